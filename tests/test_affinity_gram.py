"""The activation-based product engine against the exact autograd reference.

The reference is :func:`lightning_etap.affinity.scores.step_products` with
:class:`~lightning_etap.affinity.scores.ExactTaskGradients` (one batched
backward per parameter block, explicit ``n x P`` gradients): every path of
:class:`~lightning_etap.affinity.gram.GramEngine` (separable, dense,
Gram-matrix shortcut, explicit chunks, autograd fallback for non-linear
layers, Adam) must give the same ``Z`` to float32 accuracy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_etap.affinity.gram import GramEngine, linear_layers, shared_root
from lightning_etap.affinity.scores import step_products, task_update_rules

torch.set_default_dtype(torch.float32)


class PerTask(nn.Module):
    """Per-task inputs encoded in one pass over their concatenation (like MultiTaskMLP)."""

    def __init__(self, d=12, hidden=(16, 8), n=4, bn=False):
        super().__init__()
        layers, w = [], d
        for h in hidden:
            layers += [nn.Linear(w, h)] + ([nn.BatchNorm1d(h)] if bn else []) + [nn.ReLU()]
            w = h
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(w, 1) for _ in range(n)])

    def losses(self, xs, ys):
        sizes = [x.shape[0] for x in xs]
        h = self.encoder(torch.cat(xs))
        return torch.stack([nn.functional.binary_cross_entropy_with_logits(self.heads[i](hi), ys[i])
                            for i, hi in enumerate(torch.split(h, sizes))])


class Shared(nn.Module):
    def __init__(self, d=12, hidden=(16, 8), n=4, seq=False):
        super().__init__()
        layers, w = [], d
        for h in hidden:
            layers += [nn.Linear(w, h), nn.Tanh()]
            w = h
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(w, 1) for _ in range(n)])
        self.seq = seq

    def losses(self, x, ys):
        h = self.encoder(x)
        if self.seq:
            h = h.mean(1)
        return torch.stack([((self.heads[i](h) - ys[i]) ** 2).mean() for i in range(len(self.heads))])


class Reused(nn.Module):
    """One shared layer applied twice, a convolution (autograd fallback) and a frozen layer."""

    def __init__(self, n=3):
        super().__init__()
        self.encoder = nn.ModuleDict({
            "conv": nn.Conv1d(2, 3, 3, padding=1),
            "lin": nn.Linear(3 * 6, 10),
            "again": nn.Linear(10, 10),
            "frozen": nn.Linear(10, 10),
        })
        self.encoder["frozen"].requires_grad_(False)
        self.heads = nn.ModuleList([nn.Linear(10, 1) for _ in range(n)])

    def losses(self, x, ys):
        e = self.encoder
        h = torch.relu(e["lin"](e["conv"](x).flatten(1)))
        h = torch.relu(e["again"](h))
        h = torch.relu(e["again"](h))  # the same weights, a second time
        h = e["frozen"](h)
        return torch.stack([((self.heads[i](h) - ys[i]) ** 2).mean() for i in range(len(self.heads))])


def shared_params(model):
    return [p for p in model.encoder.parameters() if p.requires_grad]


def reference(model, losses_fn, params, rules):
    return step_products(losses_fn(), params, rules)


def engine_products(model, losses_fn, params, rules, **kw):
    engine = GramEngine(model, params, root=model.encoder, **kw)
    engine.start_step()
    losses = losses_fn()
    Z = engine.products(losses, rules)
    path = engine.last_path
    assert engine.excluded == {}  # the first-step check keeps every layer of these models on the fast path
    engine.close()
    return Z, path


def warm_optimizer(opt_fn, model, losses_fn, steps=2):
    """An optimizer with state (momentum buffers / Adam moments) after a few real steps."""
    opt = opt_fn(model)
    for _ in range(steps):
        opt.zero_grad()
        losses_fn().sum().backward()
        opt.step()
    opt.zero_grad()
    return opt


def warmed_rules(opt_name, model, losses_fn, update="optimizer"):
    """``model``'s shared parameters and the per-task update rules of an ``opt_name`` optimizer warmed on
    ``losses_fn`` (:func:`warm_optimizer`)."""
    opt = warm_optimizer(OPTIMIZERS[opt_name], model, losses_fn)
    params = shared_params(model)
    return params, task_update_rules(opt, params, update)


def per_task_data(n=4, d=12, rows=(5, 7, 3, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(r, d, generator=g) for r in rows[:n]]
    ys = [torch.randint(0, 2, (r, 1), generator=g).float() for r in rows[:n]]
    return xs, ys


def shared_input_case(model, d, n, seed):
    """Shared inputs (9 rows, ``d`` features, ``n`` tasks) for ``model``: its losses as a function, its shared
    parameters and plain-SGD update rules."""
    g = torch.Generator().manual_seed(seed)
    x, ys = torch.randn(9, d, generator=g), [torch.randn(9, 1, generator=g) for _ in range(n)]
    params = shared_params(model)
    rules = task_update_rules(torch.optim.SGD(model.parameters(), lr=0.1), params, "gradient")
    return (lambda: model.losses(x, ys)), params, rules


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
    "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov_groups": lambda m: torch.optim.SGD(
        [{"params": [p for n_, p in m.named_parameters() if n_.endswith("bias")], "lr": 0.2},
         {"params": [p for n_, p in m.named_parameters() if not n_.endswith("bias")]}],
        lr=0.05, momentum=0.8, nesterov=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw_amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("update", ["gradient", "optimizer"])
def test_separable_per_task_rows_match_autograd(opt_name, update):
    torch.manual_seed(0)
    model = PerTask()
    xs, ys = per_task_data()
    fn = lambda: model.losses(xs, ys)  # noqa: E731
    params, rules = warmed_rules(opt_name, model, fn, update)
    Z, path = engine_products(model, fn, params, rules)
    assert path == "separable"
    torch.testing.assert_close(Z, reference(model, fn, params, rules), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("trick", [True, False])
def test_dense_shared_inputs_match_autograd(opt_name, trick):
    torch.manual_seed(1)
    # wide layers and few rows: the Gram-matrix shortcut is the cheaper one for the linear rule
    model = Shared(d=40, hidden=(64, 48), n=5)
    g = torch.Generator().manual_seed(2)
    x, ys = torch.randn(6, 40, generator=g), [torch.randn(6, 1, generator=g) for _ in range(5)]
    fn = lambda: model.losses(x, ys)  # noqa: E731
    params, rules = warmed_rules(opt_name, model, fn)
    Z, path = engine_products(model, fn, params, rules, use_gram_trick=trick)
    assert path == "dense"
    torch.testing.assert_close(Z, reference(model, fn, params, rules), rtol=2e-5, atol=1e-9)


def test_dense_path_after_the_first_step_matches_autograd():
    # the first step finds the rows shared and later steps skip the representation gradients: same numbers
    torch.manual_seed(3)
    model = Shared(d=20, hidden=(16, 12), n=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = GramEngine(model, shared_params(model), root=model.encoder)
    assert train_and_check(model, opt, engine, rows=9, d=20, n=4, seed=4) == ["dense"] * 3
    assert engine._rows_shared


def train_and_check(model, opt, engine, rows, d, n, seed, steps=3):
    """A few SGD steps of ``model`` on shared random inputs; the engine's products checked against autograd
    at every step. Returns the engine's path per step."""
    g = torch.Generator().manual_seed(seed)
    params = engine.params
    paths = []
    for _ in range(steps):
        x, ys = torch.randn(rows, d, generator=g), [torch.randn(rows, 1, generator=g) for _t in range(n)]
        rules = task_update_rules(opt, params, "optimizer")
        engine.start_step()
        losses = model.losses(x, ys)
        Z = engine.products(losses, rules)
        paths.append(engine.last_path)
        torch.testing.assert_close(Z, step_products(model.losses(x, ys), params, rules), rtol=2e-5, atol=1e-9)
        assert engine.excluded == {}  # no layer of these models leaves the fast path
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    engine.close()
    return paths


