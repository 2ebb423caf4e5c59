"""The reference model, data module and training helper against independent references."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_etap.data.base import MultiTaskDataset, TaskSplits
from lightning_etap.data.datamodule import MultiTaskDataModule, epoch_permutation, oversample_indices
from lightning_etap.data.digits import load_digits
from lightning_etap.models.mtl_mlp import MultiTaskMLP, _lr_factor
from lightning_etap.training import (
    PRESETS,
    TrainConfig,
    build_model,
    get_preset,
    quiet_lightning,
    relative_gain,
    train_group,
)

FAST = TrainConfig(hidden=(16,), lr=0.05, momentum=0.9, batch_size=32, max_epochs=4, patience=2)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def per_task_toy(sizes=(40, 25, 12), d=5, seed=0) -> MultiTaskDataset:
    """Small per-task binary dataset with unequal task sizes."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    names = [f"t{i}" for i in range(len(sizes))]
    for name, n in zip(names, sizes):
        parts = []
        for m in (n, 7, 9):
            x = torch.randn(m, d, generator=g)
            y = (x[:, :1] + 0.3 * torch.randn(m, 1, generator=g) > 0).float()
            y[0, 0], y[1, 0] = 0.0, 1.0  # both classes present
            parts.append((x, y))
        splits[name] = TaskSplits(*parts)
    return MultiTaskDataset("toy", tuple(names), ("binary",) * len(names), "per_task", splits)


def _fit(model, dm, **kw):
    args = dict(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0)
    args.update(kw)
    with quiet_lightning():
        trainer = L.Trainer(**args)
        trainer.fit(model, datamodule=dm)
    return trainer


# ------------------------------------------------------------------ gain
def test_relative_gain_by_hand():
    assert relative_gain(0.5, 0.4) == pytest.approx(0.2)
    assert relative_gain(2.0, 3.0) == pytest.approx(-0.5)
    out = relative_gain(np.array([1.0, 4.0]), np.array([0.5, 5.0]))
    np.testing.assert_allclose(out, [0.5, -0.25])
    assert relative_gain(torch.tensor(0.25), torch.tensor(0.2)) == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_relative_gain_rejects_bad_stl_loss(bad):
    with pytest.raises(ValueError, match="single-task loss"):
        relative_gain(bad, 0.1)


# ------------------------------------------------------------------ lr schedule
def test_lr_schedule_matches_released_loop():
    """Simulate the released code's loop: from epoch 101, halve when (epoch + 1) % 75 == 0."""
    lr, expected = 1.0, []
    for epoch in range(400):
        if epoch > 100 and (epoch + 1) % 75 == 0:
            lr /= 2
        expected.append(lr)
    got = [_lr_factor(e, 100, 75, 0.5) for e in range(400)]
    assert got == expected
    assert got[148] == 1.0 and got[149] == 0.5 and got[224] == 0.25


def test_scheduler_applies_the_schedule_to_the_optimizer():
    model = MultiTaskMLP(3, ["a"], hidden=(2,), lr=0.1, lr_decay_start=1, lr_decay_every=2)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * _lr_factor(e, 1, 2, 0.5) for e in range(6)])


# ------------------------------------------------------------------ data module
def test_oversampling_grows_to_largest_and_balances_classes():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([[0.0]] * 8 + [[1.0]] * 2)
    idx = oversample_indices(y, 50, binary=True, generator=g)
    assert idx.numel() == 50
    assert torch.equal(idx[:10], torch.arange(10))  # every original row kept once
    extra = y[idx[10:], 0]
    assert int(extra.sum()) == 20 and int((extra == 0).sum()) == 20  # half of the deficit per class


