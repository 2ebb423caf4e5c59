"""The full pipeline on School (ILEA exam scores, one regression task per school), from Python.

    python examples/school_pipeline.py            # 10 schools: ETAP fitted on 10 groups, 1013 predicted
    python examples/school_pipeline.py --tiny     # 4 schools, 2 epochs (what CI runs)

Each stage writes into the run directory; run the script again and every
finished stage is skipped. The command-line equivalent is::

    lightning-etap run --dataset school --tasks school_001 ... school_010 --output runs/school

With 10 tasks there are 1013 multi-task groups: only the all-task group and
the 10 sampled training groups are trained (``measure_all`` is ``auto``: off
above 127 groups), ETAP predicts the other 1002, and the report shows the
chosen groups with their predicted gains (measured gains where a chosen group
is a training group). Needs the School data (``$LIGHTNING_ETAP_DATA`` or a
download on first use).
"""

from __future__ import annotations

import argparse
import tempfile

from lightning_etap.pipeline import Pipeline, PipelineConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=None, help="run directory (default: runs/school, or a temporary one with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="4 schools, 2 epochs, 3 training groups (for CI)")
    args = ap.parse_args()

    schools = [f"school_{i:03d}" for i in (1, 4, 10, 11)] if args.tiny else [f"school_{i:03d}" for i in range(1, 11)]
    config = PipelineConfig(
        dataset="school",
        tasks=schools,
        recipe={"max_epochs": 2} if args.tiny else {},
        n_train_groups=3 if args.tiny else 10,
        budgets=[2, 3],
        executor="local" if args.tiny else "processes",
        output=args.output or (tempfile.mkdtemp(prefix="etap-school-") if args.tiny else "runs/school"),
    )
    pipeline = Pipeline(config, progress=not args.tiny)
    pipeline.run()
    print(pipeline.summary())


if __name__ == "__main__":
    main()
