"""A group trainer that looks results up in a measured table instead of training.

With an exhaustive table (every group of the tasks measured once, e.g.
``benchmarks/results/chemical_exhaustive.csv``) the search strategies can be
run and compared in seconds, through exactly the machinery a real search
uses (:func:`~lightning_etap.groundtruth.collect_gains`, the
:class:`~lightning_etap.groundtruth.GainStore`, any executor).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_etap.groundtruth.base import GroupOutcome
from lightning_etap.groundtruth.gains import GroupGains

__all__ = ["OracleTrainer", "load_table"]

_REDUCTIONS = ("mean", "seed")


def load_table(source: GroupGains | str | os.PathLike) -> GroupGains:
    """A :class:`~lightning_etap.groundtruth.GroupGains` from a table, a CSV file or a store.

    Args:
        source: a ``GroupGains``; the path of a CSV written by
            :meth:`GroupGains.to_csv` (``.csv``); or the path of a
            :class:`~lightning_etap.groundtruth.GainStore` file (anything
            else; opened read-only, every seed, single-task rows included).
    """
    if isinstance(source, GroupGains):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no ground-truth table at {path}")
    if path.suffix.lower() == ".csv":
        return GroupGains.from_csv(path)
    from lightning_etap.groundtruth.store import GainStore

    with GainStore(path, read_only=True) as store:
        return store.gains(include_singletons=True)


class OracleTrainer:
    """A :class:`~lightning_etap.groundtruth.GroupTrainer` that answers from a measured table.

    ``train(jobs)`` returns, for every ``(group, seed)``, the test losses the
    table holds for that group, so a search strategy driven by this trainer
    behaves exactly as it would with real trainings that happened to give
    these numbers, at no cost. Single-task jobs are answered with the table's
    STL losses.

    Args:
        table: the measured groups: a
            :class:`~lightning_etap.groundtruth.GroupGains` (with the STL
            losses in ``stl_losses``), a CSV path or a store path (see
            :func:`load_table`).
        reduce: ``"mean"`` (default): every job gets the group's test losses
            averaged over the table's seeds, whatever its seed (so a search
            with ``seeds=(0,)`` sees the seed-averaged table); ``"seed"``: a
            job with seed ``s`` gets the losses measured with seed ``s``.

    Attributes:
        task_names: the table's tasks.
        n_calls: number of ``train`` calls so far.
        n_jobs: single-task and multi-task jobs answered so far.
        n_trained: multi-task jobs answered so far (the "trainings").

    Raises:
        ValueError: an unknown ``reduce``, or a table without STL losses.

    Example:
        >>> import numpy as np
        >>> from lightning_etap.groundtruth import GroupGains
        >>> table = GroupGains(("a", "b"), np.array([[True, True]]), np.array([[0.4, 0.5]]),
        ...                    np.array([[0.2, 0.0]]), np.array([0]), {0: np.array([0.5, 0.5])})
        >>> oracle = OracleTrainer(table)
        >>> [o.test_losses for o in oracle.train([(("a", "b"), 0), (("b",), 0)])]
        [{'a': 0.4, 'b': 0.5}, {'b': 0.5}]
    """

    def __init__(self, table: GroupGains | str | os.PathLike, *, reduce: str = "mean") -> None:
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        gains = load_table(table)
        self.reduce = reduce
        self.task_names = tuple(gains.task_names)
        self._index = {t: i for i, t in enumerate(self.task_names)}
        per_seed = {s: v for s, v in gains.stl_losses.items() if s != -1}
        if not per_seed and -1 not in gains.stl_losses:
            raise ValueError("the table holds no single-task (STL) losses; build it with include_singletons=True")
        if reduce == "mean":
            mean = gains.mean_over_seeds()
            self._losses = {(_code(row), -1): mean.test_losses[r] for r, row in enumerate(mean.masks)}
            self._stl = {-1: mean.stl_losses[-1]}
        else:
            self._losses = {(_code(row), int(s)): gains.test_losses[r]
                            for r, (row, s) in enumerate(zip(gains.masks, gains.seeds))}
            self._stl = {int(s): np.asarray(v, dtype=float) for s, v in per_seed.items()}
        digest = hashlib.sha256()
        for (code, seed), losses in sorted(self._losses.items(), key=lambda kv: kv[0]):
            if code < 1 << 63:  # the bytes every earlier fingerprint was made of
                digest.update(np.array([code, seed], dtype=np.int64).tobytes())
            else:  # more than 63 tasks: the code does not fit an int64
                digest.update(code.to_bytes((code.bit_length() + 7) // 8, "little") + np.int64(seed).tobytes())
            digest.update(np.asarray(losses, dtype=np.float64).tobytes())
        for seed in sorted(self._stl):
            digest.update(np.array([seed], dtype=np.int64).tobytes())
            digest.update(np.asarray(self._stl[seed], dtype=np.float64).tobytes())
        self._digest = digest.hexdigest()
        self.n_calls = 0
        self.n_jobs = 0
        self.n_trained = 0

    def fingerprint(self) -> dict[str, Any]:
        """The table's identity (a SHA-256 of every stored loss) and the reduction."""
        return {"trainer": "OracleTrainer", "table_sha256": self._digest, "reduce": self.reduce,
                "task_names": list(self.task_names)}

    def _seed_key(self, seed: int) -> int:
        return -1 if self.reduce == "mean" else int(seed)

    def train(self, jobs: Sequence[tuple[tuple[str, ...], int]]) -> list[GroupOutcome]:
        """Look every ``(group, seed)`` up.

        Raises:
            KeyError: a group or seed the table does not hold (the collector
                records it as a failed job).
        """
        self.n_calls += 1
        out = []
        for group, seed in jobs:
            members = [self._index[str(t)] for t in group]
            key = self._seed_key(seed)
            if len(members) == 1:
                stl = self._stl.get(key)
                value = np.nan if stl is None else float(stl[members[0]])
                if not np.isfinite(value):
                    raise KeyError(f"the table has no STL loss for task {group[0]!r} (seed {seed})")
                losses = {str(group[0]): value}
            else:
                row = self._losses.get((_code_of(members), key))
                if row is None:
                    raise KeyError(f"the table holds no measurement of group {list(group)} (seed {seed})")
                losses = {str(t): float(row[i]) for t, i in zip(group, members)}
                self.n_trained += 1
            self.n_jobs += 1
            out.append(GroupOutcome(tuple(group), int(seed), losses, epochs=0, best_epoch=0, seconds=0.0,
                                    extra={"oracle": True}))
        return out

    def __repr__(self) -> str:
        return f"OracleTrainer({len(self.task_names)} tasks, {len(self._losses)} measured rows, reduce={self.reduce!r})"


def _code(row: np.ndarray) -> int:
    return _code_of(np.flatnonzero(row))


def _code_of(members) -> int:
    code = 0
    for i in members:
        code |= 1 << int(i)
    return code
