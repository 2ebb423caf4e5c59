"""What measuring task affinity costs: training time and peak memory, side by side with plain training.

For every configuration the same seeded fit of a fixed number of optimizer
steps runs in these modes (every mode keeps the callback's other defaults:
the released code's score, ``update="gradient"``, normalised by the loss):

* ``plain``           no callback;
* ``exact``           exact ETAP at every step (``every_n_steps=1``, the fast activation engine);
* ``exact_autograd``  the same numbers the obvious way: explicit per-task gradients of every
  shared parameter (``engine="autograd"``; skipped for the 30-task wide encoder, ~40x);
* ``default``         ``AffinityCallback()`` as a user gets it (``every_n_steps="auto"``, the control variate
  where the cost model turns it on);
* ``tag``             TAG's lookahead at every step;
* ``every10``         exact ETAP every 10th step;
* ``last_layer``      every step, only the last shared layer's gradients;
* ``representation``  every step, gradients w.r.t. the encoder's output.

Configurations: Chemical (per-task inputs, 10 tasks, the paper's recipe),
ETTm1 (shared windows, 7 tasks), digits (shared inputs, 10 tasks) and a wide
shared-input encoder (3 x 1024, batch 256) with 10 and 30 tasks on synthetic
related tasks (binary labels of directions that turn from one vector through a
second to its opposite, plus a part of their own: pairs range from closely
related to opposed). A dataset that fails to load is skipped with a message.

Time: the training loop (``on_train_start`` to ``on_train_end``, validation
off), all modes interleaved in one worker process for ``--rounds`` rounds
(one for the wide encoder). A ratio is the median over rounds of the mode's
time over plain's time in the same round: on this shared virtual machine
whole spells run 10-20 % slower (stolen CPU), and pairing fits of one round
cancels most of that; the best-of-rounds ratios are stored too
(``ratio_to_plain_cpu_best``). For schedules that leave plain steps
(the default, every 10th) the fit's own plain steps measure the machine's
speed of the moment too: the "in fit" ratio is the fit's step time over its
number of steps times the median plain step of the same fit (divided by the
same statistic of the plain fit), which a slow spell between fits does not
move. Ratios use the process's CPU time,
which other jobs on a shared machine disturb far less than wall time (one
torch thread, no loader workers); wall-time ratios are stored too. Memory, in
a fresh worker per mode running a 2-step fit (step 0 is measured in every
mode): peak resident set size during the fit minus the size just before
(Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), with
glibc told to map every allocation of 128 KiB or more on its own
(``MALLOC_MMAP_THRESHOLD_``) so the RSS follows the live tensors instead of
the allocator's cache. The extra of a mode is its peak minus plain's; it is
compared with the size of one ``n x P`` float32 Jacobian of the shared
parameters (what holding every per-task gradient at once would cost).
Agreement: Spearman correlation of the off-diagonal entries of every mode's
matrix with ``exact``'s (training is identical in every mode, so they score
the same trajectory). How reproducible ``exact`` is itself comes from its
per-step record: the agreement between its even and odd epochs (split
half), and of every k-th exact step with the whole record (what any
schedule measuring fewer exact steps gives up, whatever a step costs). For
the wide encoder the timing fits are short, so the agreement comes from one
ten times longer fit carrying every mode's callback at once but TAG's (the
sparse schedules measure a few dozen of its steps); TAG's agreement there is
from the timing fits. The default's cost on the wide encoder is also timed
over fits that long (plain against default only, ``LONG_ROUNDS`` interleaved
rounds): the 60-step timing fits are too short for a schedule that measures
every k-th step with k in the tens or hundreds (``long_default_*`` in the
results). ``--long-only`` adds just those fits to an earlier run's file.
``--split-half-only`` runs one fit per configuration carrying every mode but
TAG and adds what each mode says of its own reproducibility
(``AffinityResult.split_half``) beside its agreement with exact
(``split_half_fit`` in the results).

    python benchmarks/affinity_overhead.py --quick        # digits + wide n=10, a few minutes
    python benchmarks/affinity_overhead.py                # everything (about an hour on 2 busy cores)

Results go to ``benchmarks/results/affinity_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "plain": None,
    "exact": {"every_n_steps": 1, "keep_step_scores": True},
    "exact_autograd": {"every_n_steps": 1, "engine": "autograd"},
    "default": {},
    "tag": {"method": "tag", "every_n_steps": 1},
    "every10": {"every_n_steps": 10},
    "last_layer": {"every_n_steps": 1, "scope": "last_layer"},
    "representation": {"every_n_steps": 1, "scope": "representation"},
}
#: modes left out of a configuration (too slow to be worth timing)
SKIP = {"wide30": ("exact_autograd",)}
CONFIGS = ("chemical", "ettm1", "digits", "wide10", "wide30")
QUICK_CONFIGS = ("digits", "wide10")
#: optimizer steps of the memory pass (steps 0 and 1; every mode measures step 0)
MEMORY_STEPS = 2
#: interleaved rounds of plain and the default over the wide encoder's long fit
LONG_ROUNDS = 4


# --------------------------------------------------------------------------- worker (one fit)
def seeded_fit(ds, tasks, cfg, seed: int, steps: int, callbacks):
    """One seeded fit of ``steps`` optimizer steps of the reference model on ``tasks`` (validation off, one
    device, nothing logged): the fitted model."""
    import lightning as L

    from lightning_etap.data.datamodule import MultiTaskDataModule
    from lightning_etap.training import build_model, quiet_lightning

    L.seed_everything(seed, verbose=False)
    dm = MultiTaskDataModule(ds, tasks, batch_size=cfg.batch_size, seed=seed)
    model = build_model(ds, tasks, cfg)
    with quiet_lightning():
        L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks)).fit(model, datamodule=dm)
    return model


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def _build(config: str, data_root: str | None, seed: int, rows: int = 4096):
    """(dataset, tasks, TrainConfig) of a configuration (``rows``: examples of the wide encoder's data, 3/4 of
    them for training)."""
    import torch

    from lightning_etap.data import load_dataset
    from lightning_etap.data.base import MultiTaskDataset, TaskSplits
    from lightning_etap.training import get_preset

    if config in ("digits", "chemical", "ettm1"):
        ds = load_dataset(config, data_root)
        return ds, list(ds.task_names), get_preset(config)
    n = int(config.removeprefix("wide"))
    g = torch.Generator().manual_seed(seed)
    d = 128
    x = torch.randn(rows, d, generator=g)
    # related tasks, as multi-task learning assumes: task k's direction turns from u towards -u through v as k
    # grows (angle pi k / n) plus a part of its own, so pairs range from closely related to opposed. With
    # independent random tasks every off-diagonal affinity is about the same and ranking them ranks noise.
    u, v = torch.randn(d, generator=g), torch.randn(d, generator=g)
    angle = torch.arange(n) * torch.pi / n
    w = (torch.outer(u, angle.cos()) + torch.outer(v, angle.sin()) + 0.4 * torch.randn(d, n, generator=g)) / d**0.5
    y = ((x @ w + 0.5 * torch.randn(rows, n, generator=g)) > 0).float()
    names = [f"t{k}" for k in range(n)]
    tr, va = rows * 3 // 4, rows * 7 // 8
    splits = {t: TaskSplits((x[:tr], y[:tr, k:k + 1]), (x[tr:va], y[tr:va, k:k + 1]), (x[va:], y[va:, k:k + 1]))
              for k, t in enumerate(names)}
    ds = MultiTaskDataset(config, tuple(names), ("binary",) * n, "shared", splits)
    cfg = get_preset("digits").replace(hidden=(1024, 1024, 1024), batch_size=256, lr=0.01, momentum=0.9)
    return ds, names, cfg


def worker(config: str, measure: str, steps: int, data_root: str | None, seed: int, threads: int,
           rounds: int, mode: str | None = None) -> dict:
    """Fits of one configuration in this process.

    ``measure="time"``: every mode, interleaved (plain, etap, tag, etap10, plain, ...) for ``rounds``
    rounds; the best wall and CPU time per mode. ``measure="memory"``: one fit of ``mode``.
    """
    import lightning as L
    import torch

    from lightning_etap.affinity import AffinityCallback

    torch.set_num_threads(threads)
    ds, tasks, cfg = _build(config, data_root, seed)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            self.steps: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.s0 = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append(time.process_time() - self.s0)

        def on_train_end(self, trainer, pl_module):
            self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0

    def run(n_steps, callbacks, model_cfg, group):
        return seeded_fit(ds, group, model_cfg, seed, n_steps, callbacks)

    class Callback(AffinityCallback):  # also records the fit's optimizer steps per epoch
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            self._steps_per_epoch = int(trainer.num_training_batches)

    def callback(m):
        return [Callback("encoder", heatmap=False, log_every_n_steps=0, **MODES[m])] if MODES[m] is not None else []

    modes_here = [m for m in MODES if m not in SKIP.get(config, ())]
    # warm-up on a tiny model: imports, Lightning's first-fit costs, the vmap machinery
    for m in modes_here if measure in ("time", "agreement", "long") else [mode]:
        run(3, callback(m), cfg.replace(hidden=(4,), batch_size=8), tasks[:2])

    out = {"config": config, "tasks": len(tasks), "layout": ds.layout, "hidden": list(cfg.hidden),
           "batch_size": cfg.batch_size}
    if measure == "memory":
        rss0 = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
        model = run(steps, callback(mode), cfg, tasks)
        shared_numel = sum(p.numel() for p in model.encoder.parameters())
        out.update(mode=mode, peak_rss_delta_mb=(_status_kb("VmHWM") - rss0) / 1024, shared_params=shared_numel,
                   jacobian_mb=len(tasks) * shared_numel * 4 / 2**20)
        return out
    def timed(names, n_rounds: int, keep_matrix: bool) -> dict[str, dict]:
        """Fits of the named modes, interleaved for ``n_rounds`` rounds: wall and CPU time per fit."""
        timings: dict[str, dict] = {m: {"wall": [], "cpu": [], "in_fit_extra": []} for m in names}
        for _ in range(n_rounds):
            for m, rec in timings.items():
                clock, cbs = Clock(), callback(m)
                run(steps, [clock, *cbs], cfg, tasks)
                rec["wall"].append(clock.wall)
                rec["cpu"].append(clock.cpu)
                rec["in_fit_extra"].append(in_fit_extra(clock.steps, cbs[0].result if cbs else None))
                if cbs:
                    res = cbs[0].result
                    rec["measured_steps"] = res.measured_steps
                    rec["every_n_steps_chosen"] = res.settings["every_n_steps_chosen"]
                    rec["control_variate"] = res.settings.get("control_variate_chosen", False)
                    rec["split_half"] = res.split_half
                    rec["split_half_pairs"] = res.split_half_pairs
                    if keep_matrix:
                        rec["matrix"] = res.matrix.tolist()
                        if res.step_matrices is not None:
                            rec["step_matrices"] = res.step_matrices.tolist()
                            rec["steps"] = [int(x) for x in res.steps]
                            rec["steps_per_epoch"] = cbs[0]._steps_per_epoch
        return timings

    if measure == "long":  # plain and the default over the long fit: the schedule amortised as in real training
        out.update(steps=steps, modes=timed(("plain", "default"), LONG_ROUNDS, keep_matrix=False))
        return out
    if measure == "agreement":  # one longer fit, every scored mode as its own callback on the same trajectory
        cbs = {m: callback(m)[0] for m in modes_here if MODES[m] is not None and m not in ("exact_autograd", "tag")}
        run(steps, list(cbs.values()), cfg, tasks)
        out.update(steps=steps, modes={m: {"measured_steps": cb.result.measured_steps,
                                           "every_n_steps_chosen": cb.result.settings["every_n_steps_chosen"],
                                           "split_half": cb.result.split_half,
                                           "split_half_pairs": cb.result.split_half_pairs,
                                           "matrix": cb.result.matrix.tolist()} for m, cb in cbs.items()})
        exact = cbs["exact"]
        out["modes"]["exact"].update(step_matrices=exact.result.step_matrices.tolist(),
                                     steps=[int(x) for x in exact.result.steps],
                                     steps_per_epoch=exact._steps_per_epoch)
        return out
    out.update(steps=steps, rounds=rounds, modes=timed(modes_here, rounds, keep_matrix=True))
    return out


# --------------------------------------------------------------------------- driver
def long_figures(long: dict) -> dict:
    """The default's cost over the long fit (a worker's ``measure="long"`` output), as summary entries."""
    lm = long["modes"]
    return {
        "long_steps": long["steps"],
        "long_rounds": len(lm["plain"]["cpu"]),
        "long_default_ratio_to_plain_cpu": round(paired_ratio(lm["default"]["cpu"], lm["plain"]["cpu"]), 2),
        "long_default_ratio_to_plain_wall": round(paired_ratio(lm["default"]["wall"], lm["plain"]["wall"]), 2),
        "long_default_measured_steps": lm["default"]["measured_steps"],
        "long_default_in_fit_ratio": _round(in_fit_ratio(lm["default"], lm["plain"])),
    }


#: every-k-th-step subsamples of the exact per-step record whose agreement with the whole record is reported
SUBSAMPLE_KS = (2, 5, 10, 20, 50, 100)


def in_fit_extra(step_cpu: list[float], result) -> float | None:
    """The extra CPU time of a fit's steps over its own plain steps, as a fraction of them.

    Plain steps are those neither measured nor scored by the control variate's proxy (the schedule is
    anchored at step 0); their median is what a step costs without the callback in the same fit, at the
    machine's speed of the moment. ``None`` when every step does some measuring. For the plain fit, the same
    statistic with all its steps: the skew of step times, which the ratio to plain divides out.
    """
    import numpy as np

    t = np.asarray(step_cpu)
    steps = np.arange(len(t))
    plain = np.ones(len(t), bool)
    if result is not None:
        settings = result.settings
        k = settings["every_n_steps_chosen"] or 1
        plain = steps % k != 0
        if settings.get("control_variate_chosen"):
            plain &= steps % settings.get("proxy_every", 1) != 0
    if plain.sum() < 5:
        return None
    base = float(np.median(t[plain]))
    return float(t.sum() / (len(t) * base) - 1.0)


def in_fit_ratio(mode: dict, plain: dict) -> float | None:
    """Median over rounds of ``(1 + mode's in-fit extra) / (1 + plain's skew)`` (``None`` if not defined)."""
    import statistics

    pairs = [(a, b) for a, b in zip(mode.get("in_fit_extra", []), plain.get("in_fit_extra", []), strict=False)
             if a is not None and b is not None]
    return statistics.median((1 + a) / (1 + b) for a, b in pairs) if pairs else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def paired_ratio(times: list[float], plain: list[float]) -> float:
    """Median over rounds of a mode's time over plain's in the same round (robust to slow spells of a shared
    machine, which hit both fits of a round)."""
    import statistics

    return statistics.median(a / b for a, b in zip(times, plain, strict=True))


def epoch_sum(step_matrices, steps, steps_per_epoch: int, keep=None):
    """The callback's default reduction of chosen per-step matrices: mean within each epoch, summed over epochs."""
    import numpy as np

    mats, steps = np.asarray(step_matrices), np.asarray(steps)
    keep = np.ones(len(steps), bool) if keep is None else np.asarray(keep)
    epochs = steps // steps_per_epoch
    return sum(mats[keep & (epochs == e)].mean(0) for e in np.unique(epochs[keep]))


