"""How the default's control variate behaves, offline, on the wide encoder's per-step record.

``benchmarks/affinity_overhead.py`` times the default setting and scores its
one schedule. Whether the control variate is worth its cost, and how much
the result depends on which steps a schedule happens to hit, needs the
exact score *and* the proxy at every step of one fit. This script records
both in one fit of the overhead benchmark's wide shared-input encoder (3 x
1024, batch 256, 10 tasks, 600 steps; ``AffinityCallback(every_n_steps=1,
control_variate=True)``, so every step is measured exactly and its proxy is
computed too), then replays schedules through the library's own
``AffinityAccumulator`` (with the callback's reduction), without training
again:

* the per-step Pearson correlation of the proxy's off-diagonal scores with
  the exact ones (how closely the proxy follows the batch-to-batch swings);
* for schedules "an exact step every k-th step from offset o" with the proxy
  at every unmeasured step, at every other one, or not at all (the plain
  sample), the Spearman correlation of the replayed matrix with the exact
  every-step matrix, over every offset o in 0..k-1: min, mean, max and the
  share of offsets at or above 0.95.

    python benchmarks/control_variate_offline.py              # ~10 min on 2 busy cores
    python benchmarks/control_variate_offline.py --steps 120 --tasks 10 --out /tmp/cv.json   # a quick look

Results go to ``benchmarks/results/control_variate_offline.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

#: intervals of exact steps replayed (35: the default's choice on this encoder; 40 and 44: earlier choices)
INTERVALS = (20, 35, 40, 44)
#: the proxy at every unmeasured step (1), every other one (2), or not at all (0: the plain sample)
PROXY_EVERY = (1, 2, 0)


def record(n: int, steps: int, seed: int) -> dict:
    """One fit measuring the exact score and the proxy at every step: both per step, and the epochs."""
    import affinity_overhead as ao
    import numpy as np
    import torch

    from lightning_etap.affinity import AffinityCallback

    torch.set_num_threads(1)
    ds, tasks, cfg = ao._build(f"wide{n}", None, seed)
    rows: list[tuple[int, int, np.ndarray, np.ndarray | None]] = []

    class Recorder(AffinityCallback):
        """Keeps what each measured step hands its accumulator: epoch, step, exact and proxy scores."""

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            acc = self._acc  # made at the first step's task losses
            if acc is not None and not getattr(acc, "_recorded", False):
                add = acc.add

                def recorded(epoch, scores, valid, step=None, proxy=None):
                    if not bool(valid.all()):
                        raise RuntimeError("a step with a skipped task: the replay assumes every task scored")
                    rows.append((int(epoch), int(step), scores.detach().double().cpu().numpy(),
                                 None if proxy is None else proxy.detach().double().cpu().numpy()))
                    add(epoch, scores, valid, step=step, proxy=proxy)

                acc.add, acc._recorded = recorded, True
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    cb = Recorder("encoder", heatmap=False, log_every_n_steps=0, every_n_steps=1, control_variate=True)
    t0 = time.perf_counter()
    ao.seeded_fit(ds, tasks, cfg, seed, steps, [cb])
    if len(rows) != steps or any(p is None for *_, p in rows):
        raise RuntimeError(f"expected {steps} steps with exact and proxy scores, got {len(rows)}")
    return {"tasks": n, "steps": steps, "seconds": time.perf_counter() - t0,
            "reduction": cb.reduction, "whole": np.asarray(cb.result.matrix, dtype=float),
            "epochs": np.array([r[0] for r in rows]), "exact": np.stack([r[2] for r in rows]),
            "proxy": np.stack([r[3] for r in rows])}


def replay(rec: dict, k: int, offset: int, proxy_every: int):
    """The matrix the accumulator gives when only steps ``offset, offset + k, ...`` are exact and the proxy
    scores the unmeasured steps ``offset + j * proxy_every`` (``0``: none; steps before ``offset`` follow the same
    rule, as if the schedule had started earlier)."""
    import torch

    from lightning_etap.affinity.scores import AffinityAccumulator

    n = rec["tasks"]
    acc = AffinityAccumulator(n)
    valid = torch.ones(n, dtype=torch.bool)
    for s in range(rec["steps"]):
        e = int(rec["epochs"][s])
        if s >= offset and (s - offset) % k == 0:
            acc.add(e, torch.from_numpy(rec["exact"][s]), valid, step=s,
                    proxy=torch.from_numpy(rec["proxy"][s]) if proxy_every else None)
        elif proxy_every and (s - offset) % proxy_every == 0:  # the callback's rule, counted from its anchor
            acc.add_proxy(e, torch.from_numpy(rec["proxy"][s]), valid)
    return acc.matrix(rec["reduction"]).numpy()


def figures(rec: dict) -> dict:
    import affinity_overhead as ao
    import numpy as np

    n = rec["tasks"]
    off = ~np.eye(n, dtype=bool)
    per_step = [float(np.corrcoef(x[off], p[off])[0, 1]) for x, p in zip(rec["exact"], rec["proxy"])]
    whole = rec["whole"]
    check = ao.spearman_offdiag(replay(rec, 1, 0, 0), whole)  # every step replayed is the fit's own matrix
    out = {"per_step_pearson_proxy_exact": {"median": round(float(np.median(per_step)), 3),
                                             "q10": round(float(np.quantile(per_step, 0.1)), 3),
                                             "q90": round(float(np.quantile(per_step, 0.9)), 3)},
           "replay_all_steps_rho": round(check, 6), "schedules": {}}
    for k in INTERVALS:
        for pe in PROXY_EVERY:
            rhos = [ao.spearman_offdiag(replay(rec, k, o, pe), whole) for o in range(min(k, rec["steps"]))]
            name = f"every {k}, " + ({0: "no proxy", 1: "proxy every step", 2: "proxy every other step"}[pe])
            out["schedules"][name] = {"k": k, "proxy_every": pe, "offsets": len(rhos),
                                      "min": round(min(rhos), 3), "mean": round(float(np.mean(rhos)), 3),
                                      "max": round(max(rhos), 3),
                                      "share_at_least_095": round(float(np.mean(np.array(rhos) >= 0.95)), 3),
                                      "offset0": round(rhos[0], 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "control_variate_offline.json"))
    args = ap.parse_args(argv)

    rec = record(args.tasks, args.steps, args.seed)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, one torch thread",
           "config": f"wide{args.tasks}", "steps": args.steps, "seed": args.seed,
           "fit_seconds": round(rec["seconds"], 1), **figures(rec)}
    print(f"wide encoder, {args.tasks} tasks, {args.steps} steps (fit {rec['seconds']:.0f} s)")
    p = out["per_step_pearson_proxy_exact"]
    print(f"per-step Pearson, proxy vs exact: median {p['median']} (10%-90%: {p['q10']} - {p['q90']})")
    print(f"{'schedule':40s} {'min':>6s} {'mean':>6s} {'max':>6s} {'>=0.95':>7s} {'offset 0':>9s}")
    for name, s in out["schedules"].items():
        print(f"{name:40s} {s['min']:6.3f} {s['mean']:6.3f} {s['max']:6.3f} {s['share_at_least_095']:7.0%} "
              f"{s['offset0']:9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
