"""Ground-truth collection: sampling, the store, trainers, executors, collection and the gains dataset.

Store, executor and retry logic is tested with a fake group trainer whose
losses are a known formula of (group, seed), so every expected value can be
written down independently. Real training (digits, a tiny recipe) checks the
Lightning trainers and that the executors agree.
"""

from __future__ import annotations

import csv
import doctest
import itertools
import json
import math
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from collections import Counter
from math import comb
from pathlib import Path

import numpy as np
import pytest

from lightning_etap.groundtruth import (
    CollectionError,
    FactoryGroupTrainer,
    FingerprintMismatchError,
    GainStore,
    GroupGains,
    GroupOutcome,
    GroupTrainer,
    InProcessExecutor,
    LightningGroupTrainer,
    ProcessPoolExecutor,
    collect_gains,
    plan_jobs,
    sample_groups,
)
from lightning_etap.training import TrainConfig

TINY = TrainConfig(hidden=(8,), lr=0.05, momentum=0.9, batch_size=64, max_epochs=2, patience=1)
TASKS = ("a", "b", "c", "d", "e")

# The fake trainers live in a small module written to a temporary folder, so that spawned worker
# processes and the subprocess scripts of the kill test import them without importing this file.
FAKES = '''
import os, time
from lightning_etap.groundtruth.base import GroupOutcome

TASKS = ("a", "b", "c", "d", "e")


def fake_loss(task, group, seed):
    """A known, deterministic per-task test loss of `task` trained in `group` with `seed`."""
    i = TASKS.index(task)
    others = sum(TASKS.index(t) + 1 for t in group if t != task)
    return round(0.2 + 0.1 * i + 0.01 * seed + 0.013 * others - 0.004 * (len(group) - 1) * (i % 2), 10)


class FakeTrainer:
    """Returns fake_loss for every member; can raise or kill its process for chosen groups."""

    task_names = TASKS

    def __init__(self, fail_once=(), fail_always=(), die_on=(), sleep=0.0, calls_log=None, version=1,
                 state_dir=None):
        self.fail_once = {tuple(g) for g in fail_once}
        self.fail_always = {tuple(g) for g in fail_always}
        self.die_on = {tuple(g) for g in die_on}
        self.sleep, self.calls_log, self.version, self.state_dir = sleep, calls_log, version, state_dir
        self.calls = []      # (group, seed) per job, in this process
        self.chunks = []     # the jobs of every train() call, in this process
        self._failed = set()

    def _first_failure(self, group, seed):
        # With state_dir, "once" holds across processes (each worker has its own copy of the trainer).
        if self.state_dir is None:
            first = (group, seed) not in self._failed
            self._failed.add((group, seed))
            return first
        marker = os.path.join(self.state_dir, f"failed-{'_'.join(group)}-{seed}")
        if os.path.exists(marker):
            return False
        open(marker, "w").close()
        return True

    def fingerprint(self):
        return {"trainer": "fake", "version": self.version, "tasks": list(TASKS)}

    def train(self, jobs):
        self.chunks.append(list(jobs))
        out = []
        for group, seed in jobs:
            group = tuple(group)
            self.calls.append((group, seed))
            if self.calls_log:
                with open(self.calls_log, "a") as f:
                    f.write(f"{'|'.join(group)} {seed}\\n")
            if self.sleep:
                time.sleep(self.sleep)
            if group in self.die_on:
                os._exit(3)
            if group in self.fail_always or (group in self.fail_once and self._first_failure(group, seed)):
                raise RuntimeError(f"boom in {'|'.join(group)}")
            losses = {t: fake_loss(t, group, seed) for t in group}
            out.append(GroupOutcome(group, int(seed), losses, epochs=3, best_epoch=2, seconds=0.01))
        return out
'''


@pytest.fixture(scope="session")
def fakes_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fakes")
    (folder / "gt_fakes.py").write_text(FAKES)
    sys.path.insert(0, str(folder))  # spawned workers inherit the parent's sys.path
    return folder


@pytest.fixture()
def fakes(fakes_dir):
    import gt_fakes

    return gt_fakes


