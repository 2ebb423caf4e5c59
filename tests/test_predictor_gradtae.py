"""GRAD-TAE (Li et al. 2024) against independent references.

References: a loop of ``torch.autograd.grad`` over single examples (per-example
gradients), the projection's exact and statistical properties, gradient
descent on the network's own linearisation through ``torch.func.jvp``
(the Taylor estimate of a fine-tuned group model), ``scipy.optimize.minimize``
(the Newton solver, both baselines), hand loops (pairwise averaging), and a
planted problem with two identical tasks and an unrelated one. The common
predictor contract (singletons, NaN, save / load, clone, input errors,
docstring example) is tested with the other baselines in
``test_predictor_baselines.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit

from lightning_etap.data import MultiTaskDataModule, MultiTaskDataset, TaskSplits
from lightning_etap.groups import all_groups
from lightning_etap.models import MultiTaskMLP
from lightning_etap.predictors import (
    GradTAEPredictor,
    ProjectedGradients,
    projected_gradients,
    projection_matrix,
)
from lightning_etap.predictors.gradtae import _fit_linearised

TASKS = ("a", "b", "c")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: one intra-op thread is ~10x faster than two on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------- fixtures
def _dataset(seed=0, n_train=(9, 7, 8), n_test=(5, 6, 4), kinds=("binary", "binary", "regression"), width=(1, 1, 3)):
    """A tiny per-task-input dataset (tasks have their own examples; task c has a 3-wide target)."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for t, kind, k, ntr, nte in zip(TASKS, kinds, width, n_train, n_test):
        parts = {}
        for split, size in (("train", ntr), ("val", 2), ("test", nte)):
            x = torch.randn(size, 4, generator=g, dtype=torch.float64)
            if kind == "binary":
                y = (torch.rand(size, k, generator=g) > 0.5).double()
            else:
                y = torch.randn(size, k, generator=g, dtype=torch.float64)
            parts[split] = (x, y)
        splits[t] = TaskSplits(**parts)
    return MultiTaskDataset("tiny", TASKS, kinds, "per_task", splits)


def _model(dataset, seed=0, hidden=(5,)):
    torch.manual_seed(seed)
    widths = [dataset.target_dim(t) for t in dataset.task_names]
    return MultiTaskMLP(4, dataset.task_names, dataset.task_kinds, widths, hidden=hidden).double()


def _loop_rows(model, dataset, projection, params, splits=("train", "test")):
    """Reference rows: for each split, task, example and output j, autograd.grad of model(x_i)[t][0, j]."""
    feats, offset, target, task, held = [], [], [], [], []
    for split in splits:
        for ti, t in enumerate(dataset.task_names):
            x, y = dataset.split(t, split)
            for i in range(x.shape[0]):
                out = model(x[i : i + 1])[t][0]
                for j in range(out.shape[0]):
                    grads = torch.autograd.grad(out[j], params, retain_graph=True, allow_unused=True,
                                                materialize_grads=True)
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    feats.append((flat @ projection).detach().numpy())
                    offset.append(float(out[j].detach()))
                    target.append(float(y[i, j]))
                    task.append(ti)
                    held.append(split != "train")
    return np.array(feats), np.array(offset), np.array(target), np.array(task), np.array(held)


