"""The pipeline's two ways of choosing its training groups, on the exhaustive tables (``sampling: random | active``).

Run from the repository root::

    python benchmarks/pipeline_sampling.py              # Chemical and ETTm1, 20 seeds, 10 groups + the all-task one
    python benchmarks/pipeline_sampling.py --seeds 3    # a smoke test

Each run does what the pipeline's gains, predict and select stages do, with an
:class:`~lightning_etap.search.OracleTrainer` answering from the exhaustive
table (seed-mean losses) instead of training, for budgets 2, 3 and 4:

* ``random`` (the default): the all-task group and ``n_train_groups`` groups
  drawn by :func:`~lightning_etap.groundtruth.sample_groups` with the run's
  seed, :class:`~lightning_etap.predictors.ETAPPredictor` fitted on them, the
  exact selection over every group on its predictions (the paper's protocol).
* ``active``: :func:`~lightning_etap.search.active_etap_search` with
  :class:`~lightning_etap.predictors.BayesianETAPPredictor`, ``objective="gain"``,
  the largest budget, the run's seed as ``random_state`` and as many trainings;
  per budget, active ETAP's choice (the exact best grouping of the trained
  groups) and, as the pipeline also reports it, ETAP's prediction-based
  selection fitted on the actively chosen groups.

Every choice is scored with the table's measured gains: the mean gain per task
(the pipeline's objective) and its gap to the optimum over the whole table.
Writes ``benchmarks/results/pipeline_sampling.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLES = {
    "chemical": (RESULTS / "chemical_exhaustive.csv", RESULTS / "chemical_affinity"),
    "ettm1": (RESULTS / "ettm1_repro" / "ground_truth.csv", RESULTS / "ettm1_repro" / "affinity"),
}
BUDGETS = (2, 3, 4)
METHODS = ("random + ETAP", "active ETAP", "active groups + ETAP")


def _affinity(path: Path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from active_search import read_affinity

    return read_affinity(path)


def one_run(table_name: str, seed: int, n_train_groups: int) -> dict:
    """The three choices of one seed on one table: mean measured gain per task for every budget."""
    from lightning_etap.groundtruth import GroupGains, sample_groups
    from lightning_etap.groups import all_groups, groups_to_masks
    from lightning_etap.predictors import BayesianETAPPredictor, ETAPPredictor
    from lightning_etap.search import OracleTrainer, active_etap_search
    from lightning_etap.selection import select_groups

    csv, aff_path = TABLES[table_name]
    table = GroupGains.from_csv(csv).mean_over_seeds()
    names = list(table.task_names)
    matrix = _affinity(aff_path).subset(names).matrix  # in the table's task order
    multi = table.masks.sum(axis=1) >= 2
    masks, gains = table.masks[multi], table.gains[multi]
    row = {m.tobytes(): r for r, m in enumerate(masks)}
    candidates = all_groups(len(names), min_size=2)
    n = len(names)

    def measured(selection) -> float:
        """Mean measured gain per task of a selection (each task's best chosen group; alone: 0)."""
        best = np.full(n, -np.inf)
        for mask in selection.masks:
            mask = np.asarray(mask, dtype=bool)
            value = np.zeros(n) if mask.sum() == 1 else np.where(mask, gains[row[mask.tobytes()]], -np.inf)
            best = np.maximum(best, np.where(mask, value, -np.inf))
        return float(best.sum() / n)

    def etap_choices(train_masks, train_gains) -> dict[int, float]:
        predictor = ETAPPredictor(matrix, task_names=names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            predictor.fit(train_masks, train_gains)
        predicted = predictor.predict(candidates)
        return {b: measured(select_groups(candidates, predicted, b, task_names=names)) for b in BUDGETS}

    out: dict[str, dict[int, float]] = {}
    start = time.process_time()
    drawn = sample_groups(names, n_groups=n_train_groups + 1, include_all_tasks=True, seed=seed)
    tm = groups_to_masks(drawn, names)
    out["random + ETAP"] = etap_choices(tm, np.stack([gains[row[m.tobytes()]] for m in tm]))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = active_etap_search(OracleTrainer(table), n_train_groups + 1,
                                    predictor=BayesianETAPPredictor(matrix, task_names=names), budget=max(BUDGETS),
                                    store=Path(tmp) / "s.sqlite", objective="gain", random_state=seed,
                                    task_names=names)
    am = groups_to_masks([tuple(g) for g in result.trained], names)
    ag = np.stack([gains[row[m.tobytes()]] for m in am])
    out["active ETAP"] = {b: measured(select_groups(am, ag, b, task_names=names)) for b in BUDGETS}
    out["active groups + ETAP"] = etap_choices(am, ag)
    return {"table": table_name, "seed": seed, "mean_gain": out, "cpu_seconds": time.process_time() - start,
            "random_groups": [list(g) for g in drawn], "active_groups": [list(g) for g in result.trained]}


def optimum(table_name: str) -> dict[int, float]:
    from lightning_etap.groundtruth import GroupGains
    from lightning_etap.selection import select_groups

    table = GroupGains.from_csv(TABLES[table_name][0]).mean_over_seeds()
    multi = table.masks.sum(axis=1) >= 2
    n = len(table.task_names)
    return {b: float(select_groups(table.masks[multi], table.gains[multi], b).objective / n) for b in BUDGETS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="runs per table (seeds first-seed .. first-seed + N - 1)")
    ap.add_argument("--train-groups", type=int, default=10, help="n_train_groups (besides the all-task group)")
    ap.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first .. first + N - 1 (held-in: 100)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline_sampling.json")
    args = ap.parse_args()
    runs, best = [], {}
    for name in args.tables:
        best[name] = optimum(name)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs.append(one_run(name, seed, args.train_groups))
            print(f"{name} seed {seed}: " + "; ".join(
                f"{m} " + "/".join(f"{100 * (best[name][b] - v):.2f}" for b, v in runs[-1]["mean_gain"][m].items())
                for m in METHODS), flush=True)
    summary = {}
    for name in args.tables:
        mine = [r for r in runs if r["table"] == name]
        summary[name] = {m: {b: {"mean_gap_pct": float(np.mean([100 * (best[name][b] - r["mean_gain"][m][b])
                                                                  for r in mine])),
                                 "sem_pct": float(np.std([100 * (best[name][b] - r["mean_gain"][m][b]) for r in mine],
                                                         ddof=1) / np.sqrt(len(mine))) if len(mine) > 1 else None}
                             for b in BUDGETS} for m in METHODS}
    record = {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "seeds": args.seeds, "first_seed": args.first_seed, "n_train_groups": args.train_groups, "optimum_mean_gain": best,
              "summary": summary, "runs": runs}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\nmean gap to the optimum, % mean gain per task (± s.e.m.), {args.seeds} seeds, "
          f"{args.train_groups} groups + the all-task group:")
    for name in args.tables:
        print(f"{name}:")
        for m in METHODS:
            cells = [f"B={b}: {summary[name][m][b]['mean_gap_pct']:.2f}"
                     + (f" ± {summary[name][m][b]['sem_pct']:.2f}" if summary[name][m][b]["sem_pct"] else "")
                     for b in BUDGETS]
            print(f"  {m:<22} " + "   ".join(cells))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
