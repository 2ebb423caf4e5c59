"""`lightning-etap run` end to end: the stages, the run directory, resuming, the report, user errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_etap.cli import main
from lightning_etap.pipeline import PipelineConfig, UserError
from lightning_etap.pipeline.config import check_trainer, resolve_config

REPO = Path(__file__).resolve().parents[1]
TASKS = ["digit_1", "digit_3", "digit_7", "digit_9"]
TINY = ["--dataset", "digits", "--tasks", *TASKS, "--max-epochs", "2", "--train-groups", "4",
        "--executor", "local", "--no-progress"]


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One complete tiny run on digits (4 tasks: all 11 multi-task groups measured), with the CSV logger."""
    out = tmp_path_factory.mktemp("run") / "digits"
    code = main(["run", *TINY, "--logger", "csv", "-o", str(out)])
    assert code == 0
    return out


def _measured(run_dir: Path):
    from lightning_etap.groundtruth import GainStore, GroupGains

    with GainStore(run_dir / "gains.sqlite") as store:
        return GroupGains.from_store(store, seeds=[0]).mean_over_seeds()


# ---------------------------------------------------------------------- the run directory
@pytest.mark.slow
def test_tiny_run_writes_every_file(tiny_run):
    for name in ("config.yaml", "stages.json", "timings.json", "affinity/affinity.json", "affinity/affinity.npz",
                 "groups.json", "gains.sqlite", "predictor.json", "predictions.npz", "selection.json",
                 "report/index.html"):
        assert (tiny_run / name).is_file(), name
    stages = json.loads((tiny_run / "stages.json").read_text())
    assert list(json.loads((tiny_run / "timings.json").read_text())) == ["affinity", "gains", "predict", "select",
                                                                        "report"]
    assert set(stages) == {"affinity", "gains", "predict", "select", "report"}
    import torch

    for stage in ("affinity", "gains"):  # what the numbers depend on besides the inputs: kept with the stage
        env = stages[stage]["environment"]
        assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    page = (tiny_run / "report" / "index.html").read_text()
    assert f"Trained with torch {torch.__version__} (CPU kernels {torch.backends.cpu.get_cpu_capability()})" in page
    pngs = sorted((tiny_run / "report").glob("*.png"))
    assert {p.stem for p in pngs} == {"affinity_heatmap", "affinity_curves", "predicted_vs_measured", "selection",
                                      "timings"}
    for png in pngs:  # each file is a PNG and is embedded in the page
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png.name})" in page
    assert page.count("src=\"data:image/png;base64,") == len(pngs)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert list((tiny_run / "logs" / "csv").rglob("metrics.csv"))  # the CSV logger recorded the fit
    groups = json.loads((tiny_run / "groups.json").read_text())
    assert groups["measure_all"] is True  # 11 groups <= 127
    assert tuple(groups["train"][0]) == tuple(TASKS)  # the all-task group is always a training group
    assert len(groups["train"]) == 5 and len(groups["train"]) + len(groups["heldout"]) == 11


def _brute_force(masks, gains, budget, singleton_gain=0.0):
    """Best sum over tasks of the best gain among at most ``budget`` groups covering every task (reference)."""
    n = masks.shape[1]
    rows = [(m, np.where(m, g, -np.inf)) for m, g in zip(masks, gains) if m.sum() >= 2]
    rows += [(np.eye(n, dtype=bool)[t], np.where(np.eye(n, dtype=bool)[t], singleton_gain, -np.inf)) for t in range(n)]
    best = -np.inf
    for k in range(1, budget + 1):
        for combo in itertools.combinations(range(len(rows)), k):
            value = np.max([rows[c][1] for c in combo], axis=0)
            if np.isfinite(value).all():
                best = max(best, float(value.sum()))
    return best


@pytest.mark.slow
def test_selection_is_optimal_against_brute_force(tiny_run):
    sel = json.loads((tiny_run / "selection.json").read_text())
    with np.load(tiny_run / "predictions.npz") as data:
        candidates, predicted = data["candidates"], data["predicted"]
    measured = _measured(tiny_run)
    assert sel["complete"] and [e["budget"] for e in sel["budgets"]] == [2, 3, 4]
    for entry in sel["budgets"]:
        b = entry["budget"]
        assert len(entry["etap"]["groups"]) <= b
        assert entry["etap"]["objective"] == pytest.approx(_brute_force(candidates, predicted, b), abs=1e-9)
        optimum = _brute_force(measured.masks, measured.gains, b)
        assert entry["optimum"]["objective"] == pytest.approx(optimum, abs=1e-9)
        # ETAP's choice scored by hand with the measured gains: each task takes its best chosen group
        by_group = {tuple(g): r for r, g in enumerate(measured.groups)}
        best = {t: -np.inf for t in TASKS}
        for group in entry["etap"]["groups"]:
            for t in group:
                gain = 0.0 if len(group) == 1 else measured.gains[by_group[tuple(group)], TASKS.index(t)]
                best[t] = max(best[t], gain)
        assert entry["etap"]["measured"]["objective"] == pytest.approx(sum(best.values()), abs=1e-9)
        assert entry["gap"] == pytest.approx(optimum - sum(best.values()), abs=1e-9)
        assert entry["gap"] >= -1e-9


@pytest.mark.slow
def test_training_groups_are_cross_validated_out_of_sample(tiny_run):
    from lightning_etap.affinity import AffinityResult
    from lightning_etap.predictors import ETAPPredictor

    affinity = AffinityResult.load(tiny_run / "affinity")
    with np.load(tiny_run / "predictions.npz") as data:
        masks, gains, cv = data["train_masks"], data["train_measured"], data["train_cv"]
    i = 2  # refit without group i by hand: its cross-validated prediction must come from that model
    keep = np.arange(len(masks)) != i
    with pytest.warns(UserWarning):
        model = ETAPPredictor(affinity.matrix).fit(masks[keep], gains[keep])
    np.testing.assert_allclose(cv[i][masks[i]], model.predict(masks[i:i + 1])[0][masks[i]], rtol=1e-12)


@pytest.mark.slow
def test_rerun_skips_every_stage_and_a_new_budget_redoes_only_select_and_report(tiny_run, capsys):
    before = json.loads((tiny_run / "stages.json").read_text())
    code, out, _ = _run(["run", "-o", str(tiny_run), "--no-progress"], capsys)  # config read from the run dir
    assert code == 0 and out.count("up to date") == 5
    assert json.loads((tiny_run / "stages.json").read_text()) == before
    code, out, _ = _run(["run", "-o", str(tiny_run), "--budget", "2", "3", "--no-progress"], capsys)
    assert code == 0 and out.count("up to date") == 3
    after = json.loads((tiny_run / "stages.json").read_text())
    for stage in ("affinity", "gains", "predict"):
        assert after[stage]["token"] == before[stage]["token"]
    for stage in ("select", "report"):
        assert after[stage]["token"] != before[stage]["token"]
    assert [e["budget"] for e in json.loads((tiny_run / "selection.json").read_text())["budgets"]] == [2, 3]
    assert "budget 3: ETAP chooses" in out and "time per stage" in out
    assert f"report: {tiny_run / 'report' / 'index.html'}\n" in out
    assert "`lightning-etap affinity --force --output" in out  # the hint names the stage's own command
    # select alone leaves the page behind: the summary must not present it as current
    code, out, _ = _run(["select", "-o", str(tiny_run), "--budget", "2", "--no-progress"], capsys)
    assert code == 0 and "index.html is out of date; `lightning-etap report --output" in out
    code, out, _ = _run(["report", "-o", str(tiny_run), "--no-progress"], capsys)
    assert code == 0 and "out of date" not in out


