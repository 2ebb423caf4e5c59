"""The Chemical reproduction (benchmarks/reproduce_chemical.py) end to end at a tiny size, so it cannot rot.

Four real Chemical tasks, two-epoch fits, and a synthetic exhaustive ground
truth (two seeds) written as the CSV the real run reads; every stage runs,
then the selection's optimum is checked against a brute force over the
table and a rerun must come from the cache.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

from lightning_etap.groundtruth import GroupGains
from lightning_etap.groups import all_groups

TASKS = ["83", "78", "84", "85"]


def _load_script():
    return load_benchmark("reproduce_chemical")


def synthetic_truth(names, seeds=(0, 1)) -> GroupGains:
    """Every group of ``names`` with per-seed test losses from a planted pairwise structure."""
    rng = np.random.default_rng(0)
    n = len(names)
    masks = all_groups(n)
    pair = rng.normal(0.0, 0.08, (n, n))
    stl_mean = rng.uniform(0.4, 0.7, n)
    rows_m, rows_l, rows_g, rows_s, stl = [], [], [], [], {}
    for seed in seeds:
        stl[seed] = stl_mean * (1 + rng.normal(0, 0.01, n))
        for m in masks:
            idx = np.flatnonzero(m)
            gain = np.full(n, np.nan)
            loss = np.full(n, np.nan)
            for t in idx:
                others = [s for s in idx if s != t]
                g = 0.0 if not others else float(np.mean(pair[others, t])) - 0.01 * len(others) + rng.normal(0, 0.005)
                loss[t] = stl[seed][t] * (1 - g)
                gain[t] = (stl[seed][t] - loss[t]) / stl[seed][t]
            rows_m.append(m)
            rows_l.append(loss)
            rows_g.append(gain)
            rows_s.append(seed)
    return GroupGains(tuple(names), np.array(rows_m), np.array(rows_l), np.array(rows_g), np.array(rows_s), stl)


def brute_force_min_total_loss(truth: GroupGains, budget: int) -> float:
    """Smallest total test loss of at most ``budget`` groups covering every task (each task: its best group)."""
    mean = truth.mean_over_seeds()
    masks, losses = mean.masks, mean.test_losses
    best = np.inf
    for b in range(1, budget + 1):
        for combo in itertools.combinations(range(len(masks)), b):
            cover = masks[list(combo)]
            if not cover.any(axis=0).all():
                continue
            total = np.nanmin(np.where(cover, losses[list(combo)], np.nan), axis=0).sum()
            best = min(best, float(total))
    return best


def test_split_optimum_and_noise_floor(tmp_path):
    """The held-out split, the exhaustive optimum and the seed-noise floor, on a synthetic table (no training)."""
    rc = _load_script()
    truth_gains = synthetic_truth(TASKS, seeds=(0, 1, 2))
    csv = truth_gains.to_csv(tmp_path / "truth.csv")
    s = rc.Settings(out=str(tmp_path / "run"), tasks=TASKS, ground_truth=str(csv), heldout_size=4,
                    train_sizes=[3, 5], surrogate_size=5, budgets=[2, 3])
    truth = rc.load_truth(s, TASKS)
    assert truth.seeds == [0, 1, 2] and len(truth.mean) == 15
    split = rc.make_split(truth, s)
    sizes = truth.mean.masks.sum(axis=1)
    assert len(split.heldout) == 4 and not set(split.heldout) & set(split.pool)
    assert split.all_task not in split.heldout and all(sizes[split.heldout] >= 2)
    assert set(split.heldout) == set(rc.make_split(truth, s).heldout)  # fixed by its own seed
    for k in (3, 5):
        rows = rc.training_rows(split, k, seed=1)
        assert len(rows) == k + 1 and split.all_task in rows and not set(rows) & set(split.heldout)
    for b in (2, 3):
        _, loss = rc._loss_optimum(truth.mean, b, TASKS)
        assert loss == pytest.approx(brute_force_min_total_loss(truth_gains, b), rel=1e-9)
    floor = rc.seed_noise_floor(truth, [2, 3], TASKS)
    for b in ("2", "3"):
        assert len(floor[b]["gaps"]) == 3
        assert all(g >= -1e-12 for g in floor[b]["gaps"])  # nothing beats a seed's own optimum on that seed
    with pytest.raises(ValueError, match="cannot hold"):
        rc.make_split(truth, rc.Settings(tasks=TASKS, heldout_size=8, train_sizes=[5], surrogate_size=5))
    assert rc.Settings().heldout_size == 230 and rc.Settings(paper="ettm1").heldout_size == 40


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_reproduction_end_to_end_tiny(tmp_path, shared_data):
    rc = _load_script()
    truth = synthetic_truth(TASKS)
    csv = truth.to_csv(tmp_path / "truth.csv")
    settings = rc.Settings(
        out=str(tmp_path / "run"), page=str(tmp_path / "page" / "chemical.md"), data_root=str(shared_data),
        tasks=TASKS, max_epochs=2, ground_truth=str(csv), fallback_store=str(tmp_path / "absent.sqlite"),
        affinity_seeds=[0, 1], etap_every=1, tag_every=2, runtime_epochs=1, runtime_rounds=1, pcgrad_seeds=[0],
        gradtae_dim=8, gradtae_max_examples=30, heldout_size=4, heldout_seed=0, train_sizes=[3, 5],
        surrogate_size=5, prediction_seeds=[0, 1], mtgnet_epochs=20, budgets=[2, 3], selection_train_size=3,
    )
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            rc.run(settings)
            out = Path(settings.out)
            predict_mtime = (out / "predict.json").stat().st_mtime_ns
            start = time.perf_counter()
            rc.run(settings, ["affinity", "pcgrad", "predict", "select"])  # all cached
            rerun = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    # every stage left its result; the rerun trained and refitted nothing
    for name in ("runtime.json", "pcgrad/seed0.json", "gradtae/seed0.json", "predict.json", "select.json",
                 "affinity/seed0/etap/affinity.json", "affinity/seed1/tag/affinity.json", "affinity/seed0/model.npz"):
        assert (out / name).exists(), name
    assert (out / "predict.json").stat().st_mtime_ns == predict_mtime
    assert rerun < 10

    pred = json.loads((out / "predict.json").read_text())
    held = set(pred["heldout_rows"])
    assert len(held) == 4
    mean = truth.mean_over_seeds()
    n = len(TASKS)
    all_task = next(i for i, m in enumerate(mean.masks) if m.all())
    trained = [r for r in pred["records"] if r["k"] is not None]
    assert {(r["k"], r["seed"]) for r in trained} == {(k, s) for k in (3, 5) for s in (0, 1)}
    for r in trained:
        rows = r["train_rows"]
        assert not held & set(rows), "a training group is in the held-out set"
        assert all_task in rows and len(rows) == r["k"] + 1
        assert all(mean.masks[i].sum() >= 2 for i in rows)
    # the same (k, seed) draws the same groups for every method
    by_draw = {}
    for r in trained:
        by_draw.setdefault((r["k"], r["seed"]), set()).add(tuple(r["train_rows"]))
    assert all(len(v) == 1 for v in by_draw.values())

    sel = json.loads((out / "select.json").read_text())
    for b in (2, 3):
        assert sel["optimum"]["total_loss"][str(b)]["total_test_loss"] == pytest.approx(
            brute_force_min_total_loss(truth, b), rel=1e-9)
        for method in ("etap", "tag", "mtgnet", "gradtae"):
            # nobody beats the true optimum
            assert sel["methods"][method][str(b)]["mean"] >= sel["optimum"]["total_loss"][str(b)]["total_test_loss"] - 1e-9
    assert sel["references"]["naive_mtl_table"]["mean"] == pytest.approx(float(np.nansum(mean.test_losses[all_task])))
    assert len(TASKS) == n

    page = Path(settings.page)
    text = page.read_text()
    for heading in ("Table 2", "Table 3", "Tables 7 and 8", "Table 9", "Tables 4 and 10", "Appendix D.1", "Targets"):
        assert heading in text
    data = json.loads(page.with_suffix(".json").read_text())
    assert data["ground_truth"]["seeds"] == [0, 1]
    assert {t["target"] for t in data["targets"]}  # each target says met or missed
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    assert data["versions"]["torch"] == torch.__version__

    # fit.json carries each seed's matrices, bit for bit those of the saved results
    from lightning_etap.affinity import AffinityResult

    for seed in (0, 1):
        fit = json.loads((out / "affinity" / f"seed{seed}" / "fit.json").read_text())
        for method in ("etap", "tag"):
            saved = AffinityResult.load(out / "affinity" / f"seed{seed}" / method).matrix
            assert np.array_equal(np.asarray(fit[f"{method}_matrix"]), saved)

    # "from the committed results": without the per-epoch histories and the weights (not committed), the
    # predict, select and page stages give the same page numbers
    before = json.loads(page.with_suffix(".json").read_text())
    for seed in (0, 1):
        folder = out / "affinity" / f"seed{seed}"
        for name in ("etap", "tag"):
            shutil.rmtree(folder / name)
        (folder / "model.npz").unlink()
    (out / "predict.json").unlink()
    (out / "predictions.npz").unlink()
    (out / "select.json").unlink()
    rc.run(settings, ["predict", "select", "page"])
    after = json.loads(page.with_suffix(".json").read_text())
    for doc in (before, after):  # fit times are measured, not reproduced
        for row in doc["table3"].values():
            row.pop("fit_seconds")
    for part in ("table2", "table3", "wilcoxon", "targets"):
        assert after[part] == before[part], part
    assert after["selection"]["methods"] == before["selection"]["methods"]