# ------------------------------------------------------------ per-example gradients
def test_projected_gradients_match_a_loop_of_autograd_grad():
    data = _dataset()
    model = _model(data)
    pg = projected_gradients(model, data, dim=12, seed=5)
    params = list(model.parameters())
    projection = projection_matrix(sum(p.numel() for p in params), 12, 5, dtype=torch.float64)
    feats, offset, target, task, held = _loop_rows(model, data, projection, params)
    np.testing.assert_allclose(pg.features, feats, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pg.offset, offset, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(pg.target, target)
    np.testing.assert_array_equal(pg.task, task)
    np.testing.assert_array_equal(pg.held_out, held)
    assert pg.task_names == TASKS and pg.task_kinds == data.task_kinds
    assert pg.n_parameters == projection.shape[0] and pg.dim == 12 and pg.seed == 5
    # task c has a 3-wide target: 3 rows per example
    assert (pg.task == 2).sum() == 3 * (8 + 4)


def test_parameter_subset_and_fixed_rest():
    data = _dataset()
    model = _model(data)
    pg = projected_gradients(model, data, dim=7, seed=1, parameters="encoder")
    params = list(model.encoder.parameters())
    projection = projection_matrix(sum(p.numel() for p in params), 7, 1, dtype=torch.float64)
    feats, *_ = _loop_rows(model, data, projection, params)
    np.testing.assert_allclose(pg.features, feats, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="match no parameter"):
        projected_gradients(model, data, parameters=["decoder"])


def test_data_forms_chunks_and_mode_agree():
    data = _dataset()
    model = _model(data)
    model.train()
    reference = projected_gradients(model, data, dim=6)
    assert model.training  # the training mode is restored
    tensors = {s: {t: data.split(t, s) for t in TASKS} for s in ("train", "test")}
    dm = MultiTaskDataModule(data, eval_batch_size=3)
    batches = [{"x": {t: data.split(t, "train")[0][i : i + 4] for t in TASKS},
                "y": {t: data.split(t, "train")[1][i : i + 4] for t in TASKS}} for i in range(0, 9, 4)]
    for other in (
        projected_gradients(model, tensors, dim=6),
        projected_gradients(model, {"train": batches, "test": dm.test_dataloader()}, dim=6),
        projected_gradients(model, dm, dim=6),
        projected_gradients(model, data, dim=6, chunk_size=2),
    ):
        for name in ("features", "offset", "target", "task", "held_out"):
            np.testing.assert_allclose(getattr(other, name), getattr(reference, name), rtol=1e-12, atol=1e-14)
    val = projected_gradients(model, data, dim=6, eval_split="val")
    assert (val.held_out & (val.task == 0)).sum() == 2


def test_max_examples_subsamples_rows_of_the_full_set():
    data = _dataset(n_train=(20, 20, 20))
    model = _model(data)
    full = projected_gradients(model, data, dim=6)
    sub = projected_gradients(model, data, dim=6, max_examples=5)
    assert np.bincount(sub.task[~sub.held_out]).tolist() == [5, 5, 15]
    assert np.bincount(sub.task[sub.held_out]).tolist() == [5, 5, 12]  # test sets of 5, 6, 4 examples
    full_rows = {tuple(np.round(r, 12)) for r in full.features}
    assert all(tuple(np.round(r, 12)) in full_rows for r in sub.features)


def test_projected_gradients_input_errors():
    data = _dataset()
    model = _model(data)
    with pytest.raises(ValueError, match="no split"):
        projected_gradients(model, {"train": {}}, eval_split="test")
    with pytest.raises(ValueError, match="no data for task"):
        projected_gradients(model, data, tasks=["a", "zzz"])
    bare = torch.nn.ModuleDict({"lin": torch.nn.Linear(4, 1)})
    with pytest.raises(ValueError, match="task kinds are unknown"):
        projected_gradients(bare, {s: {"a": data.split("a", s)} for s in ("train", "test")})
    wide = {s: {"a": (data.split("a", s)[0][:3], torch.zeros(3, 2, dtype=torch.float64))} for s in ("train", "test")}
    with pytest.raises(ValueError, match="width 2"):
        projected_gradients(model, wide, tasks=["a"])
    with pytest.raises(ValueError, match="max_examples"):
        projected_gradients(model, data, max_examples=0)


# ------------------------------------------------------------------ projection
def test_projection_entries_scale_and_norm_preservation():
    p, d = 3000, 200
    state = torch.random.get_rng_state()
    R = projection_matrix(p, d, seed=11, dtype=torch.float64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert R.shape == (p, d)
    assert torch.equal(R.abs(), torch.full((p, d), 1 / np.sqrt(d), dtype=torch.float64))
    plus = float((R > 0).double().mean())
    assert abs(plus - 0.5) < 5 * 0.5 / np.sqrt(p * d)  # a fair coin per entry (5 sigma)
    np.testing.assert_allclose((R * R).sum(dim=1), 1.0)  # every row has unit norm
    np.testing.assert_allclose((R * R).sum(dim=0), p / d)
    gram = (R.T @ R / (p / d)).numpy()  # columns nearly orthogonal: off-diagonal ~ N(0, 1/p)
    off = gram[~np.eye(d, dtype=bool)]
    assert abs(off.mean()) < 1e-3  # about 7 standard errors
    assert 0.8 < off.std() * np.sqrt(p) < 1.2
    # E ||R^T g||^2 = ||g||^2 over independent projections (relative sd sqrt(2/d) each)
    g = torch.randn(p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratios = [float((g @ projection_matrix(p, d, s, dtype=torch.float64)).square().sum() / g.square().sum())
              for s in range(100)]
    assert abs(np.mean(ratios) - 1) < 5 * np.sqrt(2 / d) / np.sqrt(100)
    assert 0.5 * np.sqrt(2 / d) < np.std(ratios) < 1.5 * np.sqrt(2 / d)
    assert torch.equal(projection_matrix(50, 8, 3), projection_matrix(50, 8, 3))
    assert not torch.equal(projection_matrix(50, 8, 3), projection_matrix(50, 8, 4))
    with pytest.raises(ValueError, match="dim"):
        projection_matrix(10, 0)


# ------------------------------------------------------------- Taylor estimate
def _linearised_finetune(model, data, members, projection, alpha_kappa, steps=400):
    """Fine-tune w on the network's own linearisation f(theta*) + J (R w), computed with torch.func.jvp.

    L-BFGS, then Newton steps with autograd's Hessian, on the penalised mean of the members' train losses.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    sizes = [params[n].numel() for n in names]

    def direction(w):
        flat = projection @ w
        return {n: v.reshape(params[n].shape) for n, v in zip(names, torch.split(flat, sizes))}

    def outputs(task, x, w):
        def f(p):
            return torch.func.functional_call(model, p, (x,))[task]
        base, tangent = torch.func.jvp(f, (params,), (direction(w),))
        return base + tangent

    def task_loss(task, x, y, w):
        z = outputs(task, x, w)
        if data.kind(task) == "binary":
            return torch.nn.functional.binary_cross_entropy_with_logits(z, y)
        return torch.nn.functional.mse_loss(z, y)

    w = torch.zeros(projection.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def objective(v):
        loss = sum(task_loss(t, *data.split(t, "train"), v) for t in members)
        return loss + 0.5 * alpha_kappa * v.square().sum()

    def closure():
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        return loss

    opt.step(closure)
    v = w.detach().clone()
    for _ in range(3):  # polish with Newton steps on autograd's Hessian of the same objective
        g = torch.autograd.functional.jacobian(objective, v)
        v = v - torch.linalg.solve(torch.autograd.functional.hessian(objective, v), g)
    w = v
    with torch.no_grad():
        held = {t: float(task_loss(t, *data.split(t, "test"), w)) for t in members}
        logits = {t: outputs(t, data.split(t, "test")[0], w) for t in members}
    return w.numpy(), held, logits


@pytest.mark.parametrize("baseline_group", [("a", "b"), ("a", "c"), ("c",), ("a", "b", "c")])
def test_taylor_estimate_equals_finetuning_the_linearised_network(baseline_group):
    data = _dataset(n_train=(15, 12, 10))
    model = _model(data)
    dim = 10
    pg = projected_gradients(model, data, dim=dim, seed=2)
    predictor = GradTAEPredictor(pg, alpha=0.05).fit()
    params = list(model.parameters())
    projection = projection_matrix(sum(p.numel() for p in params), dim, 2, dtype=torch.float64)
    # kappa, independently: mean over tasks of the mean squared feature entry of their training rows
    feats, _, _, task, held = _loop_rows(model, data, projection, params, splits=("train",))
    kappa = np.mean([(feats[task == t] ** 2).sum(axis=1).mean() / dim for t in range(3)])
    assert predictor.penalty_scale_ == pytest.approx(kappa, rel=1e-10)

    mask = np.array([[t in baseline_group for t in TASKS]])
    coef = predictor._group_coefs(mask)[0]
    w, held_loss, logits = _linearised_finetune(model, data, baseline_group, projection, 0.05 * kappa)
    np.testing.assert_allclose(coef, w, rtol=1e-8, atol=1e-10)
    losses = predictor.group_loss(mask)[0]
    for t in baseline_group:
        i = TASKS.index(t)
        assert losses[i] == pytest.approx(held_loss[t], rel=1e-9)
        rows = pg.held_out & (pg.task == i)
        ours = pg.offset[rows] + pg.features[rows] @ coef
        np.testing.assert_allclose(ours, logits[t].reshape(-1).numpy(), rtol=1e-8, atol=1e-10)
    if len(baseline_group) > 1:  # eq. 1 against the single-task fits
        stl = np.diag(predictor.group_loss(np.eye(3, dtype=bool)))
        gains = predictor.predict(mask)[0]
        for t in baseline_group:
            i = TASKS.index(t)
            assert gains[i] == pytest.approx((stl[i] - losses[i]) / stl[i], rel=1e-12)


@pytest.mark.parametrize("baseline", ["offset", "feature"])
def test_newton_solver_matches_scipy_minimize(baseline):
    rng = np.random.default_rng(0)
    n_rows, dim = 90, 5
    task = np.repeat([0, 1, 2], 30)
    held = np.tile(np.arange(30) >= 20, 3)
    kinds = ("binary", "regression", "binary")
    target = np.where(task == 1, rng.normal(size=n_rows), rng.integers(0, 2, n_rows))
    pg = ProjectedGradients(rng.normal(size=(n_rows, dim)), rng.normal(size=n_rows), target, task, held,
                            TASKS, kinds)
    predictor = GradTAEPredictor(pg, alpha=0.1, baseline=baseline).fit()
    for mask in ([True, True, False], [False, True, True], [True, True, True], [False, True, False]):
        members = np.flatnonzero(mask)
        rows = ~held & np.isin(task, members)
        x = pg.features[rows]
        if baseline == "feature":
            x = np.hstack([x, np.ones((rows.sum(), 1)), pg.offset[rows, None]])
        o, y, tk = pg.offset[rows], target[rows], task[rows]
        weight = 1.0 / np.bincount(tk, minlength=3)[tk]
        pen = np.r_[np.full(dim, 0.1 * predictor.penalty_scale_), np.zeros(x.shape[1] - dim)]
        binary = np.isin(tk, [0, 2])

        def objective(c, x=x, o=o, y=y, binary=binary, weight=weight, pen=pen):
            z = o + x @ c
            loss = np.where(binary, np.logaddexp(0, z) - y * z, (z - y) ** 2)
            grad_z = np.where(binary, expit(z) - y, 2 * (z - y))
            return weight @ loss + 0.5 * pen @ (c * c), x.T @ (weight * grad_z) + pen * c

        ref = minimize(objective, np.zeros(x.shape[1]), jac=True, method="BFGS", options={"gtol": 1e-11}).x
        ours = predictor._group_coefs(np.array([mask]))[0]
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_regression_closed_form_equals_newton_on_rows():
    rng = np.random.default_rng(3)
    task = np.repeat([0, 1, 2, 3], 25)
    held = np.tile(np.arange(25) >= 18, 4)
    pg = ProjectedGradients(rng.normal(size=(100, 6)), rng.normal(size=100), rng.normal(size=100), task, held,
                            ("a", "b", "c", "d"), ("regression",) * 4)
    predictor = GradTAEPredictor(pg, alpha=0.01).fit()
    masks = all_groups(4)
    closed = predictor._group_coefs(masks)
    for g, mask in enumerate(masks):
        members = np.flatnonzero(mask)
        rows = ~held & np.isin(task, members)
        weight = 1.0 / np.bincount(task[rows], minlength=4)[task[rows]]
        coef, ok = _fit_linearised(pg.features[rows], pg.offset[rows], pg.target[rows], np.zeros(rows.sum(), bool),
                                   weight, predictor._penalty, 5, 1e-14)
        assert ok
        np.testing.assert_allclose(closed[g], coef, rtol=1e-9, atol=1e-11)
        # held-out MSE from the second moments equals the direct mean over rows
        for t in members:
            r = held & (task == t)
            direct = np.mean((pg.offset[r] + pg.features[r] @ coef - pg.target[r]) ** 2)
            assert predictor.group_loss(mask[None])[0, t] == pytest.approx(direct, rel=1e-10)


# ----------------------------------------------------------- planted structure
def _planted_problem(seed=0, n_train=100, n_test=400):
    """Tasks a and b share one labelling rule, c has an orthogonal one; every task has its own examples."""
    g = torch.Generator().manual_seed(seed)
    rules = torch.linalg.qr(torch.randn(6, 2, generator=g))[0]
    splits = {}
    for t, rule in zip(TASKS, (rules[:, :1], rules[:, :1], rules[:, 1:])):
        parts = {}
        for split, size in (("train", n_train), ("val", 10), ("test", n_test)):
            x = torch.randn(size, 6, generator=g)
            logit = 3.0 * (x @ rule) + 0.5 * torch.randn(size, 1, generator=g)
            parts[split] = (x, (logit > 0).float())
        splits[t] = TaskSplits(**parts)
    return MultiTaskDataset("planted", TASKS, ("binary",) * 3, "per_task", splits)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_identical_pair_is_ranked_highest(seed):
    """A one-unit shared encoder cannot serve both rules: c conflicts with a and b, and GRAD-TAE must see it.

    Fine-tuned together, a and b pull the shared unit towards their common
    rule with twice the data; any group with c pulls it apart, so c's pairs
    lose against the single-task fits.
    """
    data = _planted_problem(seed)
    torch.manual_seed(seed)
    model = MultiTaskMLP(6, TASKS, hidden=(1,))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = {"x": {t: data.split(t, "train")[0] for t in TASKS}, "y": {t: data.split(t, "train")[1] for t in TASKS}}
    for _ in range(300):  # the all-task model theta*
        opt.zero_grad()
        sum(model.task_losses(batch).values()).backward()
        opt.step()
    pg = projected_gradients(model, data)
    predictor = GradTAEPredictor(pg).fit()
    pairs = all_groups(3, min_size=2, max_size=2)  # {a,b}, {a,c}, {b,c}
    totals = predictor.predict_total(pairs)
    ab = int(np.flatnonzero(pairs[:, 0] & pairs[:, 1])[0])
    assert np.argmax(totals) == ab
    affinity = predictor.pairwise_affinity()
    assert min(affinity[0, 1], affinity[1, 0]) > max(affinity[0, 2], affinity[1, 2])


# ------------------------------------------------------------------- interface
def _random_features(seed=0):
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(4), 20)
    held = np.tile(np.arange(20) >= 14, 4)
    target = np.where(task < 2, rng.integers(0, 2, 80), rng.normal(size=80))
    return ProjectedGradients(rng.normal(size=(80, 5)), rng.normal(size=80), target, task, held,
                              ("w", "x", "y", "z"), ("binary", "binary", "regression", "regression"), seed=0,
                              n_parameters=99)


def test_pairwise_affinity_averages_over_the_given_groups():
    predictor = GradTAEPredictor(_random_features()).fit()
    pairs = all_groups(4, min_size=2, max_size=2)
    pair_gain = predictor.predict(pairs)
    affinity = predictor.pairwise_affinity()
    for row, gain in zip(pairs, pair_gain):
        s, t = np.flatnonzero(row)
        assert affinity[s, t] == gain[t] and affinity[t, s] == gain[s]
    assert (np.diag(affinity) == 0).all()
    groups = all_groups(4, min_size=3)
    gains = predictor.predict(groups)
    averaged = predictor.pairwise_affinity(groups)
    for s in range(4):
        for t in range(4):
            if s != t:
                both = groups[:, s] & groups[:, t]
                assert averaged[s, t] == pytest.approx(gains[both, t].mean(), rel=1e-12)
    with pytest.raises(ValueError, match="pair"):
        predictor.pairwise_affinity(np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool))


def test_save_load_keeps_features_and_predictions(tmp_path):
    predictor = GradTAEPredictor(_random_features(), alpha=0.02, baseline="feature").fit()
    loaded = GradTAEPredictor.load(predictor.save(tmp_path / "gradtae.npz"))
    groups = all_groups(4)
    np.testing.assert_array_equal(loaded.predict(groups), predictor.predict(groups))
    assert loaded.get_params(deep=False).keys() == predictor.get_params(deep=False).keys()
    assert loaded.alpha == 0.02 and loaded.baseline == "feature"
    for name in ("features", "offset", "target", "task", "held_out"):
        np.testing.assert_array_equal(getattr(loaded.features, name), getattr(predictor.features, name))
    assert loaded.features.n_parameters == 99 and loaded.features.task_names == predictor.features.task_names


@pytest.mark.parametrize(
    ("option", "value"),
    [("alpha", 0.0), ("alpha", "x"), ("baseline", "none"), ("max_iter", 0), ("tol", -1.0), ("features", np.eye(3))],
)
def test_option_errors(option, value):
    params = {"features": _random_features(), option: value}
    with pytest.raises(ValueError, match=option):
        GradTAEPredictor(**params).fit()


def test_feature_validation_errors():
    good = _random_features()
    fields = {name: getattr(good, name) for name in ("features", "offset", "target", "task", "held_out")}
    meta = {"task_names": good.task_names, "task_kinds": good.task_kinds}
    cases = [
        ({"offset": good.offset[:-1]}, "offset must have shape"),
        ({"features": np.where(good.features > 2, np.nan, good.features)}, "non-finite"),
        ({"target": np.where(good.task == 0, 0.5, good.target)}, "0/1"),
        ({"held_out": np.where(good.task == 1, False, good.held_out)}, "no held-out rows"),
        ({"task": np.minimum(good.task, 2)}, "no training rows"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            ProjectedGradients(**{**fields, **change}, **meta)
    with pytest.raises(ValueError, match="task_kinds"):
        ProjectedGradients(**fields, task_names=good.task_names, task_kinds=("binary",) * 3)

