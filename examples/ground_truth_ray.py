"""Ground truth on Ray: sampled task groups trained on a Ray cluster, every result in one SQLite store.

    python examples/ground_truth_ray.py                       # a local Ray instance, digits, 10 groups
    python examples/ground_truth_ray.py --address auto        # an existing cluster (`ray start --head`)
    python examples/ground_truth_ray.py --tiny                # 3 tasks, 2 epochs (what CI runs)

Workers on the cluster only train; the driver (this script) writes the store,
so the file never has to be shared between nodes. Run it twice with the same
``--store PATH``: the second run finds every job in the store and trains
nothing (without ``--store`` every run uses a new temporary file).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lightning_etap.groundtruth import LightningGroupTrainer, RayExecutor, collect_gains, sample_groups
from lightning_etap.training import get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    ap.add_argument("--store", default=None, help="SQLite store (default: a temporary file)")
    ap.add_argument("--tiny", action="store_true", help="3 tasks, 2 epochs, 2 groups (for CI)")
    args = ap.parse_args()

    recipe = get_preset("digits")
    tasks = ["digit_3", "digit_5", "digit_8"] if args.tiny else ["digit_1", "digit_3", "digit_5", "digit_7", "digit_8"]
    if args.tiny:
        recipe = recipe.replace(max_epochs=2, hidden=(16,))
    trainer = LightningGroupTrainer("digits", recipe)
    groups = sample_groups(tasks, n_groups=2 if args.tiny else 10, include_all_tasks=True, seed=0)

    init = {} if args.address else {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
    executor = RayExecutor(address=args.address, num_cpus=1, init_kwargs=init)
    store = Path(args.store) if args.store else Path(tempfile.mkdtemp()) / "gains.sqlite"
    gains = collect_gains(trainer, groups, seeds=[0], store=store, executor=executor, progress=not args.tiny)

    print(f"{len(gains)} groups measured on Ray; store: {store}")
    for group, row in zip(gains.groups, gains.gains):
        cells = ", ".join(f"{t} {row[gains.task_names.index(t)]:+.1%}" for t in group)
        print(f"  {' + '.join(group)}: {cells}")

    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
