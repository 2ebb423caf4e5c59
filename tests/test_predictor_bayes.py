"""BayesianETAPPredictor: evidence, posterior mean, standard deviations and draws against independent formulas."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.base import clone

from lightning_etap.groups import all_groups
from lightning_etap.predictors import PRIOR_GRID, BayesianETAPPredictor, group_affinity
from lightning_etap.predictors import bayes as bayes_module
from lightning_etap.predictors.bayes import log_evidence

N_TASKS = 5


@pytest.fixture(scope="module")
def problem():
    """A planted model of the predictor's own form plus noise, on every group of 5 tasks."""
    rng = np.random.default_rng(3)
    affinity = rng.normal(size=(N_TASKS, N_TASKS))
    masks = all_groups(N_TASKS, min_size=2)
    shared = rng.normal(scale=0.05, size=N_TASKS)
    pairwise = rng.normal(scale=0.02, size=(N_TASKS, N_TASKS))
    z = group_affinity(affinity, masks)
    gains = np.full(masks.shape, np.nan)
    for g, row in enumerate(masks):
        for t in np.flatnonzero(row):
            others = np.flatnonzero(row & (np.arange(N_TASKS) != t))
            gains[g, t] = (0.1 + 0.03 * np.tanh(z[g, t]) + shared[others].sum() + pairwise[t, others].sum()
                           + 0.01 * rng.normal())
    return affinity, masks, gains


def _observed(model, masks, gains):
    x, rows, tasks = model._design(masks)
    return x.toarray(), gains[rows, tasks]


def test_doctests():
    assert doctest.testmod(bayes_module).failed == 0


@pytest.mark.parametrize("n_obs", [12, 200])  # fewer observations than weights (function space) and more
def test_log_evidence_matches_the_gaussian_density(n_obs):
    rng = np.random.default_rng(n_obs)
    x = rng.normal(size=(n_obs, 40))
    prior_var = rng.uniform(0.01, 1.0, size=40)
    y = rng.normal(size=n_obs)
    cov = (x * prior_var) @ x.T + 0.3 * np.eye(n_obs)
    assert log_evidence(x, y, prior_var, 0.3) == pytest.approx(multivariate_normal(np.zeros(n_obs), cov).logpdf(y),
                                                               rel=1e-9)


def test_the_prior_of_largest_evidence_is_chosen(problem):
    affinity, masks, gains = problem
    train = masks[:12]
    grid = {"shared": (0.1, 1.0), "pairwise": (0.03, 0.3), "noise": (0.05, 0.5)}
    model = BayesianETAPPredictor(affinity, prior_grid=grid).fit(train, gains[:12])
    x, y = _observed(model, train, gains[:12])
    best = None
    for combo in itertools.product(*({**PRIOR_GRID, **grid}).values()):  # brute force with scipy's density
        prior = {k: v * model.scale_ for k, v in zip({**PRIOR_GRID, **grid}, combo)}
        v = model._variances(prior)
        cov = (x * v) @ x.T + prior["noise"] ** 2 * np.eye(len(y))
        value = multivariate_normal(np.zeros(len(y)), cov, allow_singular=True).logpdf(y)
        if best is None or value > best[0]:
            best = (value, prior)
    assert model.prior_ == pytest.approx(best[1])
    assert model.log_evidence_ == pytest.approx(best[0], rel=1e-8)
    assert model.scale_ == pytest.approx(np.median(np.abs(y)))


def _reference_posterior(model, train, train_gains, probe):
    """Posterior mean and covariance of the probe's member gains by the dense function-space formulas."""
    x, rows, tasks = model._design(train)
    x, y = x.toarray(), train_gains[rows, tasks]
    v = model._variances(model.prior_)
    k = (x * v) @ x.T + model.prior_["noise"] ** 2 * np.eye(len(y))
    xs = model._design(probe)[0].toarray()
    cross = (xs * v) @ x.T
    mean = cross @ np.linalg.solve(k, y)
    cov = (xs * v) @ xs.T - cross @ np.linalg.solve(k, cross.T)
    return mean, cov


