"""How well predicted gains match measured ones (paper section 4, appendices D.2 and G).

:func:`evaluate_predictions` computes R², Pearson, Spearman and the sign F1
(positive vs negative transfer) at two levels: per task-in-group and per
group total. :func:`paired_wilcoxon` compares two methods' per-seed scores.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score, r2_score

from ._validation import check_gains, check_masks

__all__ = ["WilcoxonResult", "evaluate_predictions", "paired_wilcoxon"]


def evaluate_predictions(masks, true_gains, pred_gains) -> dict[str, float]:
    """Agreement of predicted with measured relative gains.

    Two levels, each with four metrics:

    * ``task_*``: over every member entry ``(G, t)`` of the groups with two
      or more tasks (singletons are excluded: their gain is 0 by definition).
    * ``group_*``: over the groups with two or more tasks, comparing the
      total gain (sum over members) measured vs predicted.

    Metrics: ``r2`` (``sklearn.metrics.r2_score``, measured as the reference),
    ``pearson`` (``scipy.stats.pearsonr``), ``spearman``
    (``scipy.stats.spearmanr``) and ``sign_f1`` (``sklearn.metrics.f1_score``
    with positive class = gain > 0, i.e. positive transfer).

    Degenerate input gives NaN, never an exception or a warning: fewer than
    two entries (all metrics); constant measured values (R², Pearson,
    Spearman); constant predictions (Pearson, Spearman); no positive value in
    either measured or predicted signs (sign F1).

    Args:
        masks: ``(m, n)`` bool group masks.
        true_gains: ``(m, n)`` measured gains (non-members ignored).
        pred_gains: ``(m, n)`` predicted gains (non-members ignored), e.g.
            ``ETAPPredictor.predict(masks)``.

    Returns:
        A flat dict of plain floats: ``task_r2``, ``task_pearson``,
        ``task_spearman``, ``task_sign_f1``, ``group_r2``,
        ``group_pearson``, ``group_spearman``, ``group_sign_f1``, plus the
        counts ``n_task_entries`` and ``n_groups`` (as floats).

    Raises:
        ValueError: masks not 0/1 or empty groups, shapes that disagree, or
            non-finite values at member positions of groups with >= 2 tasks.

    Example:
        >>> import numpy as np
        >>> masks = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=bool)
        >>> true = np.array([[0.1, -0.2, np.nan], [np.nan, 0.3, 0.2], [0.0, 0.1, -0.1]])
        >>> scores = evaluate_predictions(masks, true, true)
        >>> round(scores["task_r2"], 12), round(scores["group_pearson"], 12), scores["n_groups"]
        (1.0, 1.0, 3.0)
    """
    masks = check_masks(masks)
    true = check_gains(true_gains, masks, name="true_gains")
    pred = check_gains(pred_gains, masks, name="pred_gains")
    multi = masks.sum(axis=1) >= 2
    used = masks & multi[:, None]
    task_true, task_pred = true[used], pred[used]
    group_true = np.where(used, true, 0.0)[multi].sum(axis=1)
    group_pred = np.where(used, pred, 0.0)[multi].sum(axis=1)
    out: dict[str, float] = {}
    for level, (t, p) in (("task", (task_true, task_pred)), ("group", (group_true, group_pred))):
        out.update({f"{level}_{k}": v for k, v in _scores(t, p).items()})
    out["n_task_entries"] = float(task_true.size)
    out["n_groups"] = float(group_true.size)
    return out


def _scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    nan = float("nan")
    if true.size < 2:
        return {"r2": nan, "pearson": nan, "spearman": nan, "sign_f1": nan}
    true_constant = np.ptp(true) == 0
    pred_constant = np.ptp(pred) == 0
    r2 = nan if true_constant else float(r2_score(true, pred))
    if true_constant or pred_constant:
        pearson = spearman = nan
    else:
        pearson = float(stats.pearsonr(true, pred)[0])
        spearman = float(stats.spearmanr(true, pred)[0])
    sign_f1 = float(f1_score(true > 0, pred > 0, zero_division=np.nan))
    return {"r2": r2, "pearson": pearson, "spearman": spearman, "sign_f1": sign_f1}


class WilcoxonResult(NamedTuple):
    """Outcome of :func:`paired_wilcoxon`."""

    statistic: float
    pvalue: float
    n_pairs: int


def paired_wilcoxon(a, b, alternative: str = "greater") -> WilcoxonResult:
    """Paired Wilcoxon signed-rank test over seeds (``scipy.stats.wilcoxon``).

    ``a[i]`` and ``b[i]`` are two methods' scores with the same seed ``i``
    (e.g. ETAP's and TAG's Pearson correlation, paper Tables 11-12). With
    ``alternative="greater"`` the test asks whether ``a`` tends to be larger
    than ``b``; use ``"two-sided"`` for the paper's Table 11 wording.
    Zero differences are dropped (scipy's default ``zero_method="wilcox"``);
    when every difference is zero the test is undefined and the result is
    ``(nan, nan)``.

    Args:
        a, b: 1-D sequences of equal length with finite values.
        alternative: ``"greater"`` (default), ``"less"`` or ``"two-sided"``.

    Returns:
        ``WilcoxonResult(statistic, pvalue, n_pairs)`` with plain floats.

    Raises:
        ValueError: lengths differ, inputs not 1-D, non-finite values, or an
            unknown ``alternative``.

    Example:
        >>> paired_wilcoxon([0.5, 0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4, 0.5]).pvalue
        0.03125
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"paired_wilcoxon needs two 1-D sequences of per-seed scores; got shapes {a.shape}, {b.shape}")
    if a.shape != b.shape:
        raise ValueError(
            f"paired_wilcoxon needs one score per seed for both methods; got {a.size} and {b.size} values"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_wilcoxon: scores must be finite (drop the seeds that failed from both)")
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided'; got {alternative!r}")
    if a.size == 0 or np.all(a == b):
        return WilcoxonResult(float("nan"), float("nan"), int(a.size))
    res = stats.wilcoxon(a, b, alternative=alternative)
    return WilcoxonResult(float(res.statistic), float(res.pvalue), int(a.size))