def reliability(rec: dict) -> dict:
    """How reproducible the exact every-step matrix is, from its per-step record.

    ``split_half``: Spearman of the off-diagonal entries between the matrices of the even and the odd epochs
    (each half the steps; of the even and the odd steps when the record spans one epoch, ``split_by`` says
    which; ``None`` below two steps); ``subsample``: for every k, the mean over phases of the agreement of every k-th
    step (the matrix a schedule measuring every k-th step would give) with the whole record: what measuring
    fewer exact steps costs in agreement, whatever the speed of a step.
    """
    import numpy as np

    mats, steps, spe = rec["step_matrices"], np.asarray(rec["steps"]), rec["steps_per_epoch"]
    if len(steps) < 2:
        return {"split_half": None, "split_by": None, "subsample": {}}
    full = epoch_sum(mats, steps, spe)
    # Even against odd epochs; a record of one epoch has no odd epoch, so its halves are its even and odd steps.
    halves = "epochs" if len(np.unique(steps // spe)) >= 2 else "steps"
    parity = (steps // spe) % 2 if halves == "epochs" else steps % 2
    out = {"split_half": round(spearman_offdiag(epoch_sum(mats, steps, spe, parity == 0),
                                                epoch_sum(mats, steps, spe, parity == 1)), 3),
           "split_by": halves}
    curve = {}
    for k in SUBSAMPLE_KS:
        if k >= len(steps):
            break
        phases = range(min(k, 8))
        curve[str(k)] = round(float(np.mean([spearman_offdiag(epoch_sum(mats, steps, spe, steps % k == ph), full)
                                             for ph in phases])), 3)
    out["subsample"] = curve
    return out


def spearman_offdiag(a, b) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    a, b = np.asarray(a), np.asarray(b)
    mask = ~np.eye(a.shape[0], dtype=bool)
    return float(spearmanr(a[mask], b[mask]).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CONFIGS)}, fewer steps")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 300; quick 30)")
    ap.add_argument("--wide-steps", type=int, default=None,
                    help="optimizer steps per fit of the wide encoder (default 60; quick 10)")
    ap.add_argument("--configs", nargs="*", default=None, choices=CONFIGS)
    ap.add_argument("--data-root", default=os.environ.get("LIGHTNING_ETAP_DATA", "/work/shared/data"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per worker (default 1: steadier on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "affinity_overhead.json"))
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of all modes per small configuration, best kept (wide: 1)")
    ap.add_argument("--long-only", action="store_true",
                    help="only the long plain-vs-default fits of the wide configurations, merged into --out")
    ap.add_argument("--split-half-only", action="store_true",
                    help="only one fit per configuration carrying every scored mode but TAG: the split-half "
                         "reproducibility each mode reports (result.split_half) beside its agreement with exact, "
                         "merged into --out")
    ap.add_argument("--_worker", nargs=3, metavar=("CONFIG", "MEASURE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or (30 if args.quick else 300)
    wide_steps = args.wide_steps or (10 if args.quick else 60)
    # the agreement fits: long enough for the sparse schedules to measure a few dozen steps
    agree_steps = {"wide10": 10 * wide_steps, "wide30": 10 * wide_steps} if not args.quick else {}

    if args._worker:
        config, measure, mode = args._worker
        wide = config.startswith("wide")
        n = {"memory": MEMORY_STEPS, "agreement": agree_steps.get(config, steps),
             "long": agree_steps.get(config, steps)}.get(
            measure, wide_steps if wide else steps)
        rounds = 1 if wide else args.rounds
        print(json.dumps(worker(config, measure, n, args.data_root, args.seed, args.threads, rounds, mode)))
        return

    def call(config: str, measure: str, mode: str = "-") -> dict | None:
        cmd = [sys.executable, __file__, "--_worker", config, measure, mode, "--steps", str(steps),
               "--wide-steps", str(wide_steps), "--data-root", args.data_root, "--threads", str(args.threads),
               "--seed", str(args.seed), "--rounds", str(args.rounds)]
        env = dict(os.environ)
        if measure == "memory":  # every allocation >= 128 KiB is its own mapping: RSS follows live tensors
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"[skip] {config}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    configs = args.configs or (QUICK_CONFIGS if args.quick else CONFIGS)
    if args.split_half_only:  # what each mode says of its own reproducibility, beside its agreement with exact
        out = Path(args.out)
        saved = json.loads(out.read_text())
        for config in configs:
            got = call(config, "agreement")
            if got is None or config not in saved["configs"]:
                continue
            modes = got["modes"]
            figures = {m: {"split_half": _round(rec["split_half"]),
                           "split_half_pairs": _round(rec["split_half_pairs"]), "measured_steps": rec["measured_steps"],
                           "spearman_vs_exact": 1.0 if m == "exact" else
                           round(spearman_offdiag(rec["matrix"], modes["exact"]["matrix"]), 3)}
                       for m, rec in modes.items()}
            saved["configs"][config]["split_half_fit"] = {"steps": got["steps"], "modes": figures,
                                                          "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())}
            print(f"{config} ({got['steps']} steps): " + ", ".join(
                f"{m} split half {f['split_half']} (pairs {f['split_half_pairs']}) / rho vs exact "
                f"{f['spearman_vs_exact']}" for m, f in figures.items()), flush=True)
        out.write_text(json.dumps(saved, indent=2))
        print(f"wrote {out}")
        return
    if args.long_only:  # add the amortised default to an earlier full run's figures
        out = Path(args.out)
        saved = json.loads(out.read_text())
        for config in (c for c in configs if c in agree_steps):
            long = call(config, "long")
            if long is None or config not in saved["configs"]:
                continue
            s = saved["configs"][config]
            s.update(long_figures(long))
            s["long_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            saved["raw"].setdefault(config, {})["long"] = long
            print(f"{config}: default over a {long['steps']}-step fit {s['long_default_ratio_to_plain_cpu']:.2f}x "
                  f"plain ({s['long_default_measured_steps']} steps measured, every "
                  f"{long['modes']['default']['every_n_steps_chosen']})", flush=True)
        out.write_text(json.dumps(saved, indent=2))
        print(f"wrote {out}")
        return
    rows: dict[str, dict] = {}
    for config in configs:
        timing = call(config, "time")
        if timing is None:
            continue
        if config in agree_steps:  # agreement from a longer fit than the timing fits
            agreement = call(config, "agreement")
            timing["agreement"] = agreement["modes"]
            timing["agreement_steps"] = agreement["steps"]
            long = call(config, "long")
            if long is not None:
                timing["long"] = long
        memory = {}
        for mode in timing["modes"]:
            got = call(config, "memory", mode)
            if got is None:
                break
            memory[mode] = got
        else:
            rows[config] = {"time": timing, "memory": memory}
            t = timing["modes"]
            print(f"  {config:>8s}: " + ", ".join(
                f"{m} {min(t[m]['cpu']):.2f} s cpu / +{memory[m]['peak_rss_delta_mb']:.0f} MB" for m in t),
                flush=True)

    summary = {}
    print(f"\naffinity overhead (CPU-time ratios to plain), torch threads {args.threads}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; rho: Spearman of the off-diagonal entries with exact every-step ETAP")
    for config, r in rows.items():
        t, mem = r["time"]["modes"], r["memory"]
        agree = r["time"].get("agreement", {})  # longer fits (wide): the agreement of every mode but TAG
        modes = list(t)
        cpu = {m: min(t[m]["cpu"]) for m in modes}
        wall = {m: min(t[m]["wall"]) for m in modes}
        exact_record = agree.get("exact", t["exact"])
        extra = {m: mem[m]["peak_rss_delta_mb"] - mem["plain"]["peak_rss_delta_mb"] for m in modes}
        jac = mem["plain"]["jacobian_mb"]
        scored = [m for m in modes if m != "plain"]
        s = {
            "tasks": r["time"]["tasks"], "layout": r["time"]["layout"], "hidden": r["time"]["hidden"],
            "batch_size": r["time"]["batch_size"], "shared_params": mem["plain"]["shared_params"],
            "steps": r["time"]["steps"], "rounds": r["time"]["rounds"], "memory_steps": MEMORY_STEPS,
            "agreement_steps": r["time"].get("agreement_steps", r["time"]["steps"]),
            "plain_cpu_seconds": round(cpu["plain"], 3), "plain_wall_seconds": round(wall["plain"], 3),
            "ratio_to_plain_cpu": {m: round(paired_ratio(t[m]["cpu"], t["plain"]["cpu"]), 2) for m in scored},
            "ratio_to_plain_cpu_best": {m: round(cpu[m] / cpu["plain"], 2) for m in scored},
            "ratio_to_plain_in_fit": {m: _round(fit) for m in scored
                                      if (fit := in_fit_ratio(t[m], t["plain"])) is not None},
            "ratio_to_plain_wall": {m: round(paired_ratio(t[m]["wall"], t["plain"]["wall"]), 2) for m in scored},
            "exact_over_tag_cpu": round(paired_ratio(t["exact"]["cpu"], t["tag"]["cpu"]), 2),
            "peak_rss_delta_mb": {m: round(mem[m]["peak_rss_delta_mb"], 1) for m in modes},
            "extra_peak_mb": {m: round(extra[m], 1) for m in scored},
            "jacobian_mb": round(jac, 1),
            "exact_extra_over_jacobian": round(extra["exact"] / jac, 3),
            "spearman_vs_exact": {m: round(spearman_offdiag(agree.get(m, t[m])["matrix"],
                                                            (agree if m in agree else t)["exact"]["matrix"]), 3)
                                  for m in scored if m != "exact"},
            "measured_steps": {m: agree.get(m, t[m])["measured_steps"] for m in scored},
            "default_every_n_steps_chosen": t["default"]["every_n_steps_chosen"],
            "default_control_variate": t["default"].get("control_variate", False),
            "exact_reliability": reliability(exact_record),
            "split_half": {m: _round(agree.get(m, t[m]).get("split_half")) for m in scored},
        }
        long = r["time"].get("long")
        if long is not None:  # the default over a fit as long as the agreement fit
            s.update(long_figures(long))
        summary[config] = s
        print(f"\n{config}: n={s['tasks']} ({s['layout']} inputs), encoder {s['hidden']}, batch {s['batch_size']}, "
              f"{s['steps']} steps timed (agreement over {s['agreement_steps']}), plain {cpu['plain']:.2f} s cpu; "
              f"one n x P Jacobian {jac:.1f} MB")
        print(f"  {'mode':>15s} {'x plain':>8s} {'in fit':>7s} {'rho':>6s} {'split':>6s} {'steps':>6s} {'+MB':>7s}")
        for m in scored:
            rho = s["spearman_vs_exact"].get(m, 1.0)
            fit_ratio = s["ratio_to_plain_in_fit"].get(m)
            half = s["split_half"].get(m)
            print(f"  {m:>15s} {s['ratio_to_plain_cpu'][m]:8.2f} "
                  f"{'-' if fit_ratio is None else format(fit_ratio, '.2f'):>7s} {rho:6.3f} "
                  f"{'-' if half is None else format(half, '.3f'):>6s} {s['measured_steps'][m]:6d} {extra[m]:7.1f}")
        if "long_steps" in s:
            in_fit = s.get("long_default_in_fit_ratio")
            print(f"  default over a {s['long_steps']}-step fit: {s['long_default_ratio_to_plain_cpu']:.2f}x plain "
                  f"({'-' if in_fit is None else format(in_fit, '.2f')}x in fit; "
                  f"{s['long_default_measured_steps']} steps measured)")
        rel = s["exact_reliability"]
        half = "-" if rel["split_half"] is None else f"{rel['split_half']:.3f} ({rel['split_by']})"
        print(f"  exact's own reproducibility: split-half rho {half}; every k-th exact step vs all: "
              + ", ".join(f"k={k} {v:.3f}" for k, v in rel["subsample"].items()))
        print(f"  default chose every {s['default_every_n_steps_chosen']} steps "
              f"({'with' if s['default_control_variate'] else 'without'} the control variate); exact / TAG time "
              f"{s['exact_over_tag_cpu']:.2f}; exact extra memory / one Jacobian {s['exact_extra_over_jacobian']:.2f}")
    print("\ntargets: default <= 1.2x plain with rho >= 0.95; exact <= 0.6x TAG; "
          "exact extra peak at n=30 (wide) <= 1.2x one Jacobian")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    # configurations not run this time keep their figures from the previous file (each says when it was run)
    previous = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError:
            previous = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for s in summary.values():
        s["measured_at"] = stamp
        s["load_average"] = [round(x, 2) for x in os.getloadavg()]
    kept = {c: v for c, v in previous.get("configs", {}).items() if c not in summary}
    kept_raw = {c: v for c, v in previous.get("raw", {}).items() if c not in rows}

    out.write_text(json.dumps({
        "benchmark": "affinity_overhead",
        "torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
        "cpus": os.cpu_count(), "quick": args.quick, "seed": args.seed,
        "memory": (f"peak RSS of a separate worker during a {MEMORY_STEPS}-step fit minus its RSS before it "
                   "(VmHWM reset via /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=131072)"),
        "time": ("training loop, on_train_start to on_train_end, validation off; CPU time (process_time) and wall "
                 f"time, best of {args.rounds} interleaved rounds of all modes in one process (1 for the wide "
                 "encoder); ratios use CPU time, steadier than wall time on a shared machine"),
        "configs": {**kept, **summary},
        "raw": {**kept_raw, **{c: {"time": {m: {k: v for k, v in rec.items()
                                                  if k not in ("matrix", "step_matrices", "steps")}
                             for m, rec in r["time"]["modes"].items()},
                    "memory": r["memory"], **({"long": r["time"]["long"]} if "long" in r["time"] else {})}
                for c, r in rows.items()}},
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
