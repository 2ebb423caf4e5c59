"""Choose which task groups to train: exact selection under a budget.

The problem (paper section "Selection", after Standley et al. 2020): given
candidate groups ``masks`` (``(m, n)`` bool, see :mod:`lightning_etap.groups`)
and predicted per-task gains ``gains`` (``(m, n)`` float, only member entries
are read), choose groups whose total cost is at most ``budget`` (with the
default unit costs: at most ``budget`` groups) so that every task is in at
least one chosen group, maximising

    objective = sum over tasks t of  max { gains[g, t] : g chosen, t in g }.

Groups may overlap: a task trained in two chosen networks keeps the better
one. With ``disjoint=True`` the chosen groups must partition the tasks.

Singletons. Every task's single-task model is always a candidate with gain
``singleton_gain`` (0.0 by default: the relative gain of a model against
itself). Missing singletons are appended to the candidate list; singleton rows
already in ``masks`` also get ``singleton_gain`` whatever ``gains`` holds
there. They count toward the budget like any group. ``singleton_gain=-1e8``
reproduces the authors' released code (singletons allowed but never worth
it); ``singleton_gain=-inf`` forbids them outright. The released code also
ranks selections by the *mean* over tasks of the best gain; that is the sum
divided by ``n`` and picks the same groups.

Algorithms (all exact; ``method="auto"`` picks one):

``"brute"``
    Every combination of candidates within the budget, vectorised over the
    last group. The reference implementation; only for tiny instances.
``"bnb"``
    Standley-style depth-first branch-and-bound over candidates sorted by
    value; a child must improve at least one task of the partial selection,
    and all one-group completions of a node are evaluated in one vectorised
    step. A node is pruned by the smaller of (a) the sum over tasks of
    max(current gain, best gain among the remaining candidates) and (b) a
    Lagrangian bound (below); an uncovered task no remaining candidate
    covers, or more uncovered tasks than the remaining budget can cover,
    prunes it too. The disjoint variant branches on the groups containing
    the most constrained uncovered task and closes a node by looking up the
    group equal to its uncovered tasks (and, vectorised, the best pair of
    groups) by bit code (n <= 62). It runs on the survivors of the
    reduction below.
``"milp"``
    Mixed-integer program solved by HiGHS (``scipy.optimize.milp``). Overlap:
    binary ``x_g``, assignment ``y_gt`` (task t served by group g) with
    ``sum_g y_gt = 1``, ``y_gt <= x_g`` and ``sum_g cost_g x_g <= budget``.
    Disjoint: set partitioning ``sum_{g ni t} x_g = 1``. Built over all
    candidates up to ``_DIRECT_NNZ`` member entries, else over the survivors
    of the reduction below (at most ``_MILP_MAX_NNZ`` entries, a tenth of it
    above ``_COLGEN_MAX_N`` tasks, where HiGHS overruns its time limit; when
    capped, no optimality proof).

The Lagrangian bound: for any task prices ``pi``, relaxing "each task is
served once" leaves a knapsack over the groups' reduced values
``r_g = sum_{t in g} max(0, gains[g,t] - pi_t)`` (``gains[g,t] - pi_t`` for
the disjoint variant), so ``sum(pi) + knapsack(r)`` bounds every selection,
and ``sum(pi) + knapsack(r) - max(0, mu cost_g - r_g)`` bounds every
selection containing group ``g`` (``mu``: the knapsack's critical ratio).

The reduction (before "bnb" always, before "milp" above ``_DIRECT_NNZ``
member entries, e.g. all 2**20 - 1 groups of 20 tasks or 10**5 groups of
139 tasks):

1. prices: column generation on the LP relaxation over *all* candidates
   (pricing is one vectorised pass over the member entries) for large inputs
   with ``n <= _COLGEN_MAX_N``; otherwise subgradient descent on the
   Lagrangian bound (pure NumPy, so "bnb" on small inputs never calls
   HiGHS; with many tasks the HiGHS LPs get slow);
2. an incumbent: greedy (coverage first), single-group replacement local
   search, the exact search restricted to the generated columns, and for
   partitions a price-and-dive heuristic;
3. reduced-cost fixing: drop every candidate whose forced-in bound is below
   the incumbent (it is in no better selection);
4. the exact search ("bnb" or "milp") over the survivors, within what is left
   of ``time_limit``. The optimum over the survivors is the global optimum;
   on a time limit the reported ``bound`` is the smaller of the Lagrangian
   bound and the search's bound.

``"auto"``: ``"brute"`` when it needs at most ``_AUTO_BRUTE`` vector steps,
``"milp"`` over all candidates up to ``_DIRECT_NNZ`` member entries, else the
reduction followed by ``"bnb"``. See ``benchmarks/predict_select.py`` for
measured times and how they depend on the instance: with structured gains the
LP bound is (nearly) tight and a few dozen of 2**20 candidates survive; with
budgets that force large low-gain groups to cover many tasks the LP bound is
weak and the gap stays open at the time limit.

Numerics: very negative singleton gains (such as -1e8) and the artificial
"uncovered" variables of the column-generation path are replaced inside the
solvers by a surrogate penalty just large enough to keep the same ranking of
selections (any selection using fewer penalised singletons wins); reported
objectives always use the true values. HiGHS stops at an absolute gap of
1e-6 (its default, not adjustable through SciPy) or a relative gap of 1e-9,
so "optimal" means optimal within 1e-6.

A note on dominance: a candidate whose member gains are all at most the
singleton gain is NOT useless when singletons count toward the budget (it
covers several tasks with one network), so no such rule is applied; the
reduced-cost fixing above is the (valid) pruning.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from lightning_etap.groups import masks_to_groups

__all__ = ["Selection", "select_groups", "selection_objective"]

METHODS = ("auto", "brute", "bnb", "milp")

# "auto" uses brute force below this many vectorised steps (prefixes).
_AUTO_BRUTE = 300
# The brute-force method refuses instances with more prefixes than this.
_BRUTE_MAX = 20_000_000
# The MILP is built over all candidates below this many member entries.
_DIRECT_NNZ = 2_000
# Largest MILP (member entries) built over the survivors of reduced-cost fixing.
_MILP_MAX_NNZ = 200_000
# Column generation (LP duals) up to this many tasks, subgradient prices above.
_COLGEN_MAX_N = 40
# Exact search "auto" runs on the survivors of large instances.
_AUTO_LARGE = "bnb"
_EPS = 1e-9


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class Selection:
    """The chosen groups and how good they are.

    Attributes:
        chosen: indices of the chosen groups into the candidate list: the rows
            of ``masks`` (``0..m-1``) followed by the implicitly added
            singletons (``m, m+1, ...``, for the tasks without a singleton row,
            in task order). Sorted; a group that would serve no task (all its
            tasks do at least as well elsewhere) is left out.
        masks: ``(k, n)`` bool, the chosen groups.
        groups: the chosen groups as tuples of task names (task indices when
            no ``task_names`` were given).
        objective: sum over tasks of the best gain each task gets.
        task_gain: ``(n,)`` float, that best gain per task.
        served_by: ``(n,)`` int, the candidate index of the chosen group whose
            gain each task takes (the first one on ties).
        optimal: True when the objective is proven optimal (within 1e-6).
        bound: best proven upper bound on the optimal objective.
        gap: relative optimality gap ``(bound - objective) / max(|objective|, 1e-9)``.
        method: the algorithm that ran ("brute", "bnb" or "milp").
        seconds: wall time of the solve.
        nodes: search nodes (bnb), vector steps (brute), or LP/MILP nodes and
            column-generation rounds (milp).
        n_candidates: size of the candidate list (after adding singletons).
        n_active: candidates left after pruning (those the final solver saw).
        cost: total cost of the chosen groups.
        budget: the budget.
        disjoint: whether the groups had to partition the tasks.
        task_names: the task names, if given.
    """

    chosen: tuple[int, ...]
    masks: np.ndarray
    groups: tuple[tuple, ...]
    objective: float
    task_gain: np.ndarray
    served_by: np.ndarray
    optimal: bool
    bound: float
    gap: float
    method: str
    seconds: float
    nodes: int
    n_candidates: int
    n_active: int
    cost: float
    budget: float
    disjoint: bool
    task_names: tuple[str, ...] | None = None

    def __str__(self) -> str:
        status = "optimal" if self.optimal else f"gap {self.gap:.3%}, bound {self.bound:.6g}"
        kind = "disjoint" if self.disjoint else "overlapping"
        lines = [
            f"Selection of {len(self.chosen)} {kind} groups (cost {self.cost:g} of budget {self.budget:g}): "
            f"objective {self.objective:.6g}, {status} [{self.method}, {self.seconds:.3g} s, "
            f"{self.n_active}/{self.n_candidates} candidates, {self.nodes} nodes]"
        ]
        names = self.task_names or tuple(str(t) for t in range(len(self.task_gain)))
        for idx, group in zip(self.chosen, self.groups):
            served = [f"{names[t]} {self.task_gain[t]:+.4g}" for t in np.flatnonzero(self.served_by == idx)]
            label = "(" + ", ".join(str(t) for t in group) + ")"
            lines.append(f"  #{idx} {label}: serves {', '.join(served) if served else 'no task'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- input checks


def _as_masks(masks) -> np.ndarray:
    arr = np.asarray(masks)
    if arr.ndim != 2:
        raise ValueError(f"masks must be a 2-D (m, n) array, got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError("masks must have at least one task column")
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError("masks must be boolean (or 0/1) membership masks")
        arr = arr.astype(bool)
    return arr


def _as_gains(gains, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(gains, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"gains has shape {arr.shape} but masks has shape {shape}; they must match")
    return arr


def _check_singleton_gain(singleton_gain) -> float:
    try:
        s = float(singleton_gain)
    except (TypeError, ValueError):
        raise ValueError(f"singleton_gain must be a number, got {singleton_gain!r}") from None
    if math.isnan(s) or s == math.inf:
        raise ValueError(f"singleton_gain must be finite or -inf (forbid singletons), got {s}")
    return s


@dataclass
class _Problem:
    """Validated instance; internal candidates are the usable rows of the candidate list."""

    n: int
    m_given: int
    cand_masks: np.ndarray  # (M, n) bool, the augmented candidate list
    cand_costs: np.ndarray  # (M,)
    user_gains: np.ndarray  # (m_given, n)
    singleton_gain: float  # true value
    ids: np.ndarray  # (K,) candidate-list index of each internal candidate
    rows: np.ndarray  # (nnz,) internal candidate of each entry
    indptr: np.ndarray  # (K+1,) CSR row pointer of member entries
    cols: np.ndarray  # (nnz,) task of each entry
    vals: np.ndarray  # (nnz,) gain used inside the solvers (surrogate for penalised singletons)
    costs: np.ndarray  # (K,)
    sizes: np.ndarray  # (K,)
    is_single: np.ndarray  # (K,) bool
    budget: float
    unit: bool
    kmax: int  # most groups any budget-feasible selection can hold
    disjoint: bool
    surrogate: bool  # singleton gains replaced by a surrogate penalty
    art: float  # value of leaving a task "uncovered" (artificial) in LP/MILP
    scale: float  # magnitude of real objective values, for tolerances
    tol: float
    cache: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return len(self.ids)

    def dense(self, true: bool = False) -> np.ndarray:
        """(K, n) gains with -inf for non-members (internal or true singleton values)."""
        V = np.full((self.K, self.n), -np.inf)
        vals = self.vals
        if true and self.surrogate:
            vals = vals.copy()
            vals[np.repeat(self.is_single, self.sizes)] = self.singleton_gain
        V[self.rows, self.cols] = vals
        return V

    def dense_masks(self) -> np.ndarray:
        return self.cand_masks[self.ids]

    def true_rows(self, cand_idx: np.ndarray) -> np.ndarray:
        """True gains (k, n) of candidate-list rows, -inf for non-members."""
        cand_idx = np.asarray(cand_idx, dtype=np.int64)
        out = np.full((len(cand_idx), self.n), -np.inf)
        for r, c in enumerate(cand_idx):
            mask = self.cand_masks[c]
            if mask.sum() == 1:
                out[r, mask] = self.singleton_gain
            else:
                out[r, mask] = self.user_gains[c, mask]
        return out


def _check_budget(budget, unit: bool) -> float:
    if isinstance(budget, (bool, np.bool_)):
        raise ValueError("budget must be a number, not a bool")
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {budget!r}") from None
    if not math.isfinite(b):
        raise ValueError(f"budget must be finite, got {b}")
    if unit:
        if not b.is_integer():
            raise ValueError(
                f"with unit costs the budget is a number of groups and must be an integer, got {b}"
            )
        if b < 1:
            raise ValueError(f"budget must be at least 1 group, got {b:g}")
    elif b <= 0:
        raise ValueError(f"budget must be positive, got {b:g}")
    return b


def _build_problem(masks, gains, budget, singleton_gain, disjoint, costs, task_names=None) -> _Problem:
    masks = _as_masks(masks)
    m, n = masks.shape
    gains = _as_gains(gains, (m, n))
    s = _check_singleton_gain(singleton_gain)
    sizes_given = masks.sum(axis=1)
    empty = np.flatnonzero(sizes_given == 0)
    if len(empty):
        raise ValueError(f"group rows {empty[:10].tolist()} are empty; every group needs at least one task")
    unit = costs is None
    if unit:
        cost_given = np.ones(m)
    else:
        cost_given = np.asarray(costs, dtype=np.float64)
        if cost_given.shape != (m,):
            raise ValueError(f"costs must have shape ({m},) (one per group), got {cost_given.shape}")
        if not np.isfinite(cost_given).all() or (cost_given <= 0).any():
            raise ValueError("costs must be finite and positive")
    b = _check_budget(budget, unit)
    if not isinstance(disjoint, (bool, np.bool_)):
        raise ValueError(f"disjoint must be a bool, got {disjoint!r}")

    # member entries of the given rows, row-major (CSR)
    flat = np.flatnonzero(masks)
    rows = np.repeat(np.arange(m, dtype=np.int64), sizes_given)
    cols = flat - rows * n
    vals = gains.reshape(-1)[flat]
    del flat
    single_given = sizes_given == 1
    ptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(sizes_given, out=ptr[1:])
    single_entry = ptr[:-1][single_given]  # entry position of each singleton row
    vals[single_entry] = 0.0  # singleton gains come from singleton_gain
    finite = np.isfinite(vals)
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        task = repr(task_names[int(cols[k])]) if task_names is not None and len(task_names) == n else int(cols[k])
        raise ValueError(
            f"gain of member task {task} in group {int(rows[k])} is {vals[k]}; "
            f"member gains must be finite ({int((~finite).sum())} bad entries)"
        )
    del finite
    maxabs = float(np.abs(vals).max()) if vals.size else 0.0
    R0 = n * maxabs + 1.0  # bounds the magnitude of any sum of real gains
    has_single = np.zeros(n, dtype=bool)
    has_single[cols[single_entry]] = True
    missing = np.flatnonzero(~has_single)
    cand_masks = masks
    M = m + len(missing)
    if len(missing):
        extra = np.zeros((len(missing), n), dtype=bool)
        extra[np.arange(len(missing)), missing] = True
        cand_masks = np.concatenate([masks, extra], axis=0)
        rows = np.concatenate([rows, np.arange(m, M)])
        cols = np.concatenate([cols, missing])
        vals = np.concatenate([vals, np.zeros(len(missing))])
        single_entry = np.concatenate([single_entry, np.arange(len(vals) - len(missing), len(vals))])
    cand_costs = np.concatenate([cost_given, np.ones(len(missing))])
    is_single_cand = np.concatenate([single_given, np.ones(len(missing), dtype=bool)])

    surrogate = False
    if s == -math.inf:
        s_int = None
    elif s < -(2.0 * R0 + 1.0):
        surrogate = True  # same ranking of selections with a moderate penalty
        s_int = -(2.0 * R0 + 1.0)
    else:
        s_int = s
    if s_int is not None:
        vals[single_entry] = s_int
        usable = np.ones(M, dtype=bool)
        ids = np.arange(M)
        e_rows, e_cols, e_vals = rows, cols, vals
    else:  # forbidden singletons leave the internal candidate list
        usable = ~is_single_cand
        ids = np.flatnonzero(usable)
        keep_entry = np.ones(len(vals), dtype=bool)
        keep_entry[single_entry] = False
        remap = np.cumsum(usable) - 1
        e_rows = remap[rows[keep_entry]]
        e_cols = cols[keep_entry]
        e_vals = vals[keep_entry]
    sizes = np.bincount(e_rows, minlength=len(ids)).astype(np.int64)
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    big = max(maxabs, abs(s_int) if s_int is not None else 0.0)
    R_all = n * big + 1.0
    c_int = cand_costs[ids]
    if unit:
        kmax = int(b)
    else:
        kmax = int(math.floor(b / c_int.min() + 1e-9)) if len(ids) else 0
    return _Problem(
        n=n,
        m_given=m,
        cand_masks=cand_masks,
        cand_costs=cand_costs,
        user_gains=gains,
        singleton_gain=s,
        ids=ids,
        rows=np.asarray(e_rows, dtype=np.int64),
        indptr=indptr,
        cols=np.asarray(e_cols, dtype=np.int64),
        vals=e_vals,
        costs=c_int,
        sizes=sizes,
        is_single=is_single_cand[ids],
        budget=b,
        unit=unit,
        kmax=min(kmax, max(len(ids), 1)),
        disjoint=bool(disjoint),
        surrogate=surrogate,
        art=-(2.0 * R_all + 1.0),
        scale=R0,
        tol=1e-9 * R0,
    )


# --------------------------------------------------------------------------- helpers


def _knapsack_bound(
    values: np.ndarray, costs: np.ndarray, cap: float, unit: bool, picks: bool = False
) -> tuple:
    """Fractional-knapsack bound on picking items of value ``values`` within ``cap``.

    Returns ``(bound, mu)`` with ``bound = mu * cap + sum(max(0, values - mu * costs))``
    and ``mu`` the largest minimiser (useful for reduced-cost fixing). For
    unit costs and an integer cap this is the exact sum of the ``cap`` best
    values. With ``picks=True`` also returns the picked item indices and their
    (fractional) weights.
    """
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0))
    pos = np.flatnonzero(values > 0)
    if not len(pos) or cap <= 0:
        return (0.0, 0.0, *empty) if picks else (0.0, 0.0)
    v = values[pos]
    if unit:
        k = int(math.floor(cap + 1e-9))
        if k == 0:
            out = (0.0, float(v.max()))
            return (*out, *empty) if picks else out
        if k >= len(v):
            out = (float(v.sum()), 0.0)
            return (*out, pos, np.ones(len(pos))) if picks else out
        top = np.argpartition(v, len(v) - k)[len(v) - k :]
        out = (float(v[top].sum()), float(v[top].min()))
        return (*out, pos[top], np.ones(k)) if picks else out
    c = costs[pos]
    ratio = v / c
    order = np.argsort(-ratio, kind="stable")
    cc = np.cumsum(c[order])
    k = int(np.searchsorted(cc, cap + 1e-12, side="right"))  # items fully included
    if k >= len(v):
        mu = float(ratio[order[-1]]) if abs(cc[-1] - cap) <= 1e-12 * max(1.0, cap) else 0.0
    elif k > 0 and abs(cc[k - 1] - cap) <= 1e-12 * max(1.0, cap):
        mu = float(ratio[order[k - 1]])
    else:
        mu = float(ratio[order[k]])
    bound = mu * cap + float(np.maximum(v - mu * c, 0.0).sum())
    if not picks:
        return bound, mu
    idx = order[: k + 1] if k < len(v) else order
    w = np.ones(len(idx))
    if k < len(v):
        w[-1] = (cap - (cc[k - 1] if k else 0.0)) / c[order[k]]
    return bound, mu, pos[idx], w


def _finish(
    prob: _Problem,
    internal: Sequence[int],
    *,
    method: str,
    optimal: bool,
    bound: float,
    seconds: float,
    nodes: int,
    n_active: int,
    task_names,
) -> Selection:
    cand = np.asarray(sorted(int(prob.ids[i]) for i in set(int(i) for i in internal)), dtype=np.int64)
    rows = prob.true_rows(cand)
    if not np.isfinite(rows.max(axis=0)).all():
        raise AssertionError("internal error: the selection does not cover every task")
    best = rows.argmax(axis=0)
    used = np.unique(best)
    if len(used) < len(cand):  # a group that serves no task only costs budget: drop it
        cand, rows = cand[used], rows[used]
        best = rows.argmax(axis=0)
    task_gain = rows[best, np.arange(prob.n)]
    objective = float(task_gain.sum())
    # solver bounds are in solver units, which are >= true units (surrogate
    # singleton penalties are milder than the true ones), so they stay valid
    bound = objective if optimal else max(float(bound), objective)
    gap = (bound - objective) / max(abs(objective), 1e-9)
    masks = prob.cand_masks[cand].copy()
    names = tuple(task_names) if task_names is not None else None
    groups = tuple(masks_to_groups(masks, names))
    served = cand[best]
    for arr in (masks, task_gain, served):
        arr.setflags(write=False)
    return Selection(
        chosen=tuple(int(c) for c in cand),
        masks=masks,
        groups=groups,
        objective=objective,
        task_gain=task_gain,
        served_by=served,
        optimal=bool(optimal),
        bound=float(bound),
        gap=float(gap),
        method=method,
        seconds=float(seconds),
        nodes=int(nodes),
        n_candidates=len(prob.cand_masks),
        n_active=int(n_active),
        cost=float(prob.cand_costs[cand].sum()),
        budget=prob.budget,
        disjoint=prob.disjoint,
        task_names=names,
    )


def _internal_value(prob: _Problem, internal: Sequence[int]) -> float:
    """Objective in solver units (surrogate singletons, artificial for uncovered tasks)."""
    best = np.full(prob.n, prob.art)
    for i in internal:
        lo, hi = prob.indptr[i], prob.indptr[i + 1]
        c = prob.cols[lo:hi]
        best[c] = np.maximum(best[c], prob.vals[lo:hi])
    return float(best.sum())


def _covers(prob: _Problem, internal: Sequence[int]) -> bool:
    cov = np.zeros(prob.n, dtype=bool)
    for i in internal:
        cov[prob.cols[prob.indptr[i] : prob.indptr[i + 1]]] = True
    return bool(cov.all())


# --------------------------------------------------------------------------- brute force


def _brute_steps(prob: _Problem) -> int:
    K, kmax = prob.K, min(prob.kmax, prob.K)
    return sum(math.comb(K, k - 1) for k in range(1, kmax + 1))


def _brute(prob: _Problem, deadline: float | None):
    V = prob.dense(true=True)
    Mk = prob.dense_masks()
    K, n = V.shape
    costs = prob.costs
    budget = prob.budget + 1e-9 * max(1.0, prob.budget)
    kmax = min(prob.kmax, K)
    best_val, best_set, steps = -math.inf, None, 0
    timed_out = False
    for k in range(1, kmax + 1):
        for prefix in itertools.combinations(range(K), k - 1):
            steps += 1
            if deadline is not None and steps % 256 == 0 and time.perf_counter() > deadline:
                timed_out = True
                break
            start = prefix[-1] + 1 if prefix else 0
            if start >= K:
                continue
            p = list(prefix)
            spent = float(costs[p].sum()) if p else 0.0
            if spent > budget:
                continue
            cur = V[p].max(axis=0) if p else np.full(n, -np.inf)
            ok = costs[start:] <= budget - spent
            if prob.disjoint:
                used = Mk[p].sum(axis=0) if p else np.zeros(n, dtype=np.int64)
                if (used > 1).any():
                    continue
                ok &= ~(Mk[start:] & (used > 0)).any(axis=1)
            vals = np.maximum(cur, V[start:])
            full = np.isfinite(vals).all(axis=1) & ok
            if not full.any():
                continue
            tot = np.where(full, vals.sum(axis=1), -np.inf)
            j = int(np.argmax(tot))
            if tot[j] > best_val:
                best_val, best_set = float(tot[j]), [*p, start + j]
        if timed_out:
            break
    return best_set, best_val, not timed_out, steps


# --------------------------------------------------------------------------- branch and bound


class _Timeout(Exception):
    pass


def _dense_rows(prob: _Problem, cand: np.ndarray) -> np.ndarray:
    """(len(cand), n) internal gains of internal candidates, -inf for non-members."""
    ent, local = _entries_of(prob, cand)
    V = np.full((len(cand), prob.n), -np.inf)
    V[local, prob.cols[ent]] = prob.vals[ent]
    return V


def _greedy(prob: _Problem) -> tuple[list[int] | None, float]:
    """A quick feasible selection (internal ids, value) or ``(None, -inf)``.

    Adds the affordable group with the largest improvement per cost, where
    covering a new task counts more than any improvement, and keeps the rest
    coverable (a necessary condition). One pass over the member entries per
    added group.
    """
    n, K = prob.n, prob.K
    cols, vals, starts = prob.cols, prob.vals, prob.indptr[:-1]
    lo = np.full(n, np.inf)
    np.minimum.at(lo, cols, vals)
    hi = np.full(n, -np.inf)
    np.maximum.at(hi, cols, vals)
    bonus = float(np.max(hi - lo)) + 1.0
    smax = float(prob.sizes.max())
    cmin = float(prob.costs.min())
    eps = 1e-9 * max(1.0, prob.budget)
    cur = np.full(n, -np.inf)
    avail = np.ones(K, dtype=bool)
    spent, chosen = 0.0, []
    while True:
        rem = prob.budget - spent
        covered = cur > -np.inf
        e_cov = covered[cols]
        ok = avail & (prob.costs <= rem + eps)
        if prob.disjoint:
            ok &= np.add.reduceat(e_cov.astype(np.int64), starts) == 0
        if not ok.any():
            break
        with np.errstate(invalid="ignore"):
            better = np.maximum(vals - cur[cols], 0.0) if not prob.disjoint else 0.0
        contrib = np.where(e_cov, better, vals - lo[cols] + bonus)
        gain = np.add.reduceat(contrib, starts)
        left = (~covered).sum() - np.add.reduceat((~e_cov).astype(np.int64), starts)
        can = np.floor((rem - prob.costs) / cmin + 1e-9) * smax >= left
        score = np.where(ok & can & (gain > 0), gain / prob.costs, -np.inf)
        j = int(np.argmax(score))
        if not np.isfinite(score[j]):
            break
        chosen.append(j)
        avail[j] = False
        spent += float(prob.costs[j])
        lo_e, hi_e = prob.indptr[j], prob.indptr[j + 1]
        c = cols[lo_e:hi_e]
        cur[c] = np.maximum(cur[c], vals[lo_e:hi_e])
    if not np.isfinite(cur).all():
        return None, -math.inf
    return chosen, float(cur.sum())


def _local_search(prob: _Problem, sel: list[int], stop_at: float | None) -> tuple[list[int], float]:
    """Improve an overlapping selection by best single-group replacements and additions.

    Each move scans every candidate once (one pass over the member entries).
    """
    cols, vals, starts = prob.cols, prob.vals, prob.indptr[:-1]
    eps = 1e-9 * max(1.0, prob.budget)
    sel = list(sel)
    value = _internal_value(prob, sel)
    improved = True
    while improved:
        improved = False
        for p in [*range(len(sel)), None]:  # None: try adding a group
            if stop_at is not None and time.perf_counter() > stop_at:
                return sel, value
            others = sel if p is None else sel[:p] + sel[p + 1 :]
            cur = np.full(prob.n, -np.inf)
            for g in others:
                lo, hi = prob.indptr[g], prob.indptr[g + 1]
                cur[cols[lo:hi]] = np.maximum(cur[cols[lo:hi]], vals[lo:hi])
            covered = cur > -np.inf
            rem = prob.budget - float(prob.costs[others].sum()) if others else prob.budget
            e_cov = covered[cols]
            with np.errstate(invalid="ignore"):
                contrib = np.where(e_cov, np.maximum(vals - cur[cols], 0.0), vals)
            gain = np.add.reduceat(contrib, starts)
            n_unc = int((~covered).sum())
            if n_unc:
                hits = np.add.reduceat((~e_cov).astype(np.int64), starts)
                gain[hits < n_unc] = -np.inf
            gain[prob.costs > rem + eps] = -np.inf
            gain[others] = -np.inf
            j = int(np.argmax(gain))
            if not np.isfinite(gain[j]):
                continue
            new_value = float(np.where(covered, cur, 0.0).sum()) + float(gain[j])
            if new_value > value + prob.tol:
                sel = others + [j]
                value = new_value
                improved = True
                break
    return sel, value


def _lagrange_prices(
    prob: _Problem, lb: float | None, deadline: float | None, iters: int = 150, patience: int = 8
) -> tuple[np.ndarray, float, np.ndarray]:
    """Task prices by subgradient descent on the Lagrangian bound.

    Minimises ``L(pi) = sum(pi) + knapsack(r(pi))`` (an upper bound for any
    ``pi``) with Polyak steps towards the incumbent value ``lb``; the step
    factor halves after ``patience`` iterations without progress. Returns
    ``(pi, L(pi), seen)`` with ``seen`` the candidates the knapsack ever picked.
    """
    n = prob.n
    best = np.full(n, -np.inf)
    np.maximum.at(best, prob.cols, prob.vals)
    lo = np.full(n, np.inf)
    np.minimum.at(lo, prob.cols, prob.vals)
    target = float(lo.sum()) if lb is None or not math.isfinite(lb) else lb
    pi = best.copy()
    best_L, best_pi = math.inf, pi.copy()
    seen = np.zeros(prob.K, dtype=bool)
    theta, stall = 1.0, 0
    for _ in range(iters):
        r = _price(prob, pi)
        kb, _, items, w = _knapsack_bound(r, prob.costs, prob.budget, prob.unit, picks=True)
        seen[items] = True
        L = float(pi.sum()) + kb
        if not math.isfinite(best_L) or L < best_L - 1e-12 * max(1.0, abs(best_L)):
            best_L, best_pi, stall = L, pi.copy(), 0
        else:
            stall += 1
            if stall >= patience:
                theta, stall = theta / 2, 0
        if theta < 1e-4 or best_L <= target + prob.tol:
            break
        if deadline is not None and time.perf_counter() > deadline:
            break
        ent, local = _entries_of(prob, items)
        ew = w[local]
        if not prob.disjoint:
            ew = ew * (prob.vals[ent] > pi[prob.cols[ent]])
        d = 1.0 - np.bincount(prob.cols[ent], weights=ew, minlength=n)
        dd = float(d @ d)
        if dd <= 1e-18:
            break
        pi = pi - theta * max(L - target, 1e-9 * prob.scale) / dd * d
    return best_pi, best_L, seen


def _bnb_overlap(prob: _Problem, deadline: float | None, cand=None, pi=None, incumbent=None):
    """Depth-first branch-and-bound (overlap variant) over internal candidates ``cand``."""
    cand = np.arange(prob.K) if cand is None else np.asarray(cand, dtype=np.int64)
    V0 = _dense_rows(prob, cand)
    k, n = V0.shape
    member0 = np.isfinite(V0)
    cost0 = prob.costs[cand]
    if incumbent is None:
        incumbent = _greedy(prob)
    if pi is None:
        pi = _lagrange_prices(prob, incumbent[1], deadline)[0]
    r0 = np.where(member0, np.maximum(V0 - pi, 0.0), 0.0).sum(axis=1)
    order = np.argsort(-(r0 if prob.unit else r0 / cost0), kind="stable")
    V, Ms, cs, r = V0[order], member0[order], cost0[order], r0[order]
    sb = np.full((k + 1, n), -np.inf)
    sb[:k] = np.maximum.accumulate(V[::-1], axis=0)[::-1]
    sl = np.full((k + 1, n), np.inf)
    sl[:k] = np.minimum.accumulate(np.where(Ms, V, np.inf)[::-1], axis=0)[::-1]
    smc = np.full(k + 1, np.inf)
    smc[:k] = np.minimum.accumulate(cs[::-1])[::-1]
    pisum = float(pi.sum())
    root_ub = min(pisum + _knapsack_bound(r, cs, prob.budget, prob.unit)[0], float(sb[0].sum()))
    tol = prob.tol
    eps = 1e-9 * max(1.0, prob.budget)
    st = {"inc": incumbent[1], "set": None, "nodes": 0}
    frames: list[float] = []

    def visit(i: int, cur: np.ndarray, spent: float, chosen: list[int]) -> None:
        st["nodes"] += 1
        if deadline is not None and time.perf_counter() > deadline:
            raise _Timeout
        rem = prob.budget - spent
        covered = cur > -np.inf
        unc = ~covered
        if (unc & (sl[i] == np.inf)).any():
            return
        c = cs[i:]
        afford = c <= rem + eps
        phi, mu = _knapsack_bound(np.where(afford, r[i:], 0.0), c, rem, prob.unit)
        base = pisum + float(np.maximum(cur - pi, 0.0).sum())
        ub = min(base + phi, float(np.maximum(cur, sb[i]).sum()))
        if ub <= st["inc"] + tol:
            return
        D = V[i:]
        n_unc = int(unc.sum())
        if n_unc:
            cov = Ms[i:][:, unc].sum(axis=1).astype(np.float64)
            cov[~afford] = 0.0
            if _knapsack_bound(cov, c, rem, prob.unit)[0] < n_unc - 0.5:
                return
        imp = afford & (D > cur).any(axis=1)
        idx = np.flatnonzero(imp)
        if not len(idx):
            return
        frames.append(ub)
        NC = np.maximum(cur, D[idx])
        full = np.isfinite(NC).all(axis=1)
        if full.any():
            tot = np.where(full, NC.sum(axis=1), -np.inf)
            j = int(np.argmax(tot))
            if tot[j] > st["inc"]:
                st["inc"], st["set"] = float(tot[j]), [*chosen, i + int(idx[j])]
        more = rem - c[idx] >= smc[i + idx + 1] - eps
        if more.any():
            kids = idx[more]
            NCk = NC[more]
            ubk = np.minimum(
                pisum + np.maximum(NCk - pi, 0.0).sum(axis=1) + phi - mu * c[kids],
                np.maximum(NCk, sb[i + kids + 1]).sum(axis=1),
            )
            for q in np.flatnonzero(ubk > st["inc"] + tol):
                if ubk[q] > st["inc"] + tol:
                    j = i + int(kids[q])
                    visit(j + 1, NCk[q], spent + float(cs[j]), [*chosen, j])
        frames.pop()

    complete = True
    try:
        visit(0, np.full(n, -np.inf), 0.0, [])
    except _Timeout:
        complete = False
    # on a time-out the open nodes are bounded by the frames on the stack (or the root bound)
    bound = st["inc"] if complete else max([st["inc"], *frames] if frames else [st["inc"], root_ub])
    if st["set"] is not None:
        chosen = [int(cand[order[j]]) for j in st["set"]]
    else:
        chosen = incumbent[0]
    return chosen, st["inc"], complete, st["nodes"], bound


def _code_table(prob: _Problem):
    """Sorted bit codes of the candidates (n <= 62) for exact-mask look-ups, or None."""
    if prob.n > 62:
        return None
    if "codes" not in prob.cache:
        starts = prob.indptr[:-1]
        codes = np.add.reduceat(np.left_shift(np.int64(1), prob.cols), starts)
        w = np.add.reduceat(prob.vals, starts)
        order = np.argsort(codes, kind="stable")
        sc = codes[order]
        if (sc[1:] == sc[:-1]).any():  # repeated groups: best value first within a code
            order = np.lexsort((-w, codes))
            sc = codes[order]
        prob.cache["codes"] = (sc, order.astype(np.int64), w, codes)
    return prob.cache["codes"]


def _lookup(prob: _Problem, table, code: int, rem: float) -> int:
    """Best-valued internal candidate whose member set has bit code ``code`` and cost <= ``rem``; -1 if none."""
    sorted_codes, order = table[0], table[1]
    p = int(np.searchsorted(sorted_codes, code))
    eps = 1e-9 * max(1.0, prob.budget)
    while p < len(sorted_codes) and sorted_codes[p] == code:
        g = int(order[p])
        if prob.costs[g] <= rem + eps:
            return g
        p += 1
    return -1


def _bnb_disjoint(prob: _Problem, deadline: float | None, cand=None, pi=None, incumbent=None):
    """Depth-first branch-and-bound over partitions: branch on the most constrained uncovered task.

    A node is closed at once by looking up the group equal to its uncovered set
    (n <= 62). Candidates whose root Lagrangian bound falls below the
    incumbent are dropped as the incumbent improves.
    """
    cand = np.arange(prob.K) if cand is None else np.asarray(cand, dtype=np.int64)
    V = _dense_rows(prob, cand)
    k, n = V.shape
    Mk = np.isfinite(V)
    W = np.where(Mk, V, 0.0).sum(axis=1)
    sizes = Mk.sum(axis=1).astype(np.float64)
    cs = prob.costs[cand]
    if incumbent is None:
        incumbent = _greedy(prob)
    if pi is None:
        pi = _lagrange_prices(prob, incumbent[1], deadline)[0]
    rr = W - np.where(Mk, pi, 0.0).sum(axis=1)
    root_phi, root_mu = _knapsack_bound(rr, cs, prob.budget, prob.unit)
    forced = float(pi.sum()) + root_phi - np.maximum(root_mu * cs - rr, 0.0)
    root_ub = min(float(pi.sum()) + root_phi, float(V.max(axis=0).sum()))
    table = _code_table(prob)
    full_code = (1 << n) - 1
    bits = (np.int64(1) << np.arange(n, dtype=np.int64)) if table is not None else None
    tol = prob.tol
    eps = 1e-9 * max(1.0, prob.budget)
    st = {
        "inc": incumbent[1],
        "set": incumbent[0],
        "nodes": 0,
        "alive": np.flatnonzero(forced > incumbent[1] + tol),
    }
    frames: list[float] = []

    def improve(value: float, chosen: list[int]) -> None:
        if value > st["inc"]:
            st["inc"], st["set"] = value, list(chosen)
            st["alive"] = st["alive"][forced[st["alive"]] > value + tol]

    def visit(covered: np.ndarray, value: float, spent: float, chosen: list[int]) -> None:
        st["nodes"] += 1
        if deadline is not None and time.perf_counter() > deadline:
            raise _Timeout
        if covered.all():
            improve(value, chosen)
            return
        rem = prob.budget - spent
        unc = ~covered
        code_u = full_code ^ int(bits[covered].sum()) if table is not None else 0
        if table is not None:
            g = _lookup(prob, table, code_u, rem)
            if g >= 0:
                improve(value + float(table[2][g]), [*chosen, g])
        alive = st["alive"]
        sub = alive[(cs[alive] <= rem + eps) & ~Mk[alive][:, covered].any(axis=1)]
        if not len(sub):
            return
        if table is not None:  # best two-group completion, vectorised
            comp = code_u ^ table[3][cand[sub]]
            pos = np.minimum(np.searchsorted(table[0], comp), len(table[0]) - 1)
            h = table[1][pos]
            ok = (table[0][pos] == comp) & (comp != 0) & (cs[sub] + prob.costs[h] <= rem + eps)
            if ok.any():
                tot = np.where(ok, W[sub] + table[2][h], -np.inf)
                q = int(np.argmax(tot))
                improve(value + float(tot[q]), [*chosen, int(cand[sub[q]]), int(h[q])])
        Vf = V[sub][:, unc]
        bestfree = Vf.max(axis=0)
        if not np.isfinite(bestfree).all():
            return
        phi, mu = _knapsack_bound(rr[sub], cs[sub], rem, prob.unit)
        piU = float(pi[unc].sum())
        ub = min(
            value + float(bestfree.sum()),
            value + piU + phi,
            value + _knapsack_bound(W[sub], cs[sub], rem, prob.unit)[0],
        )
        if ub <= st["inc"] + tol:
            return
        if _knapsack_bound(sizes[sub], cs[sub], rem, prob.unit)[0] < unc.sum() - 0.5:
            return
        frames.append(ub)
        counts = np.isfinite(Vf).sum(axis=0)
        u = int(np.flatnonzero(unc)[int(np.argmin(counts))])
        kids = sub[Mk[sub, u]]
        kids = kids[np.argsort(-rr[kids], kind="stable")]
        kid_ub = value + piU + phi + rr[kids] - mu * cs[kids]
        if table is not None and prob.unit:
            # a kid that leaves room for one group only was closed by the two-group completion
            kid_ub[rem - cs[kids] < 2.0 - eps] = -np.inf
        for g, kub in zip(kids, kid_ub):
            if kub > st["inc"] + tol:
                visit(covered | Mk[g], value + float(W[g]), spent + float(cs[g]), [*chosen, int(cand[g])])
        frames.pop()

    complete = True
    try:
        visit(np.zeros(n, dtype=bool), 0.0, 0.0, [])
    except _Timeout:
        complete = False
    bound = st["inc"] if complete else max([st["inc"], *frames] if frames else [st["inc"], root_ub])
    return st["set"], st["inc"], complete, st["nodes"], bound


# --------------------------------------------------------------------------- MILP / LP


def _entries_of(prob: _Problem, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry indices of the members of internal candidates ``cand`` and their local row."""
    sizes = prob.sizes[cand]
    local = np.repeat(np.arange(len(cand)), sizes)
    starts = np.repeat(prob.indptr[cand], sizes)
    offs = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return starts + offs, local


