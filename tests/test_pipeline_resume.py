"""The affinity stage resumes an interrupted all-task fit from its checkpoint, to the uninterrupted numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_etap.affinity import AffinityCallback
from lightning_etap.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TASKS = ["digit_1", "digit_3", "digit_7", "digit_9"]
#: a fit with dropout (global torch random state), an epoch-wise lr schedule and early stopping that ends it
RECIPE = "{max_epochs: 30, patience: 2, lr: 0.5, dropout: 0.1, lr_decay_start: 2, lr_decay_every: 2}"


def _config(tmp_path: Path, recipe: str = RECIPE, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"dataset: digits\ntasks: {TASKS}\nrecipe: {recipe}\n")
    return path


def _affinity(run: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """affinity.json, the arrays of affinity.npz and the stage record of ``run``."""
    record = json.loads((run / "stages.json").read_text())["affinity"]
    with np.load(run / "affinity" / "affinity.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return json.loads((run / "affinity" / "affinity.json").read_text()), arrays, record


def _assert_same(a: Path, b: Path) -> None:
    json_a, arrays_a, record_a = _affinity(a)
    json_b, arrays_b, record_b = _affinity(b)
    assert json_a == json_b  # measured steps, settings, and the arrays' SHA-256
    assert arrays_a.keys() == arrays_b.keys() and "matrix" in arrays_a
    for key in arrays_a:  # bit for bit
        assert arrays_a[key].dtype == arrays_b[key].dtype and arrays_a[key].tobytes() == arrays_b[key].tobytes(), key
    assert (record_a["epochs"], record_a["measured_steps"]) == (record_b["epochs"], record_b["measured_steps"])


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(k)``: Ctrl-C at the start of the fit's epoch ``k`` (0-based), after ``k`` epochs finished."""

    def arm(epoch: int) -> None:
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == epoch:
                raise KeyboardInterrupt

        monkeypatch.setattr(AffinityCallback, "on_train_epoch_start", on_train_epoch_start, raising=False)

    return arm


def _progress(run: Path) -> dict:
    return json.loads((run / "affinity_checkpoint" / "progress.json").read_text())


