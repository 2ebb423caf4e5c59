"""The School scale demonstration (benchmarks/school_scale.py) end to end at a tiny size, so it cannot rot.

Six real schools, two-epoch fits, five sampled training groups and a few
dozen candidates: every stage runs, the page and its JSON agree with the run
directory, the selection is checked against a brute force over the
predictions, and a page-only rerun reads the cached stages.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from _benchmarks import load_benchmark

TASKS = [f"school_{k:03d}" for k in range(1, 7)]


def _load_script():
    return load_benchmark("school_scale")


def _best_objective(masks: np.ndarray, predicted: np.ndarray, budget: int) -> float:
    """Brute force of ``select_groups``' problem: every task covered, groups plus single-task models <= budget.

    The objective sums each task's best predicted gain among the chosen groups
    holding it; a task trained alone (a singleton, cost 1 like a group) gains 0.
    """
    n = masks.shape[1]
    multi = [k for k in range(len(masks)) if masks[k].sum() > 1]
    gains = np.where(masks, np.nan_to_num(predicted, nan=0.0), -np.inf)
    best = -np.inf
    for size in range(0, budget + 1):
        for combo in itertools.combinations(multi, size):
            per_task = gains[list(combo)].max(axis=0) if combo else np.full(n, -np.inf)
            uncovered = int(np.isinf(per_task).sum())
            spare = budget - size - uncovered
            if spare < 0:
                continue
            covered = np.sort(per_task[~np.isinf(per_task)])
            # spare singletons replace the most negative covered gains by 0
            fixed = np.where(np.arange(len(covered)) < spare, np.maximum(covered, 0.0), covered)
            best = max(best, float(fixed.sum()))
    return best


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_school_scale_tiny(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("LIGHTNING_ETAP_DATA", str(shared_data))
    script = _load_script()
    run, page = tmp_path / "run", tmp_path / "docs" / "school.md"
    argv = ["--output", str(run), "--page", str(page), "--tasks", *TASKS, "--max-epochs", "2",
            "--train-groups", "5", "--candidates", "40", "--budgets", "2", "3", "--time-limit", "10"]
    script.main(argv)

    data = json.loads(page.with_suffix(".json").read_text())
    text = page.read_text()
    assert data["n_tasks"] == len(TASKS)
    assert data["n_train_groups"] >= 5
    assert set(data["timings"]) >= {"affinity", "gains", "predict"}
    for key in ("task_pearson", "group_pearson", "task_r2", "group_sign_f1"):
        assert np.isfinite(data["leave_one_group_out"][key])
    assert data["all_tasks"]["stl_total_test_loss"] > 0
    assert "6 tasks" in text and "| 2 |" in text and "| 3 |" in text

    # the selection is the best use of the budget under the predictions (brute force over the candidates)
    with np.load(run / "predictions.npz") as z:
        masks, predicted, names = z["candidates"], z["predicted"], [str(t) for t in z["task_names"]]
    assert names == TASKS
    for b in data["budgets"]:
        assert b["optimal"] and 1 <= b["n_groups"] <= b["budget"]
        assert all(set(g) <= set(TASKS) for g in b["groups"])
        objective = b["predicted_mean_gain"] * len(TASKS)
        assert objective == pytest.approx(_best_objective(masks, predicted, b["budget"]), rel=1e-6, abs=1e-9)

    # the page alone again from the run directory: same numbers
    before = page.with_suffix(".json").read_text()
    script.main([*argv, "--page-only"])
    after = json.loads(page.with_suffix(".json").read_text())
    assert after["budgets"] == json.loads(before)["budgets"]
    assert after["leave_one_group_out"] == json.loads(before)["leave_one_group_out"]
