"""benchmarks/wide_reliability.py at a tiny size, so it cannot rot: its figures against the per-step record."""

from __future__ import annotations

import numpy as np
import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("wide_reliability")


@pytest.mark.slow
def test_tiny_fit_reports_consistent_figures(script, tmp_path):
    # 4 tasks, 512 rows (384 for training: 2 steps an epoch), 24 exact every-step steps of the 3 x 1024 encoder
    run = script.fit(4, 512, 24, 0)
    assert run["tasks"] == 4 and run["train_rows"] == 384 and run["epochs"] == 12.0
    assert len(run["loss_every_50"]) == 1 and np.isfinite(run["loss_first"]) and np.isfinite(run["loss_last"])
    rel = run["reliability"]
    assert -1 <= rel["split_half"] <= 1 and set(rel["subsample"]) == {"2", "5", "10", "20"}
    assert [p["steps"] for p in run["phases"]] == [[0, 24]]  # only the first phase exists in 24 steps
    assert 0 < run["phases"][0]["mean_abs_offdiag"] and -1 <= run["rho_construction"] <= 1


def test_reliability_of_one_epoch_splits_by_step_parity():
    overhead = load_benchmark("affinity_overhead")
    rng = np.random.default_rng(0)
    mats = rng.normal(size=(6, 4, 4))
    steps = np.arange(6)
    rel = overhead.reliability({"step_matrices": mats, "steps": steps, "steps_per_epoch": 10})  # all in epoch 0
    assert rel["split_by"] == "steps"
    # by hand: the mean of the even steps against the mean of the odd steps
    assert rel["split_half"] == round(overhead.spearman_offdiag(mats[0::2].mean(0), mats[1::2].mean(0)), 3)
    two_epochs = overhead.reliability({"step_matrices": mats, "steps": steps, "steps_per_epoch": 3})
    assert two_epochs["split_by"] == "epochs"
    assert two_epochs["split_half"] == round(overhead.spearman_offdiag(mats[:3].mean(0), mats[3:].mean(0)), 3)
    one_step = overhead.reliability({"step_matrices": mats[:1], "steps": steps[:1], "steps_per_epoch": 10})
    assert one_step == {"split_half": None, "split_by": None, "subsample": {}}
