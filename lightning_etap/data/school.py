"""School (ILEA, Goldstein 1987): 139 regression tasks, one per London secondary school.

15,362 students, each with an exam score (the target) and the school they
attend (the task). Source file ``school/ILEA567.DAT``: fixed width, CRLF line
ends, a stray ``0x1A`` byte at the end; only lines that start with a digit are
records. Each record is 16 characters (1-based columns, blank-padded numbers):

==========  ===============  =====================================================
columns     field            coding
==========  ===============  =====================================================
1           year             1985=1, 1986=2, 1987=3
2-4         school           1-139 (the task)
5-6         exam score       1-70 in this file (the target)
7-8         % FSM            percent of the school's pupils eligible for free school meals
9-10        % VR1            percent of the school's pupils in verbal-reasoning band 1
11          gender           male=0, female=1
12          VR band          VR1=2, VR2=3, VR3=1; 0 for 15 students (band unknown)
13-14       ethnic group     ESWI=1, African=2, Arab=3, Bangladeshi=4, Caribbean=5, Greek=6,
                             Indian=7, Pakistani=8, S.E.Asian=9, Turkish=10, Other=11
15          school gender    mixed=1, boys=2, girls=3
16          denomination     maintained=1, Church of England=2, Roman Catholic=3
==========  ===============  =====================================================

Features (27, the classic encoding of the multi-task-learning literature,
e.g. Evgeniou et al. 2005 / Argyriou et al. 2008: every categorical attribute
becomes one binary column per value), in this order (see :data:`FEATURE_NAMES`):

* ``year_1985, year_1986, year_1987`` (one-hot)
* ``fsm_pct, vr1_pct`` (the two school percentages, z-scored with the
  pooled training rows' mean and standard deviation)
* ``male, female``
* ``vr_band_1, vr_band_2, vr_band_3`` (the student's band; all zero when unknown)
* 11 ethnic-group columns ``eth_eswi`` ... ``eth_other``
* ``school_mixed, school_boys, school_girls``
* ``denom_maintained, denom_church_of_england, denom_roman_catholic``

Target: by default the exam score z-scored with the mean and standard
deviation of all tasks' *training* rows pooled (``standardize_target=True``).
One affine map for every task keeps the tasks' relative loss scales as in raw
points (so a group's summed loss weighs schools as the raw scores would) and
the per-task relative MTL gain is unchanged by it, while the default SGD
recipes start from targets of unit scale instead of a mean of ~20 points.
The released code of Ayman et al. (2023) also z-scores the score, with
whole-file statistics; we use training rows only so nothing leaks. The
statistics are in ``metadata["target_mean"]`` / ``["target_std"]``
(MSE in points^2 = standardised MSE x target_std^2). Pass
``standardize_target=False`` to keep raw points.

Splits: per school, ``test_fraction`` of the students go to test and
``val_fraction`` of the rest to validation, drawn at random from ``seed``.
The smallest school has 22 students.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from lightning_etap.data._download import RemoteFile, read_verified
from lightning_etap.data._tabular import check_fractions, float_list, pooled_stats, split_rows, take_rows
from lightning_etap.data.base import MultiTaskDataset, TaskSplits

FOLDER = "school"
REMOTE = RemoteFile(
    folder=FOLDER,
    name="ILEA567.DAT",
    url="https://raw.githubusercontent.com/AfiyaAyman/Task-Grouping-for-Automated-Multi-Task-Machine-"
    "Learning-via-Task-Affinity-Prediction/main/Dataset/SCHOOL/ILEA567.DAT",
    sha256="57bbbfd28db39a1383661fdce8719fa8f5b29ec6d0881292ade5f2d8c3774a68",
)
N_SCHOOLS = 139
RECORD_WIDTH = 16

#: 0-based [start, stop) character ranges of the record fields.
_FIELDS: dict[str, tuple[int, int]] = {
    "year": (0, 1), "school": (1, 4), "score": (4, 6), "fsm": (6, 8), "vr1": (8, 10),
    "gender": (10, 11), "vr_band": (11, 12), "ethnic": (12, 14), "school_gender": (14, 15),
    "denomination": (15, 16),
}
#: allowed code range of every categorical field (inclusive).
_RANGES: dict[str, tuple[int, int]] = {
    "year": (1, 3), "school": (1, N_SCHOOLS), "gender": (0, 1), "vr_band": (0, 3), "ethnic": (1, 11),
    "school_gender": (1, 3), "denomination": (1, 3), "fsm": (0, 100), "vr1": (0, 100), "score": (0, 99),
}
_ETHNIC = ("eswi", "african", "arab", "bangladeshi", "caribbean", "greek", "indian", "pakistani",
           "se_asian", "turkish", "other")

#: The 27 feature columns, in order.
FEATURE_NAMES: tuple[str, ...] = (
    "year_1985", "year_1986", "year_1987",
    "fsm_pct", "vr1_pct",
    "male", "female",
    "vr_band_1", "vr_band_2", "vr_band_3",
    *(f"eth_{e}" for e in _ETHNIC),
    "school_mixed", "school_boys", "school_girls",
    "denom_maintained", "denom_church_of_england", "denom_roman_catholic",
)
_CONTINUOUS = (3, 4)  # fsm_pct, vr1_pct: standardised; every other column is 0/1


def _parse(content: bytes, source: str) -> dict[str, np.ndarray]:
    """Field name -> int64 array (one entry per student) of an ILEA567.DAT file."""
    lines = [line.rstrip(b"\r") for line in content.split(b"\n")]
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line[:1].isdigit()]
    if not numbered:
        raise ValueError(f"{source}: no records found (expected fixed-width lines starting with a digit)")
    bad = [(n, line) for n, line in numbered if len(line) != RECORD_WIDTH]
    if bad:
        n, line = bad[0]
        raise ValueError(
            f"{source}: line {n} has {len(line)} characters, expected {RECORD_WIDTH} "
            f"(fixed-width ILEA record): {line[:40]!r}; {len(bad)} such line(s)"
        )
    chars = np.frombuffer(b"".join(line for _, line in numbered), dtype=np.uint8).reshape(-1, RECORD_WIDTH)
    is_digit = (chars >= ord("0")) & (chars <= ord("9"))
    ok = is_digit | (chars == ord(" "))
    if not ok.all():
        row = int(np.nonzero(~ok.all(axis=1))[0][0])
        raise ValueError(
            f"{source}: line {numbered[row][0]} has a character that is neither a digit nor a blank: "
            f"{numbered[row][1]!r}"
        )
    digits = np.where(is_digit, chars.astype(np.int64) - ord("0"), 0)
    fields: dict[str, np.ndarray] = {}
    for name, (a, b) in _FIELDS.items():
        if not is_digit[:, a:b].any(axis=1).all():
            row = int(np.nonzero(~is_digit[:, a:b].any(axis=1))[0][0])
            raise ValueError(
                f"{source}: line {numbered[row][0]}: field {name!r} (columns {a + 1}-{b}) is blank"
            )
        weights = 10 ** np.arange(b - a - 1, -1, -1, dtype=np.int64)
        values = digits[:, a:b] @ weights
        lo, hi = _RANGES[name]
        out = (values < lo) | (values > hi)
        if out.any():
            row = int(np.nonzero(out)[0][0])
            raise ValueError(
                f"{source}: line {numbered[row][0]}: field {name!r} = {values[row]} is outside {lo}..{hi}"
            )
        fields[name] = values
    return fields


def _features(fields: dict[str, np.ndarray]) -> np.ndarray:
    """The 27 raw feature columns (percentages not yet standardised), float64 (N, 27)."""
    n = fields["year"].shape[0]

    def one_hot(values: np.ndarray, codes: tuple[int, ...]) -> np.ndarray:
        return (values[:, None] == np.asarray(codes)[None, :]).astype(np.float64)

    columns = [
        one_hot(fields["year"], (1, 2, 3)),
        fields["fsm"].astype(np.float64)[:, None],
        fields["vr1"].astype(np.float64)[:, None],
        one_hot(fields["gender"], (0, 1)),
        one_hot(fields["vr_band"], (2, 3, 1)),  # file codes of bands VR1, VR2, VR3
        one_hot(fields["ethnic"], tuple(range(1, 12))),
        one_hot(fields["school_gender"], (1, 2, 3)),
        one_hot(fields["denomination"], (1, 2, 3)),
    ]
    x = np.concatenate(columns, axis=1)
    assert x.shape == (n, len(FEATURE_NAMES))
    return x


def load_school(
    root: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    standardize_target: bool = True,
    download: bool = True,
) -> MultiTaskDataset:
    """The 139 School tasks ``school_001`` ... ``school_139`` (per-task inputs, regression).

    Args:
        root: data root holding ``school/ILEA567.DAT``; ``None`` means
            ``$LIGHTNING_ETAP_DATA`` or the per-user cache dir.
        seed: seed of the per-school random splits.
        val_fraction: fraction of each school's non-test students used for validation.
        test_fraction: fraction of each school's students used for testing.
        standardize_target: z-score the exam score with the pooled training
            rows' statistics (default; see the module docstring) instead of
            keeping raw points.
        download: fetch a missing file from the origin (or the mirror) with a
            sha256 check.

    Returns:
        A :class:`MultiTaskDataset`; every split of every task is
        ``(inputs float32 (N, 27), targets float32 (N, 1))``.

    Raises:
        FileNotFoundError, ChecksumError, DownloadError: see
            :func:`lightning_etap.data._download.read_verified`.
        ValueError: a bad fraction, or a file that is not a valid ILEA567.DAT.
    """
    check_fractions(val_fraction, test_fraction)
    path, content = read_verified(root, REMOTE, download=download)
    fields = _parse(content, str(path))
    x = _features(fields)
    y = fields["score"].astype(np.float64)[:, None]
    school = fields["school"]
    missing = sorted(set(range(1, N_SCHOOLS + 1)) - set(school.tolist()))
    if missing:
        raise ValueError(
            f"{path}: no students for school code(s) {missing[:10]}; expected codes 1-{N_SCHOOLS}"
        )

    names = tuple(f"school_{s:03d}" for s in range(1, N_SCHOOLS + 1))
    generator = torch.Generator().manual_seed(int(seed))
    rows = [np.nonzero(school == s)[0] for s in range(1, N_SCHOOLS + 1)]
    index = [
        split_rows(torch.from_numpy(y[r]), task=name, generator=generator, val_fraction=val_fraction,
                   test_fraction=test_fraction, stratify=False)
        for name, r in zip(names, rows, strict=True)
    ]
    train_rows = np.concatenate([r[i["train"].numpy()] for r, i in zip(rows, index, strict=True)])
    x_mean, x_std = pooled_stats([x[train_rows][:, _CONTINUOUS]])
    x[:, _CONTINUOUS] = (x[:, _CONTINUOUS] - x_mean) / x_std
    if standardize_target:
        y_mean, y_std = pooled_stats([y[train_rows]])
        y = (y - y_mean) / y_std
    else:
        y_mean, y_std = np.zeros(1), np.ones(1)

    splits = {
        name: TaskSplits(**take_rows(x[r], y[r], i)) for name, r, i in zip(names, rows, index, strict=True)
    }
    return MultiTaskDataset(
        name="school",
        task_names=names,
        task_kinds=("regression",) * N_SCHOOLS,
        layout="per_task",
        splits=splits,
        metadata={
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "test_fraction": float(test_fraction),
            "n_students": int(y.shape[0]),
            "feature_names": list(FEATURE_NAMES),
            "standardized_features": {FEATURE_NAMES[c]: [float(m), float(s)]
                                      for c, m, s in zip(_CONTINUOUS, x_mean, x_std, strict=True)},
            "standardize_target": bool(standardize_target),
            "target": "exam score" + (" (z-scored)" if standardize_target else " (points)"),
            "target_mean": float_list(y_mean)[0],
            "target_std": float_list(y_std)[0],
            "source": REMOTE.url,
            "source_sha256": {REMOTE.relpath: REMOTE.sha256},
        },
    )
