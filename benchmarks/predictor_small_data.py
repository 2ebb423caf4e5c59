"""ETAP against Bayesian ETAP when few groups are measured: held-out agreement on the exhaustive tables.

Run from the repository root::

    python benchmarks/predictor_small_data.py          # 10 draws per size, about half a minute

For each exhaustive table (Chemical: 10 tasks, 1,013 multi-task groups, the
mean of 3 training seeds; ETTm1: 7 tasks, 120 groups, 1 seed) and each number
``k`` of training groups (5, 10, 20, 50), ``--draws`` random training sets
(the all-task group, which every search trains first, plus ``k - 1`` groups
drawn uniformly) are fitted with ``ETAPPredictor(affinity)`` and
``BayesianETAPPredictor(affinity)`` (both with their defaults, the same
affinity as ``benchmarks/active_search.py``), and every other multi-task
group of the table is predicted. The agreement is
:func:`~lightning_etap.predictors.evaluate_predictions` over those held-out
groups: per task in group (R², Spearman) and per group total (Spearman);
mean over draws, and how many draws the Bayesian model is ahead in task R².
Results go to ``benchmarks/results/predictor_small_data.json`` and are quoted
in ``docs/prediction.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLES = {
    "Chemical": (RESULTS / "chemical_exhaustive.csv", RESULTS / "chemical_affinity"),
    "ETTm1": (RESULTS / "ettm1_repro" / "ground_truth.csv", RESULTS / "ettm1_repro" / "affinity"),
}
SIZES = (5, 10, 20, 50)
METRICS = ("task_r2", "task_spearman", "group_spearman")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "predictor_small_data.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from active_search import _loss_rows, read_affinity

    from lightning_etap.groundtruth import GroupGains
    from lightning_etap.predictors import BayesianETAPPredictor, ETAPPredictor, evaluate_predictions

    start = time.perf_counter()
    report = {"draws": args.draws, "sizes": list(SIZES), "machine": f"{platform.machine()}, python "
              f"{platform.python_version()}", "tables": {}}
    for label, (csv, affinity_dir) in TABLES.items():
        if not csv.exists():
            print(f"{label}: {csv} missing, skipped")
            continue
        masks, gains, _, _ = _loss_rows(GroupGains.from_csv(csv))
        affinity = read_affinity(affinity_dir).matrix
        full = int(np.flatnonzero(masks.all(axis=1))[0])
        others = np.array([i for i in range(len(masks)) if i != full])
        rows = {}
        for k in SIZES:
            if k > len(masks) // 2:
                continue
            scores = {"etap": [], "bayes": []}
            for draw in range(args.draws):
                rng = np.random.default_rng(draw)
                train = np.r_[full, rng.choice(others, k - 1, replace=False)]
                test = np.setdiff1d(np.arange(len(masks)), train)
                for key, model in (("etap", ETAPPredictor(affinity)), ("bayes", BayesianETAPPredictor(affinity))):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        pred = model.fit(masks[train], gains[train]).predict(masks[test])
                    scores[key].append(evaluate_predictions(masks[test], gains[test], pred))
            row = {key: {m: float(np.mean([s[m] for s in v])) for m in METRICS} for key, v in scores.items()}
            row["bayes_ahead_task_r2"] = int(sum(b["task_r2"] > e["task_r2"]
                                                 for b, e in zip(scores["bayes"], scores["etap"], strict=True)))
            rows[str(k)] = row
            print(f"{label} k={k:>2}: task R² ETAP {row['etap']['task_r2']:.3f} / Bayesian "
                  f"{row['bayes']['task_r2']:.3f} (ahead in {row['bayes_ahead_task_r2']}/{args.draws}); "
                  f"group Spearman {row['etap']['group_spearman']:.3f} / {row['bayes']['group_spearman']:.3f}",
                  flush=True)
        report["tables"][label] = {"groups": int(len(masks)), "tasks": int(masks.shape[1]), "sizes": rows}
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
