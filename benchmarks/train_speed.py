"""Training speed of the reference model with the Chemical preset: the cost model of ground truth.

Trains one task alone (STL) and all ten tasks together (MTL) with the paper's
recipe (``PRESETS["chemical"]``), side by side in one run, and prints epochs/s,
steps/s, the epochs run before early stopping and the wall time. Writes the
figures to ``benchmarks/results/train_speed.json``.

    python benchmarks/train_speed.py                 # full recipe (minutes)
    python benchmarks/train_speed.py --max-epochs 30 # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch

from lightning_etap.data import load_dataset
from lightning_etap.data.datamodule import MultiTaskDataModule
from lightning_etap.training import get_preset, train_group


class _Count(L.Callback):
    def __init__(self):
        self.steps = 0
        self.t0 = None

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.steps += 1


def measure(dataset, tasks, config, seed):
    count = _Count()
    res = train_group(dataset, tasks, config, seed=seed, callbacks=[count])
    fit_seconds = res.seconds
    epochs_run = res.epochs
    dm = MultiTaskDataModule(dataset, tasks, batch_size=config.batch_size)
    return {
        "tasks": len(tasks),
        "steps_per_epoch": dm.steps_per_epoch,
        "epochs_run": epochs_run,
        "best_epoch": res.best_epoch,
        "seconds": round(fit_seconds, 2),
        "epochs_per_s": round(epochs_run / fit_seconds, 2),
        "steps_per_s": round(count.steps / fit_seconds, 1),
        "total_test_loss": round(res.total_test_loss, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--task", default="83", help="the STL task (default 83, the largest)")
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_speed.json"))
    args = ap.parse_args()

    ds = load_dataset("chemical", args.data_root)
    cfg = get_preset("chemical")
    if args.max_epochs:
        cfg = cfg.replace(max_epochs=args.max_epochs)
    train_group(ds, [args.task], cfg.replace(max_epochs=2), seed=args.seed)  # warm-up (imports, allocator)
    rows = {
        "stl": measure(ds, [args.task], cfg, args.seed),
        "mtl_all": measure(ds, list(ds.task_names), cfg, args.seed),
    }
    print(f"Chemical preset, torch {torch.__version__}, train_group on 1 thread, {platform.machine()}")
    print(f"{'run':>8s} {'tasks':>5s} {'steps/ep':>8s} {'epochs':>6s} {'best':>5s} {'sec':>7s} "
          f"{'epochs/s':>8s} {'steps/s':>8s} {'test loss':>9s}")
    for name, r in rows.items():
        print(f"{name:>8s} {r['tasks']:5d} {r['steps_per_epoch']:8d} {r['epochs_run']:6d} {r['best_epoch']:5d} "
              f"{r['seconds']:7.1f} {r['epochs_per_s']:8.1f} {r['steps_per_s']:8.1f} {r['total_test_loss']:9.4f}")
    ratio = rows["mtl_all"]["seconds"] / rows["mtl_all"]["epochs_run"] / (
        rows["stl"]["seconds"] / rows["stl"]["epochs_run"])
    print(f"time per epoch, all-task MTL / STL: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "config": cfg.to_dict(), **rows,
                                          "mtl_over_stl_epoch_time": round(ratio, 2)}, indent=2))


if __name__ == "__main__":
    main()
