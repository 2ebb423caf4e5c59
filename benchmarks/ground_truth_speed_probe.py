"""Scratch speed probe: ground-truth training on Chemical, batched vs one Trainer per group.

Part A (side by side, one process, same random groups): the batched trainer
(:class:`~lightning_etap.groundtruth.batched.BatchedMLPTrainer`) trains the
sampled groups with the paper's full recipe (<= 1000 epochs, early stopping).
The one-Trainer-per-group path (:func:`~lightning_etap.training.train_group`)
and the batched trainer's torch backend are too slow to run to the end, so
they train a few of the same groups for a capped number of epochs; their
seconds per *pair-step* (one task's batch in one training step) are
multiplied by the pair-steps each group really needs, which the batched run
tells us, because the training is the same (same epochs, same stopping point).

Part B (``--all``): all 1023 non-empty groups of the 10 tasks (1013 multi-task
groups and the 10 single-task models) for one seed, for real.

Wall time on a shared machine depends on the other load; the probe prints CPU
time next to wall time and the load average. Run:

    python benchmarks/ground_truth_speed_probe.py --root ../shared/data --groups 20
    python benchmarks/ground_truth_speed_probe.py --root ../shared/data --all --json all.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import time

import torch

from lightning_etap.data import load_dataset
from lightning_etap.groundtruth.batched import BatchedMLPTrainer
from lightning_etap.training import get_preset, train_group


def pair_steps_per_epoch(ds, group, batch_size: int) -> int:
    """Tasks x steps of one epoch (steps: the largest member's train size / batch, rounded up)."""
    n = max(ds.n_examples(t, "train") for t in group)
    return len(group) * math.ceil(n / batch_size)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def sample_groups(tasks, count: int, seed: int) -> list[tuple[str, ...]]:
    """Uniformly random groups of 2+ tasks (each non-STL group equally likely), in dataset order."""
    rng = random.Random(seed)
    everything = [g for k in range(2, len(tasks) + 1) for g in itertools.combinations(tasks, k)]
    return [tuple(g) for g in rng.sample(everything, count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="data root holding chemical/ (default: $LIGHTNING_ETAP_DATA)")
    parser.add_argument("--groups", type=int, default=20, help="random groups for part A")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the group sample")
    parser.add_argument("--slow-groups", type=int, default=3, help="groups trained by the slow paths")
    parser.add_argument("--slow-epochs", type=int, default=20, help="epoch cap of the slow paths")
    parser.add_argument("--threads", type=int, default=1, help="threads of the batched trainer")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the recipe's 1000 epochs")
    parser.add_argument("--all", action="store_true", help="part B: all 1023 jobs of one seed (instead of A)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    ds = load_dataset("chemical", args.root)
    cfg = get_preset("chemical")
    if args.max_epochs is not None:
        cfg = cfg.replace(max_epochs=args.max_epochs)
    B = cfg.batch_size
    report: dict = {"torch": torch.__version__, "cpus": os.cpu_count(), "config": cfg.to_dict(),
                    "load_average_start": os.getloadavg()}
    all_groups = [g for k in range(1, ds.n_tasks + 1) for g in itertools.combinations(ds.task_names, k)]
    pair_steps_all = sum(pair_steps_per_epoch(ds, g, B) for g in all_groups)

    if args.all:
        jobs = [(g, args.seed) for g in all_groups]
        trainer = BatchedMLPTrainer(ds, cfg, threads=args.threads, log_every=50)
        backend = trainer.resolved_backend()
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        outcomes, wall, cpu = timed(lambda: trainer.train(jobs))
        done = sum(pair_steps_per_epoch(ds, o.group, B) * o.epochs for o in outcomes)
        epochs = [o.epochs for o in outcomes]
        report["all"] = {
            "backend": backend, "threads": args.threads, "jobs": len(jobs), "wall_s": wall, "cpu_s": cpu,
            "groups_per_min": len(jobs) / wall * 60, "pair_steps": done, "wall_us_per_pair_step": wall / done * 1e6,
            "mean_epochs": sum(epochs) / len(epochs), "jobs_at_max_epochs": sum(e == cfg.max_epochs for e in epochs),
            "stl_test_losses": {o.group[0]: o.test_losses[o.group[0]] for o in outcomes if len(o.group) == 1},
            "all_task_total_test_loss": sum(outcomes[-1].test_losses.values()),
        }
        print(f"all {len(jobs)} jobs, seed {args.seed} ({backend}, {args.threads} thread(s)): "
              f"wall {wall / 60:.1f} min, cpu {cpu / 60:.1f} min, {len(jobs) / wall * 60:.1f} groups/min, "
              f"mean epochs {report['all']['mean_epochs']:.0f}, "
              f"{report['all']['jobs_at_max_epochs']} jobs ran all {cfg.max_epochs} epochs")
    else:
        groups = sample_groups(ds.task_names, args.groups, args.sample_seed)
        jobs = [(g, args.seed) for g in groups]
        # -- batched, full recipe
        fast = BatchedMLPTrainer(ds, cfg, threads=args.threads, backend="c")
        fast.resolved_backend()  # compile (cached) outside the timing
        outcomes, wall, cpu = timed(lambda: fast.train(jobs))
        needed = [pair_steps_per_epoch(ds, o.group, B) * o.epochs for o in outcomes]
        us_fast = wall / sum(needed) * 1e6
        report["batched_c"] = {"groups": len(jobs), "wall_s": wall, "cpu_s": cpu,
                               "groups_per_min": len(jobs) / wall * 60, "wall_us_per_pair_step": us_fast,
                               "cpu_us_per_pair_step": cpu / sum(needed) * 1e6,
                               "epochs": [o.epochs for o in outcomes]}
        print(f"batched (C kernel): {len(jobs)} groups, full recipe, wall {wall:.1f} s (cpu {cpu:.1f} s) -> "
              f"{len(jobs) / wall * 60:.2f} groups/min, {us_fast:.1f} us wall per pair-step; "
              f"epochs run: min {min(o.epochs for o in outcomes)}, max {max(o.epochs for o in outcomes)}")

        # -- slow paths on the first few groups, capped, extrapolated to the epochs the groups need
        slow_jobs = jobs[: args.slow_groups]
        capped = cfg.replace(max_epochs=args.slow_epochs)
        for name, run in [
            ("train_group", lambda: [train_group(ds, list(g), capped, seed=s) for g, s in slow_jobs]),
            ("batched_torch", lambda: BatchedMLPTrainer(ds, capped, backend="torch").train(slow_jobs)),
        ]:
            results, wall_s, cpu_s = timed(run)
            ran = [getattr(r, "epochs", None) for r in results]
            steps = sum(pair_steps_per_epoch(ds, g, B) * e for (g, _), e in zip(slow_jobs, ran))
            us = wall_s / steps * 1e6
            est = us * sum(needed) / 1e6  # seconds for the sample's groups, full recipe
            report[name] = {"groups": len(slow_jobs), "epochs_cap": args.slow_epochs, "epochs_run": ran,
                            "wall_s": wall_s, "cpu_s": cpu_s, "wall_us_per_pair_step": us,
                            "cpu_us_per_pair_step": cpu_s / steps * 1e6,
                            "estimated_groups_per_min": len(jobs) / est * 60, "speedup_of_batched_c": us / us_fast}
            print(f"{name}: {len(slow_jobs)} groups x {args.slow_epochs} epochs, wall {wall_s:.1f} s (cpu {cpu_s:.1f} s)"
                  f" -> {us:.0f} us per pair-step -> est. {len(jobs) / est * 60:.3f} groups/min on the same groups "
                  f"(batched C is {us / us_fast:.1f}x faster)")

        # -- extrapolation to every job of a seed: the sample's pair-step-weighted mean epochs for every group
        per_epoch = sum(pair_steps_per_epoch(ds, g, B) for g in groups)
        mean_epochs = sum(needed) / per_epoch
        total = pair_steps_all * mean_epochs
        report["extrapolated_all_1023"] = {
            "pair_steps_per_epoch_all": pair_steps_all, "weighted_mean_epochs_from_sample": mean_epochs,
            "batched_c_min": total * us_fast / 1e6 / 60,
            "train_group_h": total * report["train_group"]["wall_us_per_pair_step"] / 1e6 / 3600,
            "batched_torch_h": total * report["batched_torch"]["wall_us_per_pair_step"] / 1e6 / 3600,
        }
        x = report["extrapolated_all_1023"]
        print(f"all 1023 jobs of a seed (1013 groups + 10 STL; {pair_steps_all} pair-steps per epoch, "
              f"~{mean_epochs:.0f} epochs): batched C ~{x['batched_c_min']:.0f} min, batched torch "
              f"~{x['batched_torch_h']:.1f} h, one Trainer per group ~{x['train_group_h']:.1f} h")
    report["load_average_end"] = os.getloadavg()
    print(f"load average: start {report['load_average_start']}, end {report['load_average_end']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
