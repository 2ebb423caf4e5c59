"""The whole pipeline with the W&B logger: the fit's curves and the report's figures in one W&B run.

    python examples/wandb_dashboard.py                  # online (after `wandb login`)
    python examples/wandb_dashboard.py --offline        # files only; upload later with `wandb sync`
    python examples/wandb_dashboard.py --tiny           # 4 tasks, 2 epochs, offline (what CI runs)

The all-task fit logs to the W&B run (training and validation losses, and the
affinity curves when the callback's dashboard is on); the report stage reopens
the same run and logs every figure of ``report/index.html`` (heatmap,
affinity curves, predicted vs measured, the chosen groups, time per stage)
plus the selection as a table. The same from the command line::

    lightning-etap run --dataset digits --logger wandb --wandb-mode offline
"""

from __future__ import annotations

import argparse
import json
import tempfile

from lightning_etap.pipeline import Pipeline, PipelineConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offline", action="store_true", help="W&B offline mode")
    ap.add_argument("--project", default="lightning-etap")
    ap.add_argument("--output", default=None, help="run directory (default: a temporary folder)")
    ap.add_argument("--tiny", action="store_true", help="4 tasks, 2 epochs, offline (for CI)")
    args = ap.parse_args()

    tasks = ["digit_1", "digit_3", "digit_7", "digit_9"] if args.tiny else \
        ["digit_1", "digit_2", "digit_3", "digit_5", "digit_7", "digit_8", "digit_9"]
    config = PipelineConfig(
        dataset="digits",
        tasks=tasks,
        recipe={"max_epochs": 2, "hidden": [16]} if args.tiny else {},
        n_train_groups=4 if args.tiny else 10,
        executor="local" if args.tiny else "processes",
        logger="wandb",
        wandb_mode="offline" if (args.offline or args.tiny) else "online",
        wandb_project=args.project,
        output=args.output or tempfile.mkdtemp(prefix="etap-wandb-"),
    )
    pipeline = Pipeline(config, progress=not args.tiny)
    pipeline.run()
    print(pipeline.summary())
    record = json.loads(pipeline.dir.state_path.read_text())["affinity"]["logger"]
    print(f"W&B run {record['id']} in {pipeline.dir.logs_dir}")


if __name__ == "__main__":
    main()