def _model(prob: _Problem, cand: np.ndarray, artificial: bool):
    """Objective (minimise), equality and inequality blocks over candidates ``cand``."""
    n, k = prob.n, len(cand)
    ent, local = _entries_of(prob, cand)
    cols = prob.cols[ent]
    n_art = n if artificial else 0
    if prob.disjoint:
        w = np.bincount(local, weights=prob.vals[ent], minlength=k)
        c = np.concatenate([-w, np.full(n_art, -prob.art)])
        A_eq = sparse.csr_matrix(
            (
                np.ones(len(ent) + n_art),
                (np.concatenate([cols, np.arange(n_art)]), np.concatenate([local, k + np.arange(n_art)])),
            ),
            shape=(n, k + n_art),
        )
        A_ub = sparse.csr_matrix(
            (prob.costs[cand], (np.zeros(k, dtype=np.int64), np.arange(k))), shape=(1, k + n_art)
        )
        b_ub = np.array([prob.budget])
        n_int = k
    else:
        E = len(ent)
        c = np.concatenate([np.zeros(k), -prob.vals[ent], np.full(n_art, -prob.art)])
        nv = k + E + n_art
        A_eq = sparse.csr_matrix(
            (
                np.ones(E + n_art),
                (
                    np.concatenate([cols, np.arange(n_art)]),
                    np.concatenate([k + np.arange(E), k + E + np.arange(n_art)]),
                ),
            ),
            shape=(n, nv),
        )
        r = np.arange(E)
        link = sparse.csr_matrix(
            (
                np.concatenate([np.ones(E), -np.ones(E), prob.costs[cand]]),
                (np.concatenate([r, r, np.full(k, E)]), np.concatenate([k + r, local, np.arange(k)])),
            ),
            shape=(E + 1, nv),
        )
        A_ub = link
        b_ub = np.concatenate([np.zeros(E), [prob.budget]])
        n_int = k
    return c, A_eq, A_ub, b_ub, n_int


