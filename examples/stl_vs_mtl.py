"""Single-task vs multi-task training of one group, and each member's relative gain (eq. 1).

    python examples/stl_vs_mtl.py                                  # digits, no data needed
    python examples/stl_vs_mtl.py --dataset chemical --tasks 83 78 55 --preset chemical
"""

from __future__ import annotations

import argparse

from lightning_etap.data import load_dataset
from lightning_etap.training import get_preset, relative_gain, train_group


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--tasks", nargs="+", default=["digit_3", "digit_5", "digit_8"])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ds = load_dataset(args.dataset)
    cfg = get_preset(args.preset)
    if args.max_epochs:
        cfg = cfg.replace(max_epochs=args.max_epochs)
    group = train_group(ds, args.tasks, cfg, seed=args.seed)
    for task in args.tasks:
        stl = train_group(ds, [task], cfg, seed=args.seed).test_losses[task]
        mtl = group.test_losses[task]
        print(f"{task:>10s}  STL {stl:.4f}  in group {mtl:.4f}  gain {relative_gain(stl, mtl):+.1%}")


if __name__ == "__main__":
    main()
