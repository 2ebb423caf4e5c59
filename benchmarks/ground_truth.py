"""Ground truth on Chemical: many models at once vs one Trainer per group, and the exhaustive table.

Two parts, each printing its figures and writing them to
``benchmarks/results/ground_truth.json``:

1. **Side by side** (always): the same random groups (and their STL runs),
   the paper's recipe capped at ``--compare-epochs`` epochs (the
   one-Trainer-per-group path needs minutes per group at the full recipe),
   trained through :func:`~lightning_etap.groundtruth.collect_gains` twice in
   one run: with :class:`~lightning_etap.groundtruth.LightningGroupTrainer`
   (one Lightning ``Trainer`` per group) and with
   :class:`~lightning_etap.groundtruth.batched.BatchedMLPTrainer` (every
   group at once). Prints groups per minute of both, the ratio, and the
   largest relative difference of their test losses (they train the same
   models up to floating-point summation order).
2. **A seed's time** (always; ``--time-epochs``): all 1023 jobs of one seed
   for 100 epochs in one run, extrapolated to the recipe's 1000 (nothing
   stops early on Chemical, so the time is proportional to the epochs).
3. **Exhaustive** (``--full``): all 1023 non-empty groups of the ten tasks
   (1013 multi-task groups and the 10 STL models) with the full recipe
   (up to 1000 epochs, early stopping), one seed after the other, through
   ``collect_gains`` into a resumable SQLite store (rerun the same command
   after a crash: finished seeds are skipped). Prints minutes per seed and
   writes every group's per-task test loss, STL loss and gain (eq. 1) to
   ``benchmarks/results/chemical_exhaustive.csv``.

The committed table was made with::

    python benchmarks/ground_truth.py --full --seeds 0 1 2

and is read back with
:meth:`lightning_etap.groundtruth.GroupGains.from_csv`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_etap.data import load_dataset
from lightning_etap.groundtruth import GainStore, LightningGroupTrainer, collect_gains, plan_jobs
from lightning_etap.groundtruth.batched import BatchedMLPTrainer
from lightning_etap.training import get_preset

RESULTS = Path(__file__).parent / "results"


def all_groups(tasks):
    return [g for k in range(1, len(tasks) + 1) for g in itertools.combinations(tasks, k)]


def compare(ds, cfg, args) -> dict:
    rng = random.Random(args.sample_seed)
    multi = [g for g in all_groups(ds.task_names) if len(g) > 1]
    groups = rng.sample(multi, args.compare_groups)
    capped = cfg.replace(max_epochs=args.compare_epochs)
    jobs = plan_jobs(groups, [args.seed], ds.task_names)
    out = {"groups": [list(g) for g in groups], "jobs": len(jobs), "epochs": args.compare_epochs}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, trainer, chunk in [
            ("one_trainer_per_group", LightningGroupTrainer(ds, capped), 1),
            ("batched", BatchedMLPTrainer(ds, capped, threads=args.threads), len(jobs)),
        ]:
            if name == "batched":
                trainer.resolved_backend()  # compile the kernel (cached) outside the timing
            start = time.perf_counter()
            cpu = time.process_time()
            gains = collect_gains(trainer, groups, seeds=[args.seed], store=os.path.join(tmp, f"{name}.sqlite"),
                                  chunk_size=chunk, progress=False)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            losses[name] = gains.test_losses
            out[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "jobs_per_min": round(len(jobs) / wall * 60, 2)}
            print(f"{name:>22s}: {len(jobs)} jobs x {args.compare_epochs} epochs in {wall:6.1f} s wall "
                  f"({cpu:6.1f} s cpu) -> {len(jobs) / wall * 60:8.1f} jobs/min")
    a, b = losses["one_trainer_per_group"], losses["batched"]
    member = ~np.isnan(a)
    rel = np.abs(a[member] - b[member]) / np.abs(a[member])
    out["speedup"] = round(out["one_trainer_per_group"]["wall_s"] / out["batched"]["wall_s"], 1)
    out["max_rel_test_loss_diff"] = float(rel.max())
    print(f"many-at-once is {out['speedup']}x faster on the same jobs; test losses agree within "
          f"{out['max_rel_test_loss_diff']:.1e} (relative)")
    return out


def full(ds, cfg, args) -> dict:
    groups = all_groups(ds.task_names)
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    trainer = BatchedMLPTrainer(ds, cfg, threads=args.threads, progress=True)
    backend = trainer.resolved_backend()
    per_seed = {}
    previous = {}
    if args.json.exists():
        previous = json.loads(args.json.read_text()).get("exhaustive", {}).get("per_seed", {})
    for seed in args.seeds:
        start = time.perf_counter()
        cpu = time.process_time()
        gains = collect_gains(trainer, groups, seeds=[seed], store=store, chunk_size=len(groups), progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        outcomes = trainer_outcomes(store, seed)
        epochs = [o.epochs for o in outcomes]
        resumed = wall < 5  # already in the store: report the run that trained it
        if resumed and str(seed) in previous and previous[str(seed)].get("minutes"):
            per_seed[str(seed)] = previous[str(seed)]
            print(f"seed {seed}: already in {store} (trained in {previous[str(seed)]['minutes']:.1f} min)")
            continue
        if resumed:  # no earlier figures: the store's per-job seconds (each job's share of the batched run's wall)
            wall, cpu = float(sum(o.seconds for o in outcomes)), None
        per_seed[str(seed)] = {
            "minutes": round(wall / 60, 2), "cpu_minutes": None if cpu is None else round(cpu / 60, 2),
            "timed": "from the store (an earlier run trained it)" if resumed else "this run",
            "jobs": len(groups), "jobs_per_min": round(len(groups) / wall * 60, 1),
            "mean_epochs": round(float(np.mean(epochs)), 1),
            "jobs_stopped_early": int(sum(e < cfg.max_epochs for e in epochs)),
            "all_task_total_test_loss": round(float(np.nansum(gains.test_losses[-1])), 4),
            "load_average_end": os.getloadavg(),
        }
        print(f"seed {seed}: {len(groups)} jobs in {wall / 60:.1f} min wall"
              f"{' (an earlier run, from the store)' if resumed else f' ({cpu / 60:.1f} min cpu)'}, "
              f"{len(groups) / wall * 60:.0f} jobs/min, mean epochs {per_seed[str(seed)]['mean_epochs']}, "
              f"{per_seed[str(seed)]['jobs_stopped_early']} stopped early")
    with GainStore(store) as opened:
        gains = opened.gains(seeds=args.seeds, include_singletons=True)
    gains.to_csv(args.csv)
    spread = gains.seed_spread() if len(args.seeds) > 1 else None
    result = {"backend": backend, "threads": args.threads, "store": str(store), "csv": str(args.csv),
              "per_seed": per_seed}
    if spread is not None:
        result["seed_spread"] = {"mean_gain_std": round(spread.mean_std, 4),
                                 "noise_ceiling_pearson": round(spread.noise_ceiling, 3),
                                 "group_noise_ceiling_pearson": round(spread.group_noise_ceiling, 3)}
        print(f"seed-to-seed: mean std of a gain {spread.mean_std:.4f}; Pearson between seeds, per task in "
              f"group {spread.noise_ceiling:.3f}, per group total {spread.group_noise_ceiling:.3f}")
    print(f"wrote {args.csv} ({len(gains)} rows: groups x seeds, STL rows included)")
    return result


def timed_seed(ds, cfg, args) -> dict:
    """All 1023 jobs of one seed for ``--time-epochs`` epochs, in one run, extrapolated to the full recipe.

    Nothing early-stops on Chemical within the recipe (the exhaustive runs:
    mean epochs 998.9-1000), so a seed's training time is proportional to
    the epochs; this measures it on a quiet machine in a tenth of the time.
    """
    groups = all_groups(ds.task_names)
    capped = cfg.replace(max_epochs=args.time_epochs)
    trainer = BatchedMLPTrainer(ds, capped, threads=args.threads)
    trainer.resolved_backend()
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train([(g, 0) for g in groups])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    scale = cfg.max_epochs / args.time_epochs
    out = {"epochs": args.time_epochs, "jobs": len(groups), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "full_recipe_minutes_per_seed": round(wall * scale / 60, 1),
           "load_average": os.getloadavg()}
    print(f"all {len(groups)} jobs x {args.time_epochs} epochs: {wall:.1f} s wall ({cpu:.1f} s cpu) -> "
          f"{cfg.max_epochs} epochs ~ {out['full_recipe_minutes_per_seed']} min per seed (target <= 20)")
    return out


def trainer_outcomes(store_path, seed):
    with GainStore(store_path) as store:
        return [o for (g, s), o in store.outcomes().items() if s == seed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="folder holding chemical/ (default: $LIGHTNING_ETAP_DATA)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="threads of the batched trainer")
    ap.add_argument("--seed", type=int, default=0, help="training seed of the side-by-side part")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the side-by-side group sample")
    ap.add_argument("--compare-groups", type=int, default=20, help="random groups trained by both paths")
    ap.add_argument("--compare-epochs", type=int, default=20, help="epoch cap of the side-by-side part")
    ap.add_argument("--full", action="store_true", help="also train all 1023 jobs for each of --seeds")
    ap.add_argument("--time-epochs", type=int, default=100,
                    help="time all 1023 jobs for this many epochs and extrapolate (0: skip)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--store", default=str(RESULTS / "chemical_exhaustive.sqlite"),
                    help="SQLite store of the exhaustive run (resumable; not committed)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "chemical_exhaustive.csv")
    ap.add_argument("--json", type=Path, default=RESULTS / "ground_truth.json")
    args = ap.parse_args()

    torch.set_num_threads(1)
    ds = load_dataset("chemical", args.data_root)
    cfg = get_preset("chemical")
    report = {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "config": cfg.to_dict(), "load_average_start": os.getloadavg()}
    print(f"Chemical, paper recipe, torch {torch.__version__}, {os.cpu_count()} CPUs")
    report["side_by_side"] = compare(ds, cfg, args)
    if args.time_epochs:
        report["seed_time"] = timed_seed(ds, cfg, args)
    if args.full:
        report["exhaustive"] = full(ds, cfg, args)
    elif args.json.exists():  # keep the recorded exhaustive figures
        old = json.loads(args.json.read_text())
        if "exhaustive" in old:
            report["exhaustive"] = old["exhaustive"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
