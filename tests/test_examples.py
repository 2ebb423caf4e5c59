"""The examples run (tiny settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_stl_vs_mtl_example_runs():
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / "stl_vs_mtl.py"), "--max-epochs", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("gain") == 3


def _example(name: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    res = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_own_module_example_measures_its_affinity(tmp_path):
    """It runs on a plain ``pip install lightning-etap``: pandas (an extra's package) is made unimportable."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['pandas'] = None  # import pandas fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(block), os.environ.get("PYTHONPATH")]))}
    out = _example("own_module.py", "--tiny", env=env)
    assert "AffinityResult(4 tasks" in out and "pair a+b:" in out and "group a+b+c:" in out
    assert "source \\ target" in out and len([line for line in out.splitlines() if line.startswith("d   ")]) == 1


@pytest.mark.slow
def test_own_module_affinity_from_a_ddp_fit_feeds_the_pipeline(tmp_path, capsys):
    """The DDP story end to end: the example trains under DDP (2 CPU processes) and saves the affinity on rank
    zero; the pipeline takes it with --affinity-from and runs no all-task fit of its own."""
    from lightning_etap.affinity import AffinityResult
    from lightning_etap.cli import main

    out = _example("own_module.py", "--tiny", "--devices", "2", "--save", str(tmp_path / "aff"), cwd=tmp_path,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.count("saved to") == 1 and "AffinityResult(4 tasks" in out  # rank zero only
    saved = AffinityResult.load(tmp_path / "aff")
    cwd = os.getcwd()
    os.chdir(EXAMPLES)
    try:
        code = main(["run", "-c", "own_module.yaml", "--affinity-from", str(tmp_path / "aff"), "--max-epochs", "2",
                     "--train-groups", "3", "--executor", "local", "--no-progress", "-o", str(tmp_path / "run")])
    finally:
        os.chdir(cwd)
        sys.modules.pop("own_module", None)
    text = capsys.readouterr().out
    assert code == 0 and "no all-task fit: the affinity of 4 tasks imported from" in text
    assert AffinityResult.load(tmp_path / "run" / "affinity").matrix.tolist() == saved.matrix.tolist()
    assert json.loads((tmp_path / "run" / "selection.json").read_text())["complete"]


@pytest.mark.slow
def test_own_module_config_runs_the_whole_pipeline(tmp_path, capsys, monkeypatch):
    """The README's own-module story: the YAML config beside the example, run from its folder.

    A first attempt with a misspelt ``shared`` fails in one line before any fit, and does not lock the run
    directory to its settings: the corrected config then runs in the same directory. The all-task fit runs
    with one torch thread, as the ground-truth jobs do, and the caller's thread count is restored.
    """
    import torch

    from lightning_etap.affinity import AffinityCallback
    from lightning_etap.cli import main

    threads_seen = []
    monkeypatch.setattr(AffinityCallback, "on_train_epoch_start",
                        lambda self, trainer, module: threads_seen.append(torch.get_num_threads()), raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    typo = tmp_path / "typo.yaml"
    typo.write_text((EXAMPLES / "own_module.yaml").read_text().replace("shared: encoder", "shared: encodr"))
    argv = ["--max-epochs", "2", "--train-groups", "3", "--executor", "local", "--no-progress",
            "-o", str(tmp_path / "run")]
    cwd = os.getcwd()
    os.chdir(EXAMPLES)
    try:
        assert main(["run", "-c", str(typo), *argv]) == 2
        err = capsys.readouterr().err
        assert "config key 'shared': AffinityCallback: the module has no submodule 'encodr'" in err
        assert err.count("\n") == 1 and not (tmp_path / "run" / "affinity").exists()
        code = main(["run", "-c", "own_module.yaml", *argv])
    finally:
        os.chdir(cwd)
        sys.modules.pop("own_module", None)
        after = torch.get_num_threads()
        torch.set_num_threads(before)
    assert code == 0
    assert threads_seen == [1, 1] and after == 2
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["task_names"] == ["a", "b", "c", "d"] and selection["complete"]
    assert (tmp_path / "run" / "report" / "index.html").is_file()


@pytest.mark.slow
def test_ground_truth_on_ray_example(tmp_path):
    pytest.importorskip("ray", reason="the Ray example needs the ray extra (installed in CI)")
    store = tmp_path / "gains.sqlite"
    out = _example("ground_truth_ray.py", "--tiny", "--store", str(store))
    assert "2 groups measured on Ray" in out and "digit_3 + digit_5 + digit_8" in out
    out = _example("ground_truth_ray.py", "--tiny", "--store", str(store))  # resumed: nothing trained again
    assert "2 groups measured on Ray" in out


@pytest.mark.slow
def test_wandb_dashboard_example_logs_the_report_figures(tmp_path):
    pytest.importorskip("wandb", reason="the W&B example needs the wandb extra")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(tmp_path / var.lower())
    run_dir = tmp_path / "run"
    out = _example("wandb_dashboard.py", "--tiny", "--output", str(run_dir), env=env)
    assert "budget 2: ETAP chooses" in out and "W&B run" in out
    images = {p.name.split("_")[0] for p in (run_dir / "logs").rglob("media/images/report/*.png")}
    assert {"affinity", "predicted", "selection", "timings"} <= images, sorted(images)


@pytest.mark.slow
@pytest.mark.data
def test_school_pipeline_example(shared_data, tmp_path):
    env = {**os.environ, "LIGHTNING_ETAP_DATA": str(shared_data)}
    out = _example("school_pipeline.py", "--tiny", "--output", str(tmp_path / "run"), env=env)
    assert "school, 4 tasks" in out and "budget 3: ETAP chooses" in out