def test_sequence_inputs_small_chunks_and_batchnorm_fall_back_to_dense():
    torch.manual_seed(3)
    model = Shared(d=6, hidden=(10, 8), n=3, seq=True)  # Linear on (B, T, d)
    g = torch.Generator().manual_seed(4)
    x, ys = torch.randn(4, 5, 6, generator=g), [torch.randn(4, 1, generator=g) for _ in range(3)]
    fn = lambda: model.losses(x, ys)  # noqa: E731
    params, rules = warmed_rules("momentum", model, fn)
    Z, _ = engine_products(model, fn, params, rules, max_chunk_bytes=64, use_gram_trick=False)
    torch.testing.assert_close(Z, reference(model, fn, params, rules), rtol=2e-5, atol=1e-9)

    bn = PerTask(bn=True)
    xs, ys = per_task_data()
    fn = lambda: bn.losses(xs, ys)  # noqa: E731
    params, rules = warmed_rules("sgd", bn, fn, "gradient")
    Z, path = engine_products(bn, fn, params, rules)
    assert path == "dense"  # batch statistics mix the tasks' rows
    torch.testing.assert_close(Z, reference(bn, fn, params, rules), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_reused_layer_convolution_and_frozen_layer(opt_name):
    torch.manual_seed(5)
    model = Reused()
    g = torch.Generator().manual_seed(6)
    x, ys = torch.randn(7, 2, 6, generator=g), [torch.randn(7, 1, generator=g) for _ in range(3)]
    fn = lambda: model.losses(x, ys)  # noqa: E731
    params, rules = warmed_rules(opt_name, model, fn)
    assert len(linear_layers(model, params)) == 2  # lin and again; frozen is not shared-trainable
    Z, _ = engine_products(model, fn, params, rules)
    torch.testing.assert_close(Z, reference(model, fn, params, rules), rtol=2e-5, atol=1e-9)


def test_last_layer_and_representation_scopes_by_hand():
    torch.manual_seed(7)
    model = PerTask(hidden=(16, 8), n=3)
    xs, ys = per_task_data(n=3)
    fn = lambda: model.losses(xs, ys)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = shared_params(model)
    rules = task_update_rules(opt, params, "gradient")
    last = model.encoder[2]
    losses = fn()
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], [last.weight, last.bias],
                                                                          retain_graph=True)])
                     for i in range(3)])
    Z, _ = engine_products(model, fn, params, rules, scope="last_layer")
    torch.testing.assert_close(Z, 0.1 * (G @ G.T).double(), rtol=2e-5, atol=1e-9)

    h_store = {}
    model.encoder.register_forward_hook(lambda m, a, out: h_store.setdefault("h", out))
    losses = fn()
    D = torch.stack([torch.autograd.grad(losses[i], h_store["h"], retain_graph=True)[0].flatten()
                     for i in range(3)])
    Z, path = engine_products(model, fn, params, rules, scope="representation")
    assert path == "representation"
    torch.testing.assert_close(Z, 0.1 * (D @ D.T).double(), rtol=2e-5, atol=1e-9)


