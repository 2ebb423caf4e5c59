"""evaluate_predictions and paired_wilcoxon against hand-computed values and scipy/sklearn."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score

import lightning_etap.predictors.metrics as metrics_module
from lightning_etap.predictors import evaluate_predictions, paired_wilcoxon

NAN = np.nan
# three groups over three tasks plus a singleton (row 3), which must be ignored
MASKS = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=bool)
TRUE = np.array([[1.0, 2.0, NAN], [NAN, -1.0, 0.0], [3.0, -2.0, 1.0], [NAN, NAN, 5.0]])
PRED = np.array([[2.0, 1.0, NAN], [NAN, -1.0, 1.0], [2.0, -3.0, 3.0], [NAN, NAN, -7.0]])


def hand_r2(t, p):
    t, p = np.asarray(t, float), np.asarray(p, float)
    return 1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum()


def hand_pearson(t, p):
    t, p = np.asarray(t, float), np.asarray(p, float)
    tc, pc = t - t.mean(), p - p.mean()
    return (tc * pc).sum() / np.sqrt((tc**2).sum() * (pc**2).sum())


def test_task_level_by_hand():
    # member entries (row-major, singleton excluded)
    t = [1, 2, -1, 0, 3, -2, 1]
    p = [2, 1, -1, 1, 2, -3, 3]
    out = evaluate_predictions(MASKS, TRUE, PRED)
    # squared errors 1, 1, 0, 1, 1, 1, 4 -> SS_res = 9
    assert out["task_r2"] == pytest.approx(1 - 9 / (np.var(t) * 7))
    assert out["task_pearson"] == pytest.approx(hand_pearson(t, p))
    # Spearman = Pearson of the ranks (average ranks for ties)
    rt = [4.5, 6, 2, 3, 7, 1, 4.5]
    rp = [5.5, 3.5, 2, 3.5, 5.5, 1, 7]
    assert out["task_spearman"] == pytest.approx(hand_pearson(rt, rp))
    # signs: true positive where t > 0 -> [1,1,0,0,1,0,1]; pred -> [1,1,0,1,1,0,1]
    # TP = 4, FP = 1, FN = 0 -> F1 = 2*4 / (2*4 + 1 + 0) = 8/9
    assert out["task_sign_f1"] == pytest.approx(8 / 9)
    assert out["n_task_entries"] == 7.0


def test_group_level_by_hand():
    # totals of the three non-singleton groups
    t = [3.0, -1.0, 2.0]
    p = [3.0, 0.0, 2.0]
    out = evaluate_predictions(MASKS, TRUE, PRED)
    assert out["group_r2"] == pytest.approx(1 - 1 / (np.var(t) * 3))
    assert out["group_pearson"] == pytest.approx(hand_pearson(t, p))
    assert out["group_spearman"] == pytest.approx(1.0)
    # true signs [1, 0, 1], predicted [1, 0, 1] (0.0 is not positive) -> F1 = 1
    assert out["group_sign_f1"] == 1.0
    assert out["n_groups"] == 3.0


def test_plain_floats_and_keys():
    out = evaluate_predictions(MASKS, TRUE, PRED)
    assert set(out) == {
        f"{level}_{m}" for level in ("task", "group") for m in ("r2", "pearson", "spearman", "sign_f1")
    } | {"n_task_entries", "n_groups"}
    assert all(type(v) is float for v in out.values())


def test_against_scipy_and_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    masks = rng.random((50, 6)) < 0.5
    masks[masks.sum(axis=1) < 2, :2] = True
    true = np.where(masks, rng.normal(size=masks.shape), NAN)
    pred = np.where(masks, true + rng.normal(scale=0.7, size=masks.shape), NAN)
    out = evaluate_predictions(masks, true, pred)
    t, p = true[masks], pred[masks]
    assert out["task_pearson"] == pytest.approx(stats.pearsonr(t, p)[0])
    assert out["task_spearman"] == pytest.approx(stats.spearmanr(t, p)[0])
    assert out["task_sign_f1"] == pytest.approx(f1_score(t > 0, p > 0))
    assert out["task_r2"] == pytest.approx(hand_r2(t, p))
    gt, gp = np.nansum(true, axis=1), np.nansum(pred, axis=1)
    assert out["group_pearson"] == pytest.approx(hand_pearson(gt, gp))
    assert out["group_sign_f1"] == pytest.approx(f1_score(gt > 0, gp > 0))


def test_degenerate_inputs_give_nan_without_warnings():
    masks = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    true = np.array([[0.1, -0.2, NAN], [NAN, 0.3, 0.4]])
    constant = np.where(masks, 0.5, NAN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = evaluate_predictions(masks, true, constant)
        assert np.isnan(out["task_pearson"]) and np.isnan(out["task_spearman"])
        assert np.isfinite(out["task_r2"])
        out = evaluate_predictions(masks, constant, true)  # constant truth: R² undefined too
        assert np.isnan(out["task_r2"]) and np.isnan(out["task_pearson"])
        negative = np.where(masks, -1.0, NAN)
        out = evaluate_predictions(masks, negative, negative * 2)  # no positive anywhere
        assert np.isnan(out["task_sign_f1"])
        one = evaluate_predictions(masks[:1], true[:1], true[:1])  # a single group total
        assert np.isnan(one["group_r2"]) and np.isnan(one["group_pearson"])


def test_input_errors():
    with pytest.raises(ValueError, match="pred_gains has shape"):
        evaluate_predictions(MASKS, TRUE, PRED[:2])
    bad = PRED.copy()
    bad[0, 0] = NAN
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_predictions(MASKS, TRUE, bad)
    with pytest.raises(ValueError, match="only 0 and 1"):
        evaluate_predictions(MASKS * 3, TRUE, PRED)


# ------------------------------------------------------------------ Wilcoxon
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_wilcoxon_matches_scipy(alternative):
    rng = np.random.default_rng(1)
    a = rng.normal(size=10) + 0.5
    b = rng.normal(size=10)
    res = paired_wilcoxon(a, b, alternative=alternative)
    ref = stats.wilcoxon(a, b, alternative=alternative)
    assert res.statistic == pytest.approx(float(ref.statistic))
    assert res.pvalue == pytest.approx(float(ref.pvalue))
    assert res.n_pairs == 10 and type(res.pvalue) is float


def test_wilcoxon_by_hand():
    # all 5 differences positive: W+ = 15, exact one-sided p = 1 / 2**5
    res = paired_wilcoxon([5, 6, 7, 8, 9], [1, 2, 3, 4, 5])
    assert res.statistic == 15.0 and res.pvalue == pytest.approx(1 / 32)


def test_wilcoxon_errors_and_degenerate():
    with pytest.raises(ValueError, match="got 3 and 4 values"):
        paired_wilcoxon([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="finite"):
        paired_wilcoxon([1, np.nan], [1, 2])
    with pytest.raises(ValueError, match="alternative"):
        paired_wilcoxon([1, 2], [0, 1], alternative="bigger")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = paired_wilcoxon([0.3, 0.4], [0.3, 0.4])
    assert np.isnan(res.statistic) and np.isnan(res.pvalue)


def test_docstring_examples_run():
    result = doctest.testmod(metrics_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