@pytest.mark.slow
def test_resume_after_the_gains_stage_trains_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["affinity", *TINY, "-o", str(out)]) == 0
    assert main(["gains", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    import lightning_etap.training as training

    monkeypatch.setattr(training, "train_group", no_training)
    code, text, err = _run(["run", "-o", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "[1/5] affinity: up to date" in text and "[2/5] gains: up to date" in text
    assert "budget 2: ETAP chooses" in text


def _saved_affinity(folder: Path, names, matrix=None, seed=0):
    """A saved AffinityResult over ``names`` (random matrix unless given), as a user's own training writes it."""
    from lightning_etap.affinity import AffinityResult

    n = len(names)
    m = np.random.default_rng(seed).normal(size=(n, n)) if matrix is None else np.asarray(matrix, float)
    halves = np.stack([m + 0.01, m - 0.01])
    AffinityResult(tuple(names), m, m[None], [0], measured_steps=40, settings={"method": "etap"},
                   half_matrices=halves).save(folder)
    return m


@pytest.mark.slow
def test_affinity_from_a_saved_result_replaces_the_all_task_fit(tiny_run, tmp_path, capsys, monkeypatch):
    """--affinity-from: the saved result's matrix of the run's tasks (its own order and extra tasks notwithstanding)
    is the affinity stage's result; the gain store is kept; a result saved again redoes the stage."""
    from lightning_etap.affinity import AffinityResult
    from lightning_etap.predictors import ETAPPredictor

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    source = ["digit_9", "digit_0", "digit_1", "digit_7", "digit_3"]  # another order and one more task
    m = _saved_affinity(tmp_path / "mine", source)
    order = [source.index(t) for t in TASKS]

    import lightning_etap.training as training

    def no_training(*args, **kwargs):
        raise AssertionError("importing the affinity trained something")

    monkeypatch.setattr(training, "train_group", no_training)
    monkeypatch.chdir(tmp_path)  # a relative path is saved as an absolute one
    code, out, err = _run(["run", "-o", str(run), "--affinity-from", "mine", "--no-progress"], capsys)
    assert code == 0, err
    assert "no all-task fit: the affinity of 4 tasks imported from" in out and "left out: digit_0" in out
    assert "logger 'csv': nothing logged (with affinity_from there is no all-task fit" in out  # tiny_run's logger
    assert "[2/5] gains: up to date" in out and "[3/5] predict: done" in out
    got = AffinityResult.load(run / "affinity")
    assert got.task_names == tuple(TASKS) and np.array_equal(got.matrix, m[np.ix_(order, order)])
    assert got.split_half is not None and got.settings["subset_of"] == source
    record = json.loads((run / "stages.json").read_text())["affinity"]
    assert record["imported_from"] == str(tmp_path / "mine") and record["left_out"] == ["digit_0"]
    assert yaml.safe_load((run / "config.yaml").read_text())["affinity_from"] == str(tmp_path / "mine")
    assert "Imported from <code>" in (run / "report" / "index.html").read_text()
    predictor = ETAPPredictor.load(run / "predictor.json")
    off = ~np.eye(len(TASKS), dtype=bool)
    assert np.array_equal(predictor.affinity_[off], got.matrix[off])
    # up to date from another directory (the saved path is absolute) ...
    monkeypatch.chdir(REPO)
    code, out, err = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 0 and out.count("up to date") == 5, out + err
    # ... until the result is saved again
    m2 = _saved_affinity(tmp_path / "mine", source, seed=1)
    code, out, err = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 0 and "[1/5] affinity: redoing" in out and "[2/5] gains: up to date" in out, out + err
    assert np.array_equal(AffinityResult.load(run / "affinity").matrix, m2[np.ix_(order, order)])
    # 'none' goes back to the pipeline's own fit
    monkeypatch.undo()
    code, out, err = _run(["affinity", "-o", str(run), "--affinity-from", "none", "--no-progress"], capsys)
    assert code == 0 and "with the AffinityCallback" in out, out + err
    assert np.array_equal(AffinityResult.load(run / "affinity").matrix, AffinityResult.load(tiny_run / "affinity").matrix)


def test_affinity_from_a_result_saved_again_while_it_is_read_is_refused(tmp_path, capsys, monkeypatch):
    """The stage records the source's fingerprint: it must be that of what was imported, not of a newer save."""
    from lightning_etap.affinity import AffinityResult

    _saved_affinity(tmp_path / "mine", TASKS)
    real = AffinityResult.load.__func__

    def load_then_resave(cls, path):
        result = real(cls, path)
        if Path(path) == tmp_path / "mine":
            _saved_affinity(tmp_path / "mine", TASKS, seed=7)  # the training script saves again meanwhile
        return result

    monkeypatch.setattr(AffinityResult, "load", classmethod(load_then_resave))
    code, _, err = _run(["affinity", "--dataset", "digits", "--tasks", *TASKS, "--no-progress", "-o",
                         str(tmp_path / "run"), "--affinity-from", str(tmp_path / "mine")], capsys)
    assert code == 2 and "was saved again while it was read" in err, err
    stages = tmp_path / "run" / "stages.json"
    assert not stages.is_file() or "affinity" not in json.loads(stages.read_text())  # not recorded as done


def test_a_failed_import_leaves_the_run_directory_as_it_was(tmp_path, capsys):
    """A bad affinity_from (a typo, a deleted folder with --force) is refused before the stage's record is dropped:
    the run keeps its imported affinity and the later stages stay usable. The message says what the path is."""
    _saved_affinity(tmp_path / "mine", TASKS)
    run = tmp_path / "run"
    base = ["--dataset", "digits", "--tasks", *TASKS, "--no-progress", "-o", str(run)]
    assert main(["affinity", *base, "--affinity-from", str(tmp_path / "mine")]) == 0
    record = json.loads((run / "stages.json").read_text())["affinity"]
    capsys.readouterr()
    cases = [(tmp_path / "typo", "does not exist"), (tmp_path / "mine" / "affinity.json", "is a file"),
             (run, f"is a run directory; its affinity is {run / 'affinity'}")]
    for path, needle in cases:
        code, _, err = _run(["affinity", *base, "--affinity-from", str(path)], capsys)
        assert code == 2 and needle in err, err
        assert json.loads((run / "stages.json").read_text())["affinity"] == record
    shutil.rmtree(tmp_path / "mine")
    mine = ["--affinity-from", str(tmp_path / "mine")]
    code, _, err = _run(["affinity", *base, *mine, "--force"], capsys)  # re-import from a folder that is gone
    assert code == 2 and "does not exist" in err
    assert json.loads((run / "stages.json").read_text())["affinity"] == record
    code, out, _ = _run(["affinity", *base, *mine], capsys)
    assert code == 0 and "affinity: up to date" in out


def test_affinity_from_a_noisy_result_is_imported_with_a_warning(tmp_path, capsys):
    from lightning_etap.affinity import AffinityResult

    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4))
    halves = np.stack([m + rng.normal(scale=5, size=(4, 4)), m + rng.normal(scale=5, size=(4, 4))])
    noisy = AffinityResult(tuple(TASKS), m, m[None], [0], measured_steps=8, half_matrices=halves)
    assert noisy.split_half < 1 / 3
    noisy.save(tmp_path / "noisy")
    code, out, err = _run(["affinity", "--dataset", "digits", "--tasks", *TASKS, "--no-progress", "-o",
                           str(tmp_path / "run"), "--affinity-from", str(tmp_path / "noisy")], capsys)
    assert code == 0, err
    assert f"warning: two halves of its measured steps rank these tasks' pairs with Spearman {noisy.split_half:.2f}" \
        in out


def test_affinity_from_refuses_what_it_cannot_use(tmp_path, capsys):
    names = TASKS
    base = ["run", "--dataset", "digits", "--tasks", *names, "--no-progress", "-o", str(tmp_path / "run")]
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["affinity", *base[1:], "--affinity-from", str(tmp_path / "empty")], capsys)
    assert code == 2 and "holds no saved affinity result (no affinity.json)" in err and "result.save(" in err, err
    _saved_affinity(tmp_path / "three", names[:3])
    code, _, err = _run(["affinity", *base[1:], "--affinity-from", str(tmp_path / "three")], capsys)
    assert code == 2 and "has no affinity for task(s) ['digit_9']" in err, err
    m = np.ones((4, 4))
    m[1, 2] = np.nan  # digit_3 and digit_7 never measured together
    _saved_affinity(tmp_path / "gap", names, matrix=m)
    code, _, err = _run(["affinity", *base[1:], "--affinity-from", str(tmp_path / "gap")], capsys)
    assert code == 2 and "no finite affinity for digit_3->digit_7" in err and err.count("\n") == 1, err
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "affinity.json").write_text("{")
    code, _, err = _run(["affinity", *base[1:], "--affinity-from", str(tmp_path / "damaged")], capsys)
    assert code == 2 and "cannot read the affinity result in" in err, err
    cfg = tmp_path / "both.yaml"
    cfg.write_text(f"dataset: digits\naffinity: {{method: tag}}\naffinity_from: {tmp_path / 'gap'}\n")
    code, _, err = _run(["run", "-c", str(cfg), "-o", str(tmp_path / "r2")], capsys)
    assert code == 2 and "give one of the two" in err, err