def run_script(body: str, fakes_dir: Path, *args, wait: bool = True, timeout: float = 180):
    """Run a small Python script (the fakes importable) in a fresh interpreter."""
    script = fakes_dir / f"script_{abs(hash(body))}.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(fakes_dir)!r})\n" + textwrap.dedent(body))
    cmd = [sys.executable, str(script), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def table(path) -> dict:
    """The store's done rows as {(group, seed): (losses, epochs)} read with plain sqlite3."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT group_key, seed, status, test_losses, epochs FROM results").fetchall()
    assert all(r[2] == "done" for r in rows)
    return {(r[0], r[1]): (json.loads(r[3]), r[4]) for r in rows}


ALL_GROUPS = [g for k in range(2, 6) for g in itertools.combinations(TASKS, k)]  # 26 groups


# ================================================================== sampling
def test_uniform_size_sampling_properties_and_determinism():
    names = [f"t{i}" for i in range(8)]
    groups = sample_groups(names, 40, min_size=2, seed=3)
    assert len(groups) == 40 and len(set(groups)) == 40
    for g in groups:
        assert 2 <= len(g) <= 8
        assert list(g) == sorted(g, key=names.index)  # canonical: dataset order
    assert sample_groups(names, 40, min_size=2, seed=3) == groups
    assert sample_groups(names, 40, min_size=2, seed=4) != groups
    with_all = sample_groups(names, 40, min_size=2, seed=3, include_all_tasks=True)
    assert with_all[0] == tuple(names) and len(with_all) == 40 and len(set(with_all)) == 40


def test_uniform_size_draws_sizes_uniformly_then_groups_uniformly():
    names = ["a", "b", "c", "d", "e", "f"]
    draws = [sample_groups(names, 1, min_size=2, seed=s)[0] for s in range(3000)]
    sizes = Counter(len(g) for g in draws)
    assert set(sizes) == {2, 3, 4, 5, 6}
    for k in range(2, 7):  # 1/5 each; binomial sd ~ 0.0073
        assert abs(sizes[k] / 3000 - 0.2) < 0.035, sizes
    pairs = Counter(g for g in draws if len(g) == 2)
    expected = sizes[2] / comb(6, 2)
    assert len(pairs) == 15 and all(abs(c - expected) < 0.6 * expected for c in pairs.values())


def test_uniform_size_can_exhaust_every_group_and_refuses_more():
    names = list("abcdef")
    every = sample_groups(names, comb(6, 2) + comb(6, 3) + comb(6, 4) + comb(6, 5) + 1, seed=1)
    brute = {g for k in range(2, 7) for g in itertools.combinations(names, k)}
    assert set(every) == brute and len(every) == len(brute) == 57
    with pytest.raises(ValueError, match="only 57 exist"):
        sample_groups(names, 58)
    big = sample_groups([f"t{i}" for i in range(40)], 60, min_size=3, max_size=20, seed=0)  # rejection path
    assert len(set(big)) == 60 and all(3 <= len(g) <= 20 for g in big)


def test_pairs_all_and_given():
    names = list("abcd")
    assert sample_groups(names, method="pairs") == list(itertools.combinations(names, 2))
    some = sample_groups(names, 3, method="pairs", seed=0)
    assert len(some) == 3 and set(some) <= set(itertools.combinations(names, 2))
    assert some == sample_groups(names, 3, method="pairs", seed=0)
    every = sample_groups(names, method="all", min_size=1)
    assert len(every) == 15 and every[:4] == [("a",), ("b",), ("c",), ("d",)]
    assert sample_groups(names, method="all", min_size=3, include_all_tasks=True) == [
        ("a", "b", "c", "d"), ("a", "b", "c"), ("a", "b", "d"), ("a", "c", "d"), ("b", "c", "d")]
    given = sample_groups(names, method="given", groups=[["d", "a"], ("b", "c", "a")])
    assert given == [("a", "d"), ("a", "b", "c")]


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope"), "unknown sampling method"),
    (dict(), "needs n_groups"),
    (dict(n_groups=3, min_size=5), "min_size"),
    (dict(n_groups=3, max_size=1), "max_size"),
    (dict(method="given"), "needs groups"),
    (dict(method="given", groups=[["a", "z"]]), "unknown task"),
    (dict(method="given", groups=[["a", "b"], ["b", "a"]]), "given twice"),
    (dict(method="given", groups=[["a", "a"]]), "listed twice"),
    (dict(method="given", groups=["ab"]), "not the string"),
    (dict(method="pairs", n_groups=7), "only 6 exist"),
    (dict(method="pairs", groups=[["a", "b"]]), "only used with method='given'"),
])
def test_sampling_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_groups(list("abcd"), **kwargs)


def test_plan_trains_every_member_stl_once_per_seed_then_groups():
    jobs = plan_jobs([("c", "a"), ("a", "b"), ("b", "a"), ("d",)], [1, 0], list("abcde"))
    singles = [(t,) for t in "abcd"]
    assert jobs == ([(g, 1) for g in singles] + [(g, 0) for g in singles]
                    + [(("a", "c"), 1), (("a", "b"), 1), (("a", "c"), 0), (("a", "b"), 0)])


# ================================================================== gains
def test_gains_are_eq1_against_the_same_seeds_stl(tmp_path, fakes):
    groups = [("a", "b"), ("b", "d", "e"), ("a", "c", "e")]
    gains = collect_gains(fakes.FakeTrainer(), groups, seeds=[0, 1], store=tmp_path / "g.sqlite",
                          progress=False)
    assert isinstance(gains, GroupGains) and len(gains) == 6
    assert gains.task_names == TASKS
    row = 0
    for group in groups:  # group-major, then seed
        for seed in (0, 1):
            assert gains.seeds[row] == seed
            assert gains.masks[row].tolist() == [t in group for t in TASKS]
            for j, t in enumerate(TASKS):
                if t in group:
                    stl, mtl = fakes.fake_loss(t, (t,), seed), fakes.fake_loss(t, group, seed)
                    assert gains.test_losses[row, j] == pytest.approx(mtl)
                    assert gains.gains[row, j] == pytest.approx((stl - mtl) / stl)
                else:
                    assert math.isnan(gains.gains[row, j]) and math.isnan(gains.test_losses[row, j])
            row += 1
    assert gains.stl_losses[1] == pytest.approx([fakes.fake_loss(t, (t,), 1) for t in TASKS])


def test_mean_over_seeds_and_seed_spread_by_hand():
    masks = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=bool)
    g = np.array([[0.1, 0.3, np.nan], [0.3, 0.1, np.nan], [np.nan, -0.2, 0.4], [np.nan, 0.0, 0.2],
                  [0.5, 0.1, -0.1], [0.1, 0.3, 0.1]])
    seeds = np.array([0, 1, 0, 1, 0, 1])
    gains = GroupGains(("x", "y", "z"), masks, np.where(masks, 1.0, np.nan), g, seeds, {})
    mean = gains.mean_over_seeds()
    assert mean.masks.tolist() == masks[[0, 2, 4]].tolist() and mean.seeds.tolist() == [-1, -1, -1]
    np.testing.assert_allclose(mean.gains, [[0.2, 0.2, np.nan], [np.nan, -0.1, 0.3], [0.3, 0.2, 0.0]],
                               atol=1e-12)
    spread = gains.seed_spread()
    np.testing.assert_allclose(spread.std[0, :2], [np.std([0.1, 0.3], ddof=1)] * 2)
    s0 = [0.1, 0.3, -0.2, 0.4, 0.5, 0.1, -0.1]
    s1 = [0.3, 0.1, 0.0, 0.2, 0.1, 0.3, 0.1]
    assert spread.noise_ceiling == pytest.approx(np.corrcoef(s0, s1)[0, 1])
    assert spread.group_noise_ceiling == pytest.approx(np.corrcoef([0.4, 0.2, 0.5], [0.4, 0.2, 0.5])[0, 1])
    with pytest.raises(ValueError, match="at least two seeds"):
        mean.seed_spread()
    assert repr(spread).startswith("SeedSpread(3 groups, seeds [0, 1]: mean std of a gain ")  # not the arrays


def test_gains_need_every_stl_run(tmp_path, fakes):
    store = GainStore(tmp_path / "g.sqlite", fakes.FakeTrainer().fingerprint(), task_names=TASKS)
    store.record(GroupOutcome(("a", "b"), 0, {"a": 0.3, "b": 0.4}))
    store.record(GroupOutcome(("a",), 0, {"a": 0.5}))
    with pytest.raises(ValueError, match=r"b \(seed 0\)"):
        store.gains(groups=[("a", "b")], seeds=[0])
    # without explicit groups, incomplete rows are left out, and said (it was silent: an empty table, then
    # "measure more groups" from the predictor)
    with pytest.warns(UserWarning, match=r"1 finished group run\(s\) left out of the gains: a\|b \(seed 0\)") as w:
        assert len(store.gains()) == 0
    assert w[0].filename == __file__  # the user's line, not the library's
    store.record(GroupOutcome(("b",), 0, {"b": 0.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.gains().gains[0, :2] == pytest.approx([0.4, 0.2])


# ================================================================== store
def test_store_refuses_a_different_fingerprint(tmp_path, fakes):
    path = tmp_path / "g.sqlite"
    fp = {"dataset": {"name": "toy", "seed": 0}, "lr": 0.1}
    store = GainStore(path, fp, task_names=TASKS)
    store.record(GroupOutcome(("a", "b"), 0, {"a": 0.3, "b": 0.4}))
    store.close()
    other = {"dataset": {"name": "toy", "seed": 1}, "lr": 0.1, "new": True}
    with pytest.raises(FingerprintMismatchError) as err:
        GainStore(path, other)
    msg = str(err.value)
    listed = [line.strip().split(":")[0] for line in msg.splitlines() if line.startswith("  ")]
    assert listed == ["dataset.seed", "new"]
    assert "new store path" in msg and "overwrite=True" in msg
    with pytest.raises(FingerprintMismatchError, match="task_names"):
        GainStore(path, fp, task_names=TASKS[::-1])
    assert len(GainStore(path, {"lr": 0.1, "dataset": {"seed": 0, "name": "toy"}})) == 1  # key order is no change
    assert len(GainStore(path, other, overwrite=True)) == 0
    assert GainStore(path).fingerprint == other  # read-only open
    with pytest.raises(FileNotFoundError):
        GainStore(tmp_path / "missing.sqlite")
    with pytest.raises(FingerprintMismatchError):  # collect_gains checks too
        collect_gains(fakes.FakeTrainer(), [("a", "b")], store=path, progress=False)


def test_store_keeps_the_first_finished_result(tmp_path):
    store = GainStore(tmp_path / "g.sqlite", {"x": 1}, task_names=TASKS)
    assert store.record_failure(("a", "b"), 0, "boom") == 1
    assert store.record_failure(("a", "b"), 0, "boom again") == 2
    assert store.record(GroupOutcome(("a", "b"), 0, {"a": 0.3, "b": 0.4}, epochs=5))
    assert not store.record(GroupOutcome(("a", "b"), 0, {"a": 9.0, "b": 9.0}))
    assert store.record_failure(("a", "b"), 0, "late failure") == 0
    (row,) = store.rows()
    assert row["status"] == "done" and row["attempts"] == 3 and row["error"] is None
    assert row["test_loss/a"] == 0.3 and math.isnan(row["test_loss/c"])
    assert store.meta["schema_version"] == 1 and store.meta["fingerprint"] == {"x": 1}
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="no test loss"):
        store.record(GroupOutcome(("a", "c"), 0, {"a": 0.3}))


def test_exports_csv_and_pandas(tmp_path, fakes):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "g.sqlite"
    gains = collect_gains(fakes.FakeTrainer(), [("a", "b"), ("c", "d", "e")], seeds=[0], store=path,
                          progress=False)
    store = GainStore(path)
    csv_path = store.to_csv(tmp_path / "jobs.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and rows[-1]["group"] == "c|d|e"
    assert float(rows[-1]["test_loss/d"]) == pytest.approx(fakes.fake_loss("d", ("c", "d", "e"), 0))
    frame = store.to_pandas()
    assert len(frame) == 7 and list(frame.columns[:4]) == ["group", "seed", "size", "status"]
    assert frame["test_loss/e"].notna().sum() == 2  # the STL run and c|d|e
    long = gains.to_pandas()
    assert len(long) == 5 and set(long.columns) >= {"group", "seed", "task", "gain", "stl_loss"}
    gains.to_csv(tmp_path / "gains.csv")
    back = pd.read_csv(tmp_path / "gains.csv")
    np.testing.assert_allclose(back["gain"], long["gain"])
    assert back["gain"].iloc[0] == pytest.approx(gains.gains[0, 0])


def test_csv_round_trip_is_exact_and_checked(tmp_path, fakes):
    path = tmp_path / "g.sqlite"
    collect_gains(fakes.FakeTrainer(), [("a", "b"), ("b", "c", "d", "e")], seeds=[0, 1], store=path,
                  progress=False)
    gains = GainStore(path).gains(include_singletons=True)
    back = GroupGains.from_csv(gains.to_csv(tmp_path / "gains.csv"))
    assert back.task_names == gains.task_names == TASKS  # inferred from the STL rows
    np.testing.assert_array_equal(back.masks, gains.masks)
    np.testing.assert_array_equal(back.seeds, gains.seeds)
    np.testing.assert_array_equal(back.test_losses, gains.test_losses)  # NaN outside members, exact floats
    np.testing.assert_array_equal(back.gains, gains.gains)
    assert set(back.stl_losses) == {0, 1}
    np.testing.assert_array_equal(back.stl_losses[1], gains.stl_losses[1])
    ordered = GroupGains.from_csv(tmp_path / "gains.csv", task_names=["e", "d", "c", "b", "a"])
    assert ordered.task_names == ("e", "d", "c", "b", "a")
    np.testing.assert_array_equal(ordered.gains, gains.gains[:, ::-1])
    with pytest.raises(ValueError, match="not in task_names"):
        GroupGains.from_csv(tmp_path / "gains.csv", task_names=["a", "b"])
    # without the STL rows the order is that of first appearance, which may not be the dataset's: said
    lines = (tmp_path / "gains.csv").read_text().splitlines()
    assert lines[0].startswith("group,size,")
    (tmp_path / "multi.csv").write_text("\n".join(line for line in lines if line.split(",")[1] != "1") + "\n")
    with pytest.warns(UserWarning, match="does not start with every task's single-task rows.*Pass task_names="):
        GroupGains.from_csv(tmp_path / "multi.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GroupGains.from_csv(tmp_path / "multi.csv", task_names=TASKS).task_names == TASKS
    stl = [line for line in lines[1:] if line.split(",")[1] == "1"]
    (tmp_path / "late.csv").write_text("\n".join([lines[0], *[x for x in lines[1:] if x not in stl], *stl]) + "\n")
    with pytest.warns(UserWarning, match="does not start with every task's single-task rows"):
        GroupGains.from_csv(tmp_path / "late.csv")  # single-task rows after the multi-task ones
    (tmp_path / "bad.csv").write_text("group,seed\na|b,0\n")
    with pytest.raises(ValueError, match="columns"):
        GroupGains.from_csv(tmp_path / "bad.csv")
    text = (tmp_path / "gains.csv").read_text().replace("a|b,2,0,a", "a|c,2,0,a", 1)
    (tmp_path / "edited.csv").write_text(text)
    with pytest.raises(ValueError, match="member tasks"):
        GroupGains.from_csv(tmp_path / "edited.csv")


# ================================================================== collection
def test_resume_skips_done_jobs(tmp_path, fakes):
    path = tmp_path / "g.sqlite"
    trainer = fakes.FakeTrainer()
    collect_gains(trainer, [("a", "b"), ("b", "c")], seeds=[0, 1], store=path, progress=False)
    assert len(trainer.calls) == 2 * (3 + 2)
    again = fakes.FakeTrainer()
    collect_gains(again, [("a", "b"), ("b", "c")], seeds=[0, 1], store=path, progress=False)
    assert again.calls == []
    more = fakes.FakeTrainer()
    collect_gains(more, [("a", "b"), ("c", "d")], seeds=[0, 1, 2], store=path, progress=False)
    expected = {(("d",), 0), (("d",), 1), (("c", "d"), 0), (("c", "d"), 1),
                (("a",), 2), (("b",), 2), (("c",), 2), (("d",), 2), (("a", "b"), 2), (("c", "d"), 2)}
    assert sorted(more.calls) == sorted(expected)


def test_failures_are_recorded_and_retried(tmp_path, fakes, caplog):
    path = tmp_path / "g.sqlite"
    trainer = fakes.FakeTrainer(fail_once=[("b", "c")], fail_always=[("a", "c")])
    with caplog.at_level("INFO", logger="lightning_etap.groundtruth"):
        with pytest.raises(CollectionError, match="1 of 6 jobs failed") as err:
            collect_gains(trainer, [("a", "b"), ("b", "c"), ("a", "c")], seeds=[0], store=path,
                          retries=2, progress=False)
    assert list(err.value.failed) == [(("a", "c"), 0)]
    assert Counter(trainer.calls)[(("b", "c"), 0)] == 2 and Counter(trainer.calls)[(("a", "c"), 0)] == 3
    rows = {r["group"]: r for r in GainStore(path).rows()}
    assert rows["b|c"]["status"] == "done" and rows["b|c"]["attempts"] == 2
    assert rows["a|c"]["status"] == "failed" and rows["a|c"]["attempts"] == 3
    assert "RuntimeError: boom in a|c" in rows["a|c"]["error"] and "Traceback" in rows["a|c"]["error"]
    assert all(rows[k]["status"] == "done" for k in ("a", "b", "c", "a|b"))
    assert any("done a|b seed 0" in m for m in caplog.messages)
    assert any("giving up" in m for m in caplog.messages)
    fixed = fakes.FakeTrainer()
    gains = collect_gains(fixed, [("a", "b"), ("b", "c"), ("a", "c")], seeds=[0], store=path, progress=False)
    assert fixed.calls == [(("a", "c"), 0)] and len(gains) == 3
    assert {r["group"]: r for r in GainStore(path).rows()}["a|c"]["attempts"] == 4


def test_a_failing_chunk_is_split_so_the_others_go_on(tmp_path, fakes):
    trainer = fakes.FakeTrainer(fail_always=[("b", "c")])
    with pytest.raises(CollectionError) as err:
        collect_gains(trainer, [("a", "b"), ("b", "c"), ("a", "c")], seeds=[0], store=tmp_path / "g.sqlite",
                      chunk_size=4, retries=1, progress=False)
    assert list(err.value.failed) == [(("b", "c"), 0)]
    assert [len(c) for c in trainer.chunks[:2]] == [4, 2]  # jobs a, b, c, a|b; then b|c, a|c (raises)
    assert all(len(c) == 1 for c in trainer.chunks[2:])  # its jobs one at a time, the bad one twice
    assert Counter(trainer.calls)[(("b", "c"), 0)] == 3
    assert GainStore(tmp_path / "g.sqlite").counts() == {"done": 5, "failed": 1}


def test_collect_with_a_store_object_and_bad_arguments(tmp_path, fakes):
    trainer = fakes.FakeTrainer()
    store = GainStore(tmp_path / "g.sqlite", trainer.fingerprint())
    gains = collect_gains(trainer, [("e", "a")], seeds=[3], store=store, progress=True)
    assert gains.groups == [("a", "e")] and store.task_names == TASKS
    with pytest.raises(ValueError, match="retries"):
        collect_gains(trainer, [("a", "b")], store=store, retries=-1)
    with pytest.raises(ValueError, match="unknown task"):
        collect_gains(trainer, [("a", "x")], store=store)
    with pytest.raises(ValueError, match="seeds is empty"):
        collect_gains(trainer, [("a", "b")], seeds=[], store=store)
    # mistakes from a user trial: each said what it was (a TypeError from inside, or silently other seeds)
    with pytest.raises(TypeError, match=r"seeds must be a list of training seeds, e.g. seeds=\[0\].*got 0"):
        collect_gains(trainer, [("a", "b")], seeds=0, store=store)
    with pytest.raises(TypeError, match=r"seeds must be a list.*got '01'"):  # was read as seeds 0 and 1
        collect_gains(trainer, [("a", "b")], seeds="01", store=store)
    with pytest.raises(TypeError, match=r"seeds must be whole numbers; got 0.5"):
        collect_gains(trainer, [("a", "b")], seeds=[0.5], store=store)
    import torch  # whole numbers of any kind still are seeds (a float column, a tensor)
    for seeds in (np.array([3.0]), torch.tensor([3]), range(3, 4)):
        assert collect_gains(trainer, [("e", "a")], seeds=seeds, store=store, progress=False).groups == [("a", "e")]
    with pytest.raises(ValueError, match=r"holds task indices \(0\); groups here are task names"):
        collect_gains(trainer, [(0, 1)], store=store)
    with pytest.raises(ValueError, match=r"not the string 'a' \(a single group given where a list of groups"):
        collect_gains(trainer, ("a", "b"), store=store)
    with pytest.raises(ValueError, match=r"groups must be a list of groups.*not the string 'ab'"):
        collect_gains(trainer, "ab", store=store)


def test_a_loss_that_is_not_a_number_fails_its_job_with_the_reason(tmp_path, caplog):
    """A trainer returning losses as strings got "Unknown format code 'g'" from the progress log, after the row
    was stored; now the job fails like a NaN loss would, with what was returned. A trainer that reports no
    time or epochs is logged without "in nans, -1 epochs"."""

    class Trainer:
        task_names = TASKS

        def fingerprint(self):
            return {"t": 1}

        def train(self, jobs):
            return [GroupOutcome(g, s, {t: "0.5" if len(g) > 1 else np.float32(0.5) for t in g}) for g, s in jobs]

    with caplog.at_level("INFO", logger="lightning_etap.groundtruth"), pytest.raises(CollectionError) as err:
        collect_gains(Trainer(), [("a", "b")], store=tmp_path / "g.sqlite", retries=0, progress=False)
    assert list(err.value.failed) == [(("a", "b"), 0)]
    assert "test loss '0.5' (str) for 'a': test losses must be numbers" in err.value.failed[(("a", "b"), 0)]
    assert GainStore(tmp_path / "g.sqlite").counts() == {"done": 2, "failed": 1}
    assert "done a seed 0: a=0.5" in caplog.messages, caplog.messages  # no "in nans, -1 epochs"


def test_two_processes_write_one_store_at_once(tmp_path, fakes_dir):
    path = tmp_path / "g.sqlite"
    body = """
        from lightning_etap.groundtruth import GainStore, GroupOutcome
        path, who = sys.argv[1], int(sys.argv[2])
        store = GainStore(path, {"x": 1}, task_names=list("abcde"))
        jobs = [(("a", "b"), s) for s in range(150)]
        if who:
            jobs = jobs[::-1]  # the other process goes the other way: every job is contended
        for group, seed in jobs:
            store.record_failure(group, seed, f"try by {who}")
            store.record(GroupOutcome(group, seed, {"a": 1.0 + who, "b": float(seed)}))
            store.record(GroupOutcome(("c",), 1000 * who + seed, {"c": 0.5}))  # uncontended
    """
    procs = [run_script(body, fakes_dir, path, who, wait=False) for who in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    store = GainStore(path)
    assert store.counts() == {"done": 450}
    rows = [r for r in store.rows() if r["group"] == "a|b"]
    assert sorted(r["seed"] for r in rows) == list(range(150))
    for r in rows:  # the first finisher won; each job counted once; both failures counted
        assert r["test_loss/b"] == r["seed"] and r["test_loss/a"] in (1.0, 2.0)
        assert 2 <= r["attempts"] <= 3


COLLECT_SCRIPT = """
    from gt_fakes import FakeTrainer
    from lightning_etap.groundtruth import collect_gains
    path, calls_log, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
    collect_gains(FakeTrainer(sleep=sleep, calls_log=calls_log), GROUPS, seeds=[0, 1], store=path, progress=False)
"""
N_JOBS = 2 * (5 + 26)


def _collect_all(path, calls_log, sleep=0.0):
    """The same collection as COLLECT_SCRIPT, in this process."""
    import gt_fakes

    return collect_gains(gt_fakes.FakeTrainer(sleep=sleep, calls_log=calls_log), ALL_GROUPS, seeds=[0, 1],
                         store=path, progress=False)


def _script(fakes_dir) -> str:
    return f"GROUPS = {ALL_GROUPS!r}\n" + textwrap.dedent(COLLECT_SCRIPT)


def _done_count(path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_for_rows(proc, path, n: int) -> None:
    deadline = time.monotonic() + 120
    while _done_count(path) < n:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the collection did not start"
        time.sleep(0.01)


def _calls(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(line.split()[0], int(line.split()[1])) for line in log.read_text().splitlines()]


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, fakes_dir):
    reference = tmp_path / "reference.sqlite"
    _collect_all(reference, None)
    expected = table(reference)
    assert len(expected) == N_JOBS

    path = tmp_path / "killed.sqlite"
    proc = run_script(_script(fakes_dir), fakes_dir, path, tmp_path / "calls1.txt", 0.05, wait=False)
    _wait_for_rows(proc, path, 12)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as conn:
        at_kill = {(r[0], r[1]): r[2:] for r in conn.execute(
            "SELECT group_key, seed, test_losses, attempts, updated_at FROM results WHERE status = 'done'")}
    assert 12 <= len(at_kill) < N_JOBS

    _collect_all(path, tmp_path / "calls2.txt")  # the rerun
    assert table(path) == expected  # same table as the uninterrupted run
    with sqlite3.connect(path) as conn:
        after = {(r[0], r[1]): r[2:] for r in conn.execute(
            "SELECT group_key, seed, test_losses, attempts, updated_at FROM results")}
    assert all(after[k] == v for k, v in at_kill.items())  # jobs finished before the kill: untouched
    second = _calls(tmp_path / "calls2.txt")
    assert len(second) == len(set(second))  # the rerun trained each job once...
    assert set(second) == set(expected) - set(at_kill)  # ...and exactly the ones not finished at the kill


@pytest.mark.slow  # the second collector imports torch at its end (for GroupGains): ~10-20 s
def test_two_collectors_on_one_store(tmp_path, fakes_dir):
    path = tmp_path / "shared.sqlite"
    proc = run_script(_script(fakes_dir), fakes_dir, path, tmp_path / "calls1.txt", 0.02, wait=False)
    _wait_for_rows(proc, path, 3)
    _collect_all(path, tmp_path / "calls2.txt", sleep=0.02)  # a second collector, in this process, meanwhile
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    reference = tmp_path / "reference.sqlite"
    _collect_all(reference, None)
    assert table(path) == table(reference)
    assert _done_count(path) == N_JOBS


# ================================================================== executors
def test_process_pool_survives_a_dying_worker(tmp_path, fakes, caplog):
    trainer = fakes.FakeTrainer(die_on=[("a", "b")])
    executor = ProcessPoolExecutor(workers=2, preload=())  # the fakes need no torch
    with pytest.raises(CollectionError) as err, caplog.at_level("WARNING", logger="lightning_etap.groundtruth"):
        collect_gains(trainer, [("a", "b"), ("b", "c"), ("c", "d")], seeds=[0], store=tmp_path / "g.sqlite",
                      executor=executor, retries=1, progress=False)
    assert "a worker process died" in caplog.text  # said when it happens, not only if a job ends failed
    assert list(err.value.failed) == [(("a", "b"), 0)]
    assert "died" in err.value.failed[(("a", "b"), 0)]
    assert GainStore(tmp_path / "g.sqlite").counts() == {"done": 6, "failed": 1}


def test_ray_executor_explains_the_missing_extra(monkeypatch):
    from lightning_etap.groundtruth import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install lightning-etap\[ray\]"):
        RayExecutor()


@pytest.mark.slow
def test_executors_agree_on_real_training(tmp_path):
    trainer = LightningGroupTrainer("digits", TINY)
    groups = [("digit_0", "digit_1"), ("digit_1", "digit_2", "digit_3"), ("digit_0", "digit_3")]
    local = collect_gains(trainer, groups, seeds=[0], store=tmp_path / "local.sqlite",
                          executor=InProcessExecutor(), progress=False)
    pool = collect_gains(trainer, groups, seeds=[0], store=tmp_path / "pool.sqlite", chunk_size=2,
                         executor=ProcessPoolExecutor(workers=2), progress=False)
    assert len(local) == 3 and np.isfinite(local.gains[local.masks]).all()
    np.testing.assert_array_equal(local.masks, pool.masks)
    np.testing.assert_allclose(local.test_losses, pool.test_losses, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(local.gains, pool.gains, rtol=1e-5, equal_nan=True)
    for t in range(4):
        assert local.stl_losses[0][t] == pytest.approx(pool.stl_losses[0][t], rel=1e-6)


# ================================================================== trainers
def test_lightning_trainer_fingerprint_and_pickling():
    trainer = LightningGroupTrainer("digits", TINY)
    assert isinstance(trainer, GroupTrainer)
    fp = trainer.fingerprint()
    assert fp["dataset"]["name"] == "digits" and fp["dataset"]["metadata"]["seed"] == 0
    assert fp["train_config"]["hidden"] == [8] and fp["library_version"]
    assert json.loads(json.dumps(fp)) == fp
    assert LightningGroupTrainer("digits", TINY).fingerprint() == fp
    assert LightningGroupTrainer("digits", TINY.replace(lr=0.1)).fingerprint() != fp
    other = LightningGroupTrainer("digits", TINY, dataset_options={"seed": 1}).fingerprint()
    assert other["dataset"]["metadata"]["seed"] == 1 and other != fp
    blob = pickle.dumps(trainer)  # the dataset is loaded (above) but never pickled
    assert len(blob) < 4000
    assert pickle.loads(blob).dataset is trainer.dataset  # one copy per process


def _digits_model(tasks):
    from lightning_etap.models import MultiTaskMLP

    return MultiTaskMLP(16, tasks, hidden=(8,), lr=0.05)


def _digits_data(tasks, seed):
    from lightning_etap.data import MultiTaskDataModule
    from lightning_etap.groundtruth.trainers import DatasetSpec

    return MultiTaskDataModule(DatasetSpec("digits").load(), tasks, batch_size=64, seed=seed)


def test_factory_trainer_contract():
    import lightning as L

    names = [f"digit_{d}" for d in range(10)]
    trainer = FactoryGroupTrainer(_digits_model, _digits_data, names, {"data": "digits"},
                                  trainer_kwargs={"max_epochs": 1})
    (a,) = trainer.train([(("digit_0", "digit_1"), 0)])
    (b,) = trainer.train([(("digit_0", "digit_1"), 0)])
    assert set(a.test_losses) == {"digit_0", "digit_1"} and a.test_losses == b.test_losses  # seeded
    assert trainer.fingerprint()["model_factory"].endswith("_digits_model")
    assert pickle.loads(pickle.dumps(trainer)).fingerprint() == trainer.fingerprint()

    class NoLosses(L.LightningModule):
        pass

    bare = FactoryGroupTrainer(lambda tasks: NoLosses(), _digits_data, names, {"x": 1})
    with pytest.raises(ValueError, match="test_losses"):
        from lightning_etap.groundtruth.trainers import module_test_losses

        module_test_losses(NoLosses(), None, ["digit_0"])
    with pytest.raises(TypeError, match="cannot be pickled"):
        next(ProcessPoolExecutor(workers=1).run(bare, [[(("digit_0",), 0)]]))
    with pytest.raises(ValueError, match="fingerprint"):
        FactoryGroupTrainer(_digits_model, _digits_data, names, {})


# ================================================================== data module
def test_group_gain_datamodule(tmp_path, fakes):
    import torch

    from lightning_etap.groundtruth import GroupGainDataModule

    trainer = fakes.FakeTrainer()
    groups = [("a", "b"), ("b", "c", "d")]
    dm = GroupGainDataModule(trainer, groups, seeds=[0, 1], store_path=tmp_path / "g.sqlite", progress=False)
    with pytest.raises(RuntimeError, match="prepare_data"):
        dm.setup("fit")
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.gains) == 2 and dm.gains.seeds.tolist() == [-1, -1]
    masks, gains = next(iter(dm.predict_dataloader()))
    assert masks.shape == gains.shape == (2, 5) and masks.dtype == torch.float32
    expected = np.mean([(fakes.fake_loss("a", ("a",), s) - fakes.fake_loss("a", ("a", "b"), s))
                        / fakes.fake_loss("a", ("a",), s) for s in (0, 1)])
    assert gains[0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert torch.isnan(gains[masks == 0]).all()
    per_seed = GroupGainDataModule(fakes.FakeTrainer(), groups, seeds=[0, 1], store_path=tmp_path / "g.sqlite",
                                   average_seeds=False, batch_size=3, progress=False)
    per_seed.prepare_data()  # nothing left to train
    per_seed.setup("fit")
    assert [b[0].shape[0] for b in per_seed.train_dataloader()] == [3, 1]
    with pytest.raises(ValueError, match="unknown task"):
        GroupGainDataModule(trainer, [("a", "q")], store_path=tmp_path / "h.sqlite")


# ================================================================== docs
@pytest.mark.parametrize("module", ["", ".sampling", ".store", ".trainers", ".datamodule"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(f"lightning_etap.groundtruth{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