def test_engine_leaves_training_untouched_and_grad_scale_is_undone():
    torch.manual_seed(8)
    model = PerTask()
    twin = copy.deepcopy(model)
    xs, ys = per_task_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = shared_params(model)
    rules = task_update_rules(opt, params, "optimizer")
    engine = GramEngine(model, params, root=model.encoder)
    engine.start_step()
    losses = model.losses(xs, ys)
    Z1 = engine.products(losses, rules)
    engine.start_step()
    losses = model.losses(xs, ys)
    Z2 = engine.products(losses, rules, grad_scale=1024.0)
    losses.sum().backward()
    twin.losses(xs, ys).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)  # .grad only from the step's own backward
    torch.testing.assert_close(Z1, Z2, rtol=1e-5, atol=1e-12)
    engine.close()
    assert not any(m._forward_hooks for m in model.modules())


def test_root_discovery_and_errors():
    model = Reused()
    params = shared_params(model)
    assert shared_root(model, params) is model.encoder
    assert shared_root(model, params + [model.heads[0].weight]) is None
    with pytest.raises(ValueError, match="scope"):
        GramEngine(model, params, scope="nope")
    with pytest.raises(ValueError, match="representation"):
        GramEngine(model, params + [model.heads[0].weight], scope="representation")


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_small_dense_model_delegates_to_one_autograd_backward_with_the_same_numbers(opt_name):
    # many rows, narrow layers: the explicit path wins in every layer and the shared parameters are one
    # autograd block, so from the second step on the engine takes one vectorised backward to the parameters
    torch.manual_seed(5)
    model = Shared(d=12, hidden=(8, 6), n=3)
    opt = OPTIMIZERS[opt_name](model)
    engine = GramEngine(model, shared_params(model), root=model.encoder)
    assert train_and_check(model, opt, engine, rows=64, d=12, n=3, seed=6) == ["dense", "autograd", "autograd"]


