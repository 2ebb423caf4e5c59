"""Input checks shared by the predictors and the metrics (private).

Every message names the problem and the fix, because these arrays usually
come from a user's own bookkeeping of trained groups.
"""

from __future__ import annotations

import warnings

import numpy as np

from lightning_etap._stack import outside_stacklevel

__all__ = [
    "affinity_values",
    "as_float_array",
    "check_affinity",
    "check_gains",
    "check_masks",
    "resolve_task_names",
    "training_table",
]


def affinity_values(affinity) -> tuple[object, list[str] | None]:
    """The matrix of ``affinity`` in its tasks' order, and the task names it carries (``None``: plain array).

    An ``AffinityResult`` carries its ``task_names``; a pandas DataFrame its
    columns, and its rows are read by label (sources in the columns' order),
    so a DataFrame whose rows are listed in another order means the same
    matrix. Rows labelled other than the columns are refused; a default
    ``RangeIndex`` reads the rows by position.
    """
    if hasattr(affinity, "matrix") and hasattr(affinity, "task_names"):  # an AffinityResult
        return affinity.matrix, [str(t) for t in affinity.task_names]
    if hasattr(affinity, "columns") and hasattr(affinity, "index") and hasattr(affinity, "loc"):  # a DataFrame
        cols, rows = list(affinity.columns), list(affinity.index)
        if rows != cols:
            positional = rows == list(range(len(rows))) and type(affinity.index).__name__ == "RangeIndex"
            if len(rows) == len(cols) and set(rows) == set(cols) and len(set(cols)) == len(cols):
                affinity = affinity.loc[cols]  # sources by label, in the columns' order
            elif not positional:
                raise ValueError(
                    f"the affinity DataFrame's rows {rows} and columns {cols} name different tasks: rows are the "
                    "source tasks and columns the destination tasks, the same tasks; label both alike "
                    "(e.g. pd.DataFrame(matrix, index=names, columns=names))")
        return affinity.to_numpy(), [str(c) for c in cols]
    return affinity, None


def as_float_array(value) -> np.ndarray:
    """``value`` (numpy array, torch tensor, nested lists, ...) as a float64 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def resolve_task_names(given, affinity, n: int) -> list[str] | None:
    """The task names of a predictor: ``given`` (its ``task_names=``) or those ``affinity`` carries, checked."""
    carried = affinity_values(affinity)[1] if affinity is not None else None
    if given is not None and carried is not None and [str(t) for t in given] != carried:
        raise ValueError(f"task_names {list(given)} differ from the affinity's own task order {carried}: the "
                         "matrix's rows and columns follow the affinity's order; drop task_names= or reorder it")
    names = carried if given is None else [str(t) for t in given]
    if names is None:
        return None
    if len(names) != n:
        raise ValueError(f"task_names has {len(names)} names but the data cover {n} tasks")
    if len(set(names)) != n:
        raise ValueError("task_names must be unique")
    return names


def check_affinity(affinity) -> np.ndarray:
    """Validate a ``(n, n)`` task-affinity matrix; return a float copy with a zero diagonal.

    ``affinity[i, j]`` is the affinity of source task ``i`` onto destination
    task ``j``. The diagonal is ignored (it may be NaN); every off-diagonal
    entry must be finite. A DataFrame's rows are read by label
    (:func:`affinity_values`).
    """
    affinity = affinity_values(affinity)[0]
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


def check_gains(gains, masks: np.ndarray, *, name: str = "gains", task_names=None) -> np.ndarray:
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
        task = repr(str(task_names[t])) if task_names is not None and len(task_names) == arr.shape[1] else t
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) at member positions "
            f"(first: group {g}, task {task}); {fix}"
        )
    return arr


def training_table(masks, gains, names, who: str, *, ordered: bool = False,
                   required: bool = True) -> tuple[object, object, list[str] | None]:
    """``fit``'s training data: ``(masks, gains)`` arrays as given, or a :class:`GroupGains` passed alone.

    A ``GroupGains`` (``store.gains()``, anything with ``task_names``,
    ``masks`` and ``gains``) carries its task names, so its columns are put
    in the predictor's task order ``names`` (when the predictor knows them)
    by name instead of by position. ``ordered``: the predictor's columns
    follow an order of its own (its affinity matrix's), which without
    ``names`` cannot be checked (warned; the table's names are then not
    adopted). ``required``: ``gains`` must be given with plain masks.
    Returns ``(masks, gains, the columns' task names or None)``.
    """
    if gains is not None or not all(hasattr(masks, a) for a in ("task_names", "masks", "gains")):
        if required and gains is None:
            raise TypeError(f"{who}.fit needs the training groups' gains: pass fit(masks, gains), or a GroupGains "
                            "(store.gains()) alone")
        return masks, gains, None
    theirs = [str(t) for t in masks.task_names]
    if names is None:
        if ordered:
            warnings.warn(
                f"{who}: its affinity carries no task names, so the gains' columns {theirs} are taken in their own "
                "order as the affinity's rows and columns, unchecked; pass task_names= (or an AffinityResult) to "
                "have them matched by name", UserWarning, stacklevel=outside_stacklevel())
            return masks.masks, masks.gains, None
        return masks.masks, masks.gains, theirs
    ours = [str(t) for t in names]
    if sorted(ours) != sorted(theirs):
        missing, extra = [t for t in ours if t not in theirs], [t for t in theirs if t not in ours]
        raise ValueError(
            f"the gains cover tasks {theirs} but {who} predicts for {ours} (missing from the gains: {missing}; "
            f"not the predictor's: {extra}): measure the same tasks, or build the predictor's affinity on these")
    order = [theirs.index(t) for t in ours]
    return masks.masks[:, order], masks.gains[:, order], ours
