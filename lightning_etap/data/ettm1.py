"""ETTm1 (Zhou et al. 2021): forecast each of the 7 electricity-transformer series, one task per series.

The source ``ettm1/ETTm1.csv`` (or the same bytes gzipped, ``ETTm1.csv.gz``)
has a ``date`` column and the 7 series ``HUFL, HULL, MUFL, MULL, LUFL, LULL,
OT`` (high / middle / low useful and useless load, oil temperature), one row
every 15 minutes from 2016-07-01, 69,680 rows.

Split (the standard ETT protocol of Informer / Autoformer, in 15-minute rows):
the first 12 months (``12*30*24*4 = 34,560`` rows) train, the next 4 months
validation, the next 4 months test (rows 57,600 onward are unused). A
validation or test window may start up to ``input_len`` rows before its
split's first row (its inputs look back into the previous split), but every
target value lies inside the split. Every series is z-scored with the mean and
standard deviation (ddof=0) of the training rows.

Windows (``shared`` layout, every task labels the same windows):

* input: the last ``input_len`` steps of *all 7* series, flattened time-major
  to ``input_len * 7`` features (feature ``k*7 + j`` is series ``j`` at step ``k``);
* task ``t``'s target: the next ``horizon`` values of series ``t``
  (``target_dim = horizon``).

Window starts step by ``stride`` in validation and test (default 1: every
window, the standard evaluation) and by ``train_stride`` in training.
``train_stride`` defaults to :data:`DEFAULT_TRAIN_STRIDE` = 4 (one window per
hour, 8,623 training windows instead of 34,489). Consecutive windows overlap in
47 of 48 input steps, so stride 1 mostly repeats near-identical examples, and
the library's default job trains all 127 groups of the 7 tasks. Measured on a
2-core CPU with the ``ettm1`` training preset (7 single-task models x 2 seeds
per stride): the summed single-task test MSE was 3.02 at train stride 1, 3.14
at 2, 3.14 at 4 and 3.26 at 8 (at 8, 8 of the 14 runs hit the preset's 30-epoch
cap); stride 4 took 2.3x fewer optimizer steps than stride 1 (714 vs 1,610 on
average, early stopping included), and four single-task fits timed side by
side took 0.48x the wall time of stride 1. So stride 4 costs about 4 % in test
MSE for about half the training time. Pass ``train_stride=1`` for every
window. The strides used are recorded in ``metadata``.

All tasks share the same input tensor object per split (memory paid once).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from lightning_etap.data._download import RemoteFile, read_verified
from lightning_etap.data._tabular import float_list
from lightning_etap.data.base import MultiTaskDataset, TaskSplits

FOLDER = "ettm1"
REMOTE = RemoteFile(
    folder=FOLDER,
    name="ETTm1.csv",
    url="https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTm1.csv",
    sha256="6ce1759b1a18e3328421d5d75fadcb316c449fcd7cec32820c8dafda71986c9e",  # of the uncompressed CSV
    gzip_ok=True,
)
#: The 7 series, in the file's column order (= task order).
SERIES: tuple[str, ...] = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
#: 15-minute rows in a 30-day month.
ROWS_PER_MONTH = 30 * 24 * 4
#: ``[start, end)`` rows of the train / val / test targets (12 / 4 / 4 months).
BORDERS: dict[str, tuple[int, int]] = {
    "train": (0, 12 * ROWS_PER_MONTH),
    "val": (12 * ROWS_PER_MONTH, 16 * ROWS_PER_MONTH),
    "test": (16 * ROWS_PER_MONTH, 20 * ROWS_PER_MONTH),
}
#: Default window step of the training split (see the module docstring).
DEFAULT_TRAIN_STRIDE = 4


def _parse(content: bytes, source: str) -> np.ndarray:
    """The 7 series as float64 ``(rows, 7)`` from the CSV content."""
    header, _, body = content.partition(b"\n")
    columns = [c.strip() for c in header.decode("ascii", errors="replace").split(",")]
    expected = ["date", *SERIES]
    if columns != expected:
        raise ValueError(f"{source}: expected the header {','.join(expected)}, got {','.join(columns)}")
    try:
        values = np.loadtxt(io.BytesIO(body), delimiter=",", usecols=range(1, 8), dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{source}: could not parse the 7 numeric columns ({err})") from err
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{source}: contains non-finite values")
    return values


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _windows(z: np.ndarray, start: int, end: int, input_len: int, horizon: int, stride: int):
    """Inputs ``(n, input_len*7)`` and per-series targets ``(n, horizon)`` of windows whose
    targets lie in rows ``[start, end)`` (inputs begin ``input_len`` rows earlier)."""
    first = start - input_len  # first input row of the first window
    n = (end - horizon - start) // stride + 1
    view = np.lib.stride_tricks.sliding_window_view
    flat = z[first:end - horizon].reshape(-1)  # inputs never reach the last `horizon` rows
    x = view(flat, input_len * z.shape[1])[:: z.shape[1] * stride][:n]
    ys = [view(z[start:end, j], horizon)[::stride][:n] for j in range(z.shape[1])]
    return torch.from_numpy(np.ascontiguousarray(x)), [torch.from_numpy(np.ascontiguousarray(y)) for y in ys]


def load_ettm1(
    root: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    input_len: int = 48,
    horizon: int = 24,
    stride: int = 1,
    train_stride: int | None = None,
    download: bool = True,
) -> MultiTaskDataset:
    """The 7 ETTm1 forecasting tasks ``HUFL`` ... ``OT`` (shared inputs, regression).

    Args:
        root: data root holding ``ettm1/ETTm1.csv`` or ``ettm1/ETTm1.csv.gz``;
            ``None`` means ``$LIGHTNING_ETAP_DATA`` or the per-user cache dir.
        seed: accepted for a uniform loader signature and recorded in
            ``metadata``; the split is chronological and does not depend on it.
        input_len: input window length in 15-minute steps (default 48 = 12 h).
        horizon: forecast length in steps (default 24 = 6 h); every task's
            target has this width.
        stride: step between window starts in validation and test (default 1:
            every window).
        train_stride: step between training window starts; ``None`` means
            :data:`DEFAULT_TRAIN_STRIDE` (4).
        download: fetch a missing file from the origin (or the mirror) with a
            sha256 check of the uncompressed CSV.

    Returns:
        A :class:`MultiTaskDataset`: per split one input tensor float32
        ``(N, input_len*7)`` of z-scored values shared by all tasks, and per
        task float32 targets ``(N, horizon)`` (z-scored units).

    Raises:
        ValueError: non-positive lengths / strides, or windows longer than a split;
            a malformed file.
        FileNotFoundError, ChecksumError, DownloadError: see
            :func:`lightning_etap.data._download.read_verified`.
    """
    input_len = _positive_int("input_len", input_len)
    horizon = _positive_int("horizon", horizon)
    stride = _positive_int("stride", stride)
    if train_stride is None:
        train_stride = DEFAULT_TRAIN_STRIDE
    train_stride = _positive_int("train_stride", train_stride)
    shortest = min(b - a for a, b in BORDERS.values())
    if input_len > BORDERS["train"][1] - horizon or horizon > shortest:
        raise ValueError(
            f"input_len={input_len} and horizon={horizon} do not fit the splits "
            f"(train has {BORDERS['train'][1]} rows, val and test {shortest} each)"
        )

    path, content = read_verified(root, REMOTE, download=download)
    values = _parse(content, str(path))
    needed = BORDERS["test"][1]
    if values.shape[0] < needed:
        raise ValueError(f"{path}: has {values.shape[0]} data rows, the standard split needs {needed}")
    train_lo, train_hi = BORDERS["train"]
    mean = values[train_lo:train_hi].mean(axis=0)
    std = values[train_lo:train_hi].std(axis=0)
    z = ((values[:needed] - mean) / std).astype(np.float32)

    strides = {"train": train_stride, "val": stride, "test": stride}
    per_split = {}
    for split, (lo, hi) in BORDERS.items():
        # the first training window cannot look back before row 0
        start = lo + input_len if split == "train" else lo
        per_split[split] = _windows(z, start, hi, input_len, horizon, strides[split])
    splits = {
        name: TaskSplits(**{s: (x, ys[j]) for s, (x, ys) in per_split.items()})
        for j, name in enumerate(SERIES)
    }
    return MultiTaskDataset(
        name="ettm1",
        task_names=SERIES,
        task_kinds=("regression",) * len(SERIES),
        layout="shared",
        splits=splits,
        metadata={
            "seed": int(seed),
            "input_len": input_len,
            "horizon": horizon,
            "stride": stride,
            "train_stride": train_stride,
            "borders": {s: list(b) for s, b in BORDERS.items()},
            "series_mean": float_list(mean),
            "series_std": float_list(std),
            "n_windows": {s: int(x.shape[0]) for s, (x, _) in per_split.items()},
            "source": REMOTE.url,
            "source_sha256": {REMOTE.relpath: REMOTE.sha256},
        },
    )
