"""Input checks shared by the predictors and the metrics (private).

Every message names the problem and the fix, because these arrays usually
come from a user's own bookkeeping of trained groups.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_affinity", "check_gains", "check_masks"]


def check_affinity(affinity) -> np.ndarray:
    """Validate a ``(n, n)`` task-affinity matrix; return a float copy with a zero diagonal.

    ``affinity[i, j]`` is the affinity of source task ``i`` onto destination
    task ``j``. The diagonal is ignored (it may be NaN); every off-diagonal
    entry must be finite.
    """
    if hasattr(affinity, "matrix") and hasattr(affinity, "task_names"):  # an AffinityResult
        affinity = affinity.matrix
    if hasattr(affinity, "detach"):  # a torch tensor
        affinity = affinity.detach().cpu().numpy()
    try:
        matrix = np.array(affinity, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"affinity must be a numeric (n_tasks, n_tasks) array; could not convert it to floats: {e}"
        ) from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"affinity must be a square (n_tasks, n_tasks) matrix with affinity[i, j] = z[i -> j]; "
            f"got shape {matrix.shape}"
        )
    if matrix.shape[0] < 2:
        raise ValueError(f"affinity must cover at least 2 tasks; got {matrix.shape[0]}")
    np.fill_diagonal(matrix, 0.0)
    bad = ~np.isfinite(matrix)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"affinity has {int(bad.sum())} non-finite off-diagonal entries (first at [{i}, {j}]); "
            "every pair of distinct tasks needs a finite score: re-measure it or fill it explicitly"
        )
    return matrix


def check_masks(masks, n_tasks: int | None = None, *, name: str = "masks") -> np.ndarray:
    """Validate ``(m, n)`` group membership masks; return them as a bool array.

    Bool arrays are taken as they are; numeric arrays must hold only 0 and 1.
    Every group needs at least one member, and when ``n_tasks`` is given
    there must be exactly one column per task.
    """
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    arr = np.asarray(masks)
    if arr.ndim != 2:
        hint = " (for a single group pass mask[None, :])" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be a 2-D (n_groups, n_tasks) array{hint}; got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "biuf":
            raise ValueError(
                f"{name} must be a boolean (n_groups, n_tasks) membership array; got dtype {arr.dtype}. "
                "Convert groups of task names with lightning_etap.groups.groups_to_masks"
            )
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"{name} must be boolean or hold only 0 and 1 (1 = task is a member); "
                f"found other values such as {arr[~np.isin(arr, (0, 1))].ravel()[0]!r}"
            )
        arr = arr.astype(bool)
    if n_tasks is not None and arr.shape[1] != n_tasks:
        raise ValueError(
            f"{name} has {arr.shape[1]} task columns but the affinity matrix covers {n_tasks} tasks; "
            "masks need one column per task, in the affinity matrix's task order "
            "(build them with lightning_etap.groups.groups_to_masks)"
        )
    empty = ~arr.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        raise ValueError(
            f"{name} has {rows.size} empty group(s) (rows {rows[:5].tolist()}); "
            "every group needs at least one task: drop those rows"
        )
    return arr


def check_gains(gains, masks: np.ndarray, *, name: str = "gains") -> np.ndarray:
    """Validate per-task gains against validated ``masks``; return a float array.

    ``gains`` has the masks' shape; entries of non-members are ignored (NaN is
    customary). Entries of members of groups with two or more tasks must be
    finite; singletons are ignored (their gain is 0 by definition).
    """
    if hasattr(gains, "detach"):
        gains = gains.detach().cpu().numpy()
    try:
        arr = np.array(gains, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric (n_groups, n_tasks) array: {e}") from None
    if arr.shape != masks.shape:
        raise ValueError(
            f"{name} has shape {arr.shape} but masks have shape {masks.shape}; "
            "pass one gain per (group, task) cell, NaN for tasks outside the group"
        )
    used = masks & (masks.sum(axis=1) >= 2)[:, None]
    bad = used & ~np.isfinite(arr)
    if bad.any():
        g, t = np.argwhere(bad)[0]
        fix = ("the predictor returned no value there: check its inputs (a NaN affinity entry, an unfitted "
               "model)" if "pred" in name else "every member of a group needs a measured gain: re-run that group "
               "or drop it")
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) at member positions "
            f"(first: group {g}, task {t}); {fix}"
        )
    return arr