def _solve_milp(prob: _Problem, cand: np.ndarray, *, artificial: bool, time_limit: float | None):
    """MILP over internal candidates ``cand``.

    Returns ``(chosen internal ids or None, internal value, internal upper bound, optimal, nodes, status)``.
    """
    c, A_eq, A_ub, b_ub, n_int = _model(prob, cand, artificial)
    nv = len(c)
    integrality = np.zeros(nv)
    integrality[:n_int] = 1
    options: dict = {"mip_rel_gap": 1e-9}
    if time_limit is not None:
        options["time_limit"] = max(float(time_limit), 0.05)
    res = milp(
        c,
        integrality=integrality,
        bounds=Bounds(np.zeros(nv), np.ones(nv)),
        constraints=[
            LinearConstraint(A_eq, np.ones(prob.n), np.ones(prob.n)),
            LinearConstraint(A_ub, np.full(len(b_ub), -np.inf), b_ub),
        ],
        options=options,
    )
    nodes = int(getattr(res, "mip_node_count", 0) or 0)
    if res.status == 2:
        return None, -math.inf, -math.inf, True, nodes, 2
    if res.x is None:
        ub = -float(res.mip_dual_bound) if getattr(res, "mip_dual_bound", None) is not None else math.inf
        return None, -math.inf, ub, False, nodes, res.status
    chosen = [int(cand[j]) for j in np.flatnonzero(res.x[:n_int] > 0.5)]
    val = _internal_value(prob, chosen)
    dual = getattr(res, "mip_dual_bound", None)
    ub = -float(dual) if dual is not None and np.isfinite(dual) else math.inf
    optimal = res.status == 0
    if optimal:
        ub = max(ub, val) if math.isfinite(ub) else val
    return chosen, val, max(ub, val), optimal, nodes, res.status


