"""The ``lightning-etap`` command.

``lightning-etap run`` is the main job: on ETTm1 by default it measures the
task affinity during one all-task fit, trains the sampled training groups for
ground truth, fits ETAP, predicts every group, selects groups for budgets 2-4
and writes a report, all in one run directory (``runs/<dataset>``). The
stages are also commands of their own (``affinity``, ``gains``, ``predict``,
``select``, ``report``) reading and writing the same directory; a finished
stage is skipped unless ``--force``. The pipeline itself lives in
:mod:`lightning_etap.pipeline`; this module only turns options into a config.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from lightning_etap import __version__
from lightning_etap.pipeline.errors import UserError

__all__ = ["UserError", "main"]

_STAGE_HELP = {
    "affinity": "stage 1: the all-task fit with the AffinityCallback",
    "gains": "stage 2: train the training groups (and, with measure_all, every group) for ground truth",
    "predict": "stage 3: fit ETAP on the training groups and predict every candidate group",
    "select": "stage 4: select groups for every budget (and the true optimum when every group was measured)",
    "report": "stage 5: write report/index.html and its figures",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other user error."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # only options given on the command line override the config
    g = p.add_argument_group("run directory and config")
    g.add_argument("-c", "--config", default=None, metavar="FILE", help="YAML config (see docs/pipeline.md)")
    g.add_argument("-o", "--output", default=S, metavar="DIR", help="run directory (default: runs/<dataset>)")
    g.add_argument("--force", action="store_true", help="redo the stage(s) even if up to date")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=S, help="ettm1 (default), digits, chemical, school, parkinsons, landmine")
    g.add_argument("--data-root", dest="data_root", default=S, metavar="DIR",
                   help="data directory (default: $LIGHTNING_ETAP_DATA or the per-user cache)")
    g.add_argument("--preset", default=S, help="training recipe of the reference model (default: the dataset's)")
    g.add_argument("--tasks", nargs="+", default=S, metavar="TASK", help="the tasks to group (default: all)")
    g.add_argument("--max-epochs", dest="max_epochs", type=int, default=S, metavar="N", help="epoch cap of every fit")
    g.add_argument("--engine", choices=["loop", "lightning"], default=S,
                   help="how ground-truth groups train: a plain loop (default, faster, same numbers) or a Trainer")
    g.add_argument("--affinity-from", dest="affinity_from", default=S, metavar="DIR",
                   help="use the affinity saved in DIR (AffinityResult.save, e.g. from your own DDP training) "
                        "instead of an all-task fit ('none': measure it here again)")
    g = p.add_argument_group("ground truth, prediction and selection")
    g.add_argument("--train-groups", dest="n_train_groups", type=int, default=S, metavar="N",
                   help="|G_train|: sampled training groups besides the all-task group (default 10)")
    g.add_argument("--sampling", choices=["random", "active"], default=S,
                   help="how the training groups are chosen: random (default, the paper's protocol) or active "
                        "(active ETAP: one at a time, where a measurement is expected to improve the grouping most)")
    g.add_argument("--seeds", nargs="+", type=int, default=S, metavar="S", help="training seeds (default 0)")
    g.add_argument("--measure-all", dest="measure_all", choices=["auto", "true", "false"], default=S,
                   help="also train every candidate group to find the true optimum (auto: up to 127 groups)")
    g.add_argument("--budget", dest="budgets", nargs="+", type=int, default=S, metavar="B",
                   help="numbers of groups to select (default 2 3 4)")
    g = p.add_argument_group("where and how")
    g.add_argument("--executor", choices=["local", "processes", "ray"], default=S,
                   help="where ground-truth jobs train (default: processes)")
    g.add_argument("--workers", type=int, default=S, metavar="N", help="processes of the processes executor (2)")
    g.add_argument("--ray-address", dest="ray_address", default=S, metavar="ADDR", help="Ray cluster address")
    g.add_argument("--logger", choices=["none", "csv", "tensorboard", "wandb"], default=S,
                   help="logger of the all-task fit and the report's figures (default: none)")
    g.add_argument("--wandb-mode", dest="wandb_mode", choices=["online", "offline"], default=S)
    g.add_argument("--wandb-project", dest="wandb_project", default=S)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lightning-etap",
        description="Which tasks should train together? ETAP task grouping for PyTorch Lightning.",
    )
    p.add_argument("--version", action="version", version=f"lightning-etap {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="the main job: every stage, skipping those already done (default: ettm1)",
                         description="Run every stage in one run directory; finished stages are skipped, so "
                                     "the same command resumes an interrupted run.")
    _pipeline_options(run)
    for stage, text in _STAGE_HELP.items():
        _pipeline_options(sub.add_parser(stage, help=text, description=text))
    ds = sub.add_parser("datasets", help="list the datasets and where their files are looked for")
    ds.add_argument("--data-root", default=None)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("output", "dataset", "data_root", "preset", "engine", "tasks", "affinity_from", "n_train_groups", "sampling",
            "seeds", "measure_all", "budgets", "executor", "workers", "ray_address", "logger", "wandb_mode",
            "wandb_project")
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if str(out.get("affinity_from", "x")).strip().lower() in ("", "none"):
        out["affinity_from"] = None  # back to the pipeline's own all-task fit
    return out


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from lightning_etap.pipeline.config import resolve_config

    overrides = _overrides(args)
    if hasattr(args, "max_epochs") and args.max_epochs < 1:
        raise UserError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    config = resolve_config(args.config, overrides, max_epochs=getattr(args, "max_epochs", None))
    if config.custom and config.dataset_options:
        print(f"lightning-etap: dataset_options {dict(config.dataset_options)} are not used: they configure the "
              "built-in datasets' loaders, and your own datamodule factory gets (tasks, seed) only (set its "
              "options in the factory)", file=sys.stderr, flush=True)
    if config.ray_address is not None and config.executor != "ray":
        print(f"lightning-etap: ray_address {config.ray_address!r} is not used: the executor is {config.executor!r} "
              "(add --executor ray to train on that cluster)", file=sys.stderr, flush=True)
    if "workers" in overrides and config.executor == "ray":
        print("lightning-etap: --workers sizes the processes executor; Ray uses the CPUs of its cluster (start a "
              "local one with `ray start --head --num-cpus N` and pass --ray-address auto to choose)",
              file=sys.stderr, flush=True)

    from lightning_etap.groundtruth.executors import is_lightning_interrupt
    from lightning_etap.pipeline.stages import Pipeline

    pipeline = Pipeline(config, progress=not args.no_progress)
    print(f"lightning-etap {__version__}: {args.command} in {pipeline.dir.path} "
          f"({config.dataset}{', your own model' if config.custom else f', preset {config.preset}'})", flush=True)
    terminated = []

    def on_sigterm(signum, frame):  # a scheduler's stop (Slurm, `timeout`, `kill`): shut down as on Ctrl-C
        terminated.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not break off the shutdown
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # handlers are set from there only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        if args.command == "run":
            pipeline.run(force=args.force)
        else:
            pipeline.run_stage(args.command, force=args.force)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Lightning handles Ctrl-C inside a fit itself: it shuts down and raises SystemExit(1) while handling the
        # KeyboardInterrupt, which stays on the exception as its context
        if isinstance(stop, SystemExit) and not is_lightning_interrupt(stop):
            raise
        print(f"lightning-etap: {'terminated (SIGTERM)' if terminated else 'interrupted'}; finished work is kept "
              f"in {pipeline.dir.path}: rerun the same command to resume", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if args.command in ("run", "select", "report"):
        print()
        print(pipeline.summary())
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
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "datasets":
            return _cmd_datasets(args)
        return _cmd_pipeline(args)
    except UserError as err:
        print(f"lightning-etap: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lightning-etap: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from lightning_etap.groundtruth.collect import CollectionError
        from lightning_etap.groundtruth.executors import RayClusterError

        if isinstance(err, (CollectionError, RayClusterError)):
            print(f"lightning-etap: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
