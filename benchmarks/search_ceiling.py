"""How close to the optimum can ANY search get within a few trainings, given the table's own seed noise?

Run from the repository root (``benchmarks/active_search.py`` calls it for its page)::

    python benchmarks/search_ceiling.py              # the exhaustive Chemical table, 40 replicates
    python benchmarks/search_ceiling.py --replicates 4   # a smoke test

The exhaustive table is a mean over a few training seeds, so every entry
carries seed noise, and the target "within 1% of the optimum" is measured on
that noisy table. A predictor can at best learn a group's *expected* losses;
the noise of a group it has not measured is independent of everything it
has seen. So the best any search can do is what a search does that knows the
expected loss of every group exactly. This script measures that ceiling on
*replicate tables*, built to be like the real one:

* **Signal** (the expected losses): Bayesian ETAP fitted on every group of
  the table (posterior mean), plus its residual scaled per task by
  ``sqrt(1 - q)``, ``q`` the share of the residual variance that is seed
  noise, so that the signal spreads around the fit as the table does
  without its noise (variance ``V - N``).
* **Replicate**: the signal plus the noise of an independent mean over as
  many seeds as the table has: the mean of ``s`` of the group's own seed
  deviation vectors (drawn with replacement, scaled by ``sqrt(s / (s - 1))``),
  which keeps the correlation across the tasks of one training. With 3
  seeds this bootstrap has the right variance but heavier tails than
  Gaussian noise (a few groups get large draws), which makes replicates
  somewhat harder than the table for every search. STL losses are the
  table's (held fixed: they are not searched).

On every replicate (the all-task group first, then one group per training):

* **perfect model, expected improvement**: active ETAP's rule with the exact
  posterior (signal plus the replicate's noise law) in place of a fitted model;
* **perfect model, probability of optimality**: train the group most often in
  the optimal selection of the posterior draws (measured groups at their
  measured values), which values complementary groups jointly;
* **active ETAP**: :func:`~lightning_etap.search.active_etap_search` with
  :class:`~lightning_etap.predictors.BayesianETAPPredictor` on an
  :class:`~lightning_etap.search.OracleTrainer` of the replicate, exactly as
  ``benchmarks/active_search.py`` runs it on the table, to show how hard a
  replicate is compared with the table itself;
* the signal's own optimal selection, scored on the replicate.

Every figure is the mean over replicates of the true gap (the best selection
of the measured groups against the replicate's own optimum). The same two
perfect-model rules also run on the table itself (with the signal above,
which was fitted on that table), once per replicate seed.

The two rules are greedy (one group at a time): their gaps say what a search
that knows the expected losses reaches with these rules, not what no search
could beat.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: Numbers of trainings (the all-task group included) at which the ceiling is read.
CEILING_TRAININGS = (5, 10)
#: Posterior draws per choice of the two perfect-model rules.
EI_DRAWS, PO_DRAWS = 64, 48
POLICIES = ("perfect_ei", "perfect_po", "active_etap")
#: The policies also run on the table itself (its own values, the replicates' signal and noise law).
TABLE_POLICIES = ("perfect_ei", "perfect_po")


class Replicates:
    """The signal and the noise law of replicate tables of ``table`` (a :class:`GroupGains` with >= 2 seeds).

    Raises:
        ValueError: fewer than two seeds, a multi-task group without every seed or with one seed twice (no
            noise to estimate), or no all-task group (every search starts from it).
    """

    def __init__(self, table, affinity: np.ndarray) -> None:
        from lightning_etap.predictors import BayesianETAPPredictor

        seeds = sorted({int(s) for s in np.unique(table.seeds) if s >= 0})
        if len(seeds) < 2:
            raise ValueError(f"the table holds {len(seeds)} training seed(s): the seed noise needs at least 2")
        mean = table.mean_over_seeds()
        multi = mean.masks.sum(axis=1) >= 2
        self.task_names = tuple(table.task_names)
        self.masks = mean.masks[multi]
        self.loss = np.where(self.masks, mean.test_losses[multi], np.nan)
        self.stl = np.asarray(mean.stl_losses[-1], dtype=float)
        m, n = self.masks.shape
        s = len(seeds)
        codes = (self.masks.astype(np.int64) << np.arange(n)).sum(axis=1)
        where = {int(c): i for i, c in enumerate(codes)}
        per_seed = np.full((s, m, n), np.nan)
        for mask, seed, losses in zip(table.masks, table.seeds, table.test_losses):
            i = where.get(int((mask.astype(np.int64) << np.arange(n)).sum()))
            if i is not None and int(seed) in seeds:
                k = seeds.index(int(seed))
                if not np.isnan(per_seed[k, i][mask]).all():
                    raise ValueError(f"group {i} holds seed {seed} twice: one row per group and seed")
                per_seed[k, i] = losses
        if np.isnan(per_seed[:, self.masks]).any():
            raise ValueError("some multi-task group lacks a seed: the noise of every group needs all of them")
        self.n_seeds = s
        self.deviations = np.where(self.masks, (per_seed - self.loss) * np.sqrt(s / (s - 1)), 0.0)
        noise_var = (self.deviations ** 2).sum(axis=0) / s ** 2  # variance of an s-seed mean, per entry
        gains = np.where(self.masks, (self.stl - self.loss) / self.stl, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = BayesianETAPPredictor(affinity, task_names=self.task_names).fit(self.masks, gains)
        self.model = model = np.where(self.masks, self.stl * (1.0 - fitted.predict(self.masks)), np.nan)
        residual = self.loss - model
        #: per task: seed-noise variance / variance of the table around the all-group Bayesian ETAP fit
        noise, spread = np.nanmean(np.where(self.masks, noise_var, np.nan), axis=0), np.nanvar(residual, axis=0)
        # no spread left around the fit: all of it is noise (1), or there is neither (0)
        self.noise_share = np.divide(noise, spread, out=(noise > 0).astype(float), where=spread > 0)
        whole = np.nanvar(self.loss, axis=0)
        #: per task: seed-noise variance / the table's whole variance over the groups
        self.noise_share_total = np.divide(noise, whole, out=(noise > 0).astype(float), where=whole > 0)
        self.signal = model + np.sqrt(np.clip(1.0 - self.noise_share, 0.0, 1.0))[None, :] * residual
        full = np.flatnonzero(self.masks.all(axis=1))
        if not len(full):
            raise ValueError("the table has no all-task group (every search trains it first)")
        self.full = int(full[0])

    def noise(self, rng: np.random.Generator, rows: np.ndarray | None = None) -> np.ndarray:
        """``(len(rows), n)`` noise of an independent s-seed mean of the groups ``rows`` (default: all)."""
        rows = np.arange(len(self.masks)) if rows is None else rows
        pick = rng.integers(0, self.n_seeds, size=(self.n_seeds, len(rows)))
        return self.deviations[pick, rows[None, :], :].mean(axis=0)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """The test losses of one replicate table (NaN for non-members)."""
        return np.where(self.masks, self.signal + self.noise(rng), np.nan)

    def values(self, loss: np.ndarray) -> np.ndarray:
        """Selection values (STL loss minus loss, NaN for non-members)."""
        return np.where(self.masks, self.stl - loss, np.nan)


def _select(masks: np.ndarray, values: np.ndarray, budget: int):
    from lightning_etap.selection import select_groups

    return select_groups(masks, values, budget)


def _rows_of(masks: np.ndarray, chosen: np.ndarray, rows: np.ndarray) -> list[int]:
    """The entries of ``rows`` whose masks are among ``chosen`` (a selection's multi-task groups)."""
    from lightning_etap.search._common import group_codes

    want = set(group_codes(chosen))
    return [int(r) for r, c in zip(rows, group_codes(masks[rows])) if c in want]


def _total(rep: Replicates, values: np.ndarray, measured: list[int], budget: int) -> float:
    """True total test loss of the best selection of the measured groups (and STL models)."""
    rows = np.asarray(measured)
    return float(rep.stl.sum() - _select(rep.masks[rows], values[rows], budget).objective)


def perfect_search(rep: Replicates, values: np.ndarray, budget: int, rule: str, rng: np.random.Generator,
                   trainings=CEILING_TRAININGS) -> tuple[dict[int, float], list[int]]:
    """One search that knows the signal and the noise law exactly, on the table of selection ``values``.

    ``values`` is read only where the search has trained (the best selection of its measured groups and,
    for the probability rule, the measured groups' entries in every draw).

    Returns:
        ``({trainings: true total loss of the best selection of the groups measured by then}, training order)``.
    """
    from lightning_etap.search import swap_improvements

    signal = rep.values(rep.signal)
    everyone = np.arange(len(rep.masks))
    measured = [rep.full]
    out = {}
    while len(measured) < max(trainings):
        unmeasured = np.setdiff1d(everyone, measured)
        if rule == "perfect_ei":
            sel = _select(rep.masks[measured], values[measured], budget)
            grouping = _grouping_values(rep, sel, values, measured)
            expected = np.zeros(len(unmeasured))
            for _ in range(EI_DRAWS):
                draw = signal[unmeasured] - np.where(rep.masks[unmeasured], rep.noise(rng, unmeasured), 0.0)
                expected += np.maximum(swap_improvements(grouping, draw, budget), 0.0)
            measured.append(int(unmeasured[np.argmax(expected)]) if expected.max() > 0
                            else _most_valuable(signal, unmeasured))
        else:
            count = np.zeros(len(rep.masks))
            for _ in range(PO_DRAWS):
                draw = signal - np.where(rep.masks, rep.noise(rng), 0.0)
                draw[measured] = values[measured]
                for r in _rows_of(rep.masks, _select(rep.masks, draw, budget).masks, everyone):
                    count[r] += 1
            count[measured] = -1.0
            measured.append(int(np.argmax(count)) if count.max() > 0 else _most_valuable(signal, unmeasured))
        if len(measured) in trainings:
            out[len(measured)] = _total(rep, values, measured, budget)
    return out, measured


def _most_valuable(signal: np.ndarray, rows: np.ndarray) -> int:
    """The row of largest expected total value (when no draw expects anything of any group)."""
    return int(rows[np.argmax(np.nansum(signal[rows], axis=1))])


def _grouping_values(rep: Replicates, sel, values: np.ndarray, measured: list[int]) -> np.ndarray:
    """``(k, n)`` values of a selection's groups: measured values, 0 for an STL model, -inf for non-members."""
    out = np.full((len(sel.masks), rep.masks.shape[1]), -np.inf)
    for r, mask in enumerate(sel.masks):
        if mask.sum() == 1:
            out[r, np.flatnonzero(mask)[0]] = 0.0
        else:
            row = _rows_of(rep.masks, mask[None, :], np.asarray(measured))[0]
            out[r] = np.where(rep.masks[row], values[row], -np.inf)
    return out


def active_on_replicate(rep: Replicates, loss: np.ndarray, affinity: np.ndarray, budget: int, seed: int,
                        trainings=CEILING_TRAININGS) -> dict[int, float]:
    """``active_etap_search`` (the benchmark's settings) on an oracle of one replicate: ``{trainings: total}``."""
    from lightning_etap.groundtruth import GroupGains
    from lightning_etap.predictors import BayesianETAPPredictor
    from lightning_etap.search import OracleTrainer, active_etap_search, total_test_loss

    gains = np.where(rep.masks, (rep.stl - loss) / rep.stl, np.nan)
    table = GroupGains(rep.task_names, rep.masks, loss, gains, np.zeros(len(rep.masks), dtype=np.int64),
                       {0: rep.stl})
    oracle = OracleTrainer(table)
    with tempfile.TemporaryDirectory(prefix="search-ceiling-") as tmp:
        result = active_etap_search(oracle, max(trainings), budget=budget, checkpoints=trainings,
                                    predictor=BayesianETAPPredictor(affinity, task_names=rep.task_names),
                                    random_state=seed, store=os.path.join(tmp, "gains.sqlite"))
    return {step.n_trainings: total_test_loss(step.groups, table) for step in result.history}


_STATE: dict = {}


def _init(table_path: str, affinity: np.ndarray) -> None:
    warnings.simplefilter("ignore")
    from lightning_etap.search.oracle import load_table

    _STATE["rep"] = Replicates(load_table(table_path), affinity)
    _STATE["affinity"] = affinity


def _one(job: tuple[int, int, int]) -> dict:
    """Every policy on replicate ``index`` (drawn from ``seed``) at budget ``budget``, and the perfect-model rules
    on the table itself."""
    budget, index, seed = job
    rep, affinity = _STATE["rep"], _STATE["affinity"]
    rng = np.random.default_rng((seed, index))
    loss = rep.draw(rng)  # the same replicate for every budget: the draw does not depend on the budget
    values = rep.values(loss)
    best = float(rep.stl.sum() - _select(rep.masks, values, budget).objective)
    signal_rows = _rows_of(rep.masks, _select(rep.masks, rep.values(rep.signal), budget).masks,
                           np.arange(len(rep.masks)))
    signal_total = _total(rep, values, signal_rows, budget) if signal_rows else float(rep.stl.sum())
    out = {"budget": budget, "replicate": index, "optimum": best, "signal_optimum": (signal_total - best) / best}
    policy_rng = np.random.default_rng((seed, index, budget))
    for rule in ("perfect_ei", "perfect_po"):
        totals, _ = perfect_search(rep, values, budget, rule, policy_rng)
        out[rule] = {str(k): (v - best) / best for k, v in totals.items()}
    totals = active_on_replicate(rep, loss, affinity, budget, seed=index)
    out["active_etap"] = {str(k): (v - best) / best for k, v in totals.items()}
    table = rep.values(rep.loss)  # the table itself: its own optimum, the same signal and noise law
    table_best = float(rep.stl.sum() - _select(rep.masks, table, budget).objective)
    table_rng = np.random.default_rng((seed, index, budget, 1))
    out["table"] = {}
    for rule in TABLE_POLICIES:
        totals, _ = perfect_search(rep, table, budget, rule, table_rng)
        out["table"][rule] = {str(k): (v - table_best) / table_best for k, v in totals.items()}
    return out


def _stats(gaps: list[float]) -> dict[str, float]:
    gaps = np.asarray(gaps, dtype=float)
    sem = float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else float("nan")
    return {"mean_gap": float(gaps.mean()), "sem": sem, "within_1pct": float(np.mean(gaps <= 0.01))}


def fingerprint(table_path: Path, budgets, replicates: int, seed: int) -> dict:
    """What the figures depend on: the table file's SHA-256, the budgets, the replicates and their seed."""
    import hashlib

    digest = hashlib.sha256(Path(table_path).read_bytes()).hexdigest()
    return {"table_sha256": digest, "budgets": [int(b) for b in budgets], "replicates": int(replicates),
            "seed": int(seed), "method": 2}


def ceiling(table_path: Path, affinity: np.ndarray, budgets, replicates: int = 40, seed: int = 0,
            workers: int = 2) -> dict | None:
    """The replicate figures (see the module doc); ``None`` when the table cannot give them (said why)."""
    from lightning_etap.search.oracle import load_table

    start, cpu = time.perf_counter(), time.process_time()
    try:
        rep = Replicates(load_table(table_path), affinity)
    except ValueError as err:
        print(f"no ceiling section: {err}", flush=True)
        return None
    jobs = [(b, i, seed) for b in budgets for i in range(replicates)]
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_init, initargs=(str(table_path), affinity)) as pool:
            runs = list(pool.map(_one, jobs))
    else:
        _init(str(table_path), affinity)
        runs = [_one(j) for j in jobs]
    summary = {}
    for b in budgets:
        mine = [r for r in runs if r["budget"] == b]
        entry = {"signal_optimum": _stats([r["signal_optimum"] for r in mine])}
        for policy in POLICIES:
            entry[policy] = {str(k): _stats([r[policy][str(k)] for r in mine]) for k in CEILING_TRAININGS}
        entry["table"] = {rule: {str(k): _stats([r["table"][rule][str(k)] for r in mine]) for k in CEILING_TRAININGS}
                          for rule in TABLE_POLICIES}
        summary[str(b)] = entry
    return {"fingerprint": fingerprint(table_path, budgets, replicates, seed), "replicates": replicates,
            "seed": seed, "n_seeds": rep.n_seeds, "trainings": list(CEILING_TRAININGS), "budgets": list(budgets),
            "noise_share": dict(zip(rep.task_names, rep.noise_share.tolist())),
            "noise_share_total": dict(zip(rep.task_names, rep.noise_share_total.tolist())), "summary": summary,
            "runs": runs,
            "seconds": time.perf_counter() - start, "cpu_seconds_driver": time.process_time() - cpu}


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from active_search import read_affinity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=RESULTS / "chemical_exhaustive.csv")
    ap.add_argument("--affinity", type=Path, default=RESULTS / "chemical_affinity")
    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--replicates", type=int, default=40, help="as on the page of benchmarks/active_search.py")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    affinity = read_affinity(args.affinity)
    if affinity is None:
        raise SystemExit(f"no affinity at {args.affinity}")
    found = ceiling(args.table, affinity.matrix, args.budgets, args.replicates, workers=args.workers)
    if found is None:
        return 1
    print("seed noise / variance around the all-group Bayesian ETAP fit, per task:",
          ", ".join(f"{t} {v:.2f}" for t, v in found["noise_share"].items()))
    for b, e in found["summary"].items():
        cells = [f"signal's optimum {100 * e['signal_optimum']['mean_gap']:.2f}%"]
        for policy in POLICIES:
            cells.append(policy + " " + " / ".join(
                f"{100 * e[policy][str(k)]['mean_gap']:.2f}% ({100 * e[policy][str(k)]['within_1pct']:.0f}%)"
                for k in CEILING_TRAININGS))
        for rule in TABLE_POLICIES:
            cells.append(f"{rule} on the table " + " / ".join(
                f"{100 * e['table'][rule][str(k)]['mean_gap']:.2f}%" for k in CEILING_TRAININGS))
        print(f"B = {b}: " + "; ".join(cells))
    print(f"{found['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
