"""The ``lightning-etap`` command.

``lightning-etap run`` is the main job. Today it trains the reference model on a
dataset (ETTm1 by default) for every task alone (single-task learning) and for
all tasks together, and prints each task's test loss and relative MTL gain.
The later stages of the pipeline (affinity, sampled ground truth, prediction,
selection, report) will grow into the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lightning_etap import __version__


class UserError(Exception):
    """A mistake in the command line or configuration: reported in one line, no traceback."""


def _parser() -> argparse.ArgumentParser:
    from lightning_etap.data.registry import DATASETS
    from lightning_etap.training import PRESETS

    p = argparse.ArgumentParser(
        prog="lightning-etap",
        description="Which tasks should train together? ETAP task grouping for PyTorch Lightning.",
    )
    p.add_argument("--version", action="version", version=f"lightning-etap {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the main job (default dataset: ettm1)")
    run.add_argument("--dataset", default="ettm1", help=f"one of {sorted(DATASETS)} (default: ettm1)")
    run.add_argument("--data-root", default=None,
                     help="data directory (default: $LIGHTNING_ETAP_DATA or the per-user cache)")
    run.add_argument("--preset", default=None,
                     help=f"training recipe, one of {sorted(PRESETS)} (default: the dataset's own)")
    run.add_argument("--tasks", nargs="+", default=None, help="restrict to these tasks (default: all)")
    run.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    run.add_argument("--max-epochs", type=int, default=None, help="override the preset's epoch cap")
    run.add_argument("--output", default=None, help="write the results as JSON to this file")

    ds = sub.add_parser("datasets", help="list the datasets and where their files are looked for")
    ds.add_argument("--data-root", default=None)
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from lightning_etap.data.registry import DATASETS, load_dataset
    from lightning_etap.training import PRESETS, get_preset, relative_gain, train_group

    name = args.dataset.lower()
    if name not in DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose one of {sorted(DATASETS)}")
    preset = args.preset or (name if name in PRESETS else "chemical")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = get_preset(preset)
    if args.max_epochs is not None:
        if args.max_epochs < 1:
            raise UserError(f"--max-epochs must be >= 1, got {args.max_epochs}")
        config = config.replace(max_epochs=args.max_epochs)
    if args.output is not None:
        out = Path(args.output)
        if out.parent and not out.parent.exists():
            raise UserError(f"output directory {out.parent} does not exist")

    t0 = time.perf_counter()
    try:
        dataset = load_dataset(name, args.data_root)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UserError(str(err)) from err
    tasks = dataset.task_names if args.tasks is None else tuple(args.tasks)
    try:
        dataset.check_tasks(tasks)
    except ValueError as err:
        raise UserError(str(err)) from err
    print(f"lightning-etap {__version__}: {dataset.name}, {len(tasks)} tasks, preset {preset!r}, "
          f"seed {args.seed} (loaded in {time.perf_counter() - t0:.1f}s)", flush=True)

    stl = {}
    for i, task in enumerate(tasks, 1):
        res = train_group(dataset, [task], config, seed=args.seed)
        stl[task] = res.test_losses[task]
        print(f"  [{i}/{len(tasks)}] single-task {task}: test loss {stl[task]:.4f} "
              f"({res.epochs} epochs, {res.seconds:.1f}s)", flush=True)
    mtl = train_group(dataset, list(tasks), config, seed=args.seed)
    print(f"  all-task model: {mtl.epochs} epochs, {mtl.seconds:.1f}s", flush=True)

    rows = []
    print()
    print(f"{'task':>12s}  {'STL loss':>10s}  {'MTL loss':>10s}  {'gain':>8s}")
    for task in tasks:
        gain = relative_gain(stl[task], mtl.test_losses[task])
        rows.append({"task": task, "stl_loss": stl[task], "mtl_loss": mtl.test_losses[task], "gain": gain})
        print(f"{task:>12s}  {stl[task]:10.4f}  {mtl.test_losses[task]:10.4f}  {gain:+8.1%}")
    total_stl, total_mtl = sum(stl.values()), mtl.total_test_loss
    print(f"{'total':>12s}  {total_stl:10.4f}  {total_mtl:10.4f}  {(total_stl - total_mtl) / total_stl:+8.1%}")
    print(f"\nfinished in {time.perf_counter() - t0:.1f}s")
    if args.output is not None:
        payload = {"dataset": dataset.name, "preset": preset, "seed": args.seed, "config": config.to_dict(),
                   "tasks": rows, "version": __version__}
        try:
            Path(args.output).write_text(json.dumps(payload, indent=2))
        except OSError as err:
            raise UserError(f"cannot write {args.output}: {err.strerror}") from err
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from lightning_etap.data._download import resolve_root
    from lightning_etap.data.registry import DATASETS

    root = resolve_root(args.data_root)
    print(f"data root: {root} (set with --data-root or $LIGHTNING_ETAP_DATA)")
    for name in sorted(DATASETS):
        print(f"  {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-etap`` console command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "datasets":
            return _cmd_datasets(args)
    except UserError as err:
        print(f"lightning-etap: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lightning-etap: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