@pytest.mark.slow
def test_an_interrupted_affinity_fit_resumes_to_the_uninterrupted_matrix(tmp_path, capsys, monkeypatch,
                                                                         interrupt_at):
    config = _config(tmp_path)
    argv = ["affinity", "-c", str(config), "--no-progress"]
    assert main([*argv, "-o", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "affinity_checkpoint").exists()  # deleted once the stage is done
    epochs = _affinity(tmp_path / "whole")[2]["epochs"]
    assert 4 < epochs < 30  # early stopping ended it
    capsys.readouterr()

    # Ctrl-C two epochs before early stopping ends the fit: the early-stopping count, the best weights' state,
    # the lr schedule and the random states (dropout) must all come back from the checkpoint
    cut = tmp_path / "cut"
    interrupt_at(epochs - 2)
    assert main([*argv, "-o", str(cut)]) == 130
    assert "interrupted" in capsys.readouterr().err
    progress = _progress(cut)
    assert progress["epochs"] == epochs - 2 and progress["checkpoint"] == f"epoch-{epochs - 2}.ckpt"
    assert [p.name for p in (cut / "affinity_checkpoint").glob("*.ckpt")] == [progress["checkpoint"]]
    assert not (cut / "stages.json").exists()  # the stage is not done

    monkeypatch.undo()
    assert main([*argv, "-o", str(cut)]) == 0
    out = capsys.readouterr().out
    assert out.count("resuming") == 1
    assert f"affinity: resuming the all-task fit from the end of epoch {epochs - 2} (" in out
    assert not (cut / "affinity_checkpoint").exists()
    _assert_same(tmp_path / "whole", cut)


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_is_not_resumed_and_force_deletes_it(tmp_path, capsys, monkeypatch,
                                                                            interrupt_at):
    short = "{max_epochs: 4, patience: 100}"
    assert main(["affinity", "-c", str(_config(tmp_path, short)), "--no-progress", "-o", str(tmp_path / "whole")]) == 0

    run = tmp_path / "run"
    interrupt_at(2)
    assert main(["affinity", "-c", str(_config(tmp_path, "{max_epochs: 5, patience: 100}", "other.yaml")),
                 "--no-progress", "-o", str(run)]) == 130
    assert _progress(run)["epochs"] == 2
    capsys.readouterr()
    monkeypatch.undo()
    # the same directory with another recipe: the half-done fit is computed work, so the directory keeps its
    # settings (one experiment per directory) and the checkpoint stays
    assert main(["affinity", "-c", str(_config(tmp_path, short)), "--no-progress", "-o", str(run)]) == 2
    assert "recipe.max_epochs: 5 there, 4 now" in capsys.readouterr().err
    assert _progress(run)["epochs"] == 2

    # --force: the checkpoint of the interrupted fit goes, and the fit starts again
    forced = tmp_path / "forced"
    interrupt_at(2)
    argv = ["affinity", "-c", str(_config(tmp_path, short)), "--no-progress", "-o", str(forced)]
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--force"]) == 0
    out = capsys.readouterr().out
    assert "affinity: --force: deleting the checkpoint of an interrupted all-task fit (end of epoch 2)" in out
    assert "resuming the all-task fit" not in out
    _assert_same(tmp_path / "whole", forced)


@pytest.mark.slow
def test_a_checkpoint_written_for_other_inputs_is_deleted(tmp_path, capsys, monkeypatch, interrupt_at):
    """progress.json records the stage inputs; a checkpoint whose record does not match is never resumed."""
    config = _config(tmp_path, "{max_epochs: 4, patience: 100}")
    run = tmp_path / "run"
    interrupt_at(2)
    assert main(["affinity", "-c", str(config), "--no-progress", "-o", str(run)]) == 130
    monkeypatch.undo()
    path = run / "affinity_checkpoint" / "progress.json"
    progress = json.loads(path.read_text())
    progress["inputs"]["config"]["seeds"] = [7]  # as if another experiment had left it there
    path.write_text(json.dumps(progress))
    capsys.readouterr()
    assert main(["affinity", "-c", str(config), "--no-progress", "-o", str(run)]) == 0
    out = capsys.readouterr().out
    assert "written with other settings (seeds); deleting it" in out and "resuming the all-task fit" not in out
    assert not (run / "affinity_checkpoint").exists()


def test_train_group_resumes_early_stopping_and_the_best_weights(tmp_path):
    """train_group(ckpt_path=...) from a checkpoint taken after the best epoch: the same stop, weights and losses."""
    from lightning_etap.data.digits import load_digits
    from lightning_etap.pipeline.stages import _EpochCheckpoint, _RandomStates
    from lightning_etap.training import get_preset, train_group

    class Interrupt(Callback):
        def __init__(self, epoch):
            self.epoch = epoch

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == self.epoch:
                raise RuntimeError("interrupted")

    ds = load_digits()
    cfg = get_preset("digits").replace(max_epochs=30, patience=2, lr=0.5, dropout=0.1)
    whole = train_group(ds, TASKS, cfg, 0)
    assert 0 < whole.best_epoch and whole.epochs == whole.best_epoch + 3 < 30  # stopped early
    folder = tmp_path / "ckpt"
    # interrupted one epoch before the stop: the best weights and the early-stopping count are in the checkpoint
    with pytest.raises(RuntimeError, match="interrupted"):
        train_group(ds, TASKS, cfg, 0, callbacks=[_RandomStates(), _EpochCheckpoint(folder, {}),
                                                  Interrupt(whole.epochs - 1)], enable_checkpointing=True)
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["epochs"] == whole.epochs - 1
    resumed = train_group(ds, TASKS, cfg, 0, callbacks=[_RandomStates(), _EpochCheckpoint(folder, {})],
                          enable_checkpointing=True, ckpt_path=folder / progress["checkpoint"])
    assert (resumed.best_epoch, resumed.epochs, resumed.val_loss) == (whole.best_epoch, whole.epochs, whole.val_loss)
    assert resumed.test_losses == whole.test_losses
    with pytest.raises(ValueError, match="cannot resume"):
        train_group(ds, TASKS, cfg, 0, engine="loop", ckpt_path=folder / progress["checkpoint"])


@pytest.mark.slow
def test_an_interrupted_own_module_fit_resumes_to_the_uninterrupted_matrix(tmp_path, capsys, monkeypatch,
                                                                          interrupt_at):
    """examples/own_module.py: a DataLoader shuffling with its own generator, whose state the checkpoint keeps."""
    argv = ["affinity", "-c", "own_module.yaml", "--max-epochs", "4", "--no-progress"]
    monkeypatch.chdir(EXAMPLES)
    try:
        assert main([*argv, "-o", str(tmp_path / "whole")]) == 0
        interrupt_at(2)
        assert main([*argv, "-o", str(tmp_path / "cut")]) == 130
        monkeypatch.setattr(AffinityCallback, "on_train_epoch_start", Callback.on_train_epoch_start)
        capsys.readouterr()
        assert main([*argv, "-o", str(tmp_path / "cut")]) == 0
    finally:
        sys.modules.pop("own_module", None)
    assert "affinity: resuming the all-task fit from the end of epoch 2 (" in capsys.readouterr().out
    assert not (tmp_path / "cut" / "affinity_checkpoint").exists()
    _assert_same(tmp_path / "whole", tmp_path / "cut")


def _signal_the_fit_after_two_epochs(tmp_path: Path, sig: int) -> tuple[Path, Path, int, int, str]:
    """Start ``lightning-etap affinity`` (40 epochs) in a subprocess, send it ``sig`` once two epochs are
    checkpointed; return the config, the run directory, the epochs done then, the exit code and stderr."""
    config = _config(tmp_path, "{max_epochs: 40, patience: 1000, dropout: 0.1}")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "lightning_etap.cli", "affinity", "-c", str(config), "--no-progress",
            "-o", str(run)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    progress = run / "affinity_checkpoint" / "progress.json"
    deadline = time.time() + 240
    epochs = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if progress.is_file():
                epochs = json.loads(progress.read_text())["epochs"]
                if epochs >= 2:
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    return config, run, epochs, proc.returncode, err


def _resume_and_compare(tmp_path: Path, config: Path, run: Path, capsys) -> None:
    """The rerun resumes the stopped fit and ends with the matrix of an uninterrupted fit, to the bit."""
    assert main(["affinity", "-c", str(config), "--no-progress", "-o", str(run)]) == 0
    assert "affinity: resuming the all-task fit from the end of epoch " in capsys.readouterr().out
    assert main(["affinity", "-c", str(config), "--no-progress", "-o", str(tmp_path / "whole")]) == 0
    _assert_same(tmp_path / "whole", run)


@pytest.mark.slow
def test_a_killed_affinity_fit_resumes_to_the_uninterrupted_matrix(tmp_path, capsys):
    """kill -9 in the middle of the fit (no graceful shutdown): the rerun resumes from the last complete epoch."""
    config, run, epochs, _, _ = _signal_the_fit_after_two_epochs(tmp_path, signal.SIGKILL)
    assert 2 <= epochs < 39, "the fit finished or stalled before it could be killed"
    _resume_and_compare(tmp_path, config, run, capsys)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes_to_the_uninterrupted_matrix(tmp_path, capsys):
    """A scheduler's stop (Slurm's preemption, `timeout`, `kill`) sends SIGTERM: the process used to die without
    a word (outside a fit) or with Lightning's SystemExit (inside one); it now shuts down as on Ctrl-C, says so,
    exits 143, and the rerun resumes from the last complete epoch."""
    config, run, epochs, returncode, err = _signal_the_fit_after_two_epochs(tmp_path, signal.SIGTERM)
    assert 2 <= epochs < 39, "the fit finished or stalled before it could be stopped"
    assert returncode == 143, err[-2000:]
    assert f"lightning-etap: terminated (SIGTERM); finished work is kept in {run}" in err
    _resume_and_compare(tmp_path, config, run, capsys)


@pytest.mark.parametrize("persistent", [True, False])
def test_a_resume_with_persistent_loader_workers_warns_that_their_draws_restart(tmp_path, persistent):
    """Persistent workers keep their random state across epochs, which no checkpoint holds: said at resume."""
    import warnings

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_etap.pipeline.stages import _EpochCheckpoint, _RandomStates

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(torch.randn(8, 2), batch_size=4, num_workers=1, persistent_workers=persistent)

    class Interrupt(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("interrupted")

    def fit(*extra, ckpt_path=None):
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False,
                            callbacks=[_RandomStates(), _EpochCheckpoint(folder, {}), *extra])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Tiny(), ckpt_path=ckpt_path, weights_only=False)
        return [str(w.message) for w in caught if "persistent worker" in str(w.message)]

    folder = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(Interrupt())
    progress = json.loads((folder / "progress.json").read_text())
    said = fit(ckpt_path=folder / progress["checkpoint"])
    assert len(said) == persistent and all("persistent_workers=False resumes exactly" in m for m in said)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tensorboard", "wandb", "csv"])
