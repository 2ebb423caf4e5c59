"""Landmine (Xue et al. 2007): 29 binary tasks, one per minefield.

Each example is a radar signature of a ground location described by 9
features; the label says whether it is a landmine (1) or clutter (0).
Positives are rare (3-9 % of a task's 445-690 examples). By the source's
convention fields 1-15 are highly foliated and fields 16-29 bare earth or
desert; tasks are named ``field_01`` ... ``field_29`` in the file's order.

Source ``landmine/LandmineData.mat`` (MATLAB, read with :func:`scipy.io.loadmat`):
cell arrays ``feature`` (1 x 29, each ``N_m x 9``) and ``label`` (1 x 29,
each ``N_m x 1`` of 0/1).

Splits: per field, stratified by label, ``test_fraction`` of the examples go
to test and ``val_fraction`` of the rest to validation, drawn from ``seed``.
Features are z-scored with the mean and standard deviation of all fields'
training rows pooled.
"""

from __future__ import annotations

import io
import os

import numpy as np
import scipy.io
import torch

from lightning_etap.data._download import RemoteFile, read_verified
from lightning_etap.data._tabular import check_fractions, float_list, pooled_stats, split_rows, take_rows
from lightning_etap.data.base import MultiTaskDataset, TaskSplits

FOLDER = "landmine"
REMOTE = RemoteFile(
    folder=FOLDER,
    name="LandmineData.mat",
    url="https://raw.githubusercontent.com/AfiyaAyman/Task-Grouping-for-Automated-Multi-Task-Machine-"
    "Learning-via-Task-Affinity-Prediction/main/Dataset/LANDMINE/LandmineData.mat",
    sha256="2163ab20a80e33a8b65593c48cf283c540599dcb291105e63fa4af2ce24c2bea",
)
N_FIELDS = 29
N_FEATURES = 9


def _parse(content: bytes, source: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(features float64 (N_m, 9), labels float64 (N_m, 1)), ...]`` for the 29 fields."""
    try:
        mat = scipy.io.loadmat(io.BytesIO(content))
    except Exception as err:  # scipy raises several unrelated types on a bad file
        raise ValueError(f"{source}: not a readable MATLAB .mat file ({type(err).__name__}: {err})") from err
    missing = [k for k in ("feature", "label") if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{source}: missing variable(s) {missing}; the file holds {found}")
    features, labels = (np.asarray(mat[k], dtype=object).ravel() for k in ("feature", "label"))
    if features.size != N_FIELDS or labels.size != N_FIELDS:
        raise ValueError(
            f"{source}: expected {N_FIELDS} cells in 'feature' and 'label', "
            f"got {features.size} and {labels.size}"
        )
    out = []
    for m, (f, lab) in enumerate(zip(features, labels, strict=True), start=1):
        try:
            f = np.asarray(f, dtype=np.float64)
            lab = np.asarray(lab, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: field {m} does not hold numeric arrays ({err})") from err
        if f.ndim != 2 or f.shape[1] != N_FEATURES:
            raise ValueError(f"{source}: feature cell {m} has shape {f.shape}, expected (N, {N_FEATURES})")
        lab = lab.reshape(-1, 1) if lab.ndim == 1 or (lab.ndim == 2 and 1 in lab.shape) else lab
        if lab.shape != (f.shape[0], 1):
            raise ValueError(f"{source}: label cell {m} has shape {lab.shape}, expected ({f.shape[0]}, 1)")
        if not np.all(np.isfinite(f)):
            raise ValueError(f"{source}: feature cell {m} contains non-finite values")
        if not np.all(np.isin(lab, (0.0, 1.0))):
            raise ValueError(f"{source}: label cell {m} holds values other than 0/1: {np.unique(lab)[:10]}")
        out.append((f, lab))
    return out


def load_landmine(
    root: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    download: bool = True,
) -> MultiTaskDataset:
    """The 29 Landmine fields ``field_01`` ... ``field_29`` (per-task inputs, binary).

    Args:
        root: data root holding ``landmine/LandmineData.mat``; ``None`` means
            ``$LIGHTNING_ETAP_DATA`` or the per-user cache dir.
        seed: seed of the per-field stratified splits.
        val_fraction: fraction of each field's non-test examples used for validation.
        test_fraction: fraction of each field's examples used for testing.
        download: fetch a missing file from the origin (or the mirror) with a
            sha256 check.

    Returns:
        A :class:`MultiTaskDataset`; every split of every task is
        ``(inputs float32 (N, 9), targets float32 (N, 1) of 0/1)``.

    Raises:
        FileNotFoundError, ChecksumError, DownloadError: see
            :func:`lightning_etap.data._download.read_verified`.
        ValueError: a bad fraction, or a malformed file.
    """
    check_fractions(val_fraction, test_fraction)
    path, content = read_verified(root, REMOTE, download=download)
    fields = _parse(content, str(path))
    names = tuple(f"field_{m:02d}" for m in range(1, N_FIELDS + 1))
    generator = torch.Generator().manual_seed(int(seed))
    index = [
        split_rows(torch.from_numpy(lab), task=name, generator=generator, val_fraction=val_fraction,
                   test_fraction=test_fraction, stratify=True)
        for name, (_, lab) in zip(names, fields, strict=True)
    ]
    x_mean, x_std = pooled_stats([f[i["train"].numpy()] for (f, _), i in zip(fields, index, strict=True)])
    splits = {
        name: TaskSplits(**take_rows((f - x_mean) / x_std, lab, i))
        for name, (f, lab), i in zip(names, fields, index, strict=True)
    }
    return MultiTaskDataset(
        name="landmine",
        task_names=names,
        task_kinds=("binary",) * N_FIELDS,
        layout="per_task",
        splits=splits,
        metadata={
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "test_fraction": float(test_fraction),
            "feature_mean": float_list(x_mean),
            "feature_std": float_list(x_std),
            "source": REMOTE.url,
            "source_sha256": {REMOTE.relpath: REMOTE.sha256},
        },
    )