def test_wide_dense_layers_keep_the_activation_path():
    # few rows and wide layers take the example-Gram shortcut: no delegation
    torch.manual_seed(1)
    model = Shared(d=40, hidden=(64, 48), n=5)
    g = torch.Generator().manual_seed(2)
    opt = OPTIMIZERS["momentum"](model)
    params = shared_params(model)
    engine = GramEngine(model, params, root=model.encoder)
    for _ in range(2):
        x, ys = torch.randn(6, 40, generator=g), [torch.randn(6, 1, generator=g) for _t in range(5)]
        engine.start_step()
        engine.products(model.losses(x, ys), task_update_rules(opt, params, "optimizer"))
        assert engine.last_path == "dense"
    engine.close()


def test_root_gradients_per_task_calls_equal_the_vectorised_call(monkeypatch):
    import lightning_etap.affinity.gram as gram

    torch.manual_seed(7)
    model = Shared(d=10, hidden=(12, 9), n=4)
    g = torch.Generator().manual_seed(8)
    x, ys = torch.randn(5, 10, generator=g), [torch.randn(5, 1, generator=g) for _ in range(4)]
    h = model.encoder(x)
    parts = [((head(h) - y) ** 2).mean() for head, y in zip(model.heads, ys, strict=True)]
    parts[2] = parts[2].detach()  # a task that reaches nothing: zeros on both paths
    seeds = torch.eye(4) * 3.0
    small = gram.root_gradients(parts, [h], seeds)  # below the threshold: one vectorised call
    monkeypatch.setattr(gram, "BATCHED_ROOT_WORK", 0)
    large = gram.root_gradients(parts, [h], seeds)  # one call per task
    torch.testing.assert_close(small[0], large[0])
    by_hand = torch.stack([torch.autograd.grad(p * 3.0, h, retain_graph=True)[0] if p.requires_grad
                           else torch.zeros_like(h) for p in parts])
    torch.testing.assert_close(large[0], by_hand)


@pytest.mark.parametrize("layout", ["separable", "dense"])
def test_engine_with_per_task_root_gradients_matches_autograd(monkeypatch, layout):
    import lightning_etap.affinity.gram as gram

    monkeypatch.setattr(gram, "BATCHED_ROOT_WORK", 0)  # as on a wide representation
    torch.manual_seed(9)
    if layout == "separable":
        model = PerTask()
        xs, ys = per_task_data()
        fn = lambda: model.losses(xs, ys)  # noqa: E731
    else:
        model = Shared(d=12, hidden=(8, 6), n=3)
        g = torch.Generator().manual_seed(10)
        x, ys = torch.randn(7, 12, generator=g), [torch.randn(7, 1, generator=g) for _ in range(3)]
        fn = lambda: model.losses(x, ys)  # noqa: E731
    params, rules = warmed_rules("momentum", model, fn)
    engine = GramEngine(model, params, root=model.encoder)
    engine.start_step()
    losses = fn()
    Z = engine.products(losses, rules, parts=[losses[i] for i in range(losses.shape[0])])
    assert engine.last_path == layout
    engine.close()
    torch.testing.assert_close(Z, reference(model, fn, params, rules), rtol=2e-5, atol=1e-9)