def test_a_resumed_fit_logs_into_the_interrupted_fits_run(tmp_path, capsys, monkeypatch, interrupt_at, kind):
    """TensorBoard and W&B: the resumed fit continues the interrupted fit's version / run, which the report
    reopens. CSV would delete the earlier rows of a reused version: a new version, the earlier one kept."""
    if kind == "wandb":
        pytest.importorskip("wandb", reason="the W&B logger needs the wandb extra")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            monkeypatch.setenv(var, str(tmp_path / "wandb"))
    run = tmp_path / "run"
    argv = ["affinity", "-c", str(_config(tmp_path, "{max_epochs: 4}")), "--no-progress", "--logger", kind,
            "-o", str(run)]
    interrupt_at(2)
    assert main(argv) == 130
    first = _progress(run)["logger"]
    monkeypatch.setattr(AffinityCallback, "on_train_epoch_start", Callback.on_train_epoch_start)
    time.sleep(1.1)  # an event file is named by the second it was opened in: a real resume comes later than this
    assert main(argv) == 0
    assert "resuming the all-task fit from the end of epoch 2" in capsys.readouterr().out
    record = _affinity(run)[2]["logger"]
    if kind == "wandb":
        assert record == first and record["id"]
        runs = sorted(p.name for p in (run / "logs" / "wandb").glob("offline-run-*"))
        # one run, two sessions (a session started in the same second gets a "-1" suffix)
        assert len(runs) == 2 and all(name.split("-")[3] == record["id"] for name in runs), runs
    elif kind == "tensorboard":
        assert record == first and record["version"] == 0
        assert [p.name for p in (run / "logs" / "tensorboard").iterdir()] == ["version_0"]
        # both sessions wrote there (a session may leave more than one file: one per writer it opens, each named
        # by the second it was opened in)
        assert len(list((run / "logs" / "tensorboard" / "version_0").glob("events.out.tfevents.*"))) >= 2
    else:
        assert (first["version"], record["version"]) == (0, 1)
        rows = (run / "logs" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
        assert len(rows) > 1  # the interrupted fit's curves are still there