def test_an_imported_affinity_outlives_its_source_folder(tmp_path, capsys):
    """The run keeps its own copy of the imported affinity: the source folder moved away (deleted, or the run
    directory copied to another machine) leaves the stage up to date; saving it again redoes the stage, and the
    message says why."""
    from lightning_etap.pipeline.rundir import RunDirectory

    run, source = tmp_path / "run", tmp_path / "mine"
    _saved_affinity(source, TASKS)
    base = ["--dataset", "digits", "--tasks", *TASKS, "--max-epochs", "1", "--no-progress", "-o", str(run)]
    code, out, err = _run(["affinity", *base, "--affinity-from", str(source)], capsys)
    assert code == 0 and "imported from" in out, out + err
    source.rename(tmp_path / "moved")
    code, out, err = _run(["affinity", "-o", str(run), "--no-progress"], capsys)
    assert code == 0 and "affinity: up to date" in out, out + err
    (tmp_path / "moved").rename(source)
    _saved_affinity(source, TASKS, seed=1)
    code, out, err = _run(["affinity", "-o", str(run), "--no-progress"], capsys)
    assert code == 0 and f"redoing (the result in affinity_from {source} was saved again)" in out, out + err
    # back to the pipeline's own fit: the reason names the setting
    back = resolve_config(None, {"output": str(run), "affinity_from": None})
    assert RunDirectory(run).stale_reason("affinity", back) == "config affinity_from"


def test_affinity_from_into_a_run_created_with_affinity_options_names_the_way_out(tmp_path, capsys):
    """The 'affinity' options came from the run directory's config.yaml, not from this command: the error says
    that the directory keeps them and to import into another --output."""
    from lightning_etap.pipeline.stages import Pipeline

    run, source = tmp_path / "run", tmp_path / "mine"
    _saved_affinity(source, TASKS)
    Pipeline(PipelineConfig(dataset="digits", tasks=TASKS, affinity={"method": "tag"}, output=str(run)),
             progress=False).open()
    code, _, err = _run(["affinity", "-o", str(run), "--affinity-from", str(source), "--no-progress"], capsys)
    assert code == 2 and "give one of the two" in err and "import into another --output" in err, err



@pytest.mark.slow
def test_active_sampling_trains_the_groups_active_etap_chooses(tiny_run, tmp_path, capsys):
    """--sampling active: the training groups are active ETAP's choices, the same a search with the same settings
    makes on an oracle holding the run's own measurements; the gains stage then reads the affinity stage."""
    from lightning_etap.affinity import AffinityResult
    from lightning_etap.predictors import BayesianETAPPredictor
    from lightning_etap.search import OracleTrainer, active_etap_search

    stages = json.loads((tiny_run / "stages.json").read_text())
    assert "sampling" not in stages["gains"]["inputs"]["config"]  # the default: run directories stay up to date
    assert "affinity" not in stages["gains"]["inputs"]["upstream"]
    out = tmp_path / "active"
    code, text, err = _run(["run", *TINY, "--sampling", "active", "-o", str(out)], capsys)
    assert code == 0, err
    assert "chosen one at a time by active ETAP" in text and "training groups chosen by active ETAP" in text
    groups = json.loads((out / "groups.json").read_text())
    train = [tuple(g) for g in groups["train"]]
    assert groups["sampling"] == "active" and len(train) == 5 and train[0] == tuple(TASKS)
    assert len(set(train)) == 5 and len(groups["heldout"]) == 11 - 5
    # the reference: the search itself, on an oracle answering with the losses this run measured
    oracle = OracleTrainer(_measured(out))
    affinity = AffinityResult.load(out / "affinity")
    ref = active_etap_search(oracle, 5, predictor=BayesianETAPPredictor(affinity.matrix, task_names=TASKS),
                             budget=4, store=tmp_path / "ref.sqlite", objective="gain", random_state=0,
                             task_names=TASKS)
    assert [tuple(g) for g in ref.trained] == train
    record = json.loads((out / "stages.json").read_text())["gains"]
    assert record["search"]["groups"] == [list(g) for g in ref.groups] and record["search"]["budget"] == 4
    assert record["inputs"]["config"]["sampling"] == "active" and "affinity" in record["inputs"]["upstream"]
    page = (out / "report" / "index.html").read_text()
    assert "Active ETAP chose the training groups" in page and "active ETAP&#x27;s groups" in page
    assert page.index("<th>active ETAP&#x27;s groups</th>") < page.index("<th>ETAP&#x27;s groups</th>")  # first
    # per budget, its choice is the best grouping of trained groups (brute force over them), scored as measured
    measured = _measured(out)
    rows = [r for r, g in enumerate(measured.groups) if tuple(g) in set(train)]
    sel = json.loads((out / "selection.json").read_text())
    for entry in sel["budgets"]:
        best = _brute_force(measured.masks[rows], measured.gains[rows], entry["budget"])
        assert entry["active"]["objective"] == pytest.approx(best, abs=1e-9)
        assert entry["active"]["measured"]["objective"] == pytest.approx(best, abs=1e-9)
        assert all(len(g) == 1 or tuple(g) in set(train) for g in entry["active"]["groups"])
        assert entry["active_gap"] == pytest.approx(entry["optimum"]["objective"] - best, abs=1e-9)
    assert "active ETAP chooses" in text and "ETAP predicting every group chooses" in text
    from lightning_etap.pipeline.report import selection_panels  # the figure shows active ETAP's choice first

    assert selection_panels(sel) == ["active", "etap", "optimum"]
    assert selection_panels(json.loads((tiny_run / "selection.json").read_text())) == ["etap", "optimum"]
    # a new affinity makes the actively chosen groups out of date (a random draw does not depend on it), and so
    # does another largest budget or singleton gain (the search's objective); another smaller budget does not
    assert main(["affinity", "-o", str(out), "--force", "--no-progress"]) == 0
    capsys.readouterr()
    code, text, err = _run(["gains", "-o", str(out), "--no-progress"], capsys)
    assert code == 0 and "gains: redoing (stage affinity redone)" in text, text + err
    assert ("group trainings of these seeds already in the store, not trained again (a resumed search with the "
            "same seeds makes the same choices)") in text
    code, text, err = _run(["run", "-o", str(out), "--budget", "3", "4", "--no-progress"], capsys)
    assert code == 0 and "[2/5] gains: up to date" in text, text + err
    code, text, err = _run(["run", "-o", str(out), "--budget", "2", "3", "--no-progress"], capsys)
    assert code == 0 and "[2/5] gains: redoing (active sampling's largest budget)" in text, text + err
    # switched from random sampling: the gains stage now reads the affinity, which was not redone
    other = tmp_path / "switched"
    shutil.copytree(tiny_run, other)
    code, text, err = _run(["run", "-o", str(other), "--sampling", "active", "--no-progress"], capsys)
    assert code == 0 and "[2/5] gains: redoing (config sampling)" in text, text + err


