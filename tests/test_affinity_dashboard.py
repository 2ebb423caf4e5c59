"""AffinityDashboard: curves to every logger, the end-of-fit heatmap and files, W&B offline, rank zero only."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_etap.affinity.dashboard import AffinityDashboard, plot_affinity_heatmap
from lightning_etap.affinity.result import AffinityResult

TASKS = ("a", "b", "c")
HAS_TENSORBOARD = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def fake_running_matrix(step: int) -> np.ndarray:
    """A known matrix per step: entry (i, j) = 10 i + j + step / 100, diagonal NaN, one NaN entry on odd steps."""
    m = 10.0 * np.arange(3)[:, None] + np.arange(3)[None, :] + step / 100
    np.fill_diagonal(m, np.nan)
    if step % 2:
        m[2, 0] = np.nan
    return m


def final_result() -> AffinityResult:
    matrix = np.array([[0.5, -1.25, 2.0], [0.125, np.nan, -3.5], [1e-9, 7.0, -0.75]])
    epochs = np.stack([matrix / 2, matrix])
    halves = np.stack([matrix * 0.9, matrix[::-1]])  # split half: a known Spearman correlation
    return AffinityResult(TASKS, matrix, epochs, [0, 1], measured_steps=8, half_matrices=halves)


class TinyMultiTask(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.encoder(x))
        losses = {t: nn.functional.mse_loss(self.heads[t](h).squeeze(-1), y[:, k]) for k, t in enumerate(TASKS)}
        total = sum(losses.values())
        self.log("train_loss", total)
        return {"loss": total, "task_losses": losses}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 3, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)  # 8 steps per epoch


class DashboardUser(L.Callback):
    """Stands in for AffinityCallback: feeds the dashboard a known matrix at every optimizer step."""

    def __init__(self, dashboard: AffinityDashboard) -> None:
        self.dashboard = dashboard
        self.steps: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        self.steps.append(step)
        self.dashboard.log_step(trainer, TASKS, fake_running_matrix(step), step=step)

    def on_train_end(self, trainer, pl_module):
        self.dashboard.log_final(trainer, final_result())


def fit(tmp_path: Path, loggers, dashboard: AffinityDashboard, max_steps: int = 10, **trainer_kwargs):
    user = DashboardUser(dashboard)
    trainer = L.Trainer(max_steps=max_steps, logger=loggers, callbacks=[user], accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(TinyMultiTask())
    return trainer, user


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_pairs(step: int) -> dict[str, float]:
    m = fake_running_matrix(step)
    return {f"affinity/{TASKS[i]}->{TASKS[j]}": m[i, j]
            for i in range(3) for j in range(3) if i != j and np.isfinite(m[i, j])}


def assert_matrix_csv(path: Path, matrix: np.ndarray) -> None:
    rows = read_csv(path)
    assert [r["source"] for r in rows] == list(TASKS)
    got = np.array([[float(r[t]) for t in TASKS] for r in rows])
    np.testing.assert_array_equal(got, matrix)  # bit for bit, NaN where NaN


# ---------------------------------------------------------------------- CSV + TensorBoard
@pytest.mark.skipif(not HAS_TENSORBOARD, reason="TensorBoardLogger needs tensorboard or tensorboardX")
def test_curves_and_files_for_csv_and_tensorboard(tmp_path):
    csv_logger = CSVLogger(tmp_path / "csv", name="run")
    tb_logger = TensorBoardLogger(tmp_path / "tb", name="run")
    trainer, user = fit(tmp_path, [csv_logger, tb_logger], AffinityDashboard(log_every_n_steps=3),
                        max_steps=10, log_every_n_steps=3)
    assert user.steps == list(range(10))

    rows = read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    affinity_rows = [r for r in rows if r.get("affinity/a->b")]
    # Lightning's own cadence: (step + 1) % 3 == 0
    assert [int(r["step"]) for r in affinity_rows] == [2, 5, 8]
    assert {int(r["step"]) for r in rows if r.get("train_loss")} == {2, 5, 8}  # same rows as the loss
    for r in affinity_rows:
        step = int(r["step"])
        logged = {k: float(v) for k, v in r.items() if k.startswith("affinity/") and v != ""}
        assert logged.keys() == expected_pairs(step).keys()  # off-diagonal, NaN entries left out
        for k, v in expected_pairs(step).items():
            assert logged[k] == pytest.approx(v, rel=1e-12)
    assert affinity_rows[1]["affinity/c->a"] == ""  # step 5 is odd: c->a was NaN there, so not logged

    result = final_result()
    halves = [float(r["affinity/split_half"]) for r in rows if r.get("affinity/split_half")]
    assert halves == [pytest.approx(result.split_half, rel=1e-12)] and result.split_half is not None
    for logger in (csv_logger, tb_logger):
        folder = Path(logger.log_dir)
        png = folder / AffinityDashboard.HEATMAP_FILE
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert_matrix_csv(folder / AffinityDashboard.MATRIX_FILE, result.matrix)
        curves = read_csv(folder / AffinityDashboard.CURVES_FILE)
        assert len(curves) == 2 * 9
        for r in curves:
            i, j = TASKS.index(r["source"]), TASKS.index(r["target"])
            e = int(r["epoch"])
            np.testing.assert_array_equal(float(r["value"]), result.epoch_matrices[e, i, j])
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind

    # TensorBoard received the curves too (it renames '>' in a tag to '_')
    events = b"".join(p.read_bytes() for p in Path(tb_logger.log_dir).glob("events.out.tfevents.*"))
    assert all(f"affinity/{s}-_{d}".encode() in events for s in TASKS for d in TASKS if s != d)


def test_follows_trainer_frequency_and_zero_disables(tmp_path):
    csv_logger = CSVLogger(tmp_path, name="every")
    fit(tmp_path, csv_logger, AffinityDashboard(), max_steps=5, log_every_n_steps=2)
    steps = [int(r["step"]) for r in read_csv(Path(csv_logger.log_dir) / "metrics.csv") if r.get("affinity/a->b")]
    assert steps == [1, 3]

    off = CSVLogger(tmp_path, name="off")
    fit(tmp_path, off, AffinityDashboard(log_every_n_steps=0, heatmap=False), max_steps=3, log_every_n_steps=1)
    metrics = Path(off.log_dir) / "metrics.csv"
    assert "affinity/" not in metrics.read_text()
    assert not (Path(off.log_dir) / AffinityDashboard.MATRIX_FILE).exists()


def test_sparse_measurement_logs_first_step_of_each_window():
    calls = []
    trainer = SimpleNamespace(is_global_zero=True, loggers=[SimpleNamespace(log_metrics=lambda m, step: calls.append(step))])
    dashboard = AffinityDashboard(log_every_n_steps=10)
    for step in range(0, 40, 3):  # measured every third step
        dashboard.log_step(trainer, TASKS, fake_running_matrix(0), step=step)
    assert calls == [9, 21, 30, 39]  # first measured step with (step + 1) // 10 = 1, 2, 3, 4

    calls.clear()  # the same dashboard in a second fit: the step count restarts
    for step in range(12):
        dashboard.log_step(trainer, TASKS, fake_running_matrix(0), step=step)
    assert calls == [9]


def test_docstring_examples():
    import doctest

    from lightning_etap.affinity import dashboard

    outcome = doctest.testmod(dashboard)
    assert outcome.attempted > 0 and outcome.failed == 0


# ---------------------------------------------------------------------- rank zero only
def test_nonzero_rank_logs_and_writes_nothing(tmp_path):
    class Recorder:
        log_dir = str(tmp_path)

        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, metrics))

    rec = Recorder()
    trainer = SimpleNamespace(is_global_zero=False, loggers=[rec], global_step=4, log_every_n_steps=1)
    dashboard = AffinityDashboard(log_every_n_steps=1)
    for step in range(5):
        dashboard.log_step(trainer, TASKS, fake_running_matrix(step), step=step)
    dashboard.log_final(trainer, final_result())
    assert rec.calls == []
    assert list(tmp_path.iterdir()) == []

    trainer.is_global_zero = True  # the same stub on rank zero does log
    dashboard.log_step(trainer, TASKS, fake_running_matrix(5), step=5)
    dashboard.log_final(trainer, final_result())
    assert rec.calls == [(5, expected_pairs(5)), (4, {"affinity/split_half": final_result().split_half})]
    assert (tmp_path / AffinityDashboard.MATRIX_FILE).exists()


def test_no_logger_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], global_step=0, log_every_n_steps=1)
    dashboard = AffinityDashboard(log_every_n_steps=1)
    dashboard.log_step(trainer, TASKS, fake_running_matrix(0), step=0)
    dashboard.log_final(trainer, final_result())
    assert list(tmp_path.iterdir()) == []


def test_shared_log_dir_written_once_and_logger_without_dir_warns(tmp_path):
    a, b = CSVLogger(tmp_path, name="x", version=0), CSVLogger(tmp_path, name="x", version=0)
    no_dir = SimpleNamespace(log_metrics=lambda m, step: None)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[a, b, no_dir], global_step=0)
    with pytest.warns(UserWarning, match="has no log_dir"):
        AffinityDashboard().log_final(trainer, final_result())
    assert_matrix_csv(Path(a.log_dir) / AffinityDashboard.MATRIX_FILE, final_result().matrix)


def test_without_matplotlib_one_warning_and_csv_files(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    trainer = SimpleNamespace(is_global_zero=True, loggers=[CSVLogger(tmp_path, name="x")], global_step=0)
    dashboard = AffinityDashboard()
    with pytest.warns(UserWarning, match=r"heatmap was not drawn.*lightning-etap\[plot\]") as record:
        dashboard.log_final(trainer, final_result())
        dashboard.log_final(trainer, final_result())
    assert len([w for w in record if "heatmap" in str(w.message)]) == 1
    folder = Path(trainer.loggers[0].log_dir)
    assert not (folder / AffinityDashboard.HEATMAP_FILE).exists()
    assert_matrix_csv(folder / AffinityDashboard.MATRIX_FILE, final_result().matrix)
    with pytest.raises(ModuleNotFoundError, match="matplotlib"):
        plot_affinity_heatmap(final_result(), None, tmp_path / "h.png")


def test_invalid_arguments():
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="log_every_n_steps"):
            AffinityDashboard(log_every_n_steps=bad)
    with pytest.raises(ValueError, match="prefix"):
        AffinityDashboard(prefix="")
    trainer = SimpleNamespace(is_global_zero=True, loggers=[SimpleNamespace(log_metrics=lambda m, step: None)])
    with pytest.raises(ValueError, match="3x3"):
        AffinityDashboard(log_every_n_steps=1).log_step(trainer, TASKS, np.zeros((2, 2)), step=0)


# ---------------------------------------------------------------------- the heatmap itself
def test_heatmap_figure_layout(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from lightning_etap.affinity.dashboard import _heatmap_figure

    result = final_result()
    fig = _heatmap_figure(result.matrix, result.task_names)
    ax = fig.axes[0]
    assert "source" in ax.get_ylabel() and "target" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == list(TASKS)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TASKS)
    image = ax.get_images()[0]
    assert image.norm.vmin == -7.0 and image.norm.vmax == 7.0  # centred at 0, symmetric around the largest |value|
    assert image.get_array().mask.diagonal().all() and not image.get_array().mask[0, 1]  # the diagonal is grey
    assert image.get_cmap().name.startswith("RdBu")
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts[(0, 1)] == "-1.2" and texts[(2, 1)] == "7" and (1, 1) not in texts  # NaN cell unlabelled
    assert len(texts) == 8

    assert texts[(0, 0)] == "0.5"  # the diagonal keeps its value in writing
    selfish = result.matrix.copy()
    np.fill_diagonal(selfish, 250.0)  # a task's effect on itself, typically far larger than any pair's
    norm = _heatmap_figure(selfish, result.task_names).axes[0].get_images()[0].norm
    assert norm.vmax == 7.0  # the colours still span the pairs

    big = np.arange(13 * 13, dtype=float).reshape(13, 13) - 80
    assert len(_heatmap_figure(big, [f"t{i}" for i in range(13)]).axes[0].texts) == 0  # n > 12: no annotations

    path = plot_affinity_heatmap(result, None, tmp_path / "h.png", title="demo")
    assert Image.open(path).format == "PNG"
    path = plot_affinity_heatmap(result.matrix, ["x", "y", "z"], tmp_path / "h.svg")
    assert path.read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="differ"):
        plot_affinity_heatmap(result, ["x", "y", "z"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"2x2 .* shape \(3, 3\)"):
        plot_affinity_heatmap(result.matrix, ["x", "y"], tmp_path / "bad.png")


# ---------------------------------------------------------------------- W&B offline
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install 'lightning-etap[wandb]')")
def test_wandb_offline(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")

    logger = WandbLogger(save_dir=tmp_path, offline=True, project="affinity-test")
    run = logger.experiment
    logged: list[dict] = []
    original_log = run.log

    def spy(data, *args, **kwargs):  # records what reached the run, then logs it
        logged.append(dict(data))
        return original_log(data, *args, **kwargs)

    monkeypatch.setattr(run, "log", spy)
    try:
        fit(tmp_path, logger, AffinityDashboard(log_every_n_steps=4), max_steps=9, log_every_n_steps=4)
        summary = {k: run.summary[k] for k in run.summary.keys()}
        run_dir = Path(run.dir)
    finally:
        wandb.finish()

    curves = [d for d in logged if "affinity/a->b" in d]
    assert [d["trainer/global_step"] for d in curves] == [3, 7]
    for d in curves:
        step = d["trainer/global_step"]
        assert {k: v for k, v in d.items() if k.startswith("affinity/")} == pytest.approx(expected_pairs(step))
    # the run's summary holds the last curve values and the table / image
    assert summary["affinity/a->b"] == pytest.approx(expected_pairs(7)["affinity/a->b"])
    assert summary["affinity/matrix"]["_type"] == "table-file"
    assert summary["affinity/heatmap"]["_type"] == "image-file"
    assert summary["affinity/split_half"] == pytest.approx(final_result().split_half)

    # the offline run folder holds the serialized table and the PNG
    tables = list(run_dir.glob("media/table/affinity/matrix*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["source", *TASKS]
    matrix = final_result().matrix
    assert [row[0] for row in table["data"]] == list(TASKS)
    got = np.array([[np.nan if v is None else v for v in row[1:]] for row in table["data"]], dtype=float)
    np.testing.assert_array_equal(got, matrix)
    images = list(run_dir.glob("media/images/affinity/heatmap*.png"))
    assert len(images) == 1 and images[0].read_bytes()[:4] == b"\x89PNG"
