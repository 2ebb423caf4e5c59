"""ETAPPredictor and group_affinity against independent references.

References: brute-force loops for the group feature, scikit-learn's own
SplineTransformer/Ridge/GridSearchCV for the spline stage and the residual
ridges, numpy least squares for the affine variant, and planted synthetic
structure that each stage must recover.
"""

from __future__ import annotations

import doctest
import functools
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import SplineTransformer

import lightning_etap.predictors.etap as etap_module
from lightning_etap.groups import all_groups
from lightning_etap.predictors import (
    RELEASED_ALPHA_GRID,
    RESIDUAL_ALPHA_GRID,
    ETAPPredictor,
    group_affinity,
)
from lightning_etap.predictors._numerics import ridge_path_predict, spline_basis, uniform_knots

SMALL = {"degrees": (2, 3), "knots_range": (2, 3, 4, 5), "alpha_grid": (0.001, 0.01, 0.1, 1.0), "cv": 5}


# ----------------------------------------------------------------- references
def brute_group_affinity(A: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """z[G -> t] = mean over the other members s of A[s, t]; NaN for non-members and singletons."""
    out = np.full(masks.shape, np.nan)
    for g, row in enumerate(masks):
        members = [int(i) for i in np.flatnonzero(row)]
        if len(members) < 2:
            continue
        for t in members:
            others = [s for s in members if s != t]
            out[g, t] = sum(A[s, t] for s in others) / len(others)
    return out


def make_problem(n, n_train, seed, gain_fn, noise=0.02):
    """Random affinity, random training groups (>= 2 tasks), gains = gain_fn(z, masks) + noise."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    groups = all_groups(n, min_size=2)
    order = rng.permutation(len(groups))
    train, test = groups[order[:n_train]], groups[order[n_train:]]

    def gains(masks, noisy):
        g = gain_fn(brute_group_affinity(A, masks), masks)
        if noisy:
            g = g + noise * rng.normal(size=g.shape)
        return np.where(masks, g, np.nan)

    return A, train, gains(train, True), test, gains(test, False)


def member_r2(masks, true, pred):
    used = masks & (masks.sum(axis=1) >= 2)[:, None]
    return r2_score(true[used], pred[used])


def rows_of(masks, values):
    """Flatten member entries of groups with >= 2 tasks in row-major order."""
    used = masks & (masks.sum(axis=1) >= 2)[:, None]
    return values[used]


@pytest.fixture(scope="module")
def fitted():
    """One predictor with the default (released) grid; n = 6, 30 training groups."""
    A, train, y, test, y_test = make_problem(6, 30, 0, lambda z, m: np.tanh(z))
    model = ETAPPredictor(A, task_names=list("abcdef")).fit(train, y)
    return model, A, train, y, test, y_test


# ------------------------------------------------------------- group feature
def test_group_affinity_matches_brute_force():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(7, 7))
    masks = rng.random((40, 7)) < 0.5
    masks[~masks.any(axis=1), 0] = True
    masks[:3] = np.eye(7, dtype=bool)[:3]  # singletons
    np.testing.assert_allclose(group_affinity(A, masks), brute_group_affinity(A, masks), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**32 - 1))
def test_group_affinity_property(n, seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(scale=10.0, size=(n, n))
    A[np.diag_indices(n)] = np.nan  # the diagonal is ignored
    masks = rng.random((12, n)) < rng.uniform(0.2, 0.9)
    masks[~masks.any(axis=1), -1] = True
    expected = brute_group_affinity(np.nan_to_num(A), masks)
    np.testing.assert_allclose(group_affinity(A, masks), expected, rtol=1e-12, atol=1e-12)


def test_group_affinity_direction_is_source_row_to_destination_column():
    A = np.zeros((3, 3))
    A[0, 1] = 1.0  # task 0 helps task 1, nothing else
    z = group_affinity(A, np.array([[True, True, False]]))
    assert z[0, 1] == 1.0 and z[0, 0] == 0.0 and np.isnan(z[0, 2])


# ------------------------------------------------------------ numerical cores
@pytest.mark.parametrize("degree", [2, 3, 6])
@pytest.mark.parametrize("n_knots", [2, 5, 17])
def test_spline_basis_matches_sklearn_transformer(degree, n_knots):
    rng = np.random.default_rng(degree * 100 + n_knots)
    x = rng.normal(size=60)
    reference = SplineTransformer(n_knots=n_knots, degree=degree, include_bias=True).fit(x[:, None])
    knots = uniform_knots(x.min(), x.max(), n_knots, degree)
    np.testing.assert_allclose(knots, reference.bsplines_[0].t, rtol=0, atol=1e-12)
    probe = np.r_[x, x.min() - 3.0, x.max() + 0.5, x.min(), x.max(), np.linspace(-4, 4, 33)]
    np.testing.assert_allclose(
        spline_basis(probe, knots, degree), reference.transform(probe[:, None]), rtol=0, atol=1e-10
    )


def test_ridge_path_matches_sklearn_ridge():
    rng = np.random.default_rng(3)
    X, X_new = rng.random((40, 9)), rng.random((7, 9))
    X[:, -1] = 1.0 - X[:, :-1].sum(axis=1) / 9  # collinear with the intercept, as a full B-spline basis
    y = rng.normal(size=40)
    alphas = np.array([1e-6, 1e-3, 0.1, 1.0, 30.0])
    path = ridge_path_predict(X, y, X_new, alphas)
    for j, alpha in enumerate(alphas):
        np.testing.assert_allclose(path[:, j], Ridge(alpha=alpha).fit(X, y).predict(X_new), rtol=1e-7, atol=1e-8)


# ------------------------------------------------------------------- stage 1
def test_rescale_formula_by_hand():
    A, train, y, *_ = make_problem(6, 25, 4, lambda z, m: 3.0 * z - 1.0 + 0.3 * z**2, noise=0.1)
    model = ETAPPredictor(A, stage2=None, **SMALL).fit(train, y)
    z = rows_of(train, brute_group_affinity(A, train))
    gain = rows_of(train, y)
    slope = np.corrcoef(z, gain)[0, 1] * np.std(gain) / np.std(z)
    assert model.rescale_slope_ == pytest.approx(slope, rel=1e-12)
    assert model.rescale_intercept_ == pytest.approx(np.mean(gain) - slope * np.mean(z), rel=1e-12)
    unscaled = ETAPPredictor(A, stage2=None, rescale=False, **SMALL).fit(train, y)
    assert (unscaled.rescale_slope_, unscaled.rescale_intercept_) == (1.0, 0.0)


def test_stage1_matches_sklearn_pipeline_and_gridsearch(monkeypatch):
    A, train, y, test, _ = make_problem(6, 28, 5, lambda z, m: np.sin(2 * z))
    recorded = []

    def spy(group_ids, n_splits, random_state):
        folds = original(group_ids, n_splits, random_state)
        recorded.append(folds)
        return folds

    original = etap_module._group_folds
    monkeypatch.setattr(etap_module, "_group_folds", spy)
    grid = {"degrees": (2, 3), "knots_range": (2, 5), "alpha_grid": (0.001, 0.03, 1.0), "cv": 3}
    model = ETAPPredictor(A, stage2=None, **grid).fit(train, y)

    z = rows_of(train, brute_group_affinity(A, train))
    x = model.rescale_intercept_ + model.rescale_slope_ * z
    search = GridSearchCV(
        Pipeline([("spline", SplineTransformer(include_bias=True)), ("ridge", Ridge())]),
        {"spline__degree": [2, 3], "spline__n_knots": [2, 5], "ridge__alpha": [0.001, 0.03, 1.0]},
        cv=recorded[0],
        scoring="neg_mean_squared_error",
    ).fit(x[:, None], rows_of(train, y))
    ours = {(p["degree"], p["n_knots"], p["alpha"]): v
            for p, v in zip(model.cv_results_["params"], model.cv_results_["mean_test_mse"], strict=True)}
    for p, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"], strict=True):
        key = (p["spline__degree"], p["spline__n_knots"], p["ridge__alpha"])
        assert ours[key] == pytest.approx(-score, rel=1e-8)
    best = search.best_params_
    assert (model.degree_, model.n_knots_, model.alpha_) == (
        best["spline__degree"], best["spline__n_knots"], best["ridge__alpha"]
    )
    # the fitted stage 1 = sklearn's pipeline refitted on all training rows, evaluated on new groups
    x_new = model.rescale_intercept_ + model.rescale_slope_ * rows_of(test, brute_group_affinity(A, test))
    np.testing.assert_allclose(
        rows_of(test, model.predict(test)), search.best_estimator_.predict(x_new[:, None]), rtol=0, atol=1e-10
    )


def test_bspline_recovers_nonlinear_map_and_beats_affine():
    A, train, y, test, y_test = make_problem(8, 60, 6, lambda z, m: np.sin(2.0 * z), noise=0.05)
    spline = ETAPPredictor(A, stage2=None, **SMALL).fit(train, y)
    affine = ETAPPredictor(A, stage1="affine", stage2=None).fit(train, y)
    r2_spline = member_r2(test, y_test, spline.predict(test))
    r2_affine = member_r2(test, y_test, affine.predict(test))
    assert r2_spline > 0.9
    assert r2_spline > r2_affine + 0.3


def test_affine_on_linear_data_matches_least_squares():
    A, train, y, test, _ = make_problem(6, 20, 7, lambda z, m: 1.7 * z - 0.4, noise=0.1)
    model = ETAPPredictor(A, stage1="affine", stage2=None).fit(train, y)
    z = rows_of(train, brute_group_affinity(A, train))
    design = np.column_stack([np.ones_like(z), z])
    (b0, b1), *_ = np.linalg.lstsq(design, rows_of(train, y), rcond=None)
    z_test = rows_of(test, brute_group_affinity(A, test))
    np.testing.assert_allclose(rows_of(test, model.predict(test)), b0 + b1 * z_test, rtol=1e-10, atol=1e-10)


def test_constant_feature_falls_back_to_mean_with_warning():
    A = np.ones((4, 4))
    train = all_groups(4, min_size=2)
    y = np.where(train, 0.25, np.nan)
    y[0, :2] = [0.5, 0.0]
    with pytest.warns(UserWarning, match="constant"):
        model = ETAPPredictor(A, stage2=None).fit(train, y)
    assert model.stage1_kind_ == "constant"
    pred = rows_of(train, model.predict(train))
    np.testing.assert_allclose(pred, np.nanmean(rows_of(train, y)))


# ------------------------------------------------------------------- stage 2
def test_stage2_recovers_planted_membership_effect():
    n = 8
    W = np.random.default_rng(8).normal(scale=0.4, size=(n, n))

    def gain(z, masks):
        return np.tanh(z) + masks.astype(float) @ W.T  # w[t, s] u_s, summed over members s

    A, train, y, test, y_test = make_problem(n, 90, 9, gain, noise=0.02)
    full = ETAPPredictor(A, **SMALL).fit(train, y)
    stage1_only = ETAPPredictor(A, stage2=None, **SMALL).fit(train, y)
    r2_full = member_r2(test, y_test, full.predict(test))
    r2_stage1 = member_r2(test, y_test, stage1_only.predict(test))
    assert r2_full > 0.85
    assert r2_full > r2_stage1 + 0.2
    # the per-task ridge learns the planted weights up to the absorbed constant (u_t is always 1)
    off = ~np.eye(n, dtype=bool)
    assert np.corrcoef(full.residual_coef_[off], W[off])[0, 1] > 0.9


def test_residual_alpha_grid_and_choice_match_sklearn(monkeypatch):
    A, train, y, *_ = make_problem(6, 30, 10, lambda z, m: np.tanh(z) + 0.3 * m[:, [0]], noise=0.05)
    recorded = []
    original = etap_module._group_folds

    def spy(group_ids, n_splits, random_state):
        folds = original(group_ids, n_splits, random_state)
        recorded.append((np.asarray(group_ids).copy(), folds))
        return folds

    monkeypatch.setattr(etap_module, "_group_folds", spy)
    model = ETAPPredictor(A, **SMALL).fit(train, y)
    np.testing.assert_array_equal(model.residual_cv_results_["alphas"], np.logspace(-6, 2, 20))
    assert RESIDUAL_ALPHA_GRID == tuple(np.logspace(-6, 2, 20))
    assert np.isin(model.residual_alphas_, np.logspace(-6, 2, 20)).all()
    assert model.residual_cv_results_["n_splits"].tolist() == [5] * 6

    # reference for task 2: GridSearchCV over sklearn Ridge on u_G with the same folds
    task = 2
    _, task_folds = recorded[1 + task]  # call 0: stage 1; then one call per task
    # stage-1 in-sample predictions from sklearn's pipeline with the chosen hyper-parameters
    x = model.rescale_intercept_ + model.rescale_slope_ * brute_group_affinity(A, train)
    pipe = Pipeline([("spline", SplineTransformer(n_knots=model.n_knots_, degree=model.degree_)),
                     ("ridge", Ridge(alpha=model.alpha_))])
    pipe.fit(rows_of(train, x)[:, None], rows_of(train, y))
    rows = np.flatnonzero(train[:, task])  # make_problem's groups all have >= 2 tasks
    residual = y[rows, task] - pipe.predict(x[rows, task][:, None])
    keep = train
    search = GridSearchCV(Ridge(), {"alpha": list(np.logspace(-6, 2, 20))}, cv=task_folds,
                          scoring="neg_mean_squared_error").fit(keep[rows].astype(float), residual)
    np.testing.assert_allclose(model.residual_cv_results_["mean_test_mse"][task],
                               -search.cv_results_["mean_test_score"], rtol=1e-6)
    assert model.residual_alphas_[task] == search.best_params_["alpha"]
    np.testing.assert_allclose(model.residual_coef_[task], search.best_estimator_.coef_, atol=1e-10)


def test_cv_folds_never_split_a_group(monkeypatch):
    A, train, y, *_ = make_problem(7, 35, 11, lambda z, m: np.tanh(z))
    calls = []
    original = etap_module._group_folds

    def spy(group_ids, n_splits, random_state):
        folds = original(group_ids, n_splits, random_state)
        calls.append((np.asarray(group_ids).copy(), n_splits, folds))
        return folds

    monkeypatch.setattr(etap_module, "_group_folds", spy)
    ETAPPredictor(A, **SMALL).fit(train, y)
    group_ids, n_splits, folds = calls[0]  # stage 1: one row per (group, member)
    assert len(group_ids) == int(train.sum()) and n_splits == 5
    assert len(np.unique(group_ids)) == 35 < len(group_ids)
    validated = np.concatenate([va for _, va in folds])
    assert np.array_equal(np.sort(validated), np.arange(len(group_ids)))  # every row validated once
    for tr, va in folds:
        assert not set(group_ids[tr]) & set(group_ids[va])
        for g in np.unique(group_ids[va]):  # the whole group is on the validation side
            assert set(np.flatnonzero(group_ids == g)) <= set(va)


def test_fewer_groups_than_folds_warns_and_uses_fewer_folds():
    A, train, y, *_ = make_problem(5, 4, 12, lambda z, m: np.tanh(z))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = ETAPPredictor(A, **{**SMALL, "cv": 10}).fit(train, y)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert any("stage 1 uses 4-fold" in m for m in messages)
    assert any("residual alpha is chosen with one fold per group" in m for m in messages)
    assert model.stage1_n_splits_ == 4
    assert model.residual_cv_results_["n_splits"].max() < 5


def test_needs_two_groups_with_two_tasks():
    A = np.random.default_rng(0).normal(size=(4, 4))
    masks = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=bool)
    gains = np.where(masks, 0.1, np.nan)
    with pytest.raises(ValueError, match="at least 2 distinct training groups"):
        ETAPPredictor(A).fit(masks, gains)
    # the same group measured with three seeds is still one group
    with pytest.raises(ValueError, match="got 1 "):
        ETAPPredictor(A).fit(np.repeat(masks[:1], 3, axis=0), np.repeat(gains[:1], 3, axis=0))
    # two tasks: one multi-task group, nothing to predict
    with pytest.raises(ValueError, match="with 2 tasks there is one multi-task group"):
        ETAPPredictor(A[:2, :2]).fit(np.ones((3, 2), dtype=bool), np.full((3, 2), 0.1))


def test_repeated_measurements_of_a_group_stay_in_one_fold(monkeypatch):
    """Per-seed rows (collect_gains with several seeds) must not validate a group on its own other seeds."""
    from lightning_etap.predictors import etap as etap_module

    rng = np.random.default_rng(3)
    n = 6
    A = rng.normal(size=(n, n))
    masks = rng.random((12, n)) < 0.5
    masks[masks.sum(axis=1) < 2, :2] = True
    masks = np.unique(masks, axis=0)
    gains = np.where(masks, rng.normal(size=masks.shape), np.nan)
    seeds = 3
    rows = np.repeat(masks, seeds, axis=0)
    noisy = np.where(rows, np.repeat(gains, seeds, axis=0) + 0.01 * rng.normal(size=rows.shape), np.nan)
    seen = []
    real = etap_module._group_folds

    def record(ids, k, random_state):
        folds = real(ids, k, random_state)
        seen.append((np.asarray(ids), folds))
        return folds

    monkeypatch.setattr(etap_module, "_group_folds", record)
    model = ETAPPredictor(A, random_state=0).fit(rows, noisy)
    assert model.n_train_groups_ == masks.shape[0] and model.n_train_rows_ == int(rows.sum())
    assert len(seen) == 1 + n  # stage 1, then one search per task
    for ids, folds in seen:
        for tr, va in folds:
            assert not set(ids[tr]) & set(ids[va])  # no group on both sides
    # distinct groups fold as before (by row): the same model as row ids would give
    seen.clear()
    once = ETAPPredictor(A, random_state=0).fit(masks, gains)
    monkeypatch.setattr(etap_module, "_group_folds", real)
    by_row = ETAPPredictor(A, random_state=0)
    monkeypatch.setattr(etap_module, "_same_group_ids", lambda m: np.arange(len(m)))
    by_row.fit(masks, gains)
    np.testing.assert_array_equal(once.predict(masks), by_row.predict(masks))


# --------------------------------------------------------- predict semantics
def test_singletons_zero_non_members_nan_and_totals(fitted):
    model, A, train, y, test, _ = fitted
    masks = np.vstack([np.eye(6, dtype=bool), test[:10]])
    pred = model.predict(masks)
    assert np.all(pred[:6][np.eye(6, dtype=bool)] == 0.0)
    assert np.isnan(pred[~masks]).all() and np.isfinite(pred[masks]).all()
    np.testing.assert_allclose(model.predict_total(masks), np.nansum(pred, axis=1), rtol=1e-12)
    # score leaves singletons out: adding them does not change it
    truth = np.where(masks, np.tanh(group_affinity(A, masks)), np.nan)
    truth[:6] = np.where(np.eye(6, dtype=bool), 0.0, np.nan)
    assert model.score(masks, truth) == pytest.approx(model.score(masks[6:], truth[6:]), rel=1e-12)


def test_predict_in_blocks_matches_one_block(fitted, monkeypatch):
    model, *_ = fitted
    groups = all_groups(6)
    whole = model.predict(groups)
    monkeypatch.setattr(etap_module, "_CHUNK", 7)  # blocks of 7 groups, threadpool-limited path
    np.testing.assert_array_equal(model.predict(groups), whole)
    np.testing.assert_allclose(model.predict_total(groups), np.nansum(whole, axis=1), rtol=1e-12)


def test_default_grid_is_the_released_one(fitted):
    model, _, train, *_ = fitted
    n_rows = int(train.sum())
    params = model.cv_results_["params"]
    knots = sorted({p["n_knots"] for p in params})
    assert knots == list(range(2, int(np.floor(np.sqrt(n_rows))) + 10))
    assert sorted({p["degree"] for p in params}) == [2, 3, 4, 5, 6]
    assert sorted({p["alpha"] for p in params}) == sorted(RELEASED_ALPHA_GRID)
    assert len(RELEASED_ALPHA_GRID) == 24 and min(RELEASED_ALPHA_GRID) == 0.001 and max(RELEASED_ALPHA_GRID) == 1
    assert model.best_params_ == {"degree": model.degree_, "n_knots": model.n_knots_, "alpha": model.alpha_}
    assert model.n_train_groups_ == 30 and model.n_train_rows_ == n_rows
    assert model.task_names_ == list("abcdef")


def test_paper_knots_range():
    A, train, y, *_ = make_problem(6, 30, 13, lambda z, m: np.tanh(z))
    model = ETAPPredictor(A, knots_range="paper", stage2=None, degrees=(2,), cv=3).fit(train, y)
    assert sorted({p["n_knots"] for p in model.cv_results_["params"]}) == [2, 3, 4, 5]  # isqrt(30) = 5


# ----------------------------------------------------------------- variants
@functools.cache
def _fit_variant(stage1, stage2):
    """One fitted model per variant, shared by the tests (2-fold searches keep the trees quick)."""
    A, train, y, test, y_test = make_problem(6, 30, 14, lambda z, m: np.tanh(2 * z), noise=0.02)
    model = ETAPPredictor(A, stage1=stage1, stage2=stage2, **{**SMALL, "cv": 2, "residual_cv": 2})
    return model.fit(train, y), test, y_test


@pytest.mark.parametrize(
    ("stage1", "stage2"),
    [
        ("knn", "ridge"),
        ("affine", "ridge"),
        pytest.param("random_forest", None, marks=pytest.mark.slow),
        pytest.param("bspline", "gradient_boosting", marks=pytest.mark.slow),
    ],
)
def test_variants_fit_and_predict(stage1, stage2):
    model, test, y_test = _fit_variant(stage1, stage2)
    assert (model.stage1_kind_, model.stage2_kind_) == (stage1, stage2)
    pred = model.predict(test)
    assert np.isfinite(pred[test]).all() and np.isnan(pred[~test]).all()
    assert member_r2(test, y_test, pred) > 0.5


# -------------------------------------------------------------- persistence
def test_save_load_round_trip(fitted, tmp_path):
    model, A, train, y, test, _ = fitted
    path = model.save(tmp_path / "etap.json")
    json.loads(path.read_text())  # plain, standard JSON
    loaded = ETAPPredictor.load(path)
    groups = all_groups(6)
    np.testing.assert_allclose(loaded.predict(groups), model.predict(groups), rtol=0, atol=1e-12, equal_nan=True)
    assert loaded.task_names_ == list("abcdef")
    assert (loaded.degree_, loaded.n_knots_, loaded.alpha_) == (model.degree_, model.n_knots_, model.alpha_)
    np.testing.assert_array_equal(loaded.residual_alphas_, model.residual_alphas_)
    np.testing.assert_array_equal(loaded.cv_results_["mean_test_mse"], model.cv_results_["mean_test_mse"])
    assert loaded.get_params()["stage1"] == "bspline"
    # a fresh estimator built from the reloaded parameters refits to the same model
    refit = clone(loaded).fit(train, y)
    np.testing.assert_allclose(refit.predict(test), model.predict(test), rtol=0, atol=1e-12, equal_nan=True)


def test_an_affinity_result_carries_its_task_names(fitted, tmp_path):
    from lightning_etap.affinity import AffinityResult

    model, A, train, y, test, _ = fitted
    result = AffinityResult(tuple("abcdef"), A, A[None], [0], measured_steps=1)
    carried = ETAPPredictor(result).fit(train, y)
    assert carried.task_names_ == list("abcdef")
    np.testing.assert_allclose(carried.predict(test), model.predict(test), rtol=0, atol=1e-12, equal_nan=True)
    loaded = ETAPPredictor.load(carried.save(tmp_path / "p.json"))
    assert loaded.task_names_ == list("abcdef")
    np.testing.assert_allclose(loaded.predict(test), model.predict(test), rtol=0, atol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match=r"task_names \['f'.*differ from the affinity's own task order"):
        ETAPPredictor(result, task_names=list("fedcba")).fit(train, y)


def test_nan_predictions_are_not_called_unmeasured():
    from lightning_etap.predictors import evaluate_predictions

    masks = all_groups(3, min_size=2)
    true = np.where(masks, 0.1, np.nan)
    pred = true.copy()
    pred[0, 0] = np.nan
    with pytest.raises(ValueError, match="pred_gains .* the predictor returned no value there"):
        evaluate_predictions(masks, true, pred)


@pytest.mark.parametrize(("stage1", "stage2"), [("affine", None), ("knn", "ridge")])
def test_save_load_variants(stage1, stage2, tmp_path):
    A, train, y, test, _ = make_problem(5, 15, 15, lambda z, m: np.tanh(z))
    A[np.diag_indices(5)] = np.nan
    model = ETAPPredictor(A, stage1=stage1, stage2=stage2, cv=2, residual_cv=2).fit(train, y)
    loaded = ETAPPredictor.load(model.save(tmp_path / "m.json"))
    np.testing.assert_allclose(loaded.predict(test), model.predict(test), rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [("random_forest", None), ("bspline", "gradient_boosting")])
def test_save_tree_variants_not_implemented(variant, tmp_path):
    model, *_ = _fit_variant(*variant)
    with pytest.raises(NotImplementedError, match="pickle"):
        model.save(tmp_path / "trees.json")


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="ETAPPredictor"):
        ETAPPredictor.load(path)


# ------------------------------------------------------ estimator conventions
def test_unfitted_predict_raises_not_fitted(tmp_path):
    model = ETAPPredictor(np.zeros((3, 3)))
    for call in (lambda: model.predict(np.ones((1, 3), bool)), lambda: model.predict_total(np.ones((1, 3), bool)),
                 lambda: model.save(tmp_path / "x.json")):
        with pytest.raises(NotFittedError, match="call fit"):
            call()


def test_clone_get_set_params(fitted):
    model, A, *_ = fitted
    copy = clone(model)
    assert copy.get_params()["task_names"] == list("abcdef")
    assert not hasattr(copy, "degree_")
    copy.set_params(stage2=None, cv=3)
    assert copy.stage2 is None and copy.cv == 3
    assert set(ETAPPredictor(A).get_params()) == {
        "affinity", "task_names", "stage1", "stage2", "knots_range", "degrees", "alpha_grid",
        "residual_alpha_grid", "cv", "residual_cv", "rescale", "random_state",
    }


def test_set_params_after_fit_does_not_change_predictions(fitted):
    model, A, train, y, test, _ = fitted
    copy = clone(model).set_params(**SMALL).fit(train, y)
    before = copy.predict(test)
    copy.set_params(stage2=None, stage1="affine")
    np.testing.assert_array_equal(copy.predict(test), before)


def test_dataframe_and_tensor_affinity(fitted):
    pd = pytest.importorskip("pandas")
    torch = pytest.importorskip("torch")
    model, A, train, y, test, _ = fitted
    small = {**SMALL, "stage2": None}
    reference = ETAPPredictor(A, **small).fit(train, y).predict(test)
    frame = ETAPPredictor(pd.DataFrame(A, index=list("uvwxyz"), columns=list("uvwxyz")), **small).fit(train, y)
    assert frame.task_names_ == list("uvwxyz")
    np.testing.assert_array_equal(frame.predict(test), reference)
    tensor = ETAPPredictor(torch.tensor(A), **small).fit(train, y)
    assert tensor.task_names_ is None
    np.testing.assert_array_equal(tensor.predict(test), reference)


def test_fit_is_reproducible_and_returns_self():
    A, train, y, test, _ = make_problem(5, 15, 17, lambda z, m: np.tanh(z))
    model = ETAPPredictor(A, **SMALL)
    assert model.fit(train, y) is model
    again = ETAPPredictor(A, **SMALL).fit(train, y)
    np.testing.assert_array_equal(model.predict(test), again.predict(test))


# ------------------------------------------------------------------- errors
@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 4))
    masks = all_groups(4, min_size=2)
    return A, masks, np.where(masks, 0.1, np.nan)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda A, m, g: (A, m[:, :3], g[:, :3]), "3 task columns but the affinity matrix covers 4"),
        (lambda A, m, g: (A, m, g[:-1]), "gains has shape"),
        (lambda A, m, g: (A, m.astype(int) * 2, g), "only 0 and 1"),
        (lambda A, m, g: (A, m.astype(str), g), "boolean"),
        (lambda A, m, g: (A, m[0], g[0]), r"mask\[None, :\]"),
        (lambda A, m, g: (A, np.vstack([m, np.zeros((1, 4), bool)]), np.vstack([g, np.full((1, 4), np.nan)])),
         "empty group"),
        (lambda A, m, g: (A, m, np.where(m, np.nan, g)), "non-finite value"),
        (lambda A, m, g: (A[:, :3], m, g), "square"),
        (lambda A, m, g: (np.where(np.eye(4, dtype=bool), A, np.inf), m, g), "non-finite off-diagonal"),
    ],
)
def test_fit_input_errors(small, mutate, match):
    A, masks, gains = mutate(*small)
    with pytest.raises(ValueError, match=match):
        ETAPPredictor(A).fit(masks, gains)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"stage1": "spline"}, "stage1 must be one of"),
        ({"stage2": "xgboost"}, "stage2 must be one of"),
        ({"cv": 1}, "cv must be an integer >= 2"),
        ({"residual_cv": 2.5}, "residual_cv must be an integer"),
        ({"knots_range": "sqrt"}, "knots_range must be"),
        ({"knots_range": (1, 2)}, "knots_range must be"),
        ({"degrees": ()}, "degrees must be"),
        ({"alpha_grid": (0.1, -1.0)}, "alpha_grid must be"),
        ({"task_names": ["a", "b"]}, "task_names has 2 names"),
    ],
)
def test_option_errors(small, option, match):
    A, masks, gains = small
    with pytest.raises(ValueError, match=match):
        ETAPPredictor(A, **option).fit(masks, gains)


def test_predict_input_errors(fitted):
    model, *_ = fitted
    with pytest.raises(ValueError, match="5 task columns"):
        model.predict(np.ones((2, 5), dtype=bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.predict(np.full((2, 6), 0.5))


def test_zero_one_masks_accepted(fitted):
    model, _, _, _, test, _ = fitted
    np.testing.assert_array_equal(model.predict(test.astype(np.int8)), model.predict(test))


def test_docstring_examples_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(etap_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_a_group_gains_table_is_matched_to_the_predictors_tasks_by_name():
    """fit(masks, gains) takes columns by position, so an affinity in another task order than the gains gave
    silently wrong predictions. A GroupGains passed alone carries its names: its columns are put in the
    predictor's order, for ETAP and every baseline that fits on gains; other tasks are refused."""
    from lightning_etap.groundtruth import GroupGains
    from lightning_etap.predictors import (
        BayesianETAPPredictor,
        HOAPredictor,
        LinearSurrogate,
        MTGNetPredictor,
        TAGPredictor,
    )

    A, train, y, test, _ = make_problem(5, 20, 3, lambda z, m: np.tanh(z))
    names = list("abcde")
    train = np.vstack([train, np.eye(5, dtype=bool)[[0, 1]] | np.eye(5, dtype=bool)[[1, 2]]])  # two pairs for HOA
    y = np.vstack([y, np.where(train[-2:], 0.1, np.nan)])
    perm = [3, 0, 4, 2, 1]  # the gains' own column order
    table = GroupGains(tuple(names[k] for k in perm), train[:, perm], np.where(train[:, perm], 1.0, np.nan),
                       y[:, perm], np.zeros(len(train), dtype=np.int64), {})
    small = {**SMALL}
    cases = [
        (ETAPPredictor(A, task_names=names, **small), ETAPPredictor(A, task_names=names, **small)),
        (BayesianETAPPredictor(A, task_names=names), BayesianETAPPredictor(A, task_names=names)),
        (LinearSurrogate(task_names=names), LinearSurrogate(task_names=names)),
        (HOAPredictor(task_names=names), HOAPredictor(task_names=names)),  # (asked about its two pairs only)
        (MTGNetPredictor(task_names=names, max_epochs=20, random_state=0),
         MTGNetPredictor(task_names=names, max_epochs=20, random_state=0)),
    ]
    for by_name, by_position in cases:
        by_name.fit(table)
        by_position.fit(train, y)
        assert list(by_name.task_names_) == names
        query = train[-2:] if isinstance(by_name, HOAPredictor) else test
        np.testing.assert_array_equal(by_name.predict(query), by_position.predict(query),
                                      err_msg=type(by_name).__name__)
    # no names on the predictor's side: the table's own order, and its names
    plain = LinearSurrogate().fit(table)
    assert plain.task_names_ == [names[k] for k in perm]
    np.testing.assert_array_equal(plain.predict(train[:, perm]), LinearSurrogate().fit(train[:, perm], y[:, perm])
                                  .predict(train[:, perm]))
    TAGPredictor(A, task_names=names).fit(table)  # checked and ignored
    # an affinity without names: its order cannot be checked, said, and the table's names are not adopted
    with pytest.warns(UserWarning, match=r"affinity carries no task names.*taken in their own order") as record:
        unnamed = ETAPPredictor(A, **small).fit(table)
    assert record[0].filename == __file__ and unnamed.task_names_ is None
    with pytest.raises(TypeError, match=r"needs the training groups' gains: pass fit\(masks, gains\), or a GroupGains"):
        ETAPPredictor(A, task_names=names).fit(train)
    with pytest.raises(TypeError, match=r"LinearSurrogate.fit needs the training groups' gains"):
        LinearSurrogate().fit(train)
    other = GroupGains(("a", "b", "c", "d", "z"), train, np.where(train, 1.0, np.nan), y,
                       np.zeros(len(train), dtype=np.int64), {})
    with pytest.raises(ValueError, match=r"missing from the gains: \['e'\]; not the predictor's: \['z'\]"):
        ETAPPredictor(A, task_names=names).fit(other)
    with pytest.raises(ValueError, match=r"missing from the gains: \['e'\]"):
        LinearSurrogate(task_names=names).fit(other)
    # a NaN member gain is named by task (it was a column index)
    holed = y.copy()
    holed[0, np.flatnonzero(train[0])[0]] = np.nan
    with pytest.raises(ValueError, match=rf"first: group 0, task '{names[np.flatnonzero(train[0])[0]]}'"):
        ETAPPredictor(A, task_names=names).fit(train, holed)
    with pytest.raises(ValueError, match=rf"first: group 0, task '{names[np.flatnonzero(train[0])[0]]}'"):
        LinearSurrogate(task_names=names).fit(train, holed)