class Routed(nn.Module):
    """Per-task rows in any order: ``route[r]`` is the task that reads row ``r`` of the encoding (-1: none)."""

    def __init__(self, route, d=12, hidden=(16, 8), n=4):
        super().__init__()
        layers, w = [], d
        for h in hidden:
            layers += [nn.Linear(w, h), nn.ReLU()]
            w = h
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(w, 1) for _ in range(n)])
        self.route = torch.as_tensor(route)

    def losses(self, x, y):
        h = self.encoder(x)
        out = []
        for i, head in enumerate(self.heads):
            rows = torch.nonzero(self.route == i).flatten()
            out.append(nn.functional.binary_cross_entropy_with_logits(head(h[rows]), y[rows]))
        return torch.stack(out)


@pytest.mark.parametrize("route, how", [
    ([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5, "view"),  # Chemical's layout: the blocks are views
    ([2, 0, 1, 3, 0, 2, -1, 1, 3, 0, 2, 1, -1, 3], "padded"),  # interleaved rows and rows no head reads
    ([0] * 30 + [1, 2, 3], "per task"),  # one task holds most rows: one product per task, no padding
])
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_separable_rows_in_any_layout_match_autograd(route, how, opt_name):
    from lightning_etap.affinity.gram import _TaskBlocks

    torch.manual_seed(11)
    model = Routed(route)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(len(route), 12, generator=g)
    y = torch.randint(0, 2, (len(route), 1), generator=g).float()
    fn = lambda: model.losses(x, y)  # noqa: E731
    params, rules = warmed_rules(opt_name, model, fn)
    Z, path = engine_products(model, fn, params, rules, max_chunk_bytes=600)  # several chunks of rows of W
    assert path == "separable"
    torch.testing.assert_close(Z, reference(model, fn, params, rules), rtol=2e-5, atol=1e-9)

    blocks = _TaskBlocks.of(torch.as_tensor(route), 4)
    assert (blocks.index is None, blocks.batched) == {"view": (True, True), "padded": (False, True),
                                                      "per task": (False, False)}[how]
    t = torch.arange(len(route) * 2.0).reshape(len(route), 2)
    for i, rows in enumerate(blocks.rows_of(t)):  # each task's rows, in their order
        torch.testing.assert_close(rows, t[torch.as_tensor(route) == i])
    if blocks.batched:
        split = blocks.split(t)
        for i in range(4):
            mine = t[torch.as_tensor(route) == i]
            torch.testing.assert_close(split[i, :len(mine)], mine)
            assert not split[i, len(mine):].any()  # zero padding


class Tied(nn.Module):
    """A shared layer whose weight also gets gradient outside its own forward call."""

    def __init__(self, how, n=3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(n)])
        self.how = how
        if how == "tied_module":  # a head module holding the encoder's own weight
            self.tied = nn.Linear(8, 8)
            self.tied.weight = self.encoder[2].weight

    def losses(self, x, ys):
        h = self.encoder(x)
        w = self.encoder[2].weight
        out = []
        for i, head in enumerate(self.heads):
            y = head(h)
            if self.how == "functional":  # the weight used directly, outside the layer
                y = y + nn.functional.linear(h, w)[:, i:i + 1]
            elif self.how == "tied_module":
                y = y + self.tied(h)[:, i:i + 1]
            loss = ((y - ys[i]) ** 2).mean()
            if self.how == "penalty" and i == 0:  # a penalty on the shared weight in one task's loss
                loss = loss + 0.05 * w.square().sum()
            out.append(loss)
        return torch.stack(out)


