"""What every search strategy shares: the result, the measured groups, selection on top of them (private).

A strategy talks to the ground truth only through :class:`_Session`, which
trains through :func:`~lightning_etap.groundtruth.collect_gains` into a
:class:`~lightning_etap.groundtruth.GainStore`. The session remembers the
groups *this search* asked for, in order; a group the store already holds is
not trained again (``collect_gains`` skips it), and because a strategy's
decisions depend only on its seed and on the measurements of the groups it
asked for, a search rerun on the store of a crashed one makes the same
decisions, finds them all measured, and goes on from where it stopped.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_etap._stack import outside_stacklevel
from lightning_etap.groundtruth.collect import CollectionError, collect_gains
from lightning_etap.groundtruth.gains import GroupGains
from lightning_etap.groundtruth.sampling import check_seeds, group_key
from lightning_etap.groundtruth.store import FingerprintMismatchError, GainStore
from lightning_etap.groups import all_groups, groups_to_masks
from lightning_etap.selection import select_groups

__all__ = ["OBJECTIVES", "SearchResult", "SearchStep", "total_test_loss"]

#: What a grouping is judged by: ``"loss"`` (default) the summed test loss
#: over the tasks (each task's loss from the chosen group that serves it best,
#: the paper's Table 4 metric); ``"gain"`` the summed relative gain (the
#: released code's selection objective).
OBJECTIVES: tuple[str, ...] = ("loss", "gain")

#: Largest number of tasks for which the candidates default to every group.
_MAX_EXHAUSTIVE = 16

Grouping = tuple[tuple[str, ...], ...]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SearchStep:
    """The grouping a search would have returned after ``n_trainings`` trainings.

    Attributes:
        n_trainings: multi-task trainings spent so far.
        groups: the grouping (tuples of task names; one-task groups are STL models).
        estimated_loss: the strategy's estimate of its total test loss (measured
            losses for measured groups, predictions for the others).
        measured: whether every group of it has been measured (then
            ``estimated_loss`` is the measured total).
    """

    n_trainings: int
    groups: Grouping
    estimated_loss: float
    measured: bool


_SKIP = object()  # SearchResult.to_dict: a value that is not data


@dataclass(frozen=True, eq=False)
class SearchResult:
    """What a search strategy returns.

    Attributes:
        strategy: the strategy's name (a key of :data:`~lightning_etap.search.STRATEGIES`).
        task_names: the tasks.
        groups: the returned grouping: tuples of task names; every task is in
            at least one group (exactly one for a partition); a one-task group
            is that task's single-task (STL) model.
        masks: ``(k, n)`` bool, the same groups as membership masks.
        budget: the largest number of groups allowed (STL models count), or
            ``None`` (a partition of any size).
        estimated_loss: the strategy's estimate of the grouping's total test
            loss (sum over tasks of the lowest loss among the groups holding
            the task); measured wherever the group was measured.
        measured: whether every group of the grouping has been measured.
        n_trainings: multi-task group trainings the search spent (the STL
            models, needed by every strategy, are not counted). Groups found
            already measured in the store count too: they are part of the
            search, they just cost nothing the second time.
        trained: the multi-task groups the search measured, in order.
        trained_now: of those, how many this call actually trained (the
            others came from the store, e.g. after a crash).
        history: the grouping the search would have returned at each of the
            requested ``checkpoints`` (:class:`SearchStep`). A checkpoint the
            search did not reach (it spent fewer trainings) is absent, and so
            is one inside a step that measured several groups at once where
            the strategy has no answer between them (e.g.
            ``quick_reject_search``'s initial groups).
        seconds: wall time of the call.
        details: strategy-specific records (documented by each strategy).
        failed: with ``skip_failed=True``, the groups whose training failed
            (after the collection's retries) and that the search left out.
    """

    strategy: str
    task_names: tuple[str, ...]
    groups: Grouping
    masks: np.ndarray
    budget: int | None
    estimated_loss: float
    measured: bool
    n_trainings: int
    trained: Grouping
    trained_now: int
    history: tuple[SearchStep, ...]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    failed: Grouping = ()

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON data (``json.dumps`` takes it): every field but ``masks`` (the same
        groups as ``groups``); ``details`` with arrays as lists and without fitted models."""
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                items = {str(k): plain(v) for k, v in value.items()}
                return {k: v for k, v in items.items() if v is not _SKIP}
            if isinstance(value, (list, tuple)):
                return [v for v in map(plain, value) if v is not _SKIP]
            if isinstance(value, np.ndarray):
                return value.tolist()
            if isinstance(value, np.generic):
                return value.item()
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            return _SKIP  # a fitted predictor and the like: not data

        return {
            "strategy": self.strategy,
            "task_names": list(self.task_names),
            "groups": [list(g) for g in self.groups],
            "budget": self.budget,
            "estimated_loss": float(self.estimated_loss),
            "measured": bool(self.measured),
            "n_trainings": int(self.n_trainings),
            "trained": [list(g) for g in self.trained],
            "trained_now": int(self.trained_now),
            "history": [{"n_trainings": int(h.n_trainings), "groups": [list(g) for g in h.groups],
                         "estimated_loss": float(h.estimated_loss), "measured": bool(h.measured)}
                        for h in self.history],
            "seconds": float(self.seconds),
            "details": plain(self.details),
            "failed": [list(g) for g in self.failed],
        }

    def __str__(self) -> str:
        kind = "measured" if self.measured else "estimated"
        listing = "; ".join("{" + ", ".join(g) + "}" for g in self.groups)
        failed = f", {len(self.failed)} left out (failed)" if self.failed else ""
        return (f"{self.strategy}: {len(self.groups)} groups after {self.n_trainings} trainings "
                f"({self.trained_now} trained now{failed}), {kind} total test loss {self.estimated_loss:.5g}: "
                f"{listing}")


def total_test_loss(groups: Iterable[Sequence[str]], table: GroupGains) -> float:
    """True total test loss of a grouping, looked up in a measured table.

    For each task the lowest test loss among the given groups containing it
    (a one-task group is the STL model), summed over the tasks; losses are
    averaged over the table's seeds.

    Args:
        groups: the grouping (sequences of task names); must cover every task.
        table: a :class:`~lightning_etap.groundtruth.GroupGains` holding every
            multi-task group of the grouping and the STL losses.

    Raises:
        ValueError: a task no group covers, or a group the table does not hold.

    Example:
        >>> import numpy as np
        >>> from lightning_etap.groundtruth import GroupGains
        >>> table = GroupGains(("a", "b", "c"), np.array([[True, True, False]]), np.array([[0.4, 0.6, np.nan]]),
        ...                    np.full((1, 3), np.nan), np.array([0]), {0: np.array([0.5, 0.5, 0.5])})
        >>> round(total_test_loss([("a", "b"), ("b",), ("c",)], table), 6)  # 0.4 + min(0.6, 0.5) + 0.5
        1.4
    """
    return _LossTable.of(table).total(groups)


class _LossTable:
    """Seed-averaged losses of a table, by group bit code (cached per table object)."""

    _cache: dict[int, tuple[Any, _LossTable]] = {}

    def __init__(self, table: GroupGains) -> None:
        mean = table.mean_over_seeds()
        self.task_names = tuple(table.task_names)
        self.index = {t: i for i, t in enumerate(self.task_names)}
        self.stl = np.asarray(mean.stl_losses.get(-1, np.full(len(self.task_names), np.nan)), dtype=float)
        self.losses = {c: mean.test_losses[r] for r, c in enumerate(group_codes(mean.masks))}

    @classmethod
    def of(cls, table: GroupGains) -> _LossTable:
        hit = cls._cache.get(id(table))
        if hit is not None and hit[0] is table:
            return hit[1]
        made = cls(table)
        if len(cls._cache) > 16:
            cls._cache.clear()
        cls._cache[id(table)] = (table, made)
        return made

    def total(self, groups: Iterable[Sequence[str]]) -> float:
        n = len(self.task_names)
        best = np.full(n, np.inf)
        for group in groups:
            members = [self.index[str(t)] for t in group]
            if len(members) == 1:
                row = np.full(n, np.inf)
                row[members[0]] = self.stl[members[0]]
            else:
                code = sum(1 << i for i in members)
                if code not in self.losses:
                    raise ValueError(f"the table holds no measurement of group {list(group)}")
                row = np.where(np.isnan(self.losses[code]), np.inf, self.losses[code])
            best = np.minimum(best, row)
        if not np.isfinite(best).all():
            missing = [self.task_names[i] for i in np.flatnonzero(~np.isfinite(best))]
            raise ValueError(f"tasks {missing} are in no group of the grouping (or have no measured loss)")
        return float(best.sum())


# --------------------------------------------------------------------------- argument checks


def group_codes(masks: np.ndarray) -> list[int]:
    """One exact integer per membership row (bit ``t`` for task ``t``), for any number of tasks.

    int64 arithmetic is used up to 62 tasks; beyond, Python integers (an int64 code would overflow and
    collide from 64 tasks on).
    """
    masks = np.asarray(masks, dtype=bool)
    n = masks.shape[1]
    if n <= 62:
        return [int(c) for c in masks.astype(np.int64) @ np.left_shift(np.int64(1), np.arange(n, dtype=np.int64))]
    return [sum(1 << int(t) for t in np.flatnonzero(row)) for row in masks]


def check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_predictor(predictor, name: str = "predictor"):
    if isinstance(predictor, type):
        raise TypeError(f"{name} must be a predictor object, not the class {predictor.__name__}: pass e.g. "
                        f"{predictor.__name__}(affinity)")
    if not (hasattr(predictor, "fit") and hasattr(predictor, "predict") and hasattr(predictor, "get_params")):
        raise ValueError(f"{name} must be an unfitted scikit-learn-style gain predictor (e.g. "
                         f"ETAPPredictor(affinity)), got {predictor!r}")
    return predictor


def check_predictor_tasks(predictor, names: Sequence[str], strategy: str) -> None:
    """Refuse, before anything is trained, a predictor whose affinity covers other tasks than the trainer's
    (its size, or the names it carries in another order) or is not a valid matrix (a NaN entry); what can be
    read without fitting it."""
    from lightning_etap.predictors._validation import affinity_values, check_affinity

    affinity = getattr(predictor, "affinity", None)
    if affinity is None:
        return
    matrix, carried = affinity_values(affinity)
    shape = tuple(getattr(matrix, "shape", ()))
    if len(shape) == 2 and shape[0] != len(names):
        raise ValueError(f"{strategy}: the predictor's affinity covers {shape[0]} tasks, the trainer "
                         f"{len(names)} ({list(names)}): build the affinity for the trainer's tasks")
    if _library_predictor(predictor) and len(shape) == 2:
        try:  # a NaN entry stops the first fit, after the STL runs and the all-task group have trained
            check_affinity(affinity)
        except ValueError as e:
            raise ValueError(f"{strategy}: the predictor's {e}") from None
    given = getattr(predictor, "task_names", None)
    for label in (carried, None if given is None else [str(t) for t in given]):
        if label is not None and list(label) != [str(t) for t in names]:
            raise ValueError(f"{strategy}: the predictor's tasks {list(label)} are not the trainer's {list(names)} "
                             "in that order: build the predictor's affinity in the trainer's task order (its "
                             "masks' columns follow the trainer)")


def _library_predictor(predictor) -> bool:
    """Whether ``predictor`` is one of this library's (whose ``affinity`` is a task-affinity matrix; another
    estimator's ``affinity`` parameter may mean something else, e.g. a kernel name)."""
    return any(c.__module__.startswith("lightning_etap.predictors") for c in type(predictor).__mro__)


def fit_quietly(predictor, masks: np.ndarray, gains: np.ndarray):
    """A fresh clone of ``predictor`` fitted on the given groups (its small-sample warnings silenced)."""
    from sklearn.base import clone

    model = clone(predictor)
    with warnings.catch_warnings():
        # With a handful of groups the predictors warn that they use fewer folds; during a search
        # that is expected at every early step, so it is not repeated to the user.
        warnings.simplefilter("ignore", UserWarning)
        return model.fit(masks, gains)


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class Answer:
    """A grouping over candidate indices: ``groups`` are tuples of task indices."""

    groups: tuple[tuple[int, ...], ...]
    estimated_loss: float
    measured: bool


class Session:
    """The measured groups of one search and the selection machinery over them.

    Candidates are the multi-task groups the search may train (by default
    every group of two or more tasks); the all-task group is always one of
    them. Per-task values for selection follow ``objective``: ``"loss"``:
    the STL loss minus the group's loss (so the selection's objective is the
    STL total minus the grouping's total loss); ``"gain"``: relative gains.
    """

    def __init__(
        self,
        strategy: str,
        trainer,
        *,
        n_trainings: int,
        budget: int | None,
        store,
        seeds: Iterable[int],
        executor,
        objective: str,
        candidates,
        task_names: Sequence[str] | None,
        checkpoints: Iterable[int] | None,
        allow_any_budget: bool = False,
        predictor=None,
        progress: bool = False,
        singleton_gain: float = 0.0,
        skip_failed: bool = False,
    ) -> None:
        self.t0 = time.perf_counter()
        if not isinstance(skip_failed, (bool, np.bool_)):
            raise TypeError(f"skip_failed must be True or False, got {skip_failed!r}")
        self.skip_failed = bool(skip_failed)
        self.failed: list[int] = []  # candidates whose training failed, left out (skip_failed=True)
        self.strategy = strategy
        self.trainer = trainer
        self.n_trainings = check_count(n_trainings, "n_trainings")
        if budget is None and not allow_any_budget:
            raise ValueError("budget (the largest number of groups, STL models included) is required")
        self.budget = None if budget is None else check_count(budget, "budget")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective
        self.singleton_gain = float(singleton_gain)
        if self.singleton_gain != 0.0 and objective != "gain":
            raise ValueError(f"singleton_gain={singleton_gain} is a relative gain: it needs objective='gain' (with "
                             "objective='loss' a single-task model's value is its STL loss minus itself, 0)")
        names = task_names if task_names is not None else getattr(trainer, "task_names", None)
        if names is None and isinstance(store, GainStore):
            names = store.task_names
        if names is None:
            raise ValueError("the task order is unknown: pass task_names=[...] or use a trainer with task_names")
        self.names = tuple(str(t) for t in names)
        n = len(self.names)
        if n < 2:
            raise ValueError(f"a search needs at least 2 tasks, got {n}")
        self.n = n
        if predictor is not None:  # before any training: a mismatch found at the first fit wastes trainings
            check_predictor_tasks(predictor, self.names, strategy)
        self.seeds = check_seeds(seeds)
        self.executor = executor
        self.progress = bool(progress)
        self.cands = self._candidates(candidates)
        if self.n_trainings > len(self.cands):
            warnings.warn(f"{strategy}: n_trainings={self.n_trainings} is more than the {len(self.cands)} candidate "
                          f"groups; the search trains at most {len(self.cands)}", UserWarning, stacklevel=3)
        self.index = {c: i for i, c in enumerate(group_codes(self.cands))}
        self.full = self.index[(1 << n) - 1]
        self.checkpoints = sorted({check_count(c, "checkpoints") for c in (checkpoints or ())})
        self.history: list[SearchStep] = []

        try:
            if isinstance(store, GainStore):
                store.claim(trainer.fingerprint(), task_names=list(self.names))
                self.store = store
            else:  # a store this search opened is closed when it returns (result) or, after an error, is dropped
                self.store = GainStore(store, trainer.fingerprint(), task_names=list(self.names))
                self._close_store = weakref.finalize(self, self.store.close)
        except FingerprintMismatchError as err:  # the store's own advice names an option searches do not take
            text = str(err).split("\nUse a new store path")[0]
            raise FingerprintMismatchError(
                f"{text}\nUse a new store path for this search, or, to delete the stored results and start over, "
                "remove the file or open it once with GainStore(path, trainer.fingerprint(), overwrite=True)"
            ) from None
        self.order: list[int] = []
        self.known: dict[int, np.ndarray] = {}
        self.trained_now = 0
        singles = [(t,) for t in self.names]
        stl = collect_gains(trainer, singles, self.seeds, self.store, executor, progress=self.progress,
                            task_names=list(self.names))
        self.stl = np.mean([stl.stl_losses[s] for s in self.seeds], axis=0)
        if not (np.isfinite(self.stl).all() and (self.stl > 0).all()):
            raise ValueError(f"the single-task losses must be finite and positive, got {self.stl}")

    # ------------------------------------------------------------------ candidates
    def _candidates(self, candidates) -> np.ndarray:
        n = len(self.names)
        if candidates is None:
            if n > _MAX_EXHAUSTIVE:
                raise ValueError(f"with {n} tasks there are too many groups to consider them all: pass "
                                 "candidates=... (the groups the search may train)")
            return all_groups(n, min_size=2)
        if isinstance(candidates, np.ndarray) and candidates.dtype == bool:
            if candidates.ndim != 2 or candidates.shape[1] != n:
                raise ValueError(f"candidate masks must have shape (m, {n}), got {candidates.shape}")
            masks = candidates
        else:
            masks = groups_to_masks(candidates, self.names)
        masks = masks[masks.sum(axis=1) >= 2]
        masks = np.concatenate([masks, np.ones((1, n), dtype=bool)])
        _, first = np.unique(masks, axis=0, return_index=True)
        return masks[np.sort(first)]

    def group(self, i: int) -> tuple[str, ...]:
        return tuple(self.names[t] for t in np.flatnonzero(self.cands[i]))

    def code_index(self, members: Sequence[int]) -> int | None:
        """The candidate index of a group of task indices (``None``: not a candidate, or one left out as failed)."""
        i = self.index.get(sum(1 << int(t) for t in members))
        return None if i is None or i in self.failed else i

    # ------------------------------------------------------------------ measuring
    @property
    def spent(self) -> int:
        return len(self.order)

    @property
    def remaining(self) -> int:
        return self.n_trainings - len(self.order)

    @property
    def unmeasured(self) -> np.ndarray:
        """Candidates still open: neither measured nor left out as failed."""
        out = np.ones(len(self.cands), dtype=bool)
        out[self.order] = False
        out[self.failed] = False
        return out

    def measure(self, indices: Iterable[int]) -> list[int]:
        """Train (or find in the store) these candidates; returns the ones new to this search."""
        new = [int(i) for i in dict.fromkeys(int(i) for i in indices) if int(i) not in self.known]
        new = new[: max(self.remaining, 0)]
        if not new:
            return []
        groups = [self.group(i) for i in new]
        jobs = [(g, s) for g in groups for s in self.seeds]
        done = self.store.done_among(jobs)
        try:
            gains = collect_gains(self.trainer, groups, self.seeds, self.store, self.executor,
                                  progress=self.progress, task_names=list(self.names))
        except CollectionError as err:
            new, groups = self._leave_out_failed(err, new, groups)
            if not new:
                return []
            jobs = [(g, s) for g in groups for s in self.seeds]  # all in the store now: nothing trains again
            gains = collect_gains(self.trainer, groups, self.seeds, self.store, self.executor, progress=False,
                                  task_names=list(self.names))
        self.trained_now += len({g for g, s in jobs if (g, s) not in done})
        mean = gains.mean_over_seeds() if len(self.seeds) > 1 else gains
        rows = {c: mean.test_losses[r] for r, c in enumerate(group_codes(mean.masks))}
        for i, g in zip(new, groups):
            losses = rows[int(sum(1 << self.names.index(t) for t in g))]
            self.known[i] = np.asarray(losses, dtype=float)
            self.order.append(i)
        return new

    def measure_first(self, order: Sequence[int], count: int) -> None:
        """Measure the candidates of ``order`` in one call until ``count`` are measured; a group left out as
        failed (``skip_failed``) is replaced by the next ones of ``order``."""
        done = 0
        while self.spent < count and done < len(order):
            take = list(order[done : done + count - self.spent])
            done += len(take)
            self.measure(take)

    def _leave_out_failed(self, err: CollectionError, new: list[int], groups: list[tuple[str, ...]]):
        """With ``skip_failed``: drop the candidates ``err`` failed from this search (warned); else raise ``err``."""
        bad = {g for g, _ in err.failed}
        if not self.skip_failed:
            raise err
        if self.group(self.full) in bad:
            raise CollectionError(f"{self.strategy}: the all-task group, which every search trains first, failed "
                                  f"(skip_failed cannot leave it out): {err}", err.failed) from None
        lost = [i for i, g in zip(new, groups, strict=True) if g in bad]
        if not lost:
            raise err
        self.failed.extend(lost)
        why = {g: (e.strip().splitlines() or [""])[-1] for (g, _), e in err.failed.items()}
        shown = "; ".join(f"{group_key(self.group(i))}: {why[self.group(i)]}" for i in lost[:3])
        warnings.warn(f"{self.strategy}: {len(lost)} group(s) failed to train and are left out of the search "
                      f"(skip_failed=True; not counted as trainings): {shown}", UserWarning,
                      stacklevel=outside_stacklevel())  # measure() is reached at several depths
        kept = [(i, g) for i, g in zip(new, groups, strict=True) if g not in bad]
        return [i for i, _ in kept], [g for _, g in kept]

    def measured_order(self, upto: int | None = None) -> list[int]:
        """The measured candidates in measuring order (the first ``upto`` of them)."""
        return list(self.order if upto is None else self.order[:upto])

    def known_arrays(self, upto: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(indices, masks, gains)`` of the measured groups in measuring order (relative gains)."""
        order = self.measured_order(upto)
        idx = np.array(order, dtype=np.int64)
        masks = self.cands[idx]
        losses = np.array([self.known[i] for i in order]).reshape(len(idx), self.n)
        gains = np.where(masks, (self.stl - losses) / self.stl, np.nan)
        return idx, masks, gains

    def fit(self, predictor, rows: Sequence[int] | None = None, upto: int | None = None, values: bool = False):
        """``predictor`` cloned and fitted on the measured groups.

        ``upto``: only the first ``upto`` measured; ``rows``: positions into
        that list (repeats allowed, e.g. a bootstrap sample). ``values``: fit
        the selection values (:meth:`values`: with the loss objective each
        member's STL loss minus its loss, in loss units) instead of the
        relative gains.
        """
        _, masks, gains = self.known_arrays(upto)
        if values and self.objective == "loss":
            gains = gains * self.stl
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            masks, gains = masks[rows], gains[rows]
        model = fit_quietly(predictor, masks, gains)
        names = getattr(model, "task_names_", None)
        if names is not None and [str(t) for t in names] != [str(t) for t in self.names]:
            raise ValueError(f"{self.strategy}: the predictor's tasks {list(names)} are not the trainer's "
                             f"{list(self.names)} in that order: build the predictor's affinity in the trainer's "
                             "task order (its masks' columns follow the trainer)")
        return model

    # ------------------------------------------------------------------ values
    def values(self, predicted_gains: np.ndarray | None, upto: int | None = None) -> np.ndarray:
        """``(m, n)`` selection values of every candidate: measured where measured, else predicted (NaN: unknown)."""
        if predicted_gains is None:
            out = np.full(self.cands.shape, np.nan)
        else:
            pred = np.where(self.cands, predicted_gains, np.nan)
            out = pred * self.stl if self.objective == "loss" else pred
        idx, _, gains = self.known_arrays(upto)
        if len(idx):
            out[idx] = gains * self.stl if self.objective == "loss" else gains
        return out

    def losses(self, predicted_gains: np.ndarray | None, upto: int | None = None) -> np.ndarray:
        """``(m, n)`` estimated test losses: measured where measured, else ``stl * (1 - predicted gain)``."""
        if predicted_gains is None:
            out = np.full(self.cands.shape, np.nan)
        else:
            out = np.where(self.cands, self.stl * (1.0 - predicted_gains), np.nan)
        for i in self.measured_order(upto):
            out[i] = self.known[i]
        return out

    # ------------------------------------------------------------------ groupings
    def estimate(self, groups: Sequence[Sequence[int]], losses: np.ndarray) -> float:
        """Total of ``losses`` over a grouping: each task's lowest loss among its groups."""
        best = np.full(self.n, np.inf)
        for members in groups:
            if len(members) == 1:
                best[members[0]] = min(best[members[0]], self.stl[members[0]])
                continue
            index = self.code_index(members)
            if index is None:
                raise ValueError(f"{self.strategy}: group {self.named([members])[0]} is not a candidate of this "
                                 "search (or was left out as failed)")
            row = losses[index]
            best = np.minimum(best, np.where(np.isnan(row), np.inf, row))
        return float(best.sum())

    def answer(self, groups: Sequence[Sequence[int]], losses: np.ndarray, upto: int | None = None) -> Answer:
        groups = tuple(sorted((tuple(int(t) for t in g) for g in groups), key=lambda g: (-len(g), g)))
        known = set(self.measured_order(upto))
        measured = all(len(g) == 1 or self.code_index(g) in known for g in groups)
        return Answer(groups, self.estimate(groups, losses), measured)

    def select(self, values: np.ndarray, rows: np.ndarray | None = None, *, disjoint: bool = False,
               budget: int | None = None) -> tuple[tuple[tuple[int, ...], ...], float] | None:
        """Exact selection over candidate ``rows`` (default: every candidate with known values).

        Returns ``(groups, objective)`` with groups as tuples of task indices,
        or ``None`` when no selection within the budget covers every task.
        """
        budget = self.budget if budget is None else budget
        if rows is None:
            rows = np.flatnonzero(~np.isnan(np.where(self.cands, values, 0.0)).any(axis=1))
        rows = np.asarray(rows, dtype=np.int64)
        if budget is None:
            budget = self.n
        if not len(rows):
            if budget < self.n or self.singleton_gain == -np.inf:
                return None
            return tuple((t,) for t in range(self.n)), self.n * self.singleton_gain
        try:
            sel = select_groups(self.cands[rows], values[rows], budget, disjoint=disjoint,
                                singleton_gain=self.singleton_gain)
        except ValueError:
            return None
        groups = tuple(tuple(int(t) for t in np.flatnonzero(row)) for row in sel.masks)
        return groups, float(sel.objective)

    def incumbent(self, upto: int | None = None, *, disjoint: bool = False) -> tuple[Answer, float] | None:
        """The best grouping of measured groups (and STL models) only, and its objective."""
        idx = np.array(self.measured_order(upto), dtype=np.int64)
        found = self.select(self.values(None, upto), idx, disjoint=disjoint)
        if found is None:
            return None
        return self.answer(found[0], self.losses(None, upto), upto), found[1]

    def predicted_answer(self, predicted_gains: np.ndarray, upto: int | None = None) -> Answer | None:
        """The exact selection over every candidate: measured values where measured, else predictions."""
        values = self.values(predicted_gains, upto)
        found = self.select(values, np.setdiff1d(np.arange(len(self.cands)), self.failed))
        if found is None:
            return None
        return self.answer(found[0], self.losses(predicted_gains, upto), upto)

    # ------------------------------------------------------------------ results
    def record(self, answer: Answer | None, n_trainings: int | None = None) -> None:
        """Keep ``answer`` as the grouping after ``n_trainings`` (default: so far) trainings."""
        if answer is None:
            return
        spent = self.spent if n_trainings is None else int(n_trainings)
        step = SearchStep(spent, self.named(answer.groups), answer.estimated_loss, answer.measured)
        self.history = [s for s in self.history if s.n_trainings != spent] + [step]

    def named(self, groups: Sequence[Sequence[int]]) -> Grouping:
        return tuple(tuple(self.names[t] for t in g) for g in groups)

    def result(self, answer: Answer | None, details: dict[str, Any] | None = None) -> SearchResult:
        if hasattr(self, "_close_store"):
            self._close_store()  # the search is over: the store's file is complete on disk from here on
        if answer is None:
            raise ValueError(f"{self.strategy}: no grouping within budget {self.budget} covers every task "
                             "with the groups measured; raise n_trainings or the budget")
        masks = np.zeros((len(answer.groups), self.n), dtype=bool)
        for r, g in enumerate(answer.groups):
            masks[r, list(g)] = True
        history = tuple(sorted(self.history, key=lambda s: s.n_trainings))
        return SearchResult(
            strategy=self.strategy,
            task_names=self.names,
            groups=self.named(answer.groups),
            masks=masks,
            budget=self.budget,
            estimated_loss=float(answer.estimated_loss),
            measured=bool(answer.measured),
            n_trainings=self.spent,
            trained=tuple(self.group(i) for i in self.order),
            trained_now=self.trained_now,
            failed=tuple(self.group(i) for i in self.failed),
            history=history,
            seconds=time.perf_counter() - self.t0,
            details=dict(details or {}),
        )


def random_order(session: Session, rng: np.random.Generator) -> list[int]:
    """The all-task group, then every other candidate in a random order (seeded)."""
    others = np.array([i for i in range(len(session.cands)) if i != session.full], dtype=np.int64)
    return [session.full, *rng.permutation(others).tolist()]