@pytest.mark.slow
def test_without_matplotlib_the_report_has_its_tables_and_is_redone_once_it_is_installed(tiny_run, tmp_path, capsys,
                                                                                         monkeypatch):
    """A plain install (no plot extra) finishes the run: the report without figures, the summary printed; with
    matplotlib installed afterwards the next run redoes the report with them."""
    import lightning_etap.pipeline.report as report

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(report, "has_figures", lambda: False)
    # a report made with its figures stays up to date without matplotlib: redoing it would only drop them
    code, out, err = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 0 and out.count("up to date") == 5, out + err
    assert len(list((run / "report").glob("*.png"))) == 5
    # until its inputs change (here: the record of a report never made, as after an interrupted first run)
    state = json.loads((run / "stages.json").read_text())
    del state["report"]
    (run / "stages.json").write_text(json.dumps(state))
    code, out, err = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert "[5/5] report: redoing" not in out and "no figures: they need matplotlib" in out
    assert "budget 2: ETAP chooses" in out  # the summary
    page = (run / "report" / "index.html").read_text()
    assert "This page has no figures" in page and "<img" not in page and "The chosen groups" in page
    assert not list((run / "report").glob("*.png")) and (run / "report" / "quality.json").is_file()
    code, out, _ = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 0 and out.count("up to date") == 5
    monkeypatch.undo()
    code, out, err = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 0 and "[5/5] report: redoing (matplotlib is installed now: the figures)" in out, out + err
    page = (run / "report" / "index.html").read_text()
    assert "no figures" not in page and page.count("<img") == 5


