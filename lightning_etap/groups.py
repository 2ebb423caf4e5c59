"""Task groups as boolean membership masks.

Everywhere in lightning-etap a set of ``m`` groups over ``n`` tasks is a
boolean array of shape ``(m, n)``: ``masks[g, t]`` is True when task ``t`` is a
member of group ``g`` (the paper's multi-hot ``u_G``). Per-task values of a
group (gains, losses, affinity features) are float arrays of the same shape
with ``NaN`` for non-members.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "all_groups",
    "group_names",
    "groups_to_masks",
    "masks_to_groups",
    "n_groups",
]


def n_groups(n_tasks: int, min_size: int = 1, max_size: int | None = None) -> int:
    """Number of groups of ``n_tasks`` tasks with size in ``[min_size, max_size]``."""
    from math import comb

    hi = n_tasks if max_size is None else min(max_size, n_tasks)
    return sum(comb(n_tasks, k) for k in range(max(min_size, 1), hi + 1))


def all_groups(n_tasks: int, min_size: int = 1, max_size: int | None = None) -> np.ndarray:
    """Every group of ``n_tasks`` tasks with ``min_size <= |G| <= max_size``.

    Returns a ``(m, n_tasks)`` bool array ordered by bit pattern (group ``g``
    is the binary number ``g + 1`` read with task 0 as the lowest bit), filtered
    by size. ``n_tasks`` up to 24 (16M groups) is accepted.
    """
    if not 1 <= n_tasks <= 24:
        raise ValueError(f"all_groups enumerates 2**n - 1 groups; n_tasks must be in 1..24, got {n_tasks}")
    codes = np.arange(1, 1 << n_tasks, dtype=np.int64)
    masks = ((codes[:, None] >> np.arange(n_tasks, dtype=np.int64)) & 1).astype(bool)
    if min_size > 1 or max_size is not None:
        size = masks.sum(axis=1)
        keep = size >= min_size
        if max_size is not None:
            keep &= size <= max_size
        masks = masks[keep]
    return masks


def groups_to_masks(groups: Iterable[Sequence], task_names: Sequence[str]) -> np.ndarray:
    """Groups given as sequences of task names (or integer indices) -> ``(m, n)`` bool masks.

    Raises:
        ValueError: a name not in ``task_names``, an index out of range, an
            empty group or a task repeated within a group.
    """
    names = [str(t) for t in task_names]
    index = {t: i for i, t in enumerate(names)}
    rows = []
    for group in groups:
        if isinstance(group, str):
            raise ValueError(f"a group must be a sequence of tasks, not the string {group!r}")
        row = np.zeros(len(names), dtype=bool)
        members = list(group)
        if not members:
            raise ValueError("empty group: every group needs at least one task")
        for t in members:
            if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
                if not 0 <= int(t) < len(names):
                    raise ValueError(f"task index {t} out of range for {len(names)} tasks")
                i = int(t)
            else:
                if str(t) not in index:
                    raise ValueError(f"unknown task {t!r}; known tasks: {names}")
                i = index[str(t)]
            if row[i]:
                raise ValueError(f"task {names[i]!r} appears twice in group {members}")
            row[i] = True
        rows.append(row)
    return np.array(rows, dtype=bool).reshape(len(rows), len(names))


def masks_to_groups(masks: np.ndarray, task_names: Sequence[str] | None = None) -> list[tuple]:
    """``(m, n)`` bool masks -> list of tuples of task names (or indices when no names)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 1:
        masks = masks[None, :]
    if task_names is None:
        return [tuple(int(i) for i in np.flatnonzero(row)) for row in masks]
    names = [str(t) for t in task_names]
    return [tuple(names[i] for i in np.flatnonzero(row)) for row in masks]


def group_names(masks: np.ndarray, task_names: Sequence[str], sep: str = "|") -> list[str]:
    """Readable labels such as ``"83|78|55"`` for each group."""
    return [sep.join(g) for g in masks_to_groups(masks, task_names)]