@pytest.mark.parametrize("n_train, space", [(6, "observations"), (26, "weights")])
def test_posterior_mean_and_std_match_the_function_space_formulas(problem, n_train, space):
    affinity, masks, gains = problem
    model = BayesianETAPPredictor(affinity).fit(masks[:n_train], gains[:n_train])
    assert model.posterior_space_ == space  # fewer observations than weights, and more
    mean, cov = _reference_posterior(model, masks[:n_train], gains[:n_train], masks)
    _, rows, tasks = model._design(masks)
    assert model.predict(masks)[rows, tasks] == pytest.approx(mean, abs=1e-9)
    assert model.predict_std(masks)[rows, tasks] == pytest.approx(np.sqrt(np.diag(cov)), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("n_train", [6, 26])
def test_draws_have_the_posterior_mean_and_covariance(problem, n_train):
    affinity, masks, gains = problem
    model = BayesianETAPPredictor(affinity).fit(masks[:n_train], gains[:n_train])
    probe = masks[[10, 11, 25]]  # groups sharing tasks: correlated predictions
    draws = model.sample(probe, n_samples=20000, random_state=0)
    flat = draws[probe[None].repeat(len(draws), axis=0)].reshape(len(draws), -1)
    mean, cov = _reference_posterior(model, masks[:n_train], gains[:n_train], probe)
    sd = np.sqrt(np.diag(cov))
    assert flat.mean(axis=0) == pytest.approx(mean, abs=4 * sd.max() / np.sqrt(20000))
    assert np.corrcoef(flat.T) == pytest.approx(cov / np.outer(sd, sd), abs=0.04)
    assert flat.std(axis=0) == pytest.approx(sd, rel=0.03)
    again = model.sample(probe, n_samples=3, random_state=7)
    assert np.array_equal(again, model.sample(probe, n_samples=3, random_state=7), equal_nan=True)
    one_by_one = np.stack(list(model.iter_samples(probe, 3, random_state=7)))
    assert np.array_equal(one_by_one, again, equal_nan=True)


def test_scales_with_the_smaller_space():
    """Many tasks, few groups: the posterior lives on the observations, and the design stays sparse."""
    rng = np.random.default_rng(0)
    n = 120  # 14,885 weights
    affinity = rng.normal(size=(n, n))
    masks = np.zeros((40, n), dtype=bool)
    for row in masks:
        row[rng.choice(n, size=5, replace=False)] = True
    gains = np.where(masks, rng.normal(0.1, 0.05, size=masks.shape), np.nan)
    model = BayesianETAPPredictor(affinity, prior_grid={"shared": (0.3,), "noise": (0.1,)}).fit(masks, gains)
    assert model.posterior_space_ == "observations" and model.coef_.size == n * n + 3 * n + 5
    probe = masks[:3]
    mean, cov = _reference_posterior(model, masks, gains, probe)
    _, rows, tasks = model._design(probe)
    assert model.predict(probe)[rows, tasks] == pytest.approx(mean, abs=1e-9)
    assert model.predict_std(probe)[rows, tasks] == pytest.approx(np.sqrt(np.diag(cov)), rel=1e-6)
    assert model.sample(probe, 4, 0).shape == (4, 3, n)


def test_singletons_and_non_members(problem):
    affinity, masks, gains = problem
    model = BayesianETAPPredictor(affinity).fit(masks, gains)
    probe = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=bool)
    for out in (model.predict(probe), model.predict_std(probe), model.sample(probe, 2, 0)[1]):
        assert out[0, 0] == 0.0 and np.isnan(out[0, 1:]).all()
        assert np.isfinite(out[1, :2]).all() and np.isnan(out[1, 2:]).all()


def test_fits_its_own_model_and_needs_only_one_group(problem):
    affinity, masks, gains = problem
    model = BayesianETAPPredictor(affinity).fit(masks, gains)
    member = ~np.isnan(gains)
    assert model.score(masks, gains) > 0.9
    assert np.nanmax(model.predict_std(masks)) < 0.05
    one = BayesianETAPPredictor(affinity).fit(masks[-1:], gains[-1:])  # just the all-task group
    assert np.isfinite(one.predict(masks)[member]).all() and (one.predict_std(masks)[member] > 0).all()


