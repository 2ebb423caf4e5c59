"""Scale demonstration on School (139 tasks): affinity, sampled ground truth, prediction, selection.

A modest demonstration, not a reproduction (the ETAP paper has no School
experiment): the whole pipeline (``lightning_etap.pipeline``, the same stages
as ``lightning-etap run``) on all 139 schools with

* the affinity from ONE all-task fit (``AffinityCallback``, every step),
* ground truth for the all-task group, 50 groups sampled uniformly by size
  and the 139 single-task models (one seed),
* ETAP fitted on those 51 groups and evaluated leave-one-group-out,
* predictions for 100,000 candidate groups (all 9,591 pairs, the training
  groups and random larger groups), and
* exact group selection over them for several budgets with a time limit:
  the proven optimality gap is reported when the limit ends the search.

Run from the repository root::

    python benchmarks/school_scale.py            # about 10-20 minutes on 2 CPU cores
    python benchmarks/school_scale.py --page-only

It writes ``docs/results/school.md`` and ``docs/results/school.json``; the run
directory (default ``runs/school_scale``) keeps every stage's output, and a
rerun skips the finished stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(ROOT / "runs" / "school_scale"))
    ap.add_argument("--page", default=str(ROOT / "docs" / "results" / "school.md"))
    ap.add_argument("--train-groups", type=int, default=50)
    ap.add_argument("--candidates", type=int, default=100_000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--max-epochs", type=int, default=None, help="cap the school preset's epochs (tests)")
    ap.add_argument("--tasks", nargs="+", default=None, help="a subset of schools (tests)")
    ap.add_argument("--data-root", default=None, help="folder holding school/ (default: $LIGHTNING_ETAP_DATA)")
    ap.add_argument("--page-only", action="store_true", help="only rewrite the page from the run directory")
    args = ap.parse_args(argv)

    from lightning_etap.pipeline import Pipeline, PipelineConfig

    config = PipelineConfig(
        dataset="school", data_root=args.data_root, tasks=args.tasks, recipe={"max_epochs": args.max_epochs} if args.max_epochs else {},
        n_train_groups=args.train_groups, max_candidates=args.candidates, budgets=args.budgets,
        selection_time_limit=args.time_limit, executor="local", output=args.output,
    )
    start = time.perf_counter()
    if not args.page_only:
        pipeline = Pipeline(config, progress=False)
        pipeline.run(["affinity", "gains", "predict"])
        select(Path(args.output), args.budgets, args.time_limit)
    write_page(Path(args.output), Path(args.page), time.perf_counter() - start)


def select(run: Path, budgets, time_limit: float) -> None:
    """Exact selection over the predicted candidates, with the proven gap when the time limit ends the search."""
    from lightning_etap.selection import select_groups

    with np.load(run / "predictions.npz") as z:
        masks, predicted, names = z["candidates"], z["predicted"], [str(t) for t in z["task_names"]]
    out = []
    for b in budgets:
        sel = select_groups(masks, predicted, b, task_names=names, time_limit=time_limit)
        out.append({"budget": b, "groups": [list(g) for g in sel.groups], "predicted_mean_gain": sel.objective / len(names),
                    "optimal": bool(sel.optimal), "gap": float(sel.gap), "bound_mean_gain": sel.bound / len(names),
                    "seconds": float(sel.seconds), "method": sel.method, "kept": f"{sel.n_active}/{sel.n_candidates}"})
        print(f"B={b}: {len(sel.groups)} groups, predicted mean gain {100 * sel.objective / len(names):+.2f}%, "
              f"{'optimal' if sel.optimal else f'gap {sel.gap:.2%}'} in {sel.seconds:.1f} s")
    (run / "scale_selection.json").write_text(json.dumps(out, indent=1) + "\n")


def all_task_reference(run: Path) -> dict:
    """Measured total test loss and mean gain of the all-task group, and the single-task total."""
    from lightning_etap.groundtruth import GainStore

    with GainStore(run / "gains.sqlite") as store:
        gains = store.gains(include_singletons=True)
    row = int(np.flatnonzero(gains.masks.all(axis=1))[0])
    stl = gains.stl_losses[int(gains.seeds[row])]
    return {"total_test_loss": float(np.nansum(gains.test_losses[row])), "mean_gain": float(np.nanmean(gains.gains[row])),
            "stl_total_test_loss": float(np.nansum(stl))}


def write_page(run: Path, page: Path, seconds: float) -> None:
    import lightning
    import torch

    import lightning_etap
    from lightning_etap.predictors import evaluate_predictions

    timings = json.loads((run / "timings.json").read_text())
    chosen = json.loads((run / "scale_selection.json").read_text())
    with np.load(run / "predictions.npz") as z:
        masks, measured, cv = z["train_masks"], z["train_measured"], z["train_cv"]
        n_candidates, n_tasks = z["candidates"].shape
        sizes = z["candidates"].sum(axis=1)
    ok = ~np.isnan(cv).all(axis=1)
    loo = evaluate_predictions(masks[ok], measured[ok], cv[ok])
    tsize = masks.sum(axis=1)
    data = {
        "versions": {"lightning_etap": lightning_etap.__version__, "torch": torch.__version__,
                     "lightning": lightning.__version__, "python": platform.python_version(),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"},
        "n_tasks": int(n_tasks), "n_train_groups": int(len(masks)), "train_group_sizes": tsize.tolist(),
        "n_candidates": int(n_candidates), "candidate_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                                                 "max": int(sizes.max())},
        "leave_one_group_out": loo, "timings": timings, "wall_seconds_this_call": seconds,
        "all_tasks": all_task_reference(run),
        "budgets": [{**b, "n_groups": len(b["groups"]), "group_sizes": [len(g) for g in b["groups"]]} for b in chosen],
    }
    page.parent.mkdir(parents=True, exist_ok=True)
    page.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    lines = [
        f"# School: a scale demonstration ({n_tasks} tasks)\n",
        "**A demonstration of scale, not a reproduction**: the ETAP paper has no School experiment, and the "
        f"ground truth here is a sample of {len(masks)} groups, not an exhaustive table. Generated by "
        "`benchmarks/school_scale.py` (the numbers: [`school.json`](school.json)); versions: lightning-etap "
        f"{data['versions']['lightning_etap']}, torch {data['versions']['torch']}, Lightning "
        f"{data['versions']['lightning']}, Python {data['versions']['python']}; {data['versions']['machine']}, "
        "shared with other jobs.\n",
        "One regression task per school (ILEA exam scores), the `school` preset (MLP 27→16, SGD), seed 0. "
        f"The pipeline's stages: one all-task fit with the `AffinityCallback` (every step; {n_tasks}×{n_tasks} "
        f"affinity), the all-task group + {len(masks) - 1} groups sampled uniformly by size (sizes "
        f"{int(tsize.min())}–{int(tsize.max())}) + the {n_tasks} single-task models trained for their gains, "
        f"ETAP fitted on the {len(masks)} groups, predictions for {n_candidates:,} candidate groups (sizes "
        f"{int(sizes.min())}–{int(sizes.max())}, median {np.median(sizes):.0f}), and exact selection "
        "(`select_groups`, time limit per budget).\n",
        "## Prediction (leave one training group out)\n",
        "| metric | per task in group | per group total |",
        "| --- | --- | --- |",
        f"| Pearson | {loo['task_pearson']:.2f} | {loo['group_pearson']:.2f} |",
        f"| Spearman | {loo['task_spearman']:.2f} | {loo['group_spearman']:.2f} |",
        f"| R² | {loo['task_r2']:.2f} | {loo['group_r2']:.2f} |",
        f"| sign F1 | {loo['task_sign_f1']:.2f} | {loo['group_sign_f1']:.2f} |",
        "",
        "## Selection over the candidates\n",
        "Predicted mean gain per task of ETAP's choice (each task from its best chosen group; a school alone "
        "counts 0), and whether the search proved it optimal within the time limit (else the proven gap "
        "between the choice and the bound):\n",
        "| budget B | groups chosen | their sizes | predicted mean gain | search | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in data["budgets"]:
        status = "optimal" if b["optimal"] else f"gap {100 * b['gap']:.2f}% (bound {100 * b['bound_mean_gain']:+.2f}%)"
        lines.append(f"| {b['budget']} | {b['n_groups']} | {', '.join(map(str, sorted(b['group_sizes'])))} | "
                     f"{100 * b['predicted_mean_gain']:+.2f}% | {status}, {b['method']}, {b['kept']} candidates "
                     f"kept | {b['seconds']:.1f} |")
    at = data["all_tasks"]
    lines += [
        "",
        f"References (measured): all {n_tasks} schools in one network: total test loss "
        f"{at['total_test_loss']:.2f}, measured mean gain {100 * at['mean_gain']:+.2f}%; every school alone: "
        f"{at['stl_total_test_loss']:.2f}. The chosen groups were not trained (that would be up to "
        f"{max(b['budget'] for b in data['budgets'])} more models per budget), so their gains above are predictions.\n",
        "## Time\n",
        "| stage | wall |",
        "| --- | --- |",
    ]
    for stage, rec in timings.items():
        lines.append(f"| {stage} | {rec['seconds']:.0f} s |")
    lines.append("\nWall times on 2 CPU cores shared with other jobs.\n")
    page.write_text("\n".join(lines))
    print(f"wrote {page} and {page.with_suffix('.json')}")


if __name__ == "__main__":
    main()
