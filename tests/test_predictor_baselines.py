"""The baseline gain predictors against independent references.

References: hand loops of the TAG/HOA formulas, hand-computed numbers on
small examples, numpy least squares and scikit-learn's Ridge / MLPRegressor
for the linear surrogate and the 2023 feature predictor, and planted
structure that the MTG-Net transformer must learn.
"""

from __future__ import annotations

import doctest
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from sklearn.neural_network import MLPRegressor

import lightning_etap.predictors.ayman2023 as ayman_module
import lightning_etap.predictors.gradtae as gradtae_module
import lightning_etap.predictors.hoa as hoa_module
import lightning_etap.predictors.mtgnet as mtgnet_module
import lightning_etap.predictors.surrogate as surrogate_module
import lightning_etap.predictors.tag as tag_module
from lightning_etap.groups import all_groups, groups_to_masks
from lightning_etap.predictors import (
    Ayman2023Predictor,
    GradTAEPredictor,
    HOAPredictor,
    LinearSurrogate,
    MTGNetPredictor,
    ProjectedGradients,
    TAGPredictor,
)

TINY_MTG = {"hidden_dim": 16, "max_epochs": 30}


# ----------------------------------------------------------------- references
def hand_group_mean(M: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """mean over the other members s of M[s, t]; 0 for singletons, NaN for non-members."""
    out = np.full(masks.shape, np.nan)
    for g, row in enumerate(masks):
        members = [int(i) for i in np.flatnonzero(row)]
        for t in members:
            others = [s for s in members if s != t]
            out[g, t] = sum(M[s, t] for s in others) / len(others) if others else 0.0
    return out


def pair_gains_of(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All two-task groups with gains read from P[s, t] = gain of t with s."""
    n = P.shape[0]
    pairs = all_groups(n, min_size=2, max_size=2)
    gains = np.full(pairs.shape, np.nan)
    for g, row in enumerate(pairs):
        s, t = np.flatnonzero(row)
        gains[g, t], gains[g, s] = P[s, t], P[t, s]
    return pairs, gains


def planted_problem(n=5, seed=0):
    """Gains additive in membership: gain[G -> t] = b_t + sum_{s in G, s != t} W[t, s] (exactly linear)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(scale=0.1, size=(n, n))
    np.fill_diagonal(W, 0.0)
    b = rng.normal(scale=0.05, size=n)
    groups = all_groups(n, min_size=2)
    gains = np.where(groups, groups @ W.T + b, np.nan)
    return W, b, groups, gains


def member_rows(masks, values):
    return values[masks & (masks.sum(axis=1) >= 2)[:, None]]


# ------------------------------------------------------------------ factories
def _pair_and_group_training(n=5, seed=1):
    """All pairs (so HOA and Ayman can read pairwise gains) plus some larger groups."""
    rng = np.random.default_rng(seed)
    P = rng.normal(scale=0.1, size=(n, n))
    np.fill_diagonal(P, np.nan)
    pairs, pair_gains = pair_gains_of(P)
    big = all_groups(n, min_size=3)
    big = big[rng.choice(len(big), 8, replace=False)]
    big_gains = np.where(big, np.nan_to_num(hand_group_mean(np.nan_to_num(P), big)) + 0.01, np.nan)
    return np.vstack([pairs, big]), np.vstack([pair_gains, big_gains])


def _projected_gradients(n=5, seed=4):
    """Synthetic GRAD-TAE features: 3 binary and 2 regression tasks, 16 training and 6 held-out rows each."""
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(n), 22)
    held_out = np.tile(np.arange(22) >= 16, n)
    target = np.where(task < 3, rng.integers(0, 2, task.size), rng.normal(size=task.size))
    return ProjectedGradients(rng.normal(size=(task.size, 6)), rng.normal(size=task.size), target, task, held_out,
                              tuple("vwxyz"[:n]), ("binary",) * 3 + ("regression",) * (n - 3))


FACTORIES = {
    "tag": lambda: TAGPredictor(np.random.default_rng(3).normal(size=(5, 5))),
    "hoa": HOAPredictor,
    "surrogate": LinearSurrogate,
    "mtgnet": lambda: MTGNetPredictor(**TINY_MTG),
    "ayman": lambda: Ayman2023Predictor(max_iter=50, task_features={"dataset_size": [10.0, 20, 30, 40, 50]}),
    "gradtae": lambda: GradTAEPredictor(_projected_gradients()),
}


@pytest.fixture(scope="module")
def fitted_models():
    masks, gains = _pair_and_group_training()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning etc. are not under test here
        return {name: make().fit(masks, gains) for name, make in FACTORIES.items()}, masks, gains


# ---------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", list(FACTORIES))
def test_singletons_zero_non_members_nan_totals(fitted_models, name):
    models, *_ = fitted_models
    model = models[name]
    groups = all_groups(5)
    pred = model.predict(groups)
    assert pred.shape == groups.shape and pred.dtype == np.float64
    assert np.isnan(pred[~groups]).all()
    single = groups.sum(axis=1) == 1
    np.testing.assert_array_equal(pred[single][groups[single]], 0.0)
    assert np.isfinite(pred[groups]).all()
    np.testing.assert_allclose(model.predict_total(groups), np.nansum(pred, axis=1), rtol=0, atol=1e-12)
    assert isinstance(model.score(*fitted_models[1:]), float)
    zero_one = model.predict(groups.astype(int))
    np.testing.assert_array_equal(zero_one, pred)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_unfitted_raises_not_fitted(name, tmp_path):
    model = FACTORIES[name]()
    masks = np.ones((1, 5), dtype=bool)
    for call in (lambda: model.predict(masks), lambda: model.predict_total(masks),
                 lambda: model.score(masks, np.zeros((1, 5))), lambda: model.save(tmp_path / "x")):
        with pytest.raises(NotFittedError, match="call fit"):
            call()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_save_load_round_trip(fitted_models, name, tmp_path):
    models, *_ = fitted_models
    model = models[name]
    path = model.save(tmp_path / f"{name}.saved")
    loaded = type(model).load(path)
    groups = all_groups(5)
    np.testing.assert_array_equal(loaded.predict(groups), model.predict(groups))
    assert loaded.get_params().keys() == model.get_params().keys()
    assert loaded.n_tasks_ == 5


@pytest.mark.parametrize("name", list(FACTORIES))
def test_load_rejects_other_files(name, tmp_path):
    path = tmp_path / "other"
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=type(FACTORIES[name]()).__name__):
        type(FACTORIES[name]()).load(path)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_clone_refits_identically(fitted_models, name):
    models, masks, gains = fitted_models
    model = models[name]
    copy = clone(model)
    assert not hasattr(copy, "n_tasks_")
    assert copy.get_params().keys() == model.get_params().keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.fit(masks, gains)
    groups = all_groups(5, min_size=2)
    np.testing.assert_array_equal(copy.predict(groups), model.predict(groups))


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m, g: (np.where(m, 2, 0), g), "only 0 and 1"),
        (lambda m, g: (np.vstack([m, np.zeros((1, 5), bool)]), np.vstack([g, np.full((1, 5), np.nan)])), "empty"),
        (lambda m, g: (m, g[:-1]), "shape"),
        (lambda m, g: (m, np.where(m, np.nan, g)), "non-finite"),
        (lambda m, g: (m[0], g[0]), "2-D"),
    ],
)
def test_fit_input_errors(name, mutate, match):
    masks, gains = _pair_and_group_training()
    model = FACTORIES[name]()
    bad_masks, bad_gains = mutate(masks, gains)
    with pytest.raises(ValueError, match=match):
        model.fit(bad_masks, bad_gains)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_predict_input_errors(fitted_models, name):
    models, *_ = fitted_models
    model = models[name]
    with pytest.raises(ValueError, match="task columns"):
        model.predict(np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        model.predict(np.zeros((1, 5), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        model.predict(np.ones(5, dtype=bool))


@pytest.mark.parametrize(
    "module", [tag_module, hoa_module, surrogate_module, mtgnet_module, ayman_module, gradtae_module]
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------------ TAG
def test_tag_equals_hand_loop_of_eq7():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    groups = all_groups(6)
    pred = TAGPredictor(A).fit().predict(groups)
    np.testing.assert_allclose(pred, hand_group_mean(A, groups), rtol=0, atol=1e-12)


def test_tag_direction_source_row_onto_destination_column():
    A = np.zeros((3, 3))
    A[0, 1] = 5.0  # task 0 helps task 1
    pred = TAGPredictor(A).fit().predict(np.array([[True, True, False]]))
    np.testing.assert_array_equal(pred, [[0.0, 5.0, np.nan]])


def test_tag_fit_accepts_and_ignores_training_groups():
    A = np.random.default_rng(1).normal(size=(4, 4))
    groups = all_groups(4)
    plain = TAGPredictor(A).fit().predict(groups)
    masks = all_groups(4, min_size=2)
    with_groups = TAGPredictor(A).fit(masks, np.where(masks, 1.0, np.nan)).predict(groups)
    np.testing.assert_array_equal(plain, with_groups)
    TAGPredictor(A).fit(masks)  # masks alone are fine
    with pytest.raises(ValueError, match="without masks"):
        TAGPredictor(A).fit(gains=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="square"):
        TAGPredictor(np.zeros((3, 4))).fit()
    with pytest.raises(ValueError, match="task columns"):
        TAGPredictor(A).fit(np.ones((1, 3), dtype=bool))


def test_tag_dataframe_names_and_tensor(tmp_path):
    pd = pytest.importorskip("pandas")
    A = np.random.default_rng(2).normal(size=(3, 3))
    model = TAGPredictor(pd.DataFrame(A, columns=list("xyz"), index=list("xyz"))).fit()
    assert model.task_names_ == ["x", "y", "z"]
    groups = all_groups(3)
    np.testing.assert_array_equal(TAGPredictor(torch.tensor(A)).fit().predict(groups), model.predict(groups))
    loaded = TAGPredictor.load(model.save(tmp_path / "tag.json"))
    assert loaded.task_names_ == ["x", "y", "z"] and clone(loaded).fit().task_names_ == ["x", "y", "z"]


@pytest.mark.parametrize("kind", ["etap", "bayes", "tag"])
def test_a_dataframe_affinity_is_read_by_label(kind):
    """Rows listed in another order than the columns are the same matrix; rows naming other tasks are refused."""
    pd = pytest.importorskip("pandas")
    from lightning_etap.predictors import BayesianETAPPredictor, ETAPPredictor

    make = {"etap": ETAPPredictor, "bayes": BayesianETAPPredictor, "tag": TAGPredictor}[kind]
    rng = np.random.default_rng(5)
    A = rng.normal(size=(4, 4))
    names = list("abcd")
    frame = pd.DataFrame(A, index=names, columns=names)
    shuffled = frame.loc[["c", "a", "d", "b"]]  # the same labelled matrix, rows in another order
    masks = all_groups(4)
    masks = masks[masks.sum(axis=1) >= 2]
    gains = np.where(masks, rng.normal(size=masks.shape), np.nan)
    want = make(frame).fit(masks, gains)
    got = make(shuffled).fit(masks, gains)
    assert got.task_names_ == names
    np.testing.assert_allclose(got.affinity_, want.affinity_)
    np.testing.assert_allclose(got.predict(masks), want.predict(masks))
    positional = make(pd.DataFrame(A, columns=names)).fit(masks, gains)  # a default index: rows by position
    np.testing.assert_allclose(positional.predict(masks), want.predict(masks))
    with pytest.raises(ValueError, match=r"rows \['w', 'a', 'b', 'c'\] and columns .* name different tasks"):
        make(pd.DataFrame(A, index=list("wabc"), columns=names)).fit(masks, gains)


def test_ayman_pairwise_dataframe_is_saved_as_the_fit_read_it(tmp_path):
    """Only an affinity is read by label; the 2023 predictor's pairwise-gain table keeps its own reading."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(8)
    pairwise = rng.normal(size=(4, 4))
    frame = pd.DataFrame(pairwise, index=[f"r{i}" for i in range(4)], columns=list("abcd"))
    masks = all_groups(4)
    masks = masks[masks.sum(axis=1) >= 2]
    gains = np.where(masks, rng.normal(size=masks.shape), np.nan)
    model = Ayman2023Predictor(pairwise=frame).fit(masks, gains)
    loaded = Ayman2023Predictor.load(model.save(tmp_path / "ayman.json"))
    np.testing.assert_array_equal(loaded.get_params()["pairwise"], pairwise)
    np.testing.assert_allclose(clone(loaded).fit(masks, gains).predict(masks), model.predict(masks))


@pytest.mark.parametrize("kind", ["etap", "bayes", "tag"])
def test_an_affinity_result_gives_its_task_names_and_saves(kind, tmp_path):
    from lightning_etap.affinity import AffinityResult
    from lightning_etap.predictors import BayesianETAPPredictor, ETAPPredictor

    make = {"etap": ETAPPredictor, "bayes": BayesianETAPPredictor, "tag": TAGPredictor}[kind]
    rng = np.random.default_rng(6)
    A = rng.normal(size=(4, 4))
    result = AffinityResult(("p", "q", "r", "s"), A, A[None], [0])
    masks = all_groups(4)
    masks = masks[masks.sum(axis=1) >= 2]
    gains = np.where(masks, rng.normal(size=masks.shape), np.nan)
    model = make(result).fit(masks, gains)
    assert model.task_names_ == ["p", "q", "r", "s"]
    loaded = make.load(model.save(tmp_path / "model.json"))
    assert loaded.task_names_ == ["p", "q", "r", "s"]
    np.testing.assert_array_equal(loaded.predict(masks), model.predict(masks))
    with pytest.raises(ValueError, match="differ from the affinity's own task order"):
        make(result, task_names=["s", "r", "q", "p"]).fit(masks, gains)


# ------------------------------------------------------------------------ HOA
def test_hoa_hand_computed_example():
    # pair gains: {0,1}: t0 0.1, t1 0.2 | {0,2}: t0 -0.3, t2 0.4 | {1,2}: t1 0.5, t2 -0.6
    # {0,3}: t0 0.7, t3 0.8 | {1,3}: t1 0.9, t3 -1.0 | {2,3}: t2 1.1, t3 1.2
    names = list("abcd")
    pairs = groups_to_masks([("a", "b"), ("a", "c"), ("b", "c"), ("a", "d"), ("b", "d"), ("c", "d")], names)
    gains = np.full(pairs.shape, np.nan)
    for g, (s, t, gs, gt) in enumerate([(0, 1, 0.1, 0.2), (0, 2, -0.3, 0.4), (1, 2, 0.5, -0.6),
                                        (0, 3, 0.7, 0.8), (1, 3, 0.9, -1.0), (2, 3, 1.1, 1.2)]):
        gains[g, s], gains[g, t] = gs, gt
    model = HOAPredictor(task_names=names).fit(pairs, gains)
    groups = groups_to_masks([("a", "b", "c"), ("a", "b", "c", "d"), ("b", "d"), ("c",)], names)
    expected = np.array([
        [(0.1 - 0.3) / 2, (0.2 + 0.5) / 2, (0.4 - 0.6) / 2, np.nan],
        [(0.1 - 0.3 + 0.7) / 3, (0.2 + 0.5 + 0.9) / 3, (0.4 - 0.6 + 1.1) / 3, (0.8 - 1.0 + 1.2) / 3],
        [np.nan, 0.9, np.nan, -1.0],
        [np.nan, np.nan, 0.0, np.nan],
    ])
    np.testing.assert_allclose(model.predict(groups), expected, rtol=0, atol=1e-12)
    assert model.n_pairs_ == 6 and model.measured_pairs_.sum() == 12


def test_hoa_matches_hand_loop_and_ignores_larger_groups():
    rng = np.random.default_rng(4)
    P = rng.normal(size=(5, 5))
    pairs, gains = pair_gains_of(P)
    triples = all_groups(5, min_size=3, max_size=3)[:4]
    masks = np.vstack([pairs, triples])
    all_gains = np.vstack([gains, np.where(triples, 99.0, np.nan)])
    model = HOAPredictor().fit(masks, all_gains)
    assert model.n_ignored_groups_ == 4
    groups = all_groups(5)
    np.testing.assert_allclose(model.predict(groups), hand_group_mean(P, groups), rtol=0, atol=1e-12)


def test_hoa_averages_repeated_pairs():
    masks = np.array([[1, 1, 0], [1, 1, 0]], dtype=bool)
    gains = np.array([[0.1, 0.2, np.nan], [0.3, 0.6, np.nan]])
    pred = HOAPredictor().fit(masks, gains).predict(masks[:1])
    np.testing.assert_allclose(pred, [[0.2, 0.4, np.nan]])


def test_hoa_errors_name_missing_pairs():
    names = list("abcd")
    pairs = groups_to_masks([("a", "b"), ("a", "c"), ("b", "c")], names)
    gains = np.where(pairs, 0.1, np.nan)
    model = HOAPredictor(task_names=names).fit(pairs, gains)
    model.predict(groups_to_masks([("a", "b", "c"), ("d",)], names))  # covered; a singleton needs no pair
    with pytest.raises(ValueError, match=r"2 pair\(s\).*\('a', 'd'\), \('b', 'd'\)"):
        model.predict(groups_to_masks([("a", "b", "d")], names))
    with pytest.raises(ValueError, match="exactly two"):
        HOAPredictor().fit(np.ones((2, 3), dtype=bool), np.zeros((2, 3)))


# ------------------------------------------------------------ linear surrogate
def test_surrogate_recovers_planted_weights_exactly():
    W, b, groups, gains = planted_problem(n=6)
    model = LinearSurrogate().fit(groups, gains)
    np.testing.assert_allclose(model.coef_, W, rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.intercept_, b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.predict(groups)[groups], gains[groups], rtol=0, atol=1e-10)


def test_surrogate_matches_numpy_lstsq_per_task():
    rng = np.random.default_rng(5)
    groups = all_groups(5, min_size=2)
    gains = np.where(groups, rng.normal(size=groups.shape), np.nan)
    model = LinearSurrogate().fit(groups, gains)
    for t in range(5):
        rows = groups[:, t]
        others = [s for s in range(5) if s != t]
        design = np.column_stack([np.ones(rows.sum()), groups[rows][:, others].astype(float)])
        solution = np.linalg.lstsq(design, gains[rows, t], rcond=None)[0]
        np.testing.assert_allclose(model.intercept_[t], solution[0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(model.coef_[t, others], solution[1:], rtol=0, atol=1e-10)
        assert model.coef_[t, t] == 0.0


def test_surrogate_ridge_matches_sklearn():
    rng = np.random.default_rng(6)
    groups = all_groups(5, min_size=2)[rng.choice(26, 12, replace=False)]
    gains = np.where(groups, rng.normal(size=groups.shape), np.nan)
    model = LinearSurrogate(alpha=0.5).fit(groups, gains)
    for t in range(5):
        rows = groups[:, t]
        others = [s for s in range(5) if s != t]
        ref = Ridge(alpha=0.5).fit(groups[rows][:, others].astype(float), gains[rows, t])
        np.testing.assert_allclose(model.coef_[t, others], ref.coef_, rtol=0, atol=1e-10)
        np.testing.assert_allclose(model.intercept_[t], ref.intercept_, rtol=0, atol=1e-10)


def test_surrogate_underdetermined_is_minimum_norm():
    groups = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=bool)
    gains = np.where(groups, np.array([[0.3], [0.1], [0.5]]), np.nan)
    with pytest.warns(UserWarning, match=r"tasks \[3\]"):  # task 3 is in one group only
        model = LinearSurrogate().fit(groups, gains)
    X = groups[:, 1:].astype(float)
    Xc, yc = X - X.mean(axis=0), gains[:, 0] - gains[:, 0].mean()
    np.testing.assert_allclose(model.coef_[0, 1:], np.linalg.pinv(Xc) @ yc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.predict(groups)[:, 0], gains[:, 0], rtol=0, atol=1e-12)


def test_surrogate_falls_back_to_mean_with_warning():
    groups = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=bool)
    gains = np.where(groups, np.arange(16.0).reshape(4, 4) / 10, np.nan)
    with pytest.warns(UserWarning, match=r"tasks \['d'\] are in fewer than min_groups=2"):
        model = LinearSurrogate(task_names=list("abcd")).fit(groups, gains)
    assert model.fallback_tasks_ == [3]
    pred = model.predict(np.ones((1, 4), dtype=bool))
    assert pred[0, 3] == gains[3, 3]
    with pytest.warns(UserWarning, match="fewer than min_groups"):
        model = LinearSurrogate(min_groups=5).fit(groups, gains)
    np.testing.assert_allclose(model.predict(groups[:1])[0, :2], [np.nanmean(gains[:, 0]), np.nanmean(gains[:, 1])])


@pytest.mark.parametrize(("option", "value"), [("alpha", -1.0), ("alpha", "x"), ("min_groups", 0)])
def test_surrogate_option_errors(option, value):
    W, b, groups, gains = planted_problem(n=4)
    with pytest.raises(ValueError, match=option):
        LinearSurrogate(**{option: value}).fit(groups, gains)


# ---------------------------------------------------------------------- MTGNet
def test_mtgnet_learns_planted_structure_better_than_the_mean():
    rng = np.random.default_rng(7)
    n = 6
    groups = all_groups(n, min_size=2)
    helps = rng.normal(size=n)  # task s adds helps[s] to every other member's gain
    gains = np.where(groups, (groups @ helps)[:, None] - helps, np.nan) / 3
    order = rng.permutation(len(groups))
    train, test = order[:40], order[40:]
    model = MTGNetPredictor(hidden_dim=32, max_epochs=150, patience=20, dropout=0.1, random_state=0)
    model.fit(groups[train], gains[train])
    pred = model.predict(groups[test])
    corr = np.corrcoef(member_rows(groups[test], pred), member_rows(groups[test], gains[test]))[0, 1]
    assert corr > 0.5
    mean_error = np.abs(member_rows(groups[test], gains[test]) - np.nanmean(gains[train])).mean()
    model_error = np.abs(member_rows(groups[test], gains[test]) - member_rows(groups[test], pred)).mean()
    assert model_error < mean_error


def test_mtgnet_non_member_embedding_cannot_affect_a_group():
    masks, gains = _pair_and_group_training()
    model = MTGNetPredictor(**TINY_MTG).fit(masks, gains)
    groups = all_groups(5, min_size=2)
    before = model.predict(groups)
    for snapshot in model.snapshots_:
        snapshot["embedding"][4] += 10.0 * np.arange(1, 17, dtype=np.float32)
    after = model.predict(groups)
    without = ~groups[:, 4]
    np.testing.assert_array_equal(after[without], before[without])
    assert not np.allclose(after[~without][groups[~without]], before[~without][groups[~without]])


def test_mtgnet_is_deterministic_and_leaves_global_rng_alone():
    masks, gains = _pair_and_group_training()
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    a = MTGNetPredictor(**TINY_MTG, random_state=3).fit(masks, gains)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    b = MTGNetPredictor(**TINY_MTG, random_state=3).fit(masks, gains)
    c = MTGNetPredictor(**TINY_MTG, random_state=4).fit(masks, gains)
    groups = all_groups(5)
    np.testing.assert_array_equal(a.loss_history_, b.loss_history_)
    np.testing.assert_array_equal(a.predict(groups), b.predict(groups))
    assert not np.array_equal(a.loss_history_, c.loss_history_)


def test_mtgnet_ensembles_the_two_lowest_loss_snapshots():
    masks, gains = _pair_and_group_training()
    model = MTGNetPredictor(hidden_dim=16, max_epochs=25, patience=100).fit(masks, gains)
    history = model.loss_history_
    assert model.n_epochs_ == 25 == history.size and not model.stopped_early_
    best_two = np.argsort(history, kind="stable")[:2].tolist()
    assert model.snapshot_epochs_ == best_two
    np.testing.assert_array_equal(model.snapshot_losses_, history[best_two])
    groups = all_groups(5, min_size=2)
    singles = []
    for snapshot in model.snapshots_:
        one = clone(model)
        one.__dict__.update({k: v for k, v in model.__dict__.items() if k.endswith("_")})
        one.snapshots_ = [snapshot]
        singles.append(one.predict(groups))
    np.testing.assert_allclose(model.predict(groups), (singles[0] + singles[1]) / 2, rtol=1e-6, atol=1e-9)
    # the monitored loss of a snapshot is the L1 error of its own predictions on the training groups
    one.snapshots_ = [model.snapshots_[0]]
    train_pred = one.predict(masks)
    np.testing.assert_allclose(np.abs(train_pred - gains)[masks].mean(), history[best_two[0]], rtol=1e-4)


def test_mtgnet_early_stopping_uses_patience_on_the_training_loss():
    masks, gains = _pair_and_group_training()
    model = MTGNetPredictor(hidden_dim=16, max_epochs=200, patience=3, lr=0.05).fit(masks, gains)
    history = model.loss_history_
    assert model.stopped_early_ and model.n_epochs_ < 200
    best = int(np.argmin(history))
    assert model.n_epochs_ == best + 1 + 3  # three epochs without a new minimum, then stop
    assert (history[best + 1 :] >= history[best]).all()


@pytest.mark.parametrize(
    ("option", "value"),
    [("hidden_dim", 0), ("n_layers", 1.5), ("temperature", 0.0), ("dropout", 1.0), ("lr", -1.0),
     ("weight_decay", -1.0), ("max_epochs", 0), ("patience", 0), ("n_snapshots", 0), ("standardize", "yes"),
     ("num_threads", 0)],
)
def test_mtgnet_option_errors(option, value):
    masks, gains = _pair_and_group_training()
    with pytest.raises(ValueError, match=option):
        MTGNetPredictor(**{option: value}).fit(masks, gains)


def test_mtgnet_needs_two_groups():
    with pytest.raises(ValueError, match="at least 2 training group"):
        MTGNetPredictor().fit(np.array([[1, 1, 0], [1, 0, 0]], bool), np.array([[0.1, 0.2, np.nan], [0, np.nan, np.nan]]))


# ------------------------------------------------------------------- Ayman 2023
def _ayman_example():
    P = np.array([[np.nan, 0.1, 0.2, 0.3],
                  [0.4, np.nan, 0.5, 0.6],
                  [0.7, 0.8, np.nan, 0.9],
                  [1.0, 1.1, 1.2, np.nan]])
    D = np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0]], dtype=float)
    features = {"target_variance": [0.25, 1.0, 4.0, 9.0], "target_std": [0.5, 1.0, 2.0, 3.0],
                "dataset_size": [100.0, 200.0, 300.0, 400.0], "distance": D}
    return P, D, features


def test_ayman_features_by_hand():
    P, D, features = _ayman_example()
    groups = all_groups(4, min_size=2)
    gains = np.where(groups, 0.1, np.nan)
    model = Ayman2023Predictor(pairwise=P, task_features=features, max_iter=20).fit(groups, gains)
    assert model.feature_names_ == ["pair_gain_mean", "pair_gain_var", "pair_gain_std", "group_size",
                                    "target_variance", "target_std", "dataset_size", "distance_mean"]
    query = np.array([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=bool)
    got = model.member_features(query)
    # task 0 in {0, 1, 2}: pair gains P[1, 0] = 0.4 and P[2, 0] = 0.7
    np.testing.assert_allclose(got[0, 0], [0.55, 0.0225, 0.15, 3, 0.25, 0.5, 100, 1.5], rtol=0, atol=1e-12)
    # task 2 in {0, 1, 2}: P[0, 2] = 0.2, P[1, 2] = 0.5 ; distances 2 and 4
    np.testing.assert_allclose(got[0, 2], [0.35, 0.0225, 0.15, 3, 4.0, 2.0, 300, 3.0], rtol=0, atol=1e-12)
    # task 3 in the pair {1, 3}: P[1, 3] = 0.6, variance 0
    np.testing.assert_allclose(got[1, 3], [0.6, 0.0, 0.0, 2, 9.0, 3.0, 400, 5.0], rtol=0, atol=1e-12)
    assert np.isnan(got[0, 3]).all() and np.isnan(got[2]).all()  # non-member; singleton


def test_ayman_matches_mlp_on_standardised_hand_features():
    P, D, features = _ayman_example()
    rng = np.random.default_rng(8)
    groups = all_groups(4, min_size=2)
    gains = np.where(groups, rng.normal(size=groups.shape), np.nan)
    model = Ayman2023Predictor(pairwise=P, task_features=features, max_iter=100, random_state=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(groups, gains)
        X = model.member_features(groups)[groups]
        y = gains[groups]
        sx = np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
        ref = MLPRegressor(hidden_layer_sizes=(32,), max_iter=100, random_state=2, early_stopping=False)
        ref.fit((X - X.mean(axis=0)) / sx, (y - y.mean()) / y.std())
    expected = ref.predict((X - X.mean(axis=0)) / sx) * y.std() + y.mean()
    np.testing.assert_allclose(model.predict(groups)[groups], expected, rtol=1e-10, atol=1e-12)


def test_ayman_reads_pairs_from_training_and_names_missing_ones():
    rng = np.random.default_rng(9)
    P = rng.normal(size=(4, 4))
    pairs, pair_gains = pair_gains_of(P)
    triples = all_groups(4, min_size=3)
    masks = np.vstack([pairs, triples])
    gains = np.vstack([pair_gains, np.where(triples, 0.2, np.nan)])
    model = Ayman2023Predictor(max_iter=20).fit(masks, gains)
    assert model.feature_names_ == ["pair_gain_mean", "pair_gain_var", "pair_gain_std", "group_size"]
    got = model.member_features(np.ones((1, 4), dtype=bool))
    np.testing.assert_allclose(got[0, :, 0], hand_group_mean(P, np.ones((1, 4), dtype=bool))[0], atol=1e-12)
    # without the pair {2, 3}, the triples containing it cannot be featurised
    keep = ~(pairs[:, 2] & pairs[:, 3])
    with pytest.raises(ValueError, match=r"1 pair\(s\).*\('c', 'd'\)"):
        Ayman2023Predictor(task_names=list("abcd")).fit(np.vstack([pairs[keep], triples]),
                                                        np.vstack([pair_gains[keep], gains[len(pairs):]]))
    partial = Ayman2023Predictor(max_iter=20, task_names=list("abcd")).fit(pairs[keep], pair_gains[keep])
    with pytest.raises(ValueError, match="groups to predict"):
        partial.predict(np.array([[0, 1, 1, 1]], dtype=bool))


def test_ayman_task_features_as_array_and_errors():
    P, *_ = _ayman_example()
    groups = all_groups(4, min_size=2)
    gains = np.where(groups, 0.1, np.nan)
    model = Ayman2023Predictor(pairwise=P, task_features=np.ones((4, 2)), max_iter=5).fit(groups, gains)
    assert model.feature_names_[-2:] == ["task_feature_0", "task_feature_1"]
    for bad, match in (({"size": [1.0, 2.0]}, "shape"), ({"size": [1.0, np.nan, 2, 3]}, "non-finite"),
                       (np.ones((3, 2)), "shape")):
        with pytest.raises(ValueError, match=match):
            Ayman2023Predictor(pairwise=P, task_features=bad).fit(groups, gains)
    with pytest.raises(ValueError, match="pairwise must have shape"):
        Ayman2023Predictor(pairwise=np.zeros((3, 3))).fit(groups, gains)


def test_ayman_save_load_with_descriptors(tmp_path):
    P, D, features = _ayman_example()
    groups = all_groups(4, min_size=2)
    gains = np.where(groups, np.random.default_rng(1).normal(size=groups.shape), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Ayman2023Predictor(pairwise=P, task_features=features, max_iter=30).fit(groups, gains)
    loaded = Ayman2023Predictor.load(model.save(tmp_path / "ayman.json"))
    np.testing.assert_array_equal(loaded.predict(all_groups(4)), model.predict(all_groups(4)))
    assert loaded.feature_names_ == model.feature_names_
    np.testing.assert_array_equal(loaded.task_features["distance"], D)