def test_per_task_group_batches_and_oversampling():
    ds = per_task_toy()
    dm = MultiTaskDataModule(ds, batch_size=8, seed=3)
    dm.setup("fit")
    rows = dm.train_rows()
    assert len(rows) == 40
    for t in ds.task_names:
        assert rows.x[t].shape == (40, 5) and rows.y[t].shape == (40, 1)
        # the original rows are all there
        x0 = ds.split(t, "train")[0]
        assert torch.equal(rows.x[t][: x0.shape[0]], x0)
    batches = list(dm.train_dataloader())
    assert len(batches) == math.ceil(40 / 8) == dm.steps_per_epoch
    assert all(set(b["x"]) == set(ds.task_names) for b in batches)
    assert batches[0]["x"]["t0"].shape == (8, 5)


def test_batch_order_depends_only_on_seed_and_epoch():
    ds = per_task_toy()
    dm = MultiTaskDataModule(ds, batch_size=8, seed=5)
    loader = dm.train_dataloader()
    torch.manual_seed(0)
    first = [b["x"]["t0"] for b in loader]
    second = [b["x"]["t0"] for b in loader]  # next epoch: a different order
    torch.manual_seed(99)  # the global RNG plays no part
    loader.sampler.set_epoch(0)
    again = [b["x"]["t0"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], second[0])
    rows = dm.train_rows().x["t0"]
    expected = rows[epoch_permutation(len(rows), 5, 0)[:8]]
    assert torch.equal(first[0], expected)


def test_one_task_group_is_not_oversampled():
    ds = per_task_toy()
    dm = MultiTaskDataModule(ds, ["t2"], batch_size=4)
    assert len(dm.train_rows()) == 12
    assert torch.equal(dm.train_rows().x["t2"], ds.split("t2", "train")[0])


def test_eval_batches_cover_every_example_once():
    ds = per_task_toy(sizes=(5, 5, 5))
    dm = MultiTaskDataModule(ds, eval_batch_size=4)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        seen = {t: [] for t in ds.task_names}
        for batch in loader:
            for t, x in batch["x"].items():
                assert batch["y"][t].shape[0] == x.shape[0]
                seen[t].append(x)
        for t in ds.task_names:
            assert torch.equal(torch.cat(seen[t]), ds.split(t, split)[0])


def test_shared_layout_batches(digits):
    dm = MultiTaskDataModule(digits, ["digit_1", "digit_7"], batch_size=50)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (50, 16)
    assert set(batch["y"]) == {"digit_1", "digit_7"}
    assert torch.all((batch["y"]["digit_1"] == 0) | (batch["y"]["digit_1"] == 1))


def test_datamodule_rejects_bad_groups(digits):
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskDataModule(digits, ["digit_1", "nope"])
    with pytest.raises(ValueError, match="duplicate"):
        MultiTaskDataModule(digits, ["digit_1", "digit_1"])
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskDataModule(digits, [])
    with pytest.raises(ValueError, match="batch sizes"):
        MultiTaskDataModule(digits, batch_size=0)