def test_design_rows_by_hand():
    affinity = np.arange(16.0).reshape(4, 4)
    model = BayesianETAPPredictor(affinity, n_basis=2).fit(np.ones((1, 4), dtype=bool), np.full((1, 4), 0.1))
    x, rows, tasks = model._design(np.array([[True, False, True, True]]))
    assert rows.tolist() == [0, 0, 0] and tasks.tolist() == [0, 2, 3]
    lo, hi = model.z_range_
    assert (lo, hi) == (1.0, 14.0)
    layout = model._layout()
    row = x.toarray()[1]  # task 2 in {0, 2, 3}: others 0 and 3
    expected = np.zeros(row.size)
    expected[layout["level"]] = 1.0
    expected[layout["intercept"].start + 2] = 1.0
    z = (affinity[0, 2] + affinity[3, 2]) / 2  # mean affinity of the other members onto task 2
    u = (z - lo) / (hi - lo)
    expected[layout["affinity"]] = [1 - u, u]  # degree-1 B-spline with no interior knot
    expected[layout["shared"].start + np.array([0, 3])] = 1.0
    expected[layout["pairwise"].start + 2 * 4 + np.array([0, 3])] = 1.0
    expected[layout["size"].start + 2] = 1.0 / 2
    assert row == pytest.approx(expected)


@pytest.mark.parametrize("n_train", [15, 26])  # posterior over the observations, and over the weights
def test_save_and_load_reproduce_everything(problem, tmp_path, n_train):
    affinity, masks, gains = problem
    model = BayesianETAPPredictor(affinity, task_names=list("abcde")).fit(masks[:n_train], gains[:n_train])
    loaded = BayesianETAPPredictor.load(model.save(tmp_path / "bayes.json"))
    assert np.array_equal(loaded.predict(masks), model.predict(masks), equal_nan=True)
    assert np.array_equal(loaded.predict_std(masks), model.predict_std(masks), equal_nan=True)
    assert np.array_equal(loaded.sample(masks, 2, 1), model.sample(masks, 2, 1), equal_nan=True)
    assert loaded.prior_ == model.prior_ and loaded.task_names_ == list("abcde")
    refit = clone(model).fit(masks[:n_train], gains[:n_train])
    assert np.array_equal(refit.predict(masks), model.predict(masks), equal_nan=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_basis": 1}, "n_basis"),
    ({"prior_grid": {"pairs": (0.1,)}}, "unknown keys"),
    ({"prior_grid": {"shared": (-0.1,)}}, "shared"),
    ({"prior_grid": {"noise": (0.0,)}}, "noise"),
])
def test_invalid_options_raise(kwargs, match, problem):
    affinity, masks, gains = problem
    with pytest.raises(ValueError, match=match):
        BayesianETAPPredictor(affinity, **kwargs).fit(masks, gains)


def test_invalid_data_raise(problem):
    affinity, masks, gains = problem
    with pytest.raises(ValueError, match="columns"):
        BayesianETAPPredictor(affinity).fit(masks[:, :4], gains[:, :4])
    singles = np.eye(N_TASKS, dtype=bool)
    with pytest.raises(ValueError, match="two or more"):
        BayesianETAPPredictor(affinity).fit(singles, np.zeros((N_TASKS, N_TASKS)))
    model = BayesianETAPPredictor(affinity).fit(masks, gains)
    with pytest.raises(ValueError, match="n_samples"):
        model.sample(masks, 0)
    with pytest.raises(Exception, match="not fitted"):
        BayesianETAPPredictor(affinity).sample(masks)


def test_small_data_benchmark_runs(tmp_path):
    """benchmarks/predictor_small_data.py end to end with one draw, so it cannot rot."""
    import json

    from _benchmarks import load_benchmark

    module = load_benchmark("predictor_small_data")
    out = tmp_path / "small.json"
    assert module.main(["--draws", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["tables"]) == {"Chemical", "ETTm1"}
    row = report["tables"]["Chemical"]["sizes"]["10"]
    assert set(row) == {"etap", "bayes", "bayes_ahead_task_r2"} and -10 < row["bayes"]["task_r2"] <= 1
