"""What an affinity measurement produced: the labelled matrix and how it came about."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_etap._atomic import atomic_write_bytes, atomic_write_text
from lightning_etap.affinity.scores import group_affinity

__all__ = ["AffinityResult"]


def _spearman_finite(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation over the entries finite in both; ``None`` with fewer than three such entries or
    when either side is constant (to rounding)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    a, b = a[ok], b[ok]
    for x in (a, b):
        if np.ptp(x) <= 1e-12 * max(float(np.max(np.abs(x))), 1e-300):
            return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)

_FORMAT = "lightning-etap/affinity-result"
_VERSION = 1


@dataclass(frozen=True, eq=False)
class AffinityResult:
    """Task affinities measured during one training run.

    Convention: ``matrix[i, j] = z̄[i→j]``, the affinity of source task ``i``
    (row) onto target task ``j`` (column): positive when ``i``'s updates lower
    ``j``'s loss. The diagonal holds each task's affinity onto itself.

    Attributes:
        task_names: the tasks, in the matrix's order.
        matrix: ``(n, n)`` float64, the time-averaged affinity under the
            reduction in ``settings["reduction"]``.
        epoch_matrices: ``(E, n, n)`` float64, the mean step score of every
            measured epoch (NaN in a column no step of that epoch counted for).
        epochs: ``(E,)`` int, the epoch index of each row of ``epoch_matrices``.
        step_matrices: ``(S, n, n)`` float64 step scores (optimizer steps;
            gradient-accumulation micro-batches averaged), or ``None`` unless
            the callback kept them.
        steps: ``(S,)`` int, the global step of each step matrix, or ``None``.
        measured_steps: optimizer steps whose scores entered the matrix.
        skipped_steps: measured steps dropped for a non-finite loss, gradient
            or score (or a zero learning rate under TAG with ``divide_by_lr``).
        zero_loss_skips: task -> number of steps whose column was left out
            because the task's loss was exactly zero (the score divides by it).
        absent_steps: task -> number of measured steps the task was absent
            from (its loss NaN / inf while the training loss was finite, e.g.
            no labels in the batch): its row and column left out of them.
            Tasks never absent are not listed.
        half_matrices: ``(2, n, n)`` float64, the matrices of the two split
            halves of the measured steps (alternate steps, each half reduced
            like ``matrix``), or ``None`` (fewer than two steps measured, or
            a fit resumed from a checkpoint written before halves existed).
            How far they agree: :attr:`split_half`, :attr:`split_half_pairs`.
        settings: the callback's settings (method, update, ...).

    Example:
        >>> import numpy as np
        >>> m = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0], [5.0, 6.0, 0.0]])
        >>> res = AffinityResult(("a", "b", "c"), m, m[None], [0])
        >>> res.score("b", "a")  # b's updates onto a's loss
        3.0
        >>> res.member_scores(["a", "b"])  # eq. 7: {a: z[b->a], b: z[a->b]}
        {'a': 3.0, 'b': 1.0}
        >>> res.group_score(["a", "b", "c"])  # mean of (3+5)/2, (1+6)/2, (2+4)/2
        3.5
    """

    task_names: tuple[str, ...]
    matrix: np.ndarray
    epoch_matrices: np.ndarray
    epochs: np.ndarray
    step_matrices: np.ndarray | None = None
    steps: np.ndarray | None = None
    measured_steps: int = 0
    skipped_steps: int = 0
    zero_loss_skips: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    half_matrices: np.ndarray | None = None
    absent_steps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = tuple(str(t) for t in self.task_names)
        object.__setattr__(self, "task_names", names)
        n = len(names)
        if len(set(names)) != n:
            raise ValueError(f"task names must be unique, got {list(names)}")
        matrix = np.asarray(self.matrix, dtype=np.float64)
        if matrix.shape != (n, n):
            raise ValueError(f"matrix must be {n}x{n} for {n} tasks, got shape {matrix.shape}")
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "epoch_matrices", np.asarray(self.epoch_matrices, np.float64).reshape(-1, n, n))
        object.__setattr__(self, "epochs", np.asarray(self.epochs, dtype=np.int64).reshape(-1))
        if self.step_matrices is not None:
            object.__setattr__(self, "step_matrices", np.asarray(self.step_matrices, np.float64).reshape(-1, n, n))
            object.__setattr__(self, "steps", np.asarray(self.steps, dtype=np.int64).reshape(-1))
        if self.half_matrices is not None:
            halves = np.asarray(self.half_matrices, dtype=np.float64)
            if halves.shape != (2, n, n):
                raise ValueError(f"half_matrices must be 2x{n}x{n} for {n} tasks, got shape {halves.shape}")
            object.__setattr__(self, "half_matrices", halves)

    # ------------------------------------------------------------------ queries
    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def _indices(self, tasks: Sequence[str]) -> list[int]:
        if isinstance(tasks, str):
            raise TypeError(f"pass a sequence of task names, not the string {tasks!r}")
        names = [str(t) for t in tasks]
        unknown = [t for t in names if t not in self.task_names]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the result has {list(self.task_names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task(s) in group {names}")
        return [self.task_names.index(t) for t in names]

    def score(self, source: str, target: str) -> float:
        """``z̄[source→target]``."""
        i, j = self._indices([source])[0], self._indices([target])[0]
        return float(self.matrix[i, j])

    def member_scores(self, group: Sequence[str]) -> dict[str, float]:
        """Paper eq. 7 per member: ``z̄[G→t] = mean over s in G, s ≠ t of matrix[s, t]``.

        Raises:
            ValueError: unknown or duplicated task names, or fewer than two
                tasks (a single task has no affinity).
        """
        idx = self._indices(group)
        if not idx:
            raise ValueError("the group is empty: name at least two of the tasks " + str(list(self.task_names)))
        if len(idx) < 2:
            raise ValueError(
                f"group {list(group)} has a single task: a singleton has no affinity "
                "(eq. 7 averages the affinity from the other members)"
            )
        values = group_affinity(self.matrix, idx)
        return {self.task_names[k]: float(v) for k, v in zip(idx, values, strict=True)}

    def group_score(self, group: Sequence[str]) -> float:
        """The group's affinity: the mean over members ``t`` of :meth:`member_scores` (eq. 7)."""
        return float(np.mean(list(self.member_scores(group).values())))

    @functools.cached_property
    def split_half(self) -> float | None:
        """How reproducible the ranking of the matrix's entries is: the Spearman correlation between the
        off-diagonal entries of the two split halves' matrices (:attr:`half_matrices`, entries finite in both).

        Near 1: other measured steps would rank the entries the same way; near 0: the ranking is the noise of
        which steps were measured. The whole matrix, from twice the steps, is more reproducible than either
        half (roughly, for ``r > 0``, ``2r / (1 + r)`` by the Spearman-Brown formula). The ranking of the
        entries includes each task's own effects (a source whose updates are large, a target whose loss is
        small), which are often the steadiest part; :attr:`split_half_pairs` leaves them out. ``None``
        without halves, with fewer than three finite entries (two tasks), or when a half's entries are all
        equal.
        """
        if self.half_matrices is None:
            return None
        off = ~np.eye(self.n_tasks, dtype=bool)
        return _spearman_finite(self.half_matrices[0][off], self.half_matrices[1][off])

    @functools.cached_property
    def split_half_pairs(self) -> float | None:
        """:attr:`split_half` of what is specific to each pair: the Spearman correlation between the two
        halves' off-diagonal entries after removing, from each half, its least-squares fit of a level plus
        a row (source task) and a column (target task) effect.

        High when the halves agree on which *pairs* go well together beyond each task's own tendency; near
        0 when only the per-task effects are reproducible. ``None`` as for :attr:`split_half`, and with
        fewer than four tasks (the residuals of three tasks' six entries have one degree of freedom).
        """
        if self.half_matrices is None or self.n_tasks < 4:
            return None
        rows, cols = np.nonzero(~np.eye(self.n_tasks, dtype=bool))
        residuals = []
        for half in self.half_matrices:
            values = half[rows, cols]
            ok = np.isfinite(values)
            design = np.zeros((len(values), 1 + 2 * self.n_tasks))
            design[:, 0] = 1.0
            design[np.arange(len(values)), 1 + rows] = 1.0
            design[np.arange(len(values)), 1 + self.n_tasks + cols] = 1.0
            coef = np.linalg.lstsq(design[ok], values[ok], rcond=None)[0]
            residuals.append(np.where(ok, values - design @ coef, np.nan))
        return _spearman_finite(*residuals)

    def pairwise(self) -> dict[tuple[str, str], float]:
        """Group score of every pair ``(a, b)`` (task order): ``(z̄[a→b] + z̄[b→a]) / 2``."""
        n = self.n_tasks
        return {
            (self.task_names[i], self.task_names[j]): float((self.matrix[i, j] + self.matrix[j, i]) / 2)
            for i in range(n) for j in range(i + 1, n)
        }

    def subset(self, tasks: Sequence[str]) -> AffinityResult:
        """The result restricted to ``tasks``, in that order: every matrix's rows and columns of those tasks.

        Each entry is averaged over its own steps, so an entry of the subset is exactly the entry of the
        whole: the affinity of a group depends on its members only. Counts of steps stay those of the
        whole fit; ``settings["subset_of"]`` keeps the fit's task names.

        Example:
            >>> import numpy as np
            >>> m = np.arange(9.0).reshape(3, 3)
            >>> AffinityResult(("a", "b", "c"), m, m[None], [0]).subset(["c", "a"]).matrix
            array([[8., 6.],
                   [2., 0.]])
        """
        idx = self._indices(tasks)
        if len(idx) < 1:
            raise ValueError("subset needs at least one task")
        grid = np.ix_(idx, idx)
        names = tuple(self.task_names[k] for k in idx)

        def cut(stack: np.ndarray | None) -> np.ndarray | None:
            return None if stack is None else stack[(slice(None), *grid)]

        return AffinityResult(
            task_names=names,
            matrix=self.matrix[grid],
            epoch_matrices=cut(self.epoch_matrices),
            epochs=self.epochs.copy(),
            step_matrices=cut(self.step_matrices),
            steps=None if self.steps is None else self.steps.copy(),
            measured_steps=self.measured_steps,
            skipped_steps=self.skipped_steps,
            zero_loss_skips={t: k for t, k in self.zero_loss_skips.items() if t in names},
            settings={**self.settings, "subset_of": list(self.settings.get("subset_of", self.task_names))},
            half_matrices=cut(self.half_matrices),
            absent_steps={t: k for t, k in self.absent_steps.items() if t in names},
        )

    def to_pandas(self):
        """The matrix as a ``pandas.DataFrame`` (index: source task, columns: target task; needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("AffinityResult.to_pandas needs pandas: pip install pandas (or 'lightning-etap[plot]'); "
                              "result.matrix and result.task_names hold the same numbers without it") from err

        df = pd.DataFrame(self.matrix, index=list(self.task_names), columns=list(self.task_names))
        df.index.name, df.columns.name = "source", "target"
        return df

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``affinity.json`` (names, counts, settings) and ``affinity.npz`` (arrays) into directory ``path``.

        No pickle is used; :meth:`load` gives back an equal result, bit for bit.
        Each file is written to a temporary name and moved into place; the
        JSON (written last) records the arrays' SHA-256, so an interrupted save
        never passes for a complete one.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"matrix": self.matrix, "epoch_matrices": self.epoch_matrices, "epochs": self.epochs}
        if self.step_matrices is not None:
            arrays.update(step_matrices=self.step_matrices, steps=self.steps)
        if self.half_matrices is not None:
            arrays.update(half_matrices=self.half_matrices)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getbuffer()  # no second copy of a large archive
        digest = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(folder / "affinity.npz", data)
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "task_names": list(self.task_names),
            "measured_steps": int(self.measured_steps),
            "skipped_steps": int(self.skipped_steps),
            "zero_loss_skips": {str(k): int(v) for k, v in self.zero_loss_skips.items()},
            "absent_steps": {str(k): int(v) for k, v in self.absent_steps.items()},
            "settings": self.settings,
            "has_steps": self.step_matrices is not None,
            "arrays_sha256": digest,
        }
        atomic_write_text(folder / "affinity.json", json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> AffinityResult:
        """Read a result written by :meth:`save`."""
        folder = Path(path)
        meta = json.loads((folder / "affinity.json").read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{folder} does not hold an affinity result (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > _VERSION:
            raise ValueError(f"affinity result version {meta['version']} is newer than this library reads")
        raw = (folder / "affinity.npz").read_bytes()
        expected = meta.get("arrays_sha256")
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise ValueError(f"{folder / 'affinity.npz'} does not match {folder / 'affinity.json'} (an interrupted "
                             "or mixed save); save the result again")
        import io

        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(
            task_names=tuple(meta["task_names"]),
            matrix=arrays["matrix"],
            epoch_matrices=arrays["epoch_matrices"],
            epochs=arrays["epochs"],
            step_matrices=arrays.get("step_matrices") if meta["has_steps"] else None,
            steps=arrays.get("steps") if meta["has_steps"] else None,
            measured_steps=int(meta["measured_steps"]),
            skipped_steps=int(meta["skipped_steps"]),
            zero_loss_skips={k: int(v) for k, v in meta["zero_loss_skips"].items()},
            absent_steps={k: int(v) for k, v in meta.get("absent_steps", {}).items()},
            settings=dict(meta["settings"]),
            half_matrices=arrays.get("half_matrices"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AffinityResult):
            return NotImplemented

        def same(a, b) -> bool:
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")

        return (
            self.task_names == other.task_names
            and same(self.matrix, other.matrix)
            and same(self.epoch_matrices, other.epoch_matrices)
            and same(self.epochs, other.epochs)
            and same(self.step_matrices, other.step_matrices)
            and same(self.steps, other.steps)
            and same(self.half_matrices, other.half_matrices)
            and self.measured_steps == other.measured_steps
            and self.skipped_steps == other.skipped_steps
            and self.zero_loss_skips == other.zero_loss_skips
            and self.absent_steps == other.absent_steps
            and self.settings == other.settings
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = self.n_tasks
        finite = self.matrix[np.isfinite(self.matrix)]
        rng = f"[{finite.min():.3g}, {finite.max():.3g}]" if finite.size else "[no finite values]"
        method = self.settings.get("method", "?")
        r = self.split_half
        half = "" if r is None else f", split half {r:.2f}"
        return (f"AffinityResult({n} tasks, method={method!r}, {self.measured_steps} steps measured, "
                f"{self.skipped_steps} skipped, values in {rng}{half})")