def _solve_lp(
    prob: _Problem, cand: np.ndarray, fixed: np.ndarray | None = None, time_limit: float | None = None
):
    """LP relaxation over ``cand`` (with artificials; ``fixed`` positions of ``cand`` forced to 1).

    Returns ``(value, pi (n,), mu, x (len(cand),))``, or None if HiGHS stopped early.
    """
    c, A_eq, A_ub, b_ub, n_int = _model(prob, cand, True)
    lb = np.zeros(len(c))
    if fixed is not None:
        lb[:n_int][fixed] = 1.0
    options = {} if time_limit is None else {"time_limit": max(float(time_limit), 0.05)}
    res = linprog(
        c,
        A_ub=A_ub,
        b_ub=b_ub,
        A_eq=A_eq,
        b_eq=np.ones(prob.n),
        bounds=np.column_stack([lb, np.ones(len(c))]),
        method="highs",
        options=options,
    )
    if res.status != 0 or res.eqlin is None:
        return None
    pi = -np.asarray(res.eqlin.marginals, dtype=np.float64)
    mu = max(0.0, -float(res.ineqlin.marginals[-1]))
    return -float(res.fun), pi, mu, np.asarray(res.x[:n_int])


def _price(prob: _Problem, pi: np.ndarray) -> np.ndarray:
    """Reduced value r_g of every internal candidate for task prices ``pi``."""
    out = np.empty(prob.K)
    chunk = 4_000_000
    starts = prob.indptr[:-1]
    g0 = 0
    while g0 < prob.K:  # blocks of entries bound the temporary memory
        e0 = prob.indptr[g0]
        g1 = int(np.searchsorted(prob.indptr, e0 + chunk, side="right")) - 1
        g1 = min(max(g1, g0 + 1), prob.K)
        e1 = prob.indptr[g1]
        d = prob.vals[e0:e1] - pi[prob.cols[e0:e1]]
        if not prob.disjoint:
            np.maximum(d, 0.0, out=d)
        out[g0:g1] = np.add.reduceat(d, starts[g0:g1] - e0)
        g0 = g1
    return out