# ------------------------------------------------------------------ model
def test_model_contract_and_losses_against_hand_computation():
    torch.manual_seed(0)
    model = MultiTaskMLP(4, ["a", "b"], ["binary", "regression"], target_dims=[1, 3], hidden=(5,))
    x = torch.randn(6, 4)
    ya, yb = torch.randint(0, 2, (6, 1)).float(), torch.randn(6, 3)
    out = model.training_step({"x": x, "y": {"a": ya, "b": yb}}, 0)
    assert set(out) == {"loss", "task_losses"}
    h = torch.relu(model.encoder[0](x))
    pa = torch.sigmoid(model.heads[0](h))
    bce = -(ya * torch.log(pa) + (1 - ya) * torch.log(1 - pa)).mean()
    mse = ((model.heads[1](h) - yb) ** 2).mean()
    assert out["task_losses"]["a"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert out["task_losses"]["b"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(bce.item() + mse.item(), rel=1e-5)
    assert out["task_losses"]["a"].requires_grad  # still in the graph
    assert [p.data_ptr() for p in model.shared_parameters()] == [p.data_ptr() for p in model.encoder.parameters()]


def test_per_task_inputs_are_encoded_like_separate_passes():
    torch.manual_seed(1)
    model = MultiTaskMLP(3, ["a", "b"], hidden=(4, 2))
    xa, xb = torch.randn(5, 3), torch.randn(2, 3)
    out = model({"a": xa, "b": xb})
    torch.testing.assert_close(out["a"], model.heads[0](model.encoder(xa)))
    torch.testing.assert_close(out["b"], model.heads[1](model.encoder(xb)))


def test_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unique"):
        MultiTaskMLP(3, ["a", "a"])
    with pytest.raises(ValueError, match="optimizer"):
        MultiTaskMLP(3, ["a"], optimizer="lbfgs")
    with pytest.raises(ValueError, match="kinds"):
        MultiTaskMLP(3, ["a"], ["classification"])


def test_two_epochs_equal_a_plain_pytorch_loop():
    """Lightning training of the reference module == a hand-written SGD-momentum loop on the same batches."""
    ds = per_task_toy()
    dm = MultiTaskDataModule(ds, batch_size=8, seed=0)
    torch.manual_seed(0)
    model = MultiTaskMLP(5, ds.task_names, hidden=(6, 4), lr=0.1, momentum=0.9)
    params0 = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch)

    _fit(model, dm, max_epochs=2, callbacks=[Record()])
    assert len(seen) == 2 * dm.steps_per_epoch

    ref = MultiTaskMLP(5, ds.task_names, hidden=(6, 4))
    ref.load_state_dict(params0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for b in seen:
        opt.zero_grad()
        logits = {t: ref.heads[i](ref.encoder(b["x"][t])) for i, t in enumerate(ds.task_names)}
        sum(F.binary_cross_entropy_with_logits(logits[t], b["y"][t]) for t in ds.task_names).backward()
        opt.step()
    for k, v in ref.state_dict().items():
        if "metrics" not in k:
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # the two epochs were drawn in different orders
    assert not torch.equal(seen[0]["x"]["t0"], seen[dm.steps_per_epoch]["x"]["t0"])


# ------------------------------------------------------------------ training helper
def test_training_lowers_the_loss(digits):
    dm = MultiTaskDataModule(digits, ["digit_2", "digit_3"], batch_size=32)
    torch.manual_seed(0)
    model = MultiTaskMLP(digits.feature_dim, ["digit_2", "digit_3"], hidden=(16,), lr=0.05)
    batch = {"x": digits.split("digit_2", "train")[0],
             "y": {t: digits.split(t, "train")[1] for t in ("digit_2", "digit_3")}}
    with torch.no_grad():
        before = sum(v.item() for v in model.task_losses(batch).values())
    _fit(model, dm, max_epochs=5)
    with torch.no_grad():
        after = sum(v.item() for v in model.task_losses(batch).values())
    assert after < 0.7 * before


def test_train_group_is_deterministic_and_test_losses_are_exact(digits):
    tasks = ["digit_3", "digit_5"]
    a = train_group(digits, tasks, FAST, seed=7)
    b = train_group(digits, tasks, FAST, seed=7)
    c = train_group(digits, tasks, FAST, seed=8)
    assert a.test_losses == b.test_losses
    assert a.test_losses != c.test_losses
    assert set(a.test_losses) == set(tasks) and a.tasks == tuple(tasks)
    assert a.total_test_loss == pytest.approx(sum(a.test_losses.values()))
    assert 0 <= a.best_epoch < a.epochs + 1 <= FAST.max_epochs + 1


def test_test_losses_are_those_of_the_restored_best_weights(digits):
    """Recompute the test loss from the returned model's weights by a full-batch pass."""
    tasks = ["digit_4", "digit_9"]
    captured = {}

    class Grab(L.Callback):
        def on_test_end(self, trainer, pl_module):
            captured["model"] = pl_module

    res = train_group(digits, tasks, FAST.replace(max_epochs=6), seed=1, callbacks=[Grab()])
    model = captured["model"]
    x = digits.split(tasks[0], "test")[0]
    with torch.no_grad():
        out = model(x)
    for t in tasks:
        y = digits.split(t, "test")[1]
        expected = F.binary_cross_entropy_with_logits(out[t], y).item()
        assert res.test_losses[t] == pytest.approx(expected, rel=1e-5)


def test_single_task_group_is_stl(digits):
    res = train_group(digits, ["digit_0"], FAST, seed=0)
    assert list(res.test_losses) == ["digit_0"]
    model = build_model(digits, ["digit_0"], FAST)
    assert len(model.heads) == 1


def test_per_task_layout_trains(tmp_path):
    ds = per_task_toy()
    res = train_group(ds, None, FAST.replace(batch_size=8), seed=0)
    assert set(res.test_losses) == set(ds.task_names)
    assert all(np.isfinite(v) and v > 0 for v in res.test_losses.values())


def test_presets_and_errors(digits):
    chem = get_preset("chemical")
    assert chem.hidden == (32, 16) and chem.lr == 1e-3 and chem.momentum == 0.9
    assert chem.batch_size == 264 and chem.max_epochs == 1000 and chem.patience == 20
    assert (chem.lr_decay_start, chem.lr_decay_every, chem.lr_decay_factor) == (100, 75, 0.5)
    assert get_preset(FAST) is FAST
    assert set(PRESETS) >= {"chemical", "ettm1", "digits"}
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("imagenet")
    with pytest.raises(ValueError, match="unknown task"):
        train_group(digits, ["digit_11"], FAST)
    with pytest.raises(TypeError):
        FAST.replace(learning_rate=1.0)


def test_glorot_init_matches_keras_default():
    torch.manual_seed(0)
    model = MultiTaskMLP(180, ["a", "b"], hidden=(32, 16), init="glorot")
    for layer in [model.encoder[0], model.encoder[2], *model.heads]:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert torch.all(layer.bias == 0)
        assert layer.weight.abs().max() <= bound
        if layer.weight.numel() > 1000:  # uniform(-b, b) has std b / sqrt(3)
            assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    with pytest.raises(ValueError, match="init"):
        MultiTaskMLP(3, ["a"], init="he")
    assert get_preset("chemical").init == "glorot"


# ------------------------------------------------------------------ engine="loop"
@pytest.mark.parametrize("which", ["shared", "per_task"])
def test_the_plain_loop_engine_gives_the_trainer_numbers_to_the_bit(which, digits):
    """Same init, batches, optimizer, schedule, dropout draws, stopping and restoring as the Trainer."""
    if which == "shared":
        dataset, tasks = digits, ["digit_3", "digit_5", "digit_8"]
    else:
        dataset, tasks = per_task_toy(sizes=(60, 30, 14)), ["t0", "t1", "t2"]
    recipe = FAST.replace(max_epochs=9, patience=2, dropout=0.2, lr_decay_start=1, lr_decay_every=2,
                          lr_decay_factor=0.5, batch_size=16)
    for seed in (0, 1):
        ref = train_group(dataset, tasks, recipe, seed)
        fast = train_group(dataset, tasks, recipe, seed, engine="loop")
        assert fast.test_losses == ref.test_losses  # exact, every task
        assert (fast.epochs, fast.best_epoch, fast.val_loss) == (ref.epochs, ref.best_epoch, ref.val_loss)
    stopped = train_group(dataset, tasks, recipe.replace(lr=5.0, patience=1), 0)  # early stop / divergence path
    assert train_group(dataset, tasks, recipe.replace(lr=5.0, patience=1), 0, engine="loop").epochs == stopped.epochs


def test_the_plain_loop_engine_refuses_trainer_arguments(digits):
    with pytest.raises(ValueError, match="no callbacks, logger or Trainer arguments"):
        train_group(digits, ["digit_1"], FAST, 0, engine="loop", max_steps=3)
    with pytest.raises(ValueError, match="engine must be"):
        train_group(digits, ["digit_1"], FAST, 0, engine="fast")


# ------------------------------------------------------------------ PCGrad
def test_pcgrad_against_a_brute_force_projection():
    from lightning_etap.models.surgery import pcgrad

    g = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 6, generator=g, dtype=torch.float64)
    grads[3] = -grads[0]  # a direct conflict
    orders = torch.Generator().manual_seed(7)
    got = pcgrad(grads, orders)
    replay = torch.Generator().manual_seed(7)
    total = torch.zeros(6, dtype=torch.float64)
    for i in range(4):
        v = grads[i].clone()
        for j in torch.randperm(4, generator=replay).tolist():
            if j != i and float(v @ grads[j]) < 0:
                v = v - float(v @ grads[j]) / float(grads[j] @ grads[j]) * grads[j]
        total += v
    torch.testing.assert_close(got, total)
    # no conflict: plain sum
    same = torch.ones(3, 5)
    torch.testing.assert_close(pcgrad(same), same.sum(0))
    with pytest.raises(ValueError, match="tasks, parameters"):
        pcgrad(torch.ones(5))


def test_pcgrad_training_step_matches_a_hand_loop():
    """gradient_surgery='pcgrad': the encoder moves by the PCGrad combination, the heads by their own gradients."""
    from lightning_etap.models.surgery import pcgrad

    ds = per_task_toy(sizes=(40, 25))  # two tasks: each projects onto the other, so the order is immaterial
    dm = MultiTaskDataModule(ds, batch_size=8, seed=0)
    torch.manual_seed(0)
    model = MultiTaskMLP(5, ds.task_names, hidden=(6, 4), lr=0.1, momentum=0.0, gradient_surgery="pcgrad")
    params0 = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch)

    _fit(model, dm, max_epochs=1, callbacks=[Record()])
    ref = MultiTaskMLP(5, ds.task_names, hidden=(6, 4))
    ref.load_state_dict(params0)
    enc = list(ref.encoder.parameters())
    for b in seen:
        losses = [F.binary_cross_entropy_with_logits(ref.heads[i](ref.encoder(b["x"][t])), b["y"][t])
                  for i, t in enumerate(ds.task_names)]
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, enc, retain_graph=True)])
                for loss in losses]
        update = pcgrad(torch.stack(rows))
        heads = torch.autograd.grad(sum(losses), [p for h in ref.heads for p in h.parameters()])
        with torch.no_grad():
            offset = 0
            for p in enc:
                p -= 0.1 * update[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            for p, g in zip([p for h in ref.heads for p in h.parameters()], heads):
                p -= 0.1 * g
    for k, v in ref.state_dict().items():
        if "metrics" not in k:
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gradient_surgery"):
        MultiTaskMLP(5, ds.task_names, gradient_surgery="mgda")
    assert "gradient_surgery" not in TrainConfig().to_dict()  # old store fingerprints stay valid
    assert TrainConfig(gradient_surgery="pcgrad").to_dict()["gradient_surgery"] == "pcgrad"


def test_pcgrad_recipe_trains_the_same_in_both_engines():
    dataset, tasks = per_task_toy(sizes=(60, 30, 14)), ["t0", "t1", "t2"]
    recipe = FAST.replace(max_epochs=4, batch_size=16, gradient_surgery="pcgrad")
    ref = train_group(dataset, tasks, recipe, 0)
    loop = train_group(dataset, tasks, recipe, 0, engine="loop")
    plain = train_group(dataset, tasks, recipe.replace(gradient_surgery=None), 0)
    assert loop.test_losses == ref.test_losses
    assert ref.test_losses != plain.test_losses  # the surgery changed the training