@pytest.mark.parametrize("how", ["functional", "penalty", "tied_module", "plain"])
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_weight_used_outside_its_layer_goes_to_autograd(how, opt_name, recwarn):
    torch.manual_seed(11)
    model = Tied(how)
    g = torch.Generator().manual_seed(12)
    x, ys = torch.randn(9, 6, generator=g), [torch.randn(9, 1, generator=g) for _ in range(3)]
    fn = lambda: model.losses(x, ys)  # noqa: E731
    params, rules = warmed_rules(opt_name, model, fn)
    want = reference(model, fn, params, rules)
    engine = GramEngine(model, params, root=model.encoder)
    # a weight tied to another module is left to autograd from the start; the others are caught at the first step
    assert len(engine.layers) == (3 if how == "tied_module" else 2)
    for _ in range(2):  # the check runs once; the second step keeps its verdict
        engine.start_step()
        torch.testing.assert_close(engine.products(fn(), rules), want, rtol=2e-5, atol=1e-9)
    messages = [str(w.message) for w in recwarn if "recorded forward calls" in str(w.message)]
    if how in ("functional", "penalty"):
        assert len(messages) == 1 and "'encoder.2'" in messages[0] and list(engine.excluded) == [1]
        assert "modified in place" not in messages[0]
    elif how == "tied_module":  # both owners of the tied weight, from the start and without a warning
        assert messages == [] and set(engine.excluded) == {1, 2}
    else:  # nothing to warn about: a plain model keeps the fast path for every layer
        assert messages == [] and engine.excluded == {}
    engine.close()


def test_deep_copy_of_the_shared_module_mid_step():
    torch.manual_seed(13)
    model = Shared()
    g = torch.Generator().manual_seed(14)
    x, ys = torch.randn(9, 12, generator=g), [torch.randn(9, 1, generator=g) for _ in range(4)]
    params = shared_params(model)
    rules = task_update_rules(torch.optim.SGD(model.parameters(), lr=0.1), params, "gradient")
    engine = GramEngine(model, params, root=model.encoder)
    engine.start_step()
    losses = model.losses(x, ys)
    teacher = copy.deepcopy(model.encoder)  # an EMA / teacher copy made inside the step: must not fail
    with torch.enable_grad():
        teacher(x).sum()  # the copy's forward is not recorded as the student's
    assert len(engine.tap._record.linear) == 2 and len(engine.tap._record.roots) == 1
    torch.testing.assert_close(engine.products(losses, rules), reference(model, lambda: model.losses(x, ys),
                                                                          params, rules), rtol=2e-5, atol=1e-9)
    engine.close()


class Checkpointed(nn.Module):
    """The second shared layer run inside activation checkpointing (non-reentrant: autograd.grad works)."""

    def __init__(self, n=3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(n)])

    def losses(self, x, ys):
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.encoder[0](input=x))  # called with a keyword argument
        h = checkpoint(lambda z: torch.tanh(self.encoder[2](z)), h, use_reentrant=False)
        return torch.stack([((head(h) - y) ** 2).mean() for head, y in zip(self.heads, ys)])


def test_layers_called_by_keyword_and_inside_activation_checkpointing(recwarn):
    torch.manual_seed(15)
    model = Checkpointed()
    fn, params, rules = shared_input_case(model, 6, 3, 16)
    engine = GramEngine(model, params, root=model.encoder)
    engine.start_step()
    torch.testing.assert_close(engine.products(fn(), rules), reference(model, fn, params, rules), rtol=2e-5, atol=1e-9)
    assert engine.excluded == {} and not [w for w in recwarn if "recorded forward calls" in str(w.message)]
    assert engine.last_path == "dense"  # both layers on the fast path
    engine.close()


def test_a_layer_whose_calls_all_went_unrecorded_moves_to_autograd(recwarn):
    torch.manual_seed(17)
    model = Shared(hidden=(8, 8), n=3)
    fn, params, rules = shared_input_case(model, 12, 3, 18)
    engine = GramEngine(model, params, root=model.encoder)
    engine.start_step()
    losses = fn()
    engine.tap._record.linear = [c for c in engine.tap._record.linear if c.layer != 0]  # as if never recorded
    torch.testing.assert_close(engine.products(losses, rules), reference(model, fn, params, rules), rtol=2e-5,
                               atol=1e-9)
    assert list(engine.excluded) == [0] and [w for w in recwarn if "'encoder.0'" in str(w.message)]
    engine.close()


