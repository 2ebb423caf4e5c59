"""The two training engines of ground-truth collection, side by side: a Lightning Trainer per group
against the plain PyTorch loop (``train_group(engine=...)``).

Both train the same groups with the same seed, interleaved in one process
(lightning, loop, lightning, loop, ... for ``--rounds`` rounds), on one
torch thread. For each group the script reports the CPU time and wall time
of each engine (median over rounds), their ratio, the epochs run, and
whether the test losses agree to the bit.

    python benchmarks/loop_vs_lightning.py                    # ETTm1, 4 groups, 3 rounds (a few minutes)
    python benchmarks/loop_vs_lightning.py --dataset digits

Results go to ``benchmarks/results/loop_vs_lightning.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

#: the groups timed, by task index: a pair, a triple, five tasks, every task
GROUP_SIZES = (2, 3, 5, 7)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ettm1")
    ap.add_argument("--data-root", default=os.environ.get("LIGHTNING_ETAP_DATA"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loop_vs_lightning.json"))
    args = ap.parse_args(argv)

    import torch

    from lightning_etap.data import load_dataset
    from lightning_etap.training import get_preset, quiet_lightning, train_group

    torch.set_num_threads(1)
    ds = load_dataset(args.dataset, args.data_root)
    cfg = get_preset(args.dataset)
    names = list(ds.task_names)
    groups = [names[:k] for k in GROUP_SIZES if k <= len(names)]
    train_group(ds, groups[0], cfg.replace(max_epochs=1), args.seed)  # warm-up: imports, first-fit costs
    train_group(ds, groups[0], cfg.replace(max_epochs=1), args.seed, engine="loop")

    rows = []
    for group in groups:
        rec = {e: {"cpu": [], "wall": [], "losses": None, "epochs": None} for e in ("lightning", "loop")}
        for _ in range(args.rounds):
            for engine, r in rec.items():
                c0, w0 = time.process_time(), time.perf_counter()
                with quiet_lightning():
                    res = train_group(ds, group, cfg, args.seed, engine=engine)
                r["cpu"].append(time.process_time() - c0)
                r["wall"].append(time.perf_counter() - w0)
                r["losses"], r["epochs"] = res.test_losses, res.epochs
        same = rec["lightning"]["losses"] == rec["loop"]["losses"]
        cpu = {e: statistics.median(r["cpu"]) for e, r in rec.items()}
        wall = {e: statistics.median(r["wall"]) for e, r in rec.items()}
        row = {"group": group, "epochs": rec["loop"]["epochs"], "epochs_lightning": rec["lightning"]["epochs"],
               "cpu_seconds": {e: round(v, 2) for e, v in cpu.items()},
               "wall_seconds": {e: round(v, 2) for e, v in wall.items()},
               "cpu_ratio": round(cpu["lightning"] / cpu["loop"], 2),
               "wall_ratio": round(wall["lightning"] / wall["loop"], 2),
               "test_losses_identical": same}
        rows.append(row)
        print(f"{len(group)} tasks, {row['epochs']} epochs: lightning {cpu['lightning']:.2f} s CPU, loop "
              f"{cpu['loop']:.2f} s CPU ({row['cpu_ratio']:.2f}x less; wall {row['wall_ratio']:.2f}x); "
              f"test losses {'identical' if same else 'DIFFER'}", flush=True)
    out = {"benchmark": "loop_vs_lightning", "dataset": args.dataset, "rounds": args.rounds, "seed": args.seed,
           "torch": torch.__version__, "threads": 1,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average": [round(x, 2) for x in os.getloadavg()], "groups": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["test_losses_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