def _lagrangian(prob: _Problem, pi: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Upper bound valid for any ``pi`` (artificials included); returns (bound, r, mu)."""
    r = _price(prob, pi)
    kb, mu = _knapsack_bound(r, prob.costs, prob.budget, prob.unit)
    bound = float(pi.sum()) + float(np.maximum(prob.art - pi, 0.0).sum()) + kb
    return bound, r, mu


def _colgen(
    prob: _Problem, inC: np.ndarray, stop_at: float | None, *, allowed=None, fixed=None, max_rounds=500
):
    """Column generation on the LP relaxation; grows ``inC`` in place.

    Each round solves the LP over the current columns, prices every candidate
    and adds the most promising ones (at most ``max(2000, 20 n)`` member
    entries per round). Returns ``(best_pi, best_L, rounds, cand, x)``: the
    prices with the smallest Lagrangian bound (only computed without
    ``allowed``/``fixed``; None if no LP finished) and the last LP's columns
    and values.
    """
    cap = max(2000, 20 * prob.n)
    tol_rc = 1e-9 * prob.scale
    best_L, best_pi, rounds = math.inf, None, 0
    cand, x = np.flatnonzero(inC), None
    while True:
        rounds += 1
        cand = np.flatnonzero(inC)
        fx = None if fixed is None else np.isin(cand, fixed)
        lim = None if stop_at is None else stop_at - time.perf_counter()
        if lim is not None and lim <= 0:
            return best_pi, best_L, rounds - 1, cand, x
        out = _solve_lp(prob, cand, fx, lim)
        if out is None:
            return best_pi, best_L, rounds, cand, x
        _, pi, mu, x = out
        if allowed is None and fixed is None:
            L, r, _ = _lagrangian(prob, pi)
            if L < best_L:
                best_L, best_pi = L, pi
        else:
            r = _price(prob, pi)
        rc = r - mu * prob.costs
        rc[inC] = -np.inf
        if allowed is not None:
            rc[~allowed] = -np.inf
        new = np.flatnonzero(rc > tol_rc)
        if not len(new) or rounds >= max_rounds:
            return best_pi, best_L, rounds, cand, x
        if int(prob.sizes[new].sum()) > cap:
            top = new[np.argsort(-rc[new], kind="stable")]
            new = top[: max(1, int(np.searchsorted(np.cumsum(prob.sizes[top]), cap)))]
        inC[new] = True


def _dive_disjoint(prob: _Problem, inC0: np.ndarray, stop_at: float | None):
    """Price-and-dive heuristic for a partition: fix the LP's largest column, re-price, repeat.

    At every step the partition is also closed by looking up the group equal to
    the uncovered tasks (n <= 62); the best partition seen is returned.
    """
    inC = inC0.copy()
    covered = np.zeros(prob.n, dtype=bool)
    fixed: list[int] = []
    spent, value = 0.0, 0.0
    eps = 1e-9 * max(1.0, prob.budget)
    table = _code_table(prob)
    best_set, best_val, rounds = None, -math.inf, 0
    while not covered.all():
        if stop_at is not None and time.perf_counter() > stop_at:
            break
        rem = prob.budget - spent
        if table is not None:
            code = int(np.left_shift(np.int64(1), np.flatnonzero(~covered)).sum())
            g = _lookup(prob, table, code, rem)
            if g >= 0 and value + table[2][g] > best_val:
                best_set, best_val = [*fixed, g], value + float(table[2][g])
        hits = np.bincount(prob.rows, weights=covered[prob.cols], minlength=prob.K) > 0
        allowed = ~hits & (prob.costs <= rem + eps)
        inC &= allowed
        inC[fixed] = True
        _, _, k, cand, x = _colgen(
            prob, inC, stop_at, allowed=allowed, fixed=np.array(fixed, dtype=np.int64), max_rounds=30
        )
        rounds += k
        x = np.where(np.isin(cand, fixed), -1.0, x)
        j = int(np.argmax(x)) if len(x) else -1
        if j < 0 or x[j] <= 1e-6:
            break
        g = int(cand[j])
        fixed.append(g)
        lo, hi = prob.indptr[g], prob.indptr[g + 1]
        covered[prob.cols[lo:hi]] = True
        value += float(prob.vals[lo:hi].sum())
        spent += float(prob.costs[g])
    if covered.all() and value > best_val:
        best_set, best_val = fixed, value
    return best_set, best_val, rounds


def _reduce(prob: _Problem, deadline: float | None, colgen: bool):
    """Lagrangian prices, an incumbent, and reduced-cost fixing.

    Prices come from column generation on the LP relaxation (exact LP duals,
    HiGHS) with ``colgen``, else from subgradient descent (pure NumPy; also
    the choice for many tasks, where HiGHS LPs with large groups get slow). Returns
    ``(pi, L, incumbent, z_inc, survivors, rounds)``: every selection better
    than the incumbent uses only survivors, and ``L`` bounds them all.
    """
    t0 = time.perf_counter()
    share = None if deadline is None else (deadline - t0)

    def until(frac: float, default: float | None) -> float | None:
        if share is None:
            return None if default is None else time.perf_counter() + default
        return min(t0 + frac * share, deadline)

    g_set, g_val = _greedy(prob)
    if g_set is not None and not prob.disjoint:
        g_set, g_val = _local_search(prob, g_set, until(0.1, 30.0))
    hi = np.full(prob.n, -np.inf)
    np.maximum.at(hi, prob.cols, prob.vals)
    inC = np.zeros(prob.K, dtype=bool)
    inC[prob.is_single] = True
    if g_set is not None:
        inC[g_set] = True
    inC[prob.rows[prob.vals >= hi[prob.cols]]] = True  # each task's best group
    if colgen:
        r0 = _price(prob, np.zeros(prob.n))
        k = min(5 * prob.n, prob.K - 1)
        top = np.argpartition(-r0, k)[:k] if k > 0 else np.arange(prob.K)
        top = top[np.argsort(-r0[top], kind="stable")]
        inC[top[: max(1, int(np.searchsorted(np.cumsum(prob.sizes[top]), max(2000, 20 * prob.n))))]] = True
        pi, L, rounds, _, _ = _colgen(prob, inC, until(0.4, None))
    else:
        pi, L, seen = _lagrange_prices(prob, g_val, until(0.3, None), iters=3000, patience=12)
        inC |= seen
        rounds = 0
    if pi is None:  # not even one LP within the time: the trivial prices (each task's best gain)
        pi = hi.copy()
    cand = np.flatnonzero(inC)
    # incumbent: exact search over the generated columns, then (partition) a dive
    solver = _bnb_disjoint if prob.disjoint else _bnb_overlap
    inc, z_inc, *_ = solver(prob, until(0.5, 10.0), cand=cand, pi=pi, incumbent=(g_set, g_val))
    if prob.disjoint and colgen:
        d_set, d_val, k = _dive_disjoint(prob, inC, until(0.6, 20.0))
        rounds += k
        if d_set is not None and d_val > z_inc:
            inc, z_inc = d_set, d_val
    if inc is not None and not prob.disjoint:
        inc, z_inc = _local_search(prob, inc, until(0.65, 30.0))
    L, r, mu = _lagrangian(prob, pi)
    if inc is None:
        return pi, L, None, -math.inf, np.arange(prob.K), rounds
    forced = L - np.maximum(mu * prob.costs - r, 0.0)
    keep = forced >= z_inc - prob.tol
    keep[inc] = True
    return pi, L, list(inc), z_inc, np.flatnonzero(keep), rounds


# --------------------------------------------------------------------------- public API


def select_groups(
    masks,
    gains,
    budget: float,
    *,
    method: str = "auto",
    singleton_gain: float = 0.0,
    disjoint: bool = False,
    costs=None,
    task_names: Sequence[str] | None = None,
    time_limit: float | None = None,
) -> Selection:
    """Choose groups within ``budget`` that cover every task and maximise the summed best gain.

    Args:
        masks: ``(m, n)`` bool candidate groups (rows may repeat; empty rows are an error).
        gains: ``(m, n)`` float predicted gain of each member task in each group;
            non-member entries are ignored (NaN by convention). Singleton rows
            are ignored too: singletons get ``singleton_gain``.
        budget: with unit costs, the largest number of groups (an integer >= 1);
            with ``costs``, the largest total cost.
        method: ``"auto"``, ``"brute"``, ``"bnb"`` or ``"milp"`` (see the module docs).
        singleton_gain: gain of a task trained alone; ``-inf`` forbids
            singletons, ``-1e8`` mimics the authors' released code.
        disjoint: require the chosen groups to partition the tasks.
        costs: ``(m,)`` positive cost per candidate (implicitly added
            singletons cost 1; pass singleton rows to give them another cost).
        task_names: ``n`` names used in ``Selection.groups``.
        time_limit: seconds; when reached the best selection found so far is
            returned with ``optimal=False`` and its proven ``bound`` / ``gap``.

    Returns:
        A :class:`Selection`.

    Raises:
        ValueError: invalid input, or no selection within the budget covers
            every task (as a partition, with ``disjoint=True``).
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if time_limit is not None:
        try:
            time_limit = float(time_limit)
        except (TypeError, ValueError):
            raise ValueError(f"time_limit must be a number of seconds, got {time_limit!r}") from None
        if not time_limit > 0:
            raise ValueError(f"time_limit must be positive, got {time_limit}")
    prob = _build_problem(masks, gains, budget, singleton_gain, disjoint, costs, task_names)
    if task_names is not None:
        task_names = tuple(str(t) for t in task_names)
        if len(task_names) != prob.n:
            raise ValueError(f"task_names has {len(task_names)} names for {prob.n} tasks")
        if len(set(task_names)) != len(task_names):
            raise ValueError("task_names must be unique")
    deadline = None if time_limit is None else t0 + time_limit
    infeasible_msg = (
        f"no feasible selection: no {'partition of' if prob.disjoint else 'cover of'} all {prob.n} tasks "
        f"by candidate groups fits within the budget {prob.budget:g}"
        + (" (singletons are forbidden)" if prob.singleton_gain == -math.inf else "")
    )
    coverable = np.zeros(prob.n, dtype=bool)
    coverable[prob.cols] = True
    if not coverable.all():
        lost = np.flatnonzero(~coverable)[:10].tolist()
        raise ValueError(
            f"no feasible selection: tasks {[task_names[t] for t in lost] if task_names else lost} are in no "
            "usable candidate group (singletons are forbidden): add candidate groups holding them, or allow "
            "singletons (a finite singleton_gain)"
        )
    small = len(prob.vals) <= _DIRECT_NNZ
    if method == "auto":
        if _brute_steps(prob) <= _AUTO_BRUTE:
            method = "brute"
        else:
            method = "milp" if small else _AUTO_LARGE
    kw = {"task_names": task_names}

    def done(chosen, method, optimal, bound, nodes, n_active):
        return _finish(
            prob,
            chosen,
            method=method,
            optimal=optimal,
            bound=bound,
            seconds=time.perf_counter() - t0,
            nodes=nodes,
            n_active=n_active,
            **kw,
        )

    if method == "brute":
        if _brute_steps(prob) > _BRUTE_MAX:
            raise ValueError(
                f"brute force would need {_brute_steps(prob):,} vector steps; use method='bnb' or 'milp'"
            )
        chosen, val, complete, steps = _brute(prob, deadline)
        if chosen is None:
            if complete:
                raise ValueError(infeasible_msg)
            raise ValueError("no feasible selection found within the time limit")
        bound = val
        if not complete:
            bound = max(val, float(prob.dense(true=True).max(axis=0).sum()))
        return done(chosen, "brute", complete, bound, steps, prob.K)

    solver = _bnb_disjoint if prob.disjoint else _bnb_overlap
    if small and method == "milp":
        lim = None if deadline is None else max(deadline - time.perf_counter(), 0.05)
        chosen, val, ub, optimal, nodes, status = _solve_milp(
            prob, np.arange(prob.K), artificial=False, time_limit=lim
        )
        if status == 2:
            raise ValueError(infeasible_msg)
        if chosen is None:
            raise ValueError("no feasible selection found within the time limit")
        return done(chosen, "milp", optimal, ub, nodes, prob.K)

    # prices + incumbent + reduced-cost fixing, then an exact search over the survivors
    colgen = not small and prob.n <= _COLGEN_MAX_N
    pi, L, inc, z_inc, survivors, rounds = _reduce(prob, deadline, colgen)
    gap_tol = max(1e-6, 1e-9 * abs(z_inc)) if math.isfinite(z_inc) else 0.0
    if inc is not None and L <= z_inc + gap_tol:
        chosen, val, optimal, bound, nodes = inc, z_inc, True, z_inc, rounds
    elif method == "bnb":
        chosen, val, optimal, nodes, bound = solver(
            prob, deadline, cand=survivors, pi=pi, incumbent=(inc, z_inc)
        )
        nodes += rounds
        bound = min(bound, L)
    else:
        cand = survivors
        # HiGHS gets slow (and overruns its time limit) on LPs with many tasks and large groups
        max_nnz = _MILP_MAX_NNZ if prob.n <= _COLGEN_MAX_N else _MILP_MAX_NNZ // 10
        capped = int(prob.sizes[cand].sum()) > max_nnz
        if capped:  # keep the survivors with the best forced-in bounds (no proof then)
            _, r, mu = _lagrangian(prob, pi)
            penalty = np.maximum(mu * prob.costs[cand] - r[cand], 0.0)
            cand = cand[np.argsort(penalty, kind="stable")]
            cand = cand[: int(np.searchsorted(np.cumsum(prob.sizes[cand]), max_nnz))]
            cand = np.union1d(cand, inc if inc is not None else []).astype(np.int64)
        lim = None if deadline is None else deadline - time.perf_counter()
        ch, val, ub, optimal, nodes = None, -math.inf, math.inf, False, 0
        if lim is None or lim > 0.2:
            ch, val, ub, optimal, nodes, _ = _solve_milp(prob, cand, artificial=True, time_limit=lim)
        nodes += rounds
        if ch is None or val < z_inc:
            ch, val = inc, z_inc
        chosen = ch
        optimal = optimal and not capped
        bound = L if capped or not math.isfinite(ub) else min(L, max(ub, z_inc))
    if chosen is None or not _covers(prob, chosen):
        if optimal:
            raise ValueError(infeasible_msg)
        raise ValueError("no feasible selection found within the time limit")
    return done(chosen, method, optimal, max(bound, val), nodes, len(survivors))


def selection_objective(masks, gains, chosen: Sequence[int], singleton_gain: float = 0.0) -> float:
    """Objective of a given selection: sum over tasks of the best gain among chosen groups.

    Args:
        masks, gains: ``(m, n)`` candidates and gains as for :func:`select_groups`.
        chosen: indices into the candidate list (rows of ``masks``, then the
            implicitly added singletons, as in ``Selection.chosen``).
        singleton_gain: gain of a singleton group.

    Raises:
        ValueError: an index out of range, or a task no chosen group covers.
    """
    masks = _as_masks(masks)
    m, n = masks.shape
    gains = _as_gains(gains, (m, n))
    s = _check_singleton_gain(singleton_gain)
    sizes = masks.sum(axis=1)
    has = np.zeros(n, dtype=bool)
    has[np.flatnonzero(masks[sizes == 1].any(axis=0))] = True
    missing = np.flatnonzero(~has)
    best = np.full(n, -np.inf)
    covered = np.zeros(n, dtype=bool)
    for c in chosen:
        c = int(c)
        if 0 <= c < m:
            row = masks[c]
            if not row.any():
                raise ValueError(f"group {c} is empty")
            vals = np.full(n, s) if sizes[c] == 1 else gains[c]
        elif m <= c < m + len(missing):
            row = np.zeros(n, dtype=bool)
            row[missing[c - m]] = True
            vals = np.full(n, s)
        else:
            raise ValueError(f"chosen index {c} out of range for {m + len(missing)} candidates")
        if not np.isfinite(vals[row]).all():
            what = (
                "a forbidden singleton (singleton_gain=-inf)"
                if row.sum() == 1
                else "a non-finite member gain"
            )
            raise ValueError(f"chosen group {c} has {what}")
        covered |= row
        best[row] = np.maximum(best[row], vals[row])
    if not covered.all():
        raise ValueError(f"tasks {np.flatnonzero(~covered).tolist()} are not covered by the chosen groups")
    return float(best.sum())
