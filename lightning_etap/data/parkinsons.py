"""Parkinson's telemonitoring (Tsanas et al. 2009, UCI): 42 regression tasks, one per subject.

5,875 voice recordings of 42 people with early-stage Parkinson's disease,
about 100-170 per person over six months. A task is a subject (``subject#``);
the target is the clinician's ``motor_UPDRS`` (default) or ``total_UPDRS``
score, linearly interpolated between visits by the dataset's authors.

Features (19, in this order, see :data:`FEATURES`): ``age``, ``sex``
(0 male, 1 female), ``test_time`` (days since recruitment), then the 16 voice
measures ``Jitter(%)`` ... ``PPE``. Every feature is z-scored with the mean and
standard deviation of all subjects' *training* rows pooled (one map for all
tasks, nothing learned from validation or test rows). Age and sex are constant
within a subject; they still tell a shared model which tasks resemble each other.

Target: by default z-scored the same way (pooled training rows), for the same
reasons as School's exam score: the per-task relative gain is unchanged by a
common affine map, the tasks keep their raw relative loss scales, and the SGD
recipes start from unit-scale targets (raw scores are ~5-55 points). The
statistics are in ``metadata["target_mean"]`` / ``["target_std"]``; pass
``standardize_target=False`` for raw UPDRS points.

Splits: per subject, ``test_fraction`` of the recordings go to test and
``val_fraction`` of the rest to validation, drawn at random from ``seed``.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import torch

from lightning_etap.data._download import RemoteFile, read_verified
from lightning_etap.data._tabular import check_fractions, float_list, pooled_stats, split_rows, take_rows
from lightning_etap.data.base import MultiTaskDataset, TaskSplits

FOLDER = "parkinsons"
REMOTE = RemoteFile(
    folder=FOLDER,
    name="parkinsons_updrs.data",
    url="https://archive.ics.uci.edu/ml/machine-learning-databases/parkinsons/telemonitoring/"
    "parkinsons_updrs.data",
    sha256="f2c7d5025dec4e92e7feae367a5f7ccf58789a10ac6b54bdf15976c599f9dd39",
)
N_SUBJECTS = 42
TARGETS: tuple[str, ...] = ("motor_UPDRS", "total_UPDRS")
VOICE_FEATURES: tuple[str, ...] = (
    "Jitter(%)", "Jitter(Abs)", "Jitter:RAP", "Jitter:PPQ5", "Jitter:DDP",
    "Shimmer", "Shimmer(dB)", "Shimmer:APQ3", "Shimmer:APQ5", "Shimmer:APQ11", "Shimmer:DDA",
    "NHR", "HNR", "RPDE", "DFA", "PPE",
)
#: The 19 input columns, in order.
FEATURES: tuple[str, ...] = ("age", "sex", "test_time", *VOICE_FEATURES)
_SUBJECT = "subject#"


def _parse(content: bytes, source: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(subject ids int64 (N,), column name -> float64 (N,))`` of a parkinsons_updrs.data file."""
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not an ASCII CSV file ({err})") from err
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    needed = (_SUBJECT, *FEATURES, *TARGETS)
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; header is {header}")
    rows = [r for r in reader if r]
    if not rows:
        raise ValueError(f"{source}: no data rows after the header")
    width = len(header)
    for n, r in enumerate(rows, start=2):
        if len(r) != width:
            raise ValueError(f"{source}: line {n} has {len(r)} fields, the header has {width}")
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{source}: a field is not a number ({err})") from err
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{source}: contains non-finite values")
    columns = {name: table[:, header.index(name)] for name in needed}
    subject = columns.pop(_SUBJECT)
    if not np.all(subject == np.round(subject)):
        raise ValueError(f"{source}: column {_SUBJECT!r} holds non-integer values")
    return subject.astype(np.int64), columns


def load_parkinsons(
    root: str | os.PathLike[str] | None = None,
    *,
    target: str = "motor_UPDRS",
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    standardize_target: bool = True,
    download: bool = True,
) -> MultiTaskDataset:
    """The 42 subjects ``subject_01`` ... ``subject_42`` (per-task inputs, regression).

    Args:
        root: data root holding ``parkinsons/parkinsons_updrs.data``; ``None``
            means ``$LIGHTNING_ETAP_DATA`` or the per-user cache dir.
        target: ``"motor_UPDRS"`` (default) or ``"total_UPDRS"``.
        seed: seed of the per-subject random splits.
        val_fraction: fraction of each subject's non-test recordings used for validation.
        test_fraction: fraction of each subject's recordings used for testing.
        standardize_target: z-score the target with the pooled training rows'
            statistics (default) instead of keeping UPDRS points.
        download: fetch a missing file from the origin (or the mirror) with a
            sha256 check.

    Returns:
        A :class:`MultiTaskDataset`; every split of every task is
        ``(inputs float32 (N, 19), targets float32 (N, 1))``.

    Raises:
        ValueError: unknown ``target``, a bad fraction, or a malformed file.
        FileNotFoundError, ChecksumError, DownloadError: see
            :func:`lightning_etap.data._download.read_verified`.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown Parkinson's target {target!r}; choose one of {list(TARGETS)}")
    check_fractions(val_fraction, test_fraction)
    path, content = read_verified(root, REMOTE, download=download)
    subject, columns = _parse(content, str(path))
    ids = sorted(set(subject.tolist()))
    if ids != list(range(1, N_SUBJECTS + 1)):
        raise ValueError(
            f"{path}: expected subjects 1-{N_SUBJECTS}, found {len(ids)} distinct ids {ids[:5]}..."
        )
    x = np.stack([columns[c] for c in FEATURES], axis=1)
    y = columns[target][:, None]

    names = tuple(f"subject_{s:02d}" for s in ids)
    generator = torch.Generator().manual_seed(int(seed))
    rows = [np.nonzero(subject == s)[0] for s in ids]
    index = [
        split_rows(torch.from_numpy(y[r]), task=name, generator=generator, val_fraction=val_fraction,
                   test_fraction=test_fraction, stratify=False)
        for name, r in zip(names, rows, strict=True)
    ]
    train_rows = np.concatenate([r[i["train"].numpy()] for r, i in zip(rows, index, strict=True)])
    x_mean, x_std = pooled_stats([x[train_rows]])
    x = (x - x_mean) / x_std
    if standardize_target:
        y_mean, y_std = pooled_stats([y[train_rows]])
        y = (y - y_mean) / y_std
    else:
        y_mean, y_std = np.zeros(1), np.ones(1)

    splits = {
        name: TaskSplits(**take_rows(x[r], y[r], i)) for name, r, i in zip(names, rows, index, strict=True)
    }
    return MultiTaskDataset(
        name="parkinsons",
        task_names=names,
        task_kinds=("regression",) * len(names),
        layout="per_task",
        splits=splits,
        metadata={
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "test_fraction": float(test_fraction),
            "target": target,
            "feature_names": list(FEATURES),
            "feature_mean": float_list(x_mean),
            "feature_std": float_list(x_std),
            "standardize_target": bool(standardize_target),
            "target_mean": float_list(y_mean)[0],
            "target_std": float_list(y_std)[0],
            "source": REMOTE.url,
            "source_sha256": {REMOTE.relpath: REMOTE.sha256},
        },
    )