@pytest.mark.parametrize("option, needle", [
    (["--executor", "ray"], "executor 'ray' needs Ray: pip install 'lightning-etap[ray]'"),
    (["--logger", "wandb"], "logger 'wandb' needs wandb: pip install 'lightning-etap[wandb]'"),
    (["--logger", "tensorboard"], "logger 'tensorboard' needs tensorboard"),
])
def test_a_missing_package_is_refused_before_the_first_stage(option, needle, tmp_path, capsys, monkeypatch):
    """Without Ray / wandb / tensorboard installed, the run stops before the all-task fit, and makes no logs/."""
    import importlib.util

    real = importlib.util.find_spec
    missing = {"ray", "wandb", "tensorboard", "tensorboardX"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    out = tmp_path / "run"
    code, _, err = _run(["run", *TINY, *option, "-o", str(out)], capsys)
    assert code == 2 and needle in err, err
    assert not (out / "affinity").exists() and not (out / "logs").exists()


@pytest.mark.slow
def test_a_missing_ray_is_refused_before_gains_force_deletes_the_store(tiny_run, tmp_path, capsys, monkeypatch):
    """A one-stage command checks too: `gains --force --executor ray` without Ray keeps the store and the record
    (it deleted every stored training, then said Ray was missing)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as without it
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "stages.json").read_text())["gains"]
    code, out, err = _run(["gains", "-o", str(run), "--force", "--executor", "ray", "--no-progress"], capsys)
    assert code == 2 and "executor 'ray' needs Ray" in err, out + err
    assert "deleting" not in out and (run / "gains.sqlite").is_file()
    assert json.loads((run / "stages.json").read_text())["gains"] == before


@pytest.mark.slow
def test_an_imported_affinity_needs_no_logger_package(tiny_run, tmp_path, capsys, monkeypatch):
    """With affinity_from there is no all-task fit to log (nor a run for the report's figures): a logger whose
    package is missing is not refused (it was, by the early check, though nothing would use it)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    code, _, err = _run(["run", *TINY, "--affinity-from", str(tiny_run / "affinity"), "--logger", "wandb",
                         "-o", str(out)], capsys)
    assert code == 0, err
    assert not (out / "logs").exists()


@pytest.mark.slow
def test_a_rerun_gains_stage_says_how_many_jobs_the_store_already_holds(tiny_run, tmp_path, capsys, monkeypatch):
    """After an interruption the gains stage runs again: it says which jobs the store holds (and trains none)."""
    import lightning_etap.training as training

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = json.loads((run / "stages.json").read_text())
    del state["gains"]  # as if the stage had been interrupted after its last job
    (run / "stages.json").write_text(json.dumps(state))

    def no_training(*args, **kwargs):
        raise AssertionError("a stored job was trained again")

    monkeypatch.setattr(training, "train_group", no_training)
    code, out, err = _run(["gains", "-o", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert "; 5 of 5 group trainings already in the store, not trained again" in out  # the training groups
    assert "; 6 of 6 group trainings already in the store, not trained again" in out  # the 6 other groups


@pytest.mark.slow
def test_active_sampling_with_budget_one_says_no_training_can_change_the_answer(tmp_path, capsys):
    code, out, err = _run(["gains", *TINY, "--sampling", "active", "--budget", "1", "-o", str(tmp_path / "r")],
                          capsys)
    assert code == 2 and "the affinity stage has not run" in err  # active sampling reads the affinity
    assert main(["affinity", *TINY, "-o", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    code, out, err = _run(["gains", *TINY, "--sampling", "active", "--budget", "1", "-o", str(tmp_path / "r")],
                          capsys)
    assert code == 0 and "with budget 1 the only grouping is the all-task group" in out, out + err


def test_an_interrupted_redo_leaves_the_stage_to_do(tmp_path, capsys, monkeypatch):
    """A forced redo that dies after wiping the store must not leave the old "done" record behind."""
    out = tmp_path / "run"
    assert main(["affinity", *TINY, "-o", str(out)]) == 0
    assert main(["gains", "-o", str(out), "--no-progress"]) == 0
    before = _measured(out)
    from lightning_etap.groundtruth import GainStore

    with GainStore(out / "gains.sqlite") as store:
        stored = store.counts()["done"]
    capsys.readouterr()

    import lightning_etap.groundtruth as groundtruth

    real = groundtruth.collect_gains

    def dies(*args, **kwargs):
        raise RuntimeError("killed mid-collection")

    monkeypatch.setattr(groundtruth, "collect_gains", dies)
    with pytest.raises(RuntimeError, match="killed mid-collection"):
        main(["gains", "--force", "-o", str(out), "--no-progress"])
    assert f"gains: --force: deleting the {stored} stored trainings in " in capsys.readouterr().out
    assert "gains" not in json.loads((out / "stages.json").read_text())  # not "done" over a wiped store
    monkeypatch.setattr(groundtruth, "collect_gains", real)
    code, text, err = _run(["run", "-o", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "[1/5] affinity: up to date" in text and "[2/5] gains: done" in text
    after = _measured(out)
    assert sorted(after.groups) == sorted(before.groups)


def test_interrupted_runs_count_only_for_the_same_inputs_and_a_damaged_record_is_ignored(tmp_path):
    """A fit interrupted with another first seed (its checkpoint then deleted) did not work for the result that
    finishes the stage: its time is not counted. A timings.json whose record of interrupted runs is not as this
    version writes it never crashes a stage (it hid the Ctrl-C that stopped it)."""
    from lightning_etap.pipeline.rundir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.prepare()
    first, other = PipelineConfig(dataset="digits", seeds=[0]), PipelineConfig(dataset="digits", seeds=[1])
    run.record_interrupted("affinity", other, 5.0)
    run.record_interrupted("affinity", PipelineConfig(dataset="digits", seeds=[0, 1]), 3.0)  # same first seed
    run.record_interrupted("affinity", first, 0.5)  # under a second: not kept
    run.record_stage("affinity", first, 2.0)
    timing = run.timings()["affinity"]
    assert timing["interrupted_runs"] == 1 and timing["interrupted_seconds"] == 3.0
    (tmp_path / "run" / "timings.json").write_text(json.dumps({"unfinished": {"gains": 12.5}}))  # an older format
    run.record_interrupted("gains", first, 2.0)
    run.record_stage("gains", first, 1.0)
    assert run.timings()["gains"]["interrupted_seconds"] == 2.0


def test_interrupted_runs_of_a_stage_are_counted_in_its_time(tmp_path, capsys, monkeypatch):
    """timings.json held the time of the run that finished a stage only: the hours of an interrupted ground-truth
    collection, resumed later, were missing. They are kept beside it (and dropped by a --force redo)."""
    import lightning_etap.groundtruth as groundtruth

    out = tmp_path / "run"
    assert main(["affinity", *TINY, "-o", str(out)]) == 0
    real = groundtruth.collect_gains
    calls = []

    def stops_at_the_held_out_groups(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(1.05)
            raise RuntimeError("killed mid-collection")
        return real(*args, **kwargs)

    monkeypatch.setattr(groundtruth, "collect_gains", stops_at_the_held_out_groups)
    with pytest.raises(RuntimeError, match="killed mid-collection"):
        main(["gains", "-o", str(out), "--no-progress"])
    monkeypatch.setattr(groundtruth, "collect_gains", real)
    capsys.readouterr()
    code, text, err = _run(["run", "-o", str(out), "--no-progress"], capsys)
    assert code == 0, err
    timing = json.loads((out / "timings.json").read_text())["gains"]
    assert timing["interrupted_runs"] == 1 and timing["interrupted_seconds"] >= 1.05
    assert re.search(r"gains \d+\.\ds \(\+ \d+\.\ds in 1 interrupted run\)", text), text
    assert "interrupted runs" in (out / "report" / "index.html").read_text()
    assert set(json.loads((out / "timings.json").read_text())) == {"affinity", "gains", "predict", "select",
                                                                   "report"}
    assert main(["gains", "--force", "-o", str(out), "--no-progress"]) == 0  # from scratch: earlier runs do not count
    assert "interrupted_runs" not in json.loads((out / "timings.json").read_text())["gains"]


@pytest.mark.parametrize("name, writer", [("groups.json", "gains"), ("selection.json", "select"),
                                          ("predictions.npz", "predict"), ("gains.sqlite", "gains"),
                                          ("affinity/affinity.npz", "affinity")])
def test_a_damaged_file_is_a_one_line_error_naming_it_and_the_fix(tiny_run, tmp_path, capsys, name, writer):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    path = run / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated, as a full disk or a copy cut short leaves it
    code, _, err = _run(["report", "--force", "-o", str(run), "--no-progress"], capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "cannot read" in line and name.split("/")[0] in line
    assert f"lightning-etap {writer} --force --output {run}" in line


def test_an_empty_saved_config_is_named(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "config.yaml").write_text("")
    code, _, err = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 2 and "config.yaml is empty or damaged" in err and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_during_the_affinity_fit_says_how_to_resume(tmp_path):
    """Lightning handles Ctrl-C inside a fit itself (exit status 1, nothing said); the command still says it."""
    out = tmp_path / "run"
    config = tmp_path / "long.yaml"  # a fit that early stopping does not end before the interrupt
    config.write_text(f"dataset: digits\ntasks: {TASKS}\nrecipe: {{max_epochs: 100000, patience: 100000}}\n")
    argv = [sys.executable, "-m", "lightning_etap.cli", "affinity", "-c", str(config), "--no-progress",
            "-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "all-task fit" not in line:  # the fit has started
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-2000:]
        # inside the training loop: its first epoch's checkpoint is written (a fixed sleep could land in the fit's
        # set-up on a loaded machine, where the interrupt once went unanswered for 120 s in CI)
        progress = out / "affinity_checkpoint" / "progress.json"
        deadline = time.time() + 120
        while not progress.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert progress.is_file(), "the fit wrote no checkpoint within 120 s"
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; finished work is kept" in err and "rerun the same command" in err


@pytest.mark.slow
def test_a_killed_run_resumes_without_retraining(tmp_path):
    """SIGKILL in the middle of the gains stage; the rerun trains only what was not committed."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "lightning_etap.cli", "run", "--dataset", "digits", "--tasks",
            "digit_0", "digit_2", "digit_4", "digit_6", "digit_8", "--max-epochs", "3", "--train-groups", "8",
            "--measure-all", "false", "--executor", "local", "--no-progress", "-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = out / "gains.sqlite"
    deadline = time.time() + 240
    done_before: dict = {}
    try:
        while time.time() < deadline and proc.poll() is None:
            if store.is_file():
                try:
                    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
                        rows = conn.execute("SELECT group_key, seed, created_at FROM results WHERE status='done'")
                        done_before = {(k, s): c for k, s, c in rows}
                except sqlite3.OperationalError:
                    pass
                if len(done_before) >= 4:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(done_before) >= 4, "the run finished or stalled before it could be interrupted"
    assert json.loads((out / "stages.json").read_text()).keys() == {"affinity"}  # gains never finished
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    with sqlite3.connect(store) as conn:
        rows = {(k, s): (c, a) for k, s, c, a in
                conn.execute("SELECT group_key, seed, created_at, attempts FROM results WHERE status='done'")}
    assert len(rows) == 5 + 9  # 5 single-task models, the all-task group and 8 sampled groups
    for job, created in done_before.items():
        assert rows[job] == (created, 1), f"{job} was trained again"
    assert "[1/5] affinity: up to date" in res.stdout and "[3/5] predict: done" in res.stdout


# ---------------------------------------------------------------------- the report in a real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _screenshot(browser: str, page: Path, png: Path) -> np.ndarray:
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,3000",
             page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert png.is_file(), f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr[-1500:]}"
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


@pytest.mark.slow
def test_report_renders_its_plots_in_a_headless_browser(tiny_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (CI installs Debian's chromium package in .ci/run)")
    page = tiny_run / "report" / "index.html"
    shot = _screenshot(browser, page, tmp_path / "report.png")
    # the same page with every image removed: what a page whose plots failed to render looks like
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", page.read_text()))
    empty = _screenshot(browser, bare, tmp_path / "bare.png")

    def colored(img: np.ndarray) -> np.ndarray:  # saturated pixels: heatmap cells, curves, markers
        return (img.max(axis=2) - img.min(axis=2)) > 60

    assert shot.shape[:2] == (3000, 1200)
    assert shot.std() > 20, "the screenshot is blank"
    c, e = colored(shot), colored(empty)
    assert c.sum() > 20_000 and c.sum() > 10 * e.sum(), (c.sum(), e.sum())
    rows = np.flatnonzero(c.sum(axis=1) > 50)  # plots fill tall bands of the page, not single text lines
    assert rows.size > 300, rows.size
    assert (c[:, :600].sum() > 5_000) and (c[:, 600:].sum() > 5_000)  # side-by-side panels both drawn


# ---------------------------------------------------------------------- the config
def test_yaml_config_and_options_merge_with_the_options_winning(tmp_path):
    cfg_file = tmp_path / "etap.yaml"
    cfg_file.write_text("dataset: digits\nbudgets: [3]\nrecipe: {hidden: [8]}\nseeds: [1, 2]\n")
    cfg = resolve_config(cfg_file, {"budgets": [2, 4], "output": str(tmp_path / "r")}, max_epochs=3)
    assert cfg.dataset == "digits" and cfg.preset == "digits" and cfg.budgets == [2, 4] and cfg.seeds == [1, 2]
    assert cfg.recipe == {"hidden": [8], "max_epochs": 3}
    assert PipelineConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg  # round trip


def test_default_config_is_the_ettm1_job():
    cfg = resolve_config(None, {"output": "/nonexistent-run-dir-for-test"})
    assert (cfg.dataset, cfg.preset, cfg.n_train_groups, cfg.budgets) == ("ettm1", "ettm1", 10, [2, 3, 4])
    assert cfg.measures_all(7) and not cfg.measures_all(8)
    assert resolve_config(None, {}).output == str(Path("runs") / "ettm1")


def test_the_saved_config_is_the_base_and_the_identity_must_match(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text(PipelineConfig(dataset="digits", seeds=[3], output=str(out)).resolved().to_yaml())
    assert resolve_config(None, {"output": str(out)}).seeds == [3]
    (out / "affinity").mkdir()  # something was computed with the saved settings
    code, _, err = _run(["gains", "-o", str(out), "--dataset", "ettm1"], capsys)
    assert code == 2 and "was created with other settings (dataset: 'digits' there, 'ettm1' now)" in err


@pytest.mark.slow
def test_groups_trained_for_some_of_the_seeds_only_are_left_out_and_the_report_keeps_the_selections_seeds(
        tmp_path, capsys):
    """After another first seed the old seed's draw of training groups stays in the store with that seed only:
    select and report took them in, averaged over fewer seeds (as "held-out measured groups" though none were
    measured). And a report asked for other seeds than the gains stage ran with mixed them with selection.json."""
    from lightning_etap.pipeline.report import _load
    from lightning_etap.pipeline.rundir import RunDirectory

    run = tmp_path / "run"
    assert main(["run", *TINY, "--measure-all", "false", "-o", str(run)]) == 0
    assert main(["run", "-o", str(run), "--seeds", "1", "0", "--no-progress"]) == 0
    capsys.readouterr()
    rundir = RunDirectory(run)
    groups = json.loads((run / "groups.json").read_text())
    measured = rundir.measured([1, 0])
    assert sorted(measured.groups) == sorted(tuple(g) for g in groups["train"])  # not the seed-0 draw's groups
    quality = json.loads((run / "report" / "quality.json").read_text())
    assert "heldout" not in quality  # nothing was measured beyond the training groups with both seeds
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["seeds"] = [1]  # as a later `report --seeds 1` saves it, before the gains stage is redone
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    data = _load(rundir)
    assert data["config"].seeds == [1, 0]  # the seeds selection.json was computed from
    np.testing.assert_allclose(data["measured"].gains, measured.gains)


@pytest.mark.slow
def test_seeds_added_to_a_finished_run_train_only_their_jobs(tiny_run, tmp_path, capsys, monkeypatch):
    """More seeds for a finished run were refused (a new directory and every training again). Now the all-task
    fit (seeded by the first seed) stays, the gains stage trains the new seed's jobs only, and going back to the
    first seed trains nothing and gives the first run's numbers again."""
    import lightning_etap.training as training
    from lightning_etap.groundtruth import GainStore

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, text, err = _run(["run", "-o", str(run), "--seeds", "0", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert "[1/5] affinity: up to date" in text and "gains: redoing (config seeds)" in text, text
    assert "; 5 of 10 group trainings already in the store, not trained again" in text  # seed 0 of the 5 groups
    assert "; 6 of 12 group trainings already in the store, not trained again" in text  # ... of the 6 held out
    with GainStore(run / "gains.sqlite", read_only=True) as store:
        done = store.done_jobs()
    assert {s for _, s in done} == {0, 1} and len(done) == 2 * (11 + 4)  # groups and STL, both seeds
    with GainStore(run / "gains.sqlite", read_only=True) as store:  # the selection's numbers: both seeds' mean
        found = store.outcomes([(tuple(TASKS), 0), (tuple(TASKS), 1)])
    rows = [o.test_losses for o in found.values()]
    assert len(rows) == 2
    by_hand = sum(np.mean([r[t] for r in rows]) for t in TASKS)
    selection = json.loads((run / "selection.json").read_text())
    assert selection["all_tasks"]["total_test_loss"] == pytest.approx(by_hand, rel=1e-12)

    def no_training(*args, **kwargs):
        raise AssertionError("a stored job was trained again")

    monkeypatch.setattr(training, "train_group", no_training)
    code, text, err = _run(["run", "-o", str(run), "--seeds", "0", "--no-progress"], capsys)
    assert code == 0, err
    assert "[1/5] affinity: up to date" in text and "gains: redoing (config seeds)" in text, text
    first, again = (json.loads((d / "selection.json").read_text()) for d in (tiny_run, run))
    assert [e["etap"]["groups"] for e in again["budgets"]] == [e["etap"]["groups"] for e in first["budgets"]]
    assert [e["optimum"]["objective"] for e in again["budgets"]] == [e["optimum"]["objective"]
                                                                   for e in first["budgets"]]
    state = json.loads((run / "stages.json").read_text())
    state["affinity"]["inputs"]["config"]["seeds"] = [0, 1]  # as earlier versions stored it: every seed
    (run / "stages.json").write_text(json.dumps(state))
    code, text, err = _run(["affinity", "-o", str(run), "--seeds", "0", "--no-progress"], capsys)
    assert code == 0 and "affinity: up to date" in text, text + err  # an upgrade does not redo the all-task fit
    monkeypatch.undo()
    code, text, err = _run(["affinity", "-o", str(run), "--seeds", "1", "--no-progress"], capsys)
    assert code == 0 and "affinity: redoing (config seeds)" in text, text + err  # another first seed: another fit


def test_a_mapping_in_the_file_replaces_the_saved_one(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    saved = PipelineConfig(dataset="digits", predictor={"stage1": "affine"}, recipe={"hidden": [8], "max_epochs": 3},
                           output=str(out))
    (out / "config.yaml").write_text(saved.resolved().to_yaml())
    back = tmp_path / "back.yaml"
    back.write_text("dataset: digits\npredictor: {}\nrecipe: {hidden: [8]}\n")  # back to the defaults
    cfg = resolve_config(back, {"output": str(out)})
    assert cfg.predictor == {} and cfg.recipe == {"hidden": [8]}
    assert resolve_config(None, {"output": str(out)}).predictor == {"stage1": "affine"}  # not given: the saved one


OWN = {"model": "m:build", "datamodule": "m:data", "tasks": ["a", "b", "c"]}


@pytest.mark.parametrize("trainer, needle", [
    ({"max_epoch": 8}, "lightning.Trainer has no argument 'max_epoch' (did you mean 'max_epochs'"),
    ({"max_epochs": "eight"}, "max_epochs must be int or None (lightning.Trainer's annotation), got 'eight'"),
    ({"max_epochs": True}, "max_epochs must be int or None"),
    ({"precision": "bf17"}, "precision must be 64 or 32 or 16 or 'transformer-engine'"),
    ({"callbacks": ["EarlyStopping"]}, "'callbacks' is set by the pipeline; return your callbacks from"),
    ({"logger": "csv"}, "'logger' is set by the pipeline; choose the logger with 'logger'"),
    ({"strategy": "ddp", "devices": 2}, "the pipeline trains one process per fit (strategy 'ddp', devices 2, "),
    ({"devices": [0, 1]}, "Lightning's multi-process launchers would re-run the whole command"),
    ({"strategy": "ddp_spawn"}, "Scale the ground truth with --executor processes or ray instead"),
    ({"num_nodes": 2}, "the pipeline trains one process per fit (strategy None, devices None, num_nodes 2)"),
])
def test_trainer_options_are_checked_against_the_trainer(trainer, needle, tmp_path):
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({**OWN, "trainer": trainer, "output": str(tmp_path / "r")}))
    with pytest.raises(UserError) as err:
        resolve_config(path)
    assert f"config key 'trainer' in config file {path}: " in str(err.value) and needle in str(err.value)


def test_own_model_trainer_options_that_fit_pass_and_reference_only_keys_are_refused(tmp_path):
    fine = {"max_epochs": 3, "precision": "bf16-mixed", "gradient_clip_val": 0.5, "devices": 1, "accelerator": "cpu",
            "limit_train_batches": 0.5, "val_check_interval": 1.0, "deterministic": "warn", "max_time": "00:00:05:00",
            "logger": False, "callbacks": []}  # what the pipeline sets anyway is harmless
    check_trainer(fine)
    assert PipelineConfig(**OWN, trainer=fine, code_version="abc123").resolved().trainer == fine
    # a run directory saved before the check is not locked out by it: only what a command gives is checked
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.yaml").write_text(PipelineConfig(**OWN, trainer={"max_epochs": 20.0}, output=str(out)).to_yaml())
    assert resolve_config(None, {"output": str(out)}).trainer == {"max_epochs": 20.0}
    with pytest.raises(UserError, match=r"must be a string, got the number 2498023: quote it"):
        PipelineConfig.from_dict({**OWN, "code_version": 2498023})
    with pytest.raises(UserError, match="'engine' \\('lightning'\\) chooses how the reference model trains"):
        PipelineConfig(**OWN, engine="lightning").resolved()
    with pytest.raises(UserError, match="'code_version' labels your own 'model'"):
        PipelineConfig(dataset="digits", code_version="v2").resolved()


def test_a_run_directory_with_nothing_computed_takes_new_settings(tmp_path):
    from lightning_etap.pipeline.rundir import RunDirectory

    run = RunDirectory(tmp_path / "r")
    run.prepare()
    run.save_config(PipelineConfig(**OWN, trainer={"max_epoch": 8}, output=str(run.path)))  # a failed first run
    fixed = PipelineConfig(**OWN, trainer={"max_epochs": 8}, output=str(run.path))
    run.check_config(fixed)  # nothing computed with the old settings: no refusal
    run.affinity_dir.mkdir()  # once something is computed, the settings are the directory's
    with pytest.raises(UserError, match=r"other settings \(trainer.max_epoch: 8 there, unset now; "
                                        r"trainer.max_epochs: unset there, 8 now\); give the same settings"):
        run.check_config(fixed)
    run.affinity_dir.rmdir()
    run.affinity_checkpoint_dir.mkdir()  # a half-done affinity fit counts as computed too
    with pytest.raises(UserError, match="was created with other settings"):
        run.check_config(fixed)
    run.affinity_checkpoint_dir.rmdir()
    run.save_config(fixed)
    run.check_config(dataclasses.replace(fixed, code_version="v2"))
    run.record_stage("affinity", fixed, 1.0)
    with pytest.raises(UserError, match="code_version: None there, 'v2' now"):
        run.check_config(dataclasses.replace(fixed, code_version="v2"))
    assert "code_version" not in json.loads(run.state_path.read_text())["affinity"]["inputs"]["config"]


# ---------------------------------------------------------------------- user errors: one line each
@pytest.fixture()
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: digits\nbudgett: 3\n")
    return path


@pytest.fixture()
def broken_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset: [digits\n")
    return path


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of chemical, digits"),
        (["run", "-c", "{bad_yaml}"], "unknown config key 'budgett' in config file"),
        (["run", "-c", "{broken_yaml}"], "is not valid YAML (line 2"),
        (["run", "-c", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml does not exist"),
        (["run", "--dataset", "digits", "--data-root", "{tmp}/no-such-dir"], "data root {tmp}/no-such-dir does not"),
        (["run", "--dataset", "digits", "--budget", "0"], "budget must be >= 1"),
        (["run", "--dataset", "digits", "--budget", "two"], "argument --budget: invalid int value: 'two'"),
        (["run", "--dataset", "digits", "-o", "{a_file}/run"], "is not writable"),
        (["run", "--dataset", "digits", "-o", "{a_file}"], "is not writable: it is a file"),
        (["run", "--dataset", "digits", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--dataset", "digits", "--tasks", "digit_42", "digit_1", "digit_2"], "unknown task(s) ['digit_42']"),
        (["run", "--dataset", "digits", "--tasks", "digit_1", "digit_2"], "needs at least 3 tasks"),
        (["run", "--dataset", "digits", "--max-epochs", "0"], "--max-epochs must be >= 1"),
        (["run", "--dataset", "digits", "--train-groups", "1"], "'n_train_groups' in the command-line options must be an integer >= 2"),
        (["run", "--dataset", "digits", "--seeds", "0", "0"], "'seeds' in the command-line options lists a seed twice"),
        (["predict", "--dataset", "digits"], "the affinity stage has not run; predict needs it"),
        (["report", "--dataset", "digits"], "the affinity stage has not run; report needs it"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch, bad_yaml, broken_yaml, a_file):
    monkeypatch.chdir(tmp_path)  # default run directories land here
    fill = {"bad_yaml": bad_yaml, "broken_yaml": broken_yaml, "a_file": a_file, "tmp": tmp_path}
    argv = [a.format(**fill) for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    err = err.strip()
    assert err.startswith("lightning-etap: error: ")
    assert needle.format(**fill) in err and "\n" not in err and "Traceback" not in err, err


def test_a_number_yaml_reads_as_a_string_is_a_number(tmp_path):
    """YAML 1.1 reads -1e8 (the released code's singleton gain, as the docs write it) as a string."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\nsingleton_gain: -1e8\nselection_time_limit: 1e1\n")
    assert yaml.safe_load(cfg.read_text())["singleton_gain"] == "-1e8"
    config = resolve_config(cfg, {"output": str(tmp_path / "r")})
    assert config.singleton_gain == -1e8 and config.selection_time_limit == 10.0
    cfg.write_text("dataset: digits\nsingleton_gain: lots\n")
    with pytest.raises(UserError, match="singleton_gain"):
        resolve_config(cfg, {"output": str(tmp_path / "r")})


def test_the_unknown_key_message_lists_the_allowed_keys(bad_yaml, capsys):
    code, _, err = _run(["run", "-c", str(bad_yaml)], capsys)
    assert code == 2 and "allowed keys: dataset, data_root," in err and "budgets" in err


def test_missing_dataset_files_are_one_line(tmp_path, capsys, monkeypatch):
    """ETTm1 absent from the data root and from the mirror: no download, one line saying how to fix it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LIGHTNING_ETAP_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LIGHTNING_ETAP_MIRROR", str(tmp_path / "mirror"))
    code, _, err = _run(["affinity", "-o", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and "ETTm1.csv" in err and err.count("\n") == 1, err
    monkeypatch.setenv("LIGHTNING_ETAP_DATA", str(tmp_path / "nowhere"))
    code, _, err = _run(["affinity", "-o", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and f"data root {tmp_path / 'nowhere'} does not exist" in err


def test_an_unknown_affinity_option_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\naffinity: {methd: tag}\n")
    code, _, err = _run(["run", "-c", str(cfg), "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown affinity option 'methd'" in err and "allowed: method, update" in err


def test_user_error_is_the_cli_error():
    from lightning_etap import cli

    assert cli.UserError is UserError


def test_help_lists_the_stages():
    res = subprocess.run([sys.executable, "-m", "lightning_etap.cli", "--help"], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "120"})
    for stage in ("run", "affinity", "gains", "predict", "select", "report", "datasets"):
        assert stage in res.stdout


def test_evaluate_selection_by_hand():
    from lightning_etap.groundtruth import GroupGains
    from lightning_etap.pipeline import evaluate_selection

    nan = np.nan
    masks = np.array([[1, 1, 0], [1, 1, 1]], dtype=bool)
    losses = np.array([[0.9, 1.2, nan], [0.95, 0.9, 1.3]])
    stl = np.array([1.0, 1.0, 1.0])
    gains = np.where(masks, (stl - losses) / stl, nan)  # eq. 1: ab -> [0.1, -0.2]; abc -> [0.05, 0.1, -0.3]
    measured = GroupGains(("a", "b", "c"), masks, losses, gains, np.array([-1, -1]), {-1: stl})
    ab_c = evaluate_selection(np.array([[1, 1, 0], [0, 0, 1]], dtype=bool), measured)
    assert ab_c["objective"] == pytest.approx(0.1 - 0.2 + 0.0)  # c alone: gain 0, its single-task loss
    assert ab_c["total_test_loss"] == pytest.approx(0.9 + 1.2 + 1.0)
    both = evaluate_selection(masks, measured)  # each task takes its better group
    assert both["task_gain"] == pytest.approx({"a": 0.1, "b": 0.1, "c": -0.3})
    assert both["total_test_loss"] == pytest.approx(0.9 + 0.9 + 1.3)
    unknown = evaluate_selection(np.array([[1, 0, 0], [0, 1, 1]], dtype=bool), measured)  # bc never trained
    assert unknown["objective"] is None and unknown["measured"] == [True, False]


def test_workers_with_ray_says_ray_sizes_itself(tmp_path, capsys):
    code, _, err = _run(["report", "--dataset", "digits", "--executor", "ray", "--workers", "3",
                         "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and "--workers sizes the processes executor; Ray uses the CPUs of its cluster" in err


WANDB_PROBE = """
import sys
from lightning_etap.pipeline import PipelineConfig, UserError
from lightning_etap.pipeline.components import Workspace
cfg = PipelineConfig(dataset="digits", logger="wandb", output=sys.argv[1]).resolved()
try:
    logger = Workspace(cfg).logger(__import__("pathlib").Path(cfg.output))
    print("mode", logger.experiment.settings.mode)
    logger.experiment.finish()
except UserError as err:
    print("UserError:", err)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "online"])
def test_the_wandb_logger_follows_wandb_mode_and_a_missing_login_is_one_line(tmp_path, mode):
    pytest.importorskip("wandb", reason="the W&B logger needs the wandb extra")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update({"WANDB_MODE": mode, "HOME": str(tmp_path), "WANDB_SILENT": "true",
                **{k: str(tmp_path / "wandb") for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                                                       "WANDB_DATA_DIR")}})
    res = subprocess.run([sys.executable, "-c", WANDB_PROBE, str(tmp_path / "run")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    if mode == "offline":  # the config's default leaves the mode to WANDB_MODE (it used to force "online")
        assert "mode offline" in res.stdout
    else:  # no API key: one line naming the fixes, before any fit starts
        assert "UserError: W&B could not start a run (No API key configured" in res.stdout
        assert "--wandb-mode offline" in res.stdout


def test_an_affinity_that_measured_nothing_stops_the_run_instead_of_grouping_on_zeros(tmp_path, capsys):
    """shared naming per-task parameters (or detached task losses) gives an all-zero matrix: the callback warned,
    and the run went on to a confident grouping built on it, with the stage recorded as done (a fixed module was
    then 'up to date'). Now the stage stops with one line, records nothing and keeps no checkpoint to resume."""
    config = tmp_path / "heads.yaml"
    config.write_text("dataset: digits\ntasks: [digit_0, digit_1, digit_2]\nshared: heads\nrecipe: {max_epochs: 2}\n")
    run = tmp_path / "run"
    assert main(["run", "-c", str(config), "--no-progress", "-o", str(run)]) == 2
    err = capsys.readouterr().err
    assert "lightning-etap: error: affinity: the all-task fit measured no interaction between the tasks" in err
    assert "shared='heads' names per-task parameters" in err
    assert not (run / "stages.json").exists() and not (run / "affinity").exists()
    assert not (run / "affinity_checkpoint").exists()


def test_own_factories_of_the_wrong_kind_or_signature_are_one_line(tmp_path, capsys, monkeypatch):
    """A model factory returning a plain nn.Module was reported as "no submodule 'encoder'"; a datamodule factory
    taking (tasks) only gave a 27-line traceback of the call."""
    (tmp_path / "wrong_factories.py").write_text(
        "import torch.nn as nn\n\ndef plain(tasks):\n    return nn.Linear(2, 2)\n\ndef one_arg(tasks):\n"
        "    return None\n")
    example = Path(__file__).resolve().parents[1] / "examples"
    shutil.copy(example / "own_module.py", tmp_path / "own_module.py")
    base = (example / "own_module.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    cases = {
        "plain": (base.replace("own_module:build_model", "wrong_factories:plain"),
                  "model 'wrong_factories:plain' returned Linear, not a lightning.LightningModule"),
        "one_arg": (base.replace("own_module:build_datamodule", "wrong_factories:one_arg"),
                    "datamodule 'wrong_factories:one_arg' is called as datamodule(tasks, seed), but it takes (tasks)"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        assert main(["affinity", "-c", f"{name}.yaml", "--no-progress", "-o", str(tmp_path / name)]) == 2
        assert f"lightning-etap: error: {message}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_logger_added_after_the_fit_says_it_logs_nothing(tiny_run, tmp_path, capsys):
    """--logger on a directory whose all-task fit ran without one: the report stage was redone and said nothing,
    though no logs/ and no run were made."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    code, out, err = _run(["report", "--force", "-o", str(run)], capsys)  # the fit logged: no such note
    assert code == 0 and "nothing logged" not in out, err
    shutil.rmtree(run / "logs")
    stages = json.loads((run / "stages.json").read_text())
    stages["affinity"]["logger"] = {}  # as if the fit had run without a logger
    (run / "stages.json").write_text(json.dumps(stages))
    code, out, err = _run(["report", "--force", "-o", str(run)], capsys)
    assert code == 0, err
    assert "logger 'csv': nothing logged: the all-task fit ran without a logger" in out
    assert not (run / "logs").exists()
    code, out, err = _run(["run", "-o", str(run)], capsys)  # every stage up to date: it still says so, once each
    assert code == 0 and "[5/5] report: up to date" in out, err
    assert out.count("logger 'csv': nothing logged: the all-task fit ran without a logger") == 2  # affinity, report


@pytest.mark.slow
def test_another_logger_than_the_fits_is_named(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)  # its fit logged with CSV
    code, out, err = _run(["run", "-o", str(run), "--logger", "tensorboard"], capsys)
    assert code == 0, err
    assert out.count("logger 'tensorboard': the all-task fit was logged with another logger (CSVLogger); the "
                     "report's figures go to a new run without the fit's curves") == 2


@pytest.mark.slow
def test_an_imported_affinity_does_not_depend_on_the_seeds(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["affinity", *TINY, "--affinity-from", str(tiny_run / "affinity"), "-o", str(out)]) == 0
    capsys.readouterr()
    code, text, err = _run(["affinity", "-o", str(out), "--seeds", "2", "--no-progress"], capsys)
    assert code == 0 and "affinity: up to date" in text, text + err


@pytest.mark.slow
def test_the_summary_cautions_when_the_predictor_does_not_follow_its_training_groups(tiny_run, monkeypatch):
    """A leave-one-out r of -0.05 per task was followed by 'ETAP chooses ..., predicted +3.25%' with no caveat."""
    import lightning_etap.pipeline.report as report
    from lightning_etap.pipeline.rundir import RunDirectory

    real = report.prediction_quality
    weak = {"task_pearson": -0.05, "group_pearson": -0.6, "n_groups": 11}
    monkeypatch.setattr(report, "prediction_quality", lambda data: {**real(data), "train_cv": {**weak}})
    text = report.terminal_summary(RunDirectory(tiny_run))
    assert "caution: ETAP's predictions barely follow the measured gains of the training groups" in text
    strong = {"task_pearson": 0.8, "group_pearson": 0.9, "n_groups": 11}
    monkeypatch.setattr(report, "prediction_quality", lambda data: {**real(data), "train_cv": {**strong}})
    assert "caution" not in report.terminal_summary(RunDirectory(tiny_run))


@pytest.mark.slow
def test_impossible_predicted_gains_are_capped_and_said(tiny_run, tmp_path, capsys, monkeypatch):
    """ETAP's linear stages extrapolated member gains beyond +100% (a loss below 0: +821% on Parkinson's) and the
    selection chased them. They are capped at +100% and the predict stage says how many there were."""
    from lightning_etap.predictors import ETAPPredictor

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    real = ETAPPredictor.predict
    monkeypatch.setattr(ETAPPredictor, "predict", lambda self, masks: real(self, masks) * 0.0 + 3.0)  # NaN stays
    code, out, err = _run(["predict", "--force", "-o", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert re.search(r"predict: \d+ predicted member gains above \+100% \(impossible: a loss below 0\) set to "
                     r"\+100%; the largest was \+\d+\.\d%", out), out
    with np.load(run / "predictions.npz") as data:
        assert np.nanmax(data["predicted"]) == 1.0 and np.nanmax(data["train_cv"]) <= 1.0


@pytest.mark.slow
def test_a_selection_stopped_by_the_time_limit_is_said_with_its_bound(tiny_run, tmp_path, capsys, monkeypatch):
    """selection.json recorded `optimal: false` for a selection stopped at selection_time_limit (School, budget 5),
    but neither the summary nor the select stage said so. Both do now, with the proven bound."""
    import lightning_etap.pipeline.report as report

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    sel = json.loads((run / "selection.json").read_text())
    record = sel["budgets"][0]["etap"]
    record["optimal"], record["bound"] = False, record["objective"] + 0.07
    (run / "selection.json").write_text(json.dumps(sel))
    real = report.prediction_quality

    def weak_groups(data):
        quality = real(data)
        quality["train_cv"]["task_pearson"], quality["train_cv"]["group_pearson"] = 0.9, 0.05
        return quality

    monkeypatch.setattr(report, "prediction_quality", weak_groups)
    code, out, err = _run(["run", "-o", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert ("note: ETAP's selection stopped at the selection time limit: not proven optimal, at most +1.75%/task "
            "below the best possible") in out, out
    assert "caution: ETAP's predictions barely follow the measured gains of the training groups it was fitted on " \
           "(per group (the groups' totals))" in out, out
