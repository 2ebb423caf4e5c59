"""Why the exact affinity of the wide synthetic encoder is hard to reproduce: memorisation.

``benchmarks/affinity_overhead.py`` scores the cheap settings by their
Spearman agreement with exact ETAP at every step. On its wide shared-input
encoder with 30 tasks the exact matrix does not even agree with itself
across halves of the fit. This script asks why, with one exact every-step fit
(600 steps, batch 256, the overhead benchmark's model and synthetic tasks) on
two sizes of the same data:

* ``4096`` rows, the overhead benchmark's data: 3,072 training rows, so the
  600 steps are 50 epochs and the 2.2M-parameter encoder memorises its noisy
  labels;
* ``51200`` rows: 38,400 training rows, 4 epochs, no memorisation.

For each it prints the training loss along the fit, the mean absolute
off-diagonal score per phase of the fit, how reproducible the exact matrix
is (split half between even and odd epochs, and every k-th step against
all steps: what any schedule of exact steps gives up), and how well the
matrix follows the tasks' construction (Spearman with minus the angle
between two tasks' label directions: neighbours are related, the ends
opposed).

    python benchmarks/wide_reliability.py                 # n = 30, both sizes, ~20 min on 2 cores
    python benchmarks/wide_reliability.py --tasks 10 30

Results go to ``benchmarks/results/wide_reliability.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

#: phases of the fit over which the mean |score| and the agreement with the construction are reported
PHASES = ((0, 50), (50, 100), (100, 200), (200, 300), (300, 400), (400, 500), (500, 600))


def fit(n: int, rows: int, steps: int, seed: int) -> dict:
    """One exact every-step fit of the wide encoder: its per-step matrices, losses and figures."""
    import affinity_overhead as ao
    import numpy as np
    import torch

    from lightning_etap.affinity import AffinityCallback

    torch.set_num_threads(1)
    ds, tasks, cfg = ao._build(f"wide{n}", None, seed, rows=rows)

    class Exact(AffinityCallback):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            self.steps_per_epoch, self.losses = int(trainer.num_training_batches), []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    cb = Exact("encoder", heatmap=False, log_every_n_steps=0, every_n_steps=1, keep_step_scores=True)
    t0 = time.perf_counter()
    ao.seeded_fit(ds, tasks, cfg, seed, steps, [cb])
    seconds = time.perf_counter() - t0
    res = cb.result
    mats = np.asarray(res.step_matrices, dtype=float)
    rec = {"step_matrices": mats, "steps": [int(s) for s in res.steps], "steps_per_epoch": cb.steps_per_epoch}
    angle = np.arange(n) * np.pi / n
    related = -np.abs(np.subtract.outer(angle, angle))
    off = ~np.eye(n, dtype=bool)
    phases = []
    for a, b in PHASES:
        if a >= len(mats):
            break
        seg = mats[a:b]
        phases.append({"steps": [a, min(b, len(mats))], "mean_abs_offdiag": round(float(np.abs(seg[:, off]).mean()), 4),
                       "rho_construction": round(ao.spearman_offdiag(seg.mean(0), related), 3),
                       "rho_with_whole_fit": round(ao.spearman_offdiag(seg.mean(0), res.matrix), 3)})
    return {
        "tasks": n, "rows": rows, "train_rows": rows * 3 // 4, "steps": steps,
        "epochs": round(steps / cb.steps_per_epoch, 1), "seconds": round(seconds, 1),
        "loss_first": round(cb.losses[0], 3), "loss_last": round(float(np.mean(cb.losses[-10:])), 3),
        "loss_every_50": [round(x, 3) for x in cb.losses[::50]],
        "reliability": ao.reliability(rec),
        "rho_construction": round(ao.spearman_offdiag(res.matrix, related), 3),
        "phases": phases,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[30])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 51200])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="fits run at once, one torch thread each")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wide_reliability.json"))
    args = ap.parse_args(argv)
    cases = [(n, r) for n in args.tasks for r in args.rows]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(fit, *zip(*cases, strict=True), [args.steps] * len(cases), [args.seed] * len(cases)))
    for r in runs:
        rel = r["reliability"]
        print(f"n={r['tasks']:>2} rows={r['rows']:>6} ({r['epochs']:g} epochs): loss {r['loss_first']:.2f} -> "
              f"{r['loss_last']:.2f}; split half {rel['split_half']:.2f}; every k-th step "
              + " ".join(f"k={k}: {v:.2f}" for k, v in rel["subsample"].items())
              + f"; rho with the construction {r['rho_construction']:.2f}")
        for p in r["phases"]:
            print(f"    steps {p['steps'][0]:>3}-{p['steps'][1]:<3} mean |z| {p['mean_abs_offdiag']:.3f}  "
                  f"rho construction {p['rho_construction']:+.2f}  rho whole fit {p['rho_with_whole_fit']:+.2f}")
    out = {"benchmark": "wide_reliability", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "steps": args.steps, "seed": args.seed, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