def test_last_layer_scope_with_a_tied_last_layer_measures_that_layer():
    torch.manual_seed(19)
    model = Tied("tied_module")
    model.tied = nn.Linear(8, 8)  # tie the LAST encoder layer's weight to a module called after it
    model.tied.weight = model.encoder[2].weight
    model.how = "plain"  # the tied module is never called: the last call is encoder.2's own
    fn, params, rules = shared_input_case(model, 6, 3, 20)
    last = [k for k, p in enumerate(params) if p is model.encoder[2].weight or p is model.encoder[2].bias]
    want = step_products(fn(), [params[k] for k in last], [rules[k] for k in last])
    engine = GramEngine(model, params, root=model.encoder, scope="last_layer")
    engine.start_step()
    torch.testing.assert_close(engine.products(fn(), rules), want, rtol=2e-5, atol=1e-9)
    engine.close()


def test_a_non_finite_first_check_is_retried_at_the_next_step(recwarn):
    torch.manual_seed(21)
    model = Tied("functional")
    fn, params, rules = shared_input_case(model, 6, 3, 22)
    engine = GramEngine(model, params, root=model.encoder)
    engine._single_block = False  # keep this tiny model off the one-backward shortcut, which needs no check
    engine.start_step()
    engine.products(fn(), rules, grad_scale=1e39)  # overflows in float32, as fp16's first scaled steps do
    assert engine.excluded == {} and not engine._verified
    engine.start_step()
    torch.testing.assert_close(engine.products(fn(), rules), reference(model, fn, params, rules), rtol=2e-5,
                               atol=1e-9)
    assert list(engine.excluded) == [1] and engine._verified
    engine.close()


def test_an_in_place_op_on_a_layer_output_is_named_in_the_warning(recwarn):
    torch.manual_seed(23)
    model = Shared(hidden=(8, 8), n=3)
    model.encoder[1] = nn.ReLU(inplace=True)  # rewrites the first layer's recorded output
    fn, params, rules = shared_input_case(model, 12, 3, 24)
    engine = GramEngine(model, params, root=model.encoder)
    engine.start_step()
    torch.testing.assert_close(engine.products(fn(), rules), reference(model, fn, params, rules), rtol=2e-5,
                               atol=1e-9)
    messages = [str(w.message) for w in recwarn if "recorded forward calls" in str(w.message)]
    assert 0 in engine.excluded and len(messages) == 1 and "nn.ReLU(inplace=True)" in messages[0]
    engine.close()


class Attention(nn.Module):
    """A transformer encoder as the shared module: its attention's out_proj is a Linear it never calls."""

    def __init__(self, n=3):
        super().__init__()
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(n)])

    def losses(self, x, ys):
        h = self.encoder(x).mean(1)
        return torch.stack([((head(h) - y) ** 2).mean() for head, y in zip(self.heads, ys, strict=True)])


def test_attention_out_proj_goes_to_autograd_without_a_warning(recwarn):
    torch.manual_seed(17)
    model = Attention()
    g = torch.Generator().manual_seed(18)
    x, ys = torch.randn(5, 4, 8, generator=g), [torch.randn(5, 1, generator=g) for _ in range(3)]
    fn = lambda: model.losses(x, ys)  # noqa: E731
    params, rules = warmed_rules("adam", model, fn)
    want = reference(model, fn, params, rules)
    engine = GramEngine(model, params, root=model.encoder)
    names = {id(m): name for name, m in model.named_modules()}
    assert sorted(names[id(lay.module)] for lay in engine.layers) == ["encoder.layers.0.linear1",
                                                                      "encoder.layers.0.linear2"]
    for _ in range(2):
        engine.start_step()
        torch.testing.assert_close(engine.products(fn(), rules), want, rtol=2e-5, atol=1e-9)
    assert engine.excluded == {}
    assert not [w for w in recwarn if "recorded forward calls" in str(w.message)]
    engine.close()
