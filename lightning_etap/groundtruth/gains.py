"""Measured group gains as a dataset for gain predictors.

:class:`GroupGains` is what the predictors' ``fit(masks, gains)`` takes: one
row per trained ``(group, seed)``, membership masks and relative gains
(paper eq. 1) against the single-task loss of the *same* seed.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_etap._atomic import atomic_file
from lightning_etap._stack import outside_stacklevel
from lightning_etap.groundtruth.sampling import canonical_group, group_key

__all__ = ["GroupGains", "SeedSpread"]


@dataclass(frozen=True)
class SeedSpread:
    """How much the measured gains move between training seeds.

    Attributes:
        task_names: the tasks.
        masks: ``(g, n)`` bool, one row per group measured with two or more seeds.
        std: ``(g, n)`` standard deviation (``ddof=1``) of each member's gain
            across seeds; NaN for non-members.
        mean_std: mean of ``std`` over member entries.
        seeds: the seeds compared.
        task_pearson: ``(s, s)`` Pearson correlation between two seeds' gains
            over the member entries ``(G, t)`` both seeds measured.
        group_pearson: the same for each group's total gain (sum over members).
        noise_ceiling: mean off-diagonal ``task_pearson``: how well one seed's
            gains predict another's. No predictor evaluated against a single
            seed can be expected to correlate better than this.
        group_noise_ceiling: mean off-diagonal ``group_pearson``.
    """

    task_names: tuple[str, ...]
    masks: np.ndarray
    std: np.ndarray
    mean_std: float
    seeds: tuple[int, ...]
    task_pearson: np.ndarray
    group_pearson: np.ndarray
    noise_ceiling: float
    group_noise_ceiling: float

    def __repr__(self) -> str:  # the arrays are attributes; the summary is what one reads
        return (f"SeedSpread({len(self.masks)} groups, seeds {list(self.seeds)}: mean std of a gain "
                f"{self.mean_std:.4g}, noise ceiling {self.noise_ceiling:.3f} per task in a group, "
                f"{self.group_noise_ceiling:.3f} per group)")


@dataclass(frozen=True, eq=False)
class GroupGains:
    """Ground-truth test losses and relative gains of trained groups.

    Attributes:
        task_names: the tasks (columns), in the dataset's order.
        masks: ``(m, n)`` bool membership, one row per ``(group, seed)``.
        test_losses: ``(m, n)`` per-task test loss of the group's model; NaN
            for non-members.
        gains: ``(m, n)`` relative gain ``(L_STL - L_MTL) / L_STL`` of every
            member (eq. 1, :func:`~lightning_etap.training.relative_gain`),
            against the STL loss of the same seed; NaN for non-members.
        seeds: ``(m,)`` training seed of each row (``-1`` after
            :meth:`mean_over_seeds`).
        stl_losses: seed -> ``(n,)`` single-task test losses (NaN where a task
            had no STL run with that seed).

    The table goes straight into any predictor's ``fit``, which matches its
    columns to the predictor's tasks by name when the predictor knows them
    (``fit(gains.masks, gains.gains)`` takes them by position)::

        gains = store.gains()
        ETAPPredictor(affinity).fit(gains)
    """

    task_names: tuple[str, ...]
    masks: np.ndarray
    test_losses: np.ndarray
    gains: np.ndarray
    seeds: np.ndarray
    stl_losses: dict[int, np.ndarray]

    def __post_init__(self) -> None:
        m, n = self.masks.shape if self.masks.ndim == 2 else (-1, -1)
        if n != len(self.task_names):
            raise ValueError(f"masks must have shape (m, {len(self.task_names)}), got {self.masks.shape}")
        for name in ("test_losses", "gains"):
            if getattr(self, name).shape != (m, n):
                raise ValueError(f"{name} must have shape {(m, n)}, got {getattr(self, name).shape}")
        if self.seeds.shape != (m,):
            raise ValueError(f"seeds must have shape ({m},), got {self.seeds.shape}")

    # ---------------------------------------------------------------- building
    @classmethod
    def from_outcomes(
        cls,
        task_names: Sequence[str],
        outcomes: Iterable,
        groups: Iterable[Sequence[str]] | None = None,
        seeds: Iterable[int] | None = None,
        *,
        include_singletons: bool = False,
    ) -> GroupGains:
        """Build from :class:`~lightning_etap.groundtruth.GroupOutcome` objects (STL runs among them).

        Args:
            task_names: the dataset's tasks.
            outcomes: finished jobs, single-task ones included.
            groups: the groups to include, in this order; ``None``: every
                finished group whose members all have an STL loss for its
                seed (by size, then task order).
            seeds: the seeds to include (``None``: all).
            include_singletons: keep one-task groups as rows (gain 0).

        Raises:
            ValueError: with explicit ``groups``, a requested ``(group, seed)``
                or one of its STL runs is missing.
        """
        from lightning_etap.training import relative_gain

        names = tuple(str(t) for t in task_names)
        index = {t: i for i, t in enumerate(names)}
        n = len(names)
        by_job = {(canonical_group(o.group, names), int(o.seed)): o for o in outcomes}
        seed_set = None if seeds is None else {int(s) for s in seeds}
        stl: dict[int, np.ndarray] = {}
        for (g, s), o in by_job.items():
            if len(g) == 1 and (seed_set is None or s in seed_set):
                stl.setdefault(s, np.full(n, np.nan))[index[g[0]]] = float(o.test_losses[g[0]])
        if groups is None:
            def referenced(j):
                return all(j[1] in stl and not np.isnan(stl[j[1]][index[t]]) for t in j[0])

            def order(j):  # by size, then task order, then seed
                return len(j[0]), [index[t] for t in j[0]], j[1]

            finished = [j for j in by_job if (seed_set is None or j[1] in seed_set)
                        and (include_singletons or len(j[0]) > 1)]
            jobs = sorted((j for j in finished if referenced(j)), key=order)
            left_out = sorted((j for j in finished if not referenced(j)), key=order)
            if left_out:
                shown = ", ".join(f"{group_key(g)} (seed {s})" for g, s in left_out[:5])
                warnings.warn(
                    f"{len(left_out)} finished group run(s) left out of the gains: {shown}"
                    f"{' ...' if len(left_out) > 5 else ''}. The single-task runs of some of their members (the "
                    "reference of the relative gain, same seed) are missing; train them (collect_gains "
                    "trains a group's single-task runs with it), or pass groups= to get every missing job listed",
                    UserWarning, stacklevel=outside_stacklevel())
        else:
            wanted_seeds = sorted(seed_set) if seed_set is not None else sorted({s for _, s in by_job})
            jobs, missing = [], []
            for g in groups:
                c = canonical_group(g, names)
                if len(c) == 1 and not include_singletons:
                    continue
                for s in wanted_seeds:
                    needed = [(c, s)] + [((t,), s) for t in c]
                    absent = [j for j in needed if j not in by_job]
                    missing.extend(absent)
                    if not absent:
                        jobs.append((c, s))
            if missing:
                shown = ", ".join(f"{group_key(g)} (seed {s})" for g, s in list(dict.fromkeys(missing))[:8])
                raise ValueError(
                    f"{len(set(missing))} job(s) needed for the requested gains are not finished: {shown}"
                    f"{' ...' if len(set(missing)) > 8 else ''}; run the collection (collect_gains) first"
                )
        m = len(jobs)
        masks = np.zeros((m, n), dtype=bool)
        losses = np.full((m, n), np.nan)
        gains = np.full((m, n), np.nan)
        for r, (g, s) in enumerate(jobs):
            cols = [index[t] for t in g]
            masks[r, cols] = True
            losses[r, cols] = [float(by_job[(g, s)].test_losses[t]) for t in g]
            gains[r, cols] = relative_gain(stl[s][cols], losses[r, cols])
        return cls(
            task_names=names, masks=masks, test_losses=losses, gains=gains,
            seeds=np.array([s for _, s in jobs], dtype=np.int64), stl_losses=stl,
        )

    @classmethod
    def from_store(cls, store, groups=None, seeds=None, *, include_singletons: bool = False) -> GroupGains:
        """Build from a :class:`~lightning_etap.groundtruth.GainStore` (see :meth:`from_outcomes`)."""
        names = store.task_names
        if names is None:
            raise ValueError(
                f"the store {store.path} records no task order; open it once with task_names=... "
                "(collect_gains does this) before building gains"
            )
        return cls.from_outcomes(names, store.outcomes().values(), groups, seeds,
                                 include_singletons=include_singletons)

    # ---------------------------------------------------------------- views
    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """Each row's group as a tuple of task names."""
        return [tuple(self.task_names[i] for i in np.flatnonzero(row)) for row in self.masks]

    def mean_over_seeds(self) -> GroupGains:
        """One row per distinct group: gains and test losses averaged over its seeds.

        The gain of a row is the mean of the per-seed gains (each against its
        own seed's STL loss), not the gain of the mean losses. ``seeds`` is
        ``-1``, and ``stl_losses[-1]`` holds the STL losses averaged over
        seeds (the per-seed entries are kept). Rows keep first-appearance order.
        """
        first: dict[bytes, int] = {}
        inverse = np.array([first.setdefault(row.tobytes(), len(first)) for row in self.masks], dtype=np.int64)
        g = len(first)
        order = [int(np.flatnonzero(inverse == i)[0]) for i in range(g)]
        gains = np.full((g, self.n_tasks), np.nan)
        losses = np.full((g, self.n_tasks), np.nan)
        with np.errstate(invalid="ignore"):
            for i in range(g):
                rows = inverse == i
                gains[i] = self.gains[rows].mean(axis=0)
                losses[i] = self.test_losses[rows].mean(axis=0)
        masks = self.masks[order]
        gains[~masks] = np.nan
        losses[~masks] = np.nan
        stl = dict(self.stl_losses)
        per_seed = [v for s, v in self.stl_losses.items() if s != -1]
        if per_seed:
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a task without STL runs stays NaN
                stl[-1] = np.nanmean(np.stack(per_seed), axis=0)
        return GroupGains(self.task_names, masks, losses, gains, np.full(g, -1, dtype=np.int64), stl)

    def seed_spread(self) -> SeedSpread:
        """Seed-to-seed variability of the gains, and the noise ceiling it sets (see :class:`SeedSpread`).

        Raises:
            ValueError: fewer than two seeds, or no group measured with two seeds.
        """
        seeds = tuple(sorted({int(s) for s in self.seeds}))
        if len(seeds) < 2:
            raise ValueError(f"seed_spread needs gains from at least two seeds; these have {list(seeds)}")
        keys = [row.tobytes() for row in self.masks]
        rows: dict[bytes, dict[int, int]] = {}
        for r, (k, s) in enumerate(zip(keys, self.seeds)):
            rows.setdefault(k, {})[int(s)] = r
        multi = [(k, per) for k, per in rows.items() if len(per) >= 2]
        if not multi:
            raise ValueError("no group was measured with two or more seeds")
        masks = np.array([self.masks[next(iter(per.values()))] for _, per in multi], dtype=bool)
        std = np.full(masks.shape, np.nan)
        for i, (_, per) in enumerate(multi):
            vals = self.gains[list(per.values())]
            std[i, masks[i]] = np.std(vals[:, masks[i]], axis=0, ddof=1)
        s = len(seeds)
        task_r, group_r = np.eye(s), np.eye(s)
        for a in range(s):
            for b in range(a + 1, s):
                ta, tb, ga, gb = [], [], [], []
                for per in rows.values():
                    if seeds[a] in per and seeds[b] in per:
                        ra, rb = per[seeds[a]], per[seeds[b]]
                        mk = self.masks[ra]
                        if mk.sum() < 2:
                            continue
                        ta.extend(self.gains[ra, mk])
                        tb.extend(self.gains[rb, mk])
                        ga.append(self.gains[ra, mk].sum())
                        gb.append(self.gains[rb, mk].sum())
                task_r[a, b] = task_r[b, a] = _pearson(ta, tb)
                group_r[a, b] = group_r[b, a] = _pearson(ga, gb)
        off = ~np.eye(s, dtype=bool)
        return SeedSpread(
            task_names=self.task_names, masks=masks, std=std,
            mean_std=float(np.nanmean(std[masks])) if masks.any() else math.nan,
            seeds=seeds, task_pearson=task_r, group_pearson=group_r,
            noise_ceiling=_nanmean(task_r[off]), group_noise_ceiling=_nanmean(group_r[off]),
        )

    # ---------------------------------------------------------------- export
    def records(self) -> list[dict[str, Any]]:
        """Long format: one dict per row and member task (group, size, seed, task, test_loss, stl_loss, gain)."""
        out = []
        for r in range(len(self)):
            members = np.flatnonzero(self.masks[r])
            key = group_key([self.task_names[i] for i in members])
            seed = int(self.seeds[r])
            for i in members:
                stl = self.stl_losses.get(seed)
                out.append({
                    "group": key, "size": int(members.size), "seed": seed, "task": self.task_names[i],
                    "test_loss": float(self.test_losses[r, i]),
                    "stl_loss": float(stl[i]) if stl is not None else math.nan,
                    "gain": float(self.gains[r, i]),
                })
        return out

    def to_pandas(self):
        """:meth:`records` as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover
            raise ImportError("GroupGains.to_pandas needs pandas: pip install pandas (or use to_csv)") from e
        return pd.DataFrame(self.records(), columns=list(_RECORD_COLUMNS))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`records` to a CSV file (standard library only)."""
        path = Path(path)
        with atomic_file(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(_RECORD_COLUMNS))
            writer.writeheader()
            writer.writerows(self.records())
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike, task_names: Sequence[str] | None = None) -> GroupGains:
        """Read a table written by :meth:`to_csv` (the same rows, in the same order).

        Args:
            path: the CSV file (columns ``group, size, seed, task, test_loss, stl_loss, gain``).
            task_names: the dataset's task order. ``None``: the order in which
                tasks first appear in the file (the dataset's order when the
                table holds the STL rows, as ``to_csv`` of a collection with
                ``include_singletons=True`` writes them first; a file that does
                not start with every task's single-task rows gets a warning that
                the order may not be the dataset's).

        Raises:
            ValueError: missing columns, a task outside ``task_names``, a
                ``(group, seed)`` whose member rows disagree with its key, or
                two STL losses for one task and seed that differ.
        """
        from lightning_etap.groundtruth.sampling import parse_group_key

        path = Path(path)
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _RECORD_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: not a GroupGains table, columns {missing} are missing")
            records = list(reader)
        seen: dict[str, None] = {}
        for r in records:
            seen.setdefault(r["task"], None)
        names = tuple(str(t) for t in task_names) if task_names is not None else tuple(seen)
        if task_names is None and len(names) > 1:
            # the order is the dataset's only when every task's single-task row comes before any multi-task row
            leading: set[str] = set()
            for r in records:
                if str(r["size"]).strip() != "1":
                    break
                leading.add(r["task"])
            if leading != set(names):
                warnings.warn(
                    f"{path} does not start with every task's single-task rows, so its task order "
                    f"{list(names)[:6]}{' ...' if len(names) > 6 else ''} is the order of first appearance, not "
                    "necessarily the dataset's: the masks' columns follow it, and an affinity matrix in another "
                    "order would be matched to the wrong tasks. Pass task_names= the dataset's order (e.g. "
                    "affinity.task_names)", UserWarning, stacklevel=2)
        index = {t: i for i, t in enumerate(names)}
        unknown = [t for t in seen if t not in index]
        if unknown:
            raise ValueError(f"{path}: task(s) {unknown[:5]} are not in task_names")
        n = len(names)
        rows: dict[tuple[str, int], int] = {}
        masks: list[np.ndarray] = []
        losses: list[np.ndarray] = []
        gains: list[np.ndarray] = []
        seeds: list[int] = []
        stl: dict[int, np.ndarray] = {}
        for r in records:
            seed = int(r["seed"])
            key = (r["group"], seed)
            if key not in rows:
                rows[key] = len(masks)
                masks.append(np.zeros(n, dtype=bool))
                losses.append(np.full(n, np.nan))
                gains.append(np.full(n, np.nan))
                seeds.append(seed)
            k, i = rows[key], index[r["task"]]
            masks[k][i] = True
            losses[k][i] = float(r["test_loss"])
            gains[k][i] = float(r["gain"])
            value = float(r["stl_loss"])
            held = stl.setdefault(seed, np.full(n, np.nan))
            if not math.isnan(value):
                if not math.isnan(held[i]) and held[i] != value:
                    raise ValueError(f"{path}: two different STL losses for task {r['task']!r}, seed {seed}")
                held[i] = value
        for (key, _seed), k in rows.items():
            members = set(parse_group_key(key))
            if members != {names[i] for i in np.flatnonzero(masks[k])}:
                raise ValueError(f"{path}: the rows of group {key!r} do not list exactly its member tasks")
        m = len(masks)
        return cls(
            task_names=names,
            masks=np.array(masks, dtype=bool).reshape(m, n),
            test_losses=np.array(losses, dtype=float).reshape(m, n),
            gains=np.array(gains, dtype=float).reshape(m, n),
            seeds=np.array(seeds, dtype=np.int64),
            stl_losses=stl,
        )

    def __repr__(self) -> str:
        return (f"GroupGains({len(self)} rows, {self.n_tasks} tasks, "
                f"seeds={sorted({int(s) for s in self.seeds})})")


_RECORD_COLUMNS = ("group", "size", "seed", "task", "test_loss", "stl_loss", "gain")


def _pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan
