"""Shared helpers of the per-task tabular loaders (School, Parkinson's, Landmine, Chemical).

One convention for every loader:

* ``test_fraction`` of each task's rows go to test; ``val_fraction`` of the
  *remaining* rows go to validation (the convention of
  :func:`~lightning_etap.data.digits.load_digits`; Chemical has a fixed test
  file, so only the validation split is drawn there).
* Splits are drawn with one :class:`torch.Generator` seeded with ``seed``,
  task by task in the dataset's canonical order: same seed, same rows.
* Binary tasks are split stratified by label.
* Standardisation statistics come from the *training* rows of all tasks
  pooled, so every task sees the same affine feature map (a shared encoder
  needs one input scale) and nothing leaks from validation or test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_etap.data.base import stratified_split

SplitIndex = dict[str, Tensor]  # split name -> row indices (sorted, int64)


def check_fractions(val_fraction: float, test_fraction: float | None = None) -> None:
    """Raise ``ValueError`` unless the fractions lie in (0, 1)."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if value is not None and not 0.0 < float(value) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")


def split_rows(
    y: Tensor,
    *,
    task: str,
    generator: torch.Generator,
    val_fraction: float,
    test_fraction: float | None,
    stratify: bool,
) -> SplitIndex:
    """Row indices of one task's train / val / test split.

    With ``test_fraction=None`` there is no test split to draw (the caller has
    a fixed test set) and the result has ``"train"`` and ``"val"`` only.

    Raises:
        ValueError: a split would be empty (the task is too small for the
            fractions); the message names the task.
    """
    n = int(y.shape[0])
    rows = torch.arange(n)
    out: SplitIndex = {}
    if test_fraction is not None:
        rest, test = stratified_split(y, test_fraction, generator, stratify=stratify)
        out["test"] = test
        rows = rest
    train_rel, val_rel = stratified_split(y[rows], val_fraction, generator, stratify=stratify)
    out["train"], out["val"] = rows[train_rel], rows[val_rel]
    empty = [s for s, idx in out.items() if idx.numel() == 0]
    if empty:
        sizes = {s: int(idx.numel()) for s, idx in out.items()}
        raise ValueError(
            f"task {task!r} has {n} rows, too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: split sizes {sizes}"
        )
    return out


def pooled_stats(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and standard deviation (ddof=0) of the row-wise concatenation of ``parts``.

    A constant column gets standard deviation 1, so standardising leaves it at 0.
    """
    stacked = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts], axis=0)
    mean = stacked.mean(axis=0)
    std = stacked.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean, std


def take_rows(x: np.ndarray, y: np.ndarray, index: SplitIndex) -> dict[str, tuple[Tensor, Tensor]]:
    """Split name -> ``(inputs, targets)`` float32 tensors (targets 2-D) of one task's rows."""
    x32 = np.asarray(x, dtype=np.float32)
    y32 = np.asarray(y, dtype=np.float32).reshape(len(y), -1)

    def rows(a: np.ndarray, i: Tensor) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a[i.numpy()]))

    return {s: (rows(x32, i), rows(y32, i)) for s, i in index.items()}


def float_list(values: np.ndarray) -> list[float]:
    """Plain floats for metadata (JSON-friendly, fingerprint-stable)."""
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]
