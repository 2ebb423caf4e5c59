"""Task affinity (ETAP and TAG) against independent references: hand computation, real optimizer steps, brute force."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_etap.affinity import AffinityCallback, AffinityResult
from lightning_etap.affinity.scores import (
    AffinityAccumulator,
    ExactTaskGradients,
    LinearUpdate,
    apply_update,
    parameter_blocks,
    step_products,
    step_scores,
    task_update_rules,
)
from lightning_etap.data.digits import load_digits
from lightning_etap.models.mtl_mlp import MultiTaskMLP
from lightning_etap.training import TrainConfig, quiet_lightning, train_group

TASKS = ("a", "b", "c")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: intra-op threads only add synchronisation (BatchNorm on 8 rows took ~0.1 s
    with 2 threads on a busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- a user's own small modules
class TinyMTL(L.LightningModule):
    """2-layer encoder, one linear head per regression task; optional BatchNorm and dropout."""

    def __init__(self, d=4, hidden=(5, 3), optimizer="sgd", lr=0.1, bn=False, dropout=0.0, opt_kwargs=None,
                 nan_steps=(), zero_task=None):
        super().__init__()
        layers = [nn.Linear(d, hidden[0]), nn.Tanh()]
        if bn:
            layers.append(nn.BatchNorm1d(hidden[0]))
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(hidden[0], hidden[1]), nn.Tanh()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(hidden[1], 1) for _ in TASKS])
        self.optimizer, self.lr, self.opt_kwargs = optimizer, lr, dict(opt_kwargs or {})
        self.nan_steps, self.zero_task = set(nan_steps), zero_task

    def task_losses(self, batch):
        x, y = batch
        h = self.encoder(x)
        return {t: F.mse_loss(head(h).squeeze(-1), y[:, k]) for k, (t, head) in enumerate(zip(TASKS, self.heads, strict=True))}

    def training_step(self, batch, batch_idx):
        losses = self.task_losses(batch)
        total = sum(losses.values())
        reported = dict(losses)
        if self.zero_task is not None:
            reported[self.zero_task] = losses[self.zero_task] * 0.0  # exactly zero, still in the graph
        if self.trainer.global_step in self.nan_steps:
            reported["b"] = losses["b"] * float("nan")  # only the reported loss; training stays finite
        self.log("train_loss", total.detach())
        return {"loss": total, "task_losses": reported}

    def configure_optimizers(self):
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
               "rmsprop": torch.optim.RMSprop}[self.optimizer]
        return cls(self.parameters(), lr=self.lr, **self.opt_kwargs)


class ConvTwoTower(L.LightningModule):
    """A different architecture: a conv tower shared by all tasks, a small MLP per task; Adam."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 8)
        self.towers = nn.ModuleDict({t: nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)) for t in TASKS})

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))
        losses = {t: F.binary_cross_entropy_with_logits(self.towers[t](h).squeeze(-1), y[:, k])
                  for k, t in enumerate(TASKS)}
        return {"loss": sum(losses.values()), "task_losses": losses}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def tiny_loader(n=24, d=4, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 2], torch.sin(x[:, 3])], 1) + 0.1 * torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def image_loader(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.stack([(x[:, 0, :3].mean((1, 2)) > 0), (x[:, 0, 3:].mean((1, 2)) > 0), (x.mean((1, 2, 3)) > 0)], 1)
    return DataLoader(TensorDataset(x, y.float()), batch_size=8, shuffle=False)


class Recorder(L.Callback):
    """Model, optimizer, RNG and batch at the start of every (micro-)batch."""

    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.records.append(dict(
            step=trainer.global_step, epoch=trainer.current_epoch,
            batch=[b.clone() for b in batch],
            state=copy.deepcopy(pl_module.state_dict()),
            opt=copy.deepcopy(trainer.optimizers[0].state_dict()),
            rng=torch.get_rng_state(),
        ))


def fit(model, loader, callbacks=(), seed=0, **kw):
    args = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    args.update(kw)
    L.seed_everything(seed, verbose=False)
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningModule.log.*")
        warnings.filterwarnings("ignore", message=".*train_dataloader.*does not have many workers.*")
        trainer = L.Trainer(callbacks=list(callbacks), **args)
        trainer.fit(model, train_dataloaders=loader)
    return trainer


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def ref_grads(make, rec, shared_of, rng=False):
    """Independent reference: a fresh model loaded with the recorded weights, one autograd call per task."""
    model = make()
    model.load_state_dict(rec["state"])
    model.train()
    if rng:
        torch.set_rng_state(rec["rng"])
    losses = model.task_losses(rec["batch"])
    shared = shared_of(model)
    G = torch.stack([flat(torch.autograd.grad(losses[t], shared, retain_graph=True)) for t in TASKS]).double()
    L_ = torch.stack([losses[t].detach() for t in TASKS]).double()
    return model, G, L_


def reduce_by_hand(step_mats, epochs, reduction):
    step_mats, epochs = np.asarray(step_mats), np.asarray(epochs)
    per_epoch = [step_mats[epochs == e].mean(0) for e in sorted(set(epochs.tolist()))]
    return np.sum(per_epoch, 0) if reduction == "epoch_mean_sum" else step_mats.mean(0)


# ---------------------------------------------------------------------- hand computation, every knob
KNOBS = list(itertools.product(["gradient", "optimizer"], [True, False], [True, False], ["epoch_mean_sum", "mean"]))


def test_step_scores_and_reductions_match_hand_computation_for_every_knob():
    """16 callbacks on one fit (SGD momentum 0.9): each against per-task autograd calls and the update by hand."""
    torch.manual_seed(0)
    make = lambda: TinyMTL(optimizer="sgd", lr=0.1, opt_kwargs={"momentum": 0.9})  # noqa: E731
    model = make()
    rec = Recorder()
    cbs = {k: AffinityCallback("encoder", every_n_steps=1, update=k[0], divide_by_lr=k[1], normalize_by_loss=k[2], reduction=k[3],
                               keep_step_scores=True) for k in KNOBS}
    fit(model, tiny_loader(), [rec, *cbs.values()])
    assert len(rec.records) == 6
    assert "training_step" not in model.__dict__ and not any("tap" in k for k in model.__dict__)  # all unwrapped
    lr, mu = 0.1, 0.9
    for (update, div, norm, reduction), cb in cbs.items():
        res = cb.result
        assert res.task_names == TASKS and res.measured_steps == 6 and res.skipped_steps == 0
        expected = []
        for r in rec.records:
            _, G, L_ = ref_grads(make, r, lambda m: list(m.encoder.parameters()))
            U = lr * G
            if update == "optimizer" and r["step"] > 0:  # momentum buffer b: u_i = lr (mu b + g_i)
                b = flat([r["opt"]["state"][k]["momentum_buffer"] for k in range(4)]).double()
                U = lr * (mu * b + G)
            Z = U @ G.T  # Z[i, j] = u_i . g_j
            if div:
                Z = Z / lr
            if norm:
                Z = Z / L_[None, :]
            expected.append(Z.numpy())
        np.testing.assert_allclose(res.step_matrices, np.stack(expected), rtol=2e-5, atol=1e-7)
        assert res.steps.tolist() == list(range(6))
        np.testing.assert_allclose(res.matrix, reduce_by_hand(expected, [r["epoch"] for r in rec.records], reduction),
                                   rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(res.epoch_matrices, [np.mean(expected[:3], 0), np.mean(expected[3:], 0)],
                                   rtol=2e-5, atol=1e-7)
    # the knobs matter: the released default differs from the paper's eq. 5 / eq. 6 choices
    default = cbs[("gradient", True, True, "epoch_mean_sum")].result.matrix
    assert not np.allclose(default, cbs[("optimizer", False, True, "mean")].result.matrix)


def test_gradient_accumulation_averages_micro_batch_scores():
    torch.manual_seed(1)
    make = lambda: TinyMTL(optimizer="sgd", lr=0.05, opt_kwargs={"momentum": 0.5, "nesterov": True})  # noqa: E731
    rec = Recorder()
    cb = AffinityCallback("encoder", every_n_steps=1, update="optimizer", keep_step_scores=True)
    fit(make(), tiny_loader(n=32), [rec, cb], max_epochs=1, accumulate_grad_batches=2)
    res = cb.result
    assert res.measured_steps == 2 and res.steps.tolist() == [0, 1]
    for step in (0, 1):
        mats = []
        for r in [r for r in rec.records if r["step"] == step]:
            model, G, L_ = ref_grads(make, r, lambda m: list(m.encoder.parameters()))
            shared = list(model.encoder.parameters())
            U = []
            for i in range(3):  # the real optimizer's step on a copy: u_i = theta_before - theta_after
                m2 = copy.deepcopy(model)
                opt = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.5, nesterov=True)
                opt.load_state_dict(copy.deepcopy(r["opt"]))
                for p, g in zip(m2.encoder.parameters(), torch.split(G[i].float(), [p.numel() for p in shared]), strict=True):
                    p.grad = g.reshape(p.shape)
                opt.step()
                U.append((flat(shared) - flat(m2.encoder.parameters())).detach().double())
            mats.append(((torch.stack(U) @ G.T) / 0.05 / L_[None, :]).numpy())
        np.testing.assert_allclose(res.step_matrices[step], np.mean(mats, 0), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- the optimizer's own update
SGD_CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.8, nesterov=True, weight_decay=0.01),
    dict(momentum=0.9, dampening=0.2, weight_decay=0.05, maximize=True),
    dict(momentum=0.0, weight_decay=0.1),
]
ADAM_CONFIGS = [
    (torch.optim.Adam, dict()),
    (torch.optim.Adam, dict(weight_decay=0.05, amsgrad=True)),
    (torch.optim.AdamW, dict(weight_decay=0.1)),
    (torch.optim.AdamW, dict(amsgrad=True, betas=(0.8, 0.95), maximize=True)),
]


@pytest.mark.parametrize("warmup", [0, 3], ids=["first_step", "after_3_steps"])
@pytest.mark.parametrize("make_opt", [lambda ps, kw=kw: torch.optim.SGD(ps, lr=0.1, **kw) for kw in SGD_CONFIGS]
                         + [lambda ps, c=c, kw=kw: c(ps, lr=0.01, **kw) for c, kw in ADAM_CONFIGS],
                         ids=[f"sgd{k}" for k in range(len(SGD_CONFIGS))] + [f"adam{k}" for k in range(len(ADAM_CONFIGS))])
def test_optimizer_update_equals_a_real_step_on_a_copy(make_opt, warmup):
    g = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(4, 3, generator=g)), nn.Parameter(torch.randn(5, generator=g))]
    frozen_other = nn.Parameter(torch.randn(2, generator=g))  # in the optimizer, not shared
    opt = make_opt([{"params": params}, {"params": [frozen_other], "lr": 0.3}])
    for _ in range(warmup):
        for p in [*params, frozen_other]:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    n = 3
    grads = [torch.randn(n, *p.shape, generator=g) for p in params]
    before = copy.deepcopy(opt.state_dict())
    for per_unit in (False, True):
        rules = task_update_rules(opt, params, "optimizer", per_unit_lr=per_unit)
        ours = [apply_update(r, G) for r, G in zip(rules, grads, strict=True)]
        lr = opt.param_groups[0]["lr"]
        for i in range(n):
            pair = copy.deepcopy({"params": params, "opt": opt})
            for p, G in zip(pair["params"], grads, strict=True):
                p.grad = G[i].clone()
            pair["opt"].step()
            for p, p2, u in zip(params, pair["params"], ours, strict=True):
                # compared on the parameters' scale (theta_before - theta_after loses digits to cancellation)
                torch.testing.assert_close(u[i] * (lr if per_unit else 1.0), p.detach() - p2.detach(),
                                           rtol=1e-4, atol=1e-6)
    after = opt.state_dict()  # the optimizer state was only read
    assert before["param_groups"] == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        for name, v in before["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][name]))


def test_gradient_update_and_unsupported_optimizer():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.RMSprop([p], lr=0.2)
    (rule,) = task_update_rules(opt, [p], "gradient")
    torch.testing.assert_close(apply_update(rule, torch.ones(2, 3)), torch.full((2, 3), 0.2))
    with pytest.raises(ValueError, match=r"SGD.*Adam.*AdamW"):
        task_update_rules(opt, [p], "optimizer")
    with pytest.raises(ValueError, match="not in the optimizer"):
        task_update_rules(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), [p], "gradient")


# ---------------------------------------------------------------------- the numerical core on its own
def test_block_products_equal_the_full_jacobian_and_blocks_partition():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 300), nn.ReLU(), nn.Linear(300, 4), nn.Tanh(), nn.Linear(4, 4))
    x = torch.randn(10, 6)
    h = enc(x)
    losses = torch.stack([h[:, 0].pow(2).mean(), (h[:, 1] * h[:, 2]).mean(), h[:, 3].sum()])
    params = list(enc.parameters())
    blocks = parameter_blocks(params, enc, min_numel=50)
    assert sorted(k for b in blocks for k in b) == list(range(len(params)))
    assert [0, 1] in blocks  # a layer's weight and bias together
    J = torch.stack([flat(torch.autograd.grad(losses[i], params, retain_graph=True)) for i in range(3)]).double()
    c = [torch.randn(p.shape) for p in params]
    rules = [LinearUpdate(alpha=0.7, offset=ci) for ci in c]
    expected = 0.7 * J @ J.T + (J @ flat(c).double())[None, :]
    for provider in (ExactTaskGradients(batched=True), ExactTaskGradients(batched=False)):
        Z = step_products(losses, params, rules, blocks, provider)
        torch.testing.assert_close(Z, expected, rtol=1e-5, atol=1e-5)
    scores, valid = step_scores(expected, torch.tensor([2.0, 0.0, 4.0]))
    assert valid.tolist() == [True, False, True]
    torch.testing.assert_close(scores[:, 0], expected[:, 0] / 2)
    assert torch.all(scores[:, 1] == 0)


def test_accumulator_reductions_and_state_round_trip():
    acc = AffinityAccumulator(2, keep_steps=True)
    s = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * k for k in (1, 2, 3)]
    acc.add(0, s[0], torch.tensor([True, True]), step=0)
    acc.add(0, s[1], torch.tensor([True, False]), step=1)
    acc.add(1, s[2], torch.tensor([True, True]), step=2)
    # column 0: epoch means 1.5*[1,3] and 3*[1,3]; column 1: epoch means [2,4] (step 1 left out) and 3*[2,4]
    ems = torch.tensor([[1.5 + 3, 2 + 6], [4.5 + 9, 4 + 12]], dtype=torch.float64)
    torch.testing.assert_close(acc.matrix("epoch_mean_sum"), ems)
    mean = torch.tensor([[6 / 3, 8 / 2], [18 / 3, 16 / 2]], dtype=torch.float64)
    torch.testing.assert_close(acc.matrix("mean"), mean)
    again = AffinityAccumulator.from_state_dict(acc.state_dict())
    assert torch.equal(again.matrix("mean"), acc.matrix("mean")) and again.steps == [0, 1, 2]
    assert torch.isnan(AffinityAccumulator(2).matrix()).all()


# ---------------------------------------------------------------------- TAG
def test_tag_matches_brute_force_lookahead_with_batchnorm_and_dropout():
    torch.manual_seed(2)
    make = lambda: TinyMTL(optimizer="sgd", lr=0.1, bn=True, dropout=0.3, opt_kwargs={"momentum": 0.9})  # noqa: E731
    rec = Recorder()
    tag = AffinityCallback("encoder", every_n_steps=1, method="tag", keep_step_scores=True)
    tag_opt = AffinityCallback("encoder", every_n_steps=1, method="tag", update="optimizer", divide_by_lr=False, keep_step_scores=True)
    model = make()
    fit(model, tiny_loader(), [rec, tag, tag_opt])
    assert "training_step" not in model.__dict__
    for cb, update, div in ((tag, "gradient", True), (tag_opt, "optimizer", False)):
        expected = []
        for r in rec.records:
            model, G, L_ = ref_grads(make, r, lambda m: list(m.encoder.parameters()), rng=True)
            shared = list(model.encoder.parameters())
            U = 0.1 * G
            if update == "optimizer" and r["step"] > 0:
                b = flat([r["opt"]["state"][k]["momentum_buffer"] for k in range(len(shared))]).double()
                U = 0.1 * (0.9 * b + G)
            rows = []
            for i in range(3):  # brute force: copy, apply task i's update, recompute every loss on the same batch
                m2 = make()
                m2.load_state_dict(r["state"])
                m2.train()
                with torch.no_grad():
                    for p, u in zip(m2.encoder.parameters(), torch.split(U[i], [p.numel() for p in shared]), strict=True):
                        p.sub_(u.reshape(p.shape).float())
                    torch.set_rng_state(r["rng"])  # the same dropout masks as the training forward
                    after = m2.task_losses(r["batch"])
                rows.append([1 - after[t].item() / L_[j].item() for j, t in enumerate(TASKS)])
            z = np.array(rows) / (0.1 if div else 1.0)
            expected.append(z)
        np.testing.assert_allclose(cb.result.step_matrices, np.stack(expected), rtol=1e-3, atol=2e-5)


def snapshot(trainer, model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(trainer.optimizers[0].state_dict()),
        torch.get_rng_state(),
    )


@pytest.mark.parametrize("method,optimizer,update", [("etap", "sgd", "gradient"), ("tag", "sgd", "optimizer"),
                                                     ("tag", "adam", "optimizer"), ("etap", "adamw", "optimizer")])
def test_training_is_bit_for_bit_identical_with_and_without_the_callback(method, optimizer, update):
    """Parameters, BatchNorm buffers, optimizer state and the RNG end exactly as in a plain fit."""
    kw = dict(optimizer=optimizer, lr=0.05, bn=True, dropout=0.2,
              opt_kwargs={"momentum": 0.9} if optimizer == "sgd" else {})
    runs = []
    for callbacks in ([], [AffinityCallback("encoder", every_n_steps=1, method=method, update=update)]):
        torch.manual_seed(5)
        model = TinyMTL(**kw)
        trainer = fit(model, tiny_loader(), callbacks, seed=5)
        runs.append(snapshot(trainer, model))
        if callbacks:
            assert callbacks[0].result.measured_steps == 6
            assert "training_step" not in model.__dict__  # unwrapped at teardown
    (s0, o0, r0), (s1, o1, r1) = runs
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert "encoder.2.running_mean" in s0  # the BatchNorm buffers are in the comparison
    for k in o0["state"]:
        for name in o0["state"][k]:
            assert torch.equal(torch.as_tensor(o0["state"][k][name]), torch.as_tensor(o1["state"][k][name]))
    assert torch.equal(r0, r1)


# ---------------------------------------------------------------------- modules in the wild
def test_reference_module_through_train_group():
    ds = load_digits()
    group = ["digit_1", "digit_4", "digit_7"]
    cfg = TrainConfig(hidden=(16,), lr=0.05, momentum=0.9, batch_size=64, max_epochs=2, patience=5)
    cb = AffinityCallback("encoder", every_n_steps=1)
    train_group(ds, group, cfg, seed=0, callbacks=[cb])
    res = cb.result
    steps = 2 * int(np.ceil(len(ds.split("digit_1", "train")[0]) / 64))
    assert res.task_names == tuple(group) and res.measured_steps == steps
    assert res.epoch_matrices.shape == (2, 3, 3) and np.isfinite(res.matrix).all()
    assert (np.diag(res.matrix) > 0).all()  # g_i . g_i / L_i with positive BCE losses
    assert res.settings["method"] == "etap" and res.settings["reduction"] == "epoch_mean_sum"


def test_own_module_with_adam_shared_as_list_and_as_callable():
    """A conv two-tower module with nothing of ours, Adam's own update, checked against real steps on copies."""
    torch.manual_seed(4)
    model = ConvTwoTower()
    as_list = AffinityCallback([*model.conv.parameters(), *model.fc.parameters()], update="optimizer", every_n_steps=1,
                               keep_step_scores=True)
    as_callable = AffinityCallback(lambda m: [*m.conv.parameters(), *m.fc.parameters()], update="optimizer", every_n_steps=1,
                                   keep_step_scores=True)
    rec = Recorder()
    fit(model, image_loader(), [rec, as_list, as_callable], max_epochs=1)
    assert np.array_equal(as_list.result.step_matrices, as_callable.result.step_matrices)
    assert np.array_equal(as_list.result.matrix, as_callable.result.matrix)
    for r in (rec.records[0], rec.records[2]):  # the first step (empty Adam state) and a later one
        m = ConvTwoTower()
        m.load_state_dict(r["state"])
        x, y = r["batch"]
        h = torch.relu(m.fc(torch.relu(m.conv(x)).flatten(1)))
        losses = [F.binary_cross_entropy_with_logits(m.towers[t](h).squeeze(-1), y[:, k]) for k, t in enumerate(TASKS)]
        shared = [*m.conv.parameters(), *m.fc.parameters()]
        grads = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
        U = []
        for gi in grads:
            pair = copy.deepcopy(m)
            opt = torch.optim.Adam(pair.parameters(), lr=0.01)
            opt.load_state_dict(copy.deepcopy(r["opt"]))
            for p, g in zip([*pair.conv.parameters(), *pair.fc.parameters()], gi, strict=True):
                p.grad = g.clone()
            opt.step()
            U.append((flat(shared) - flat([*pair.conv.parameters(), *pair.fc.parameters()])).detach().double())
        G = torch.stack([flat(gi) for gi in grads]).double()
        L_ = torch.tensor([loss.item() for loss in losses], dtype=torch.float64)
        expected = (torch.stack(U) @ G.T) / 0.01 / L_[None, :]
        np.testing.assert_allclose(as_list.result.step_matrices[r["step"]], expected.numpy(), rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------- counting, skipping, errors
class AllNaN(TinyMTL):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.trainer.global_step in self.nan_steps:  # every task's reported loss NaN: nothing to measure
            out["task_losses"] = {t: v * float("nan") for t, v in out["task_losses"].items()}
        return out


def test_non_finite_steps_are_skipped_once_warned_and_every_n_steps_counts():
    cb = AffinityCallback("encoder", every_n_steps=2, keep_step_scores=True)
    with pytest.warns(RuntimeWarning, match="skipping a step") as record:
        fit(AllNaN(nan_steps={2, 4}), tiny_loader(n=48), [cb], max_epochs=1)  # 6 steps; measured 0, 2, 4
    assert sum("skipping a step" in str(w.message) for w in record) == 1
    res = cb.result
    assert res.measured_steps == 1 and res.skipped_steps == 2 and res.steps.tolist() == [0]
    cb3 = AffinityCallback("encoder", every_n_steps=3, keep_step_scores=True)
    fit(TinyMTL(), tiny_loader(n=80), [cb3], max_epochs=1)  # 10 steps
    assert cb3.result.steps.tolist() == [0, 3, 6, 9] and cb3.result.measured_steps == 4


def assert_b_absent_at_steps_2_and_4(res, steps):
    """Task b had no labels at steps 2 and 4 of 6 (one epoch): those steps' b row and column are NaN, every other
    entry is the clean run's (``steps``), and the matrix is each entry's mean over the steps it counted in."""
    keep = [0, 1, 3, 5]
    b = TASKS.index("b")
    other = np.ix_(*[[i for i in range(len(TASKS)) if i != b]] * 2)
    np.testing.assert_allclose(res.step_matrices[keep], steps[keep], rtol=1e-12, atol=1e-15)
    for k in (2, 4):
        assert np.isnan(res.step_matrices[k][b]).all() and np.isnan(res.step_matrices[k][:, b]).all()
        np.testing.assert_allclose(res.step_matrices[k][other], steps[k][other], rtol=1e-12, atol=1e-15)
    expected = steps.mean(0)
    expected[b] = steps[keep][:, b].mean(0)
    expected[:, b] = steps[keep][:, :, b].mean(0)
    np.testing.assert_allclose(res.matrix, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("engine", ["fast", "autograd"])
def test_a_task_with_a_nan_loss_is_absent_from_that_step_only(engine):
    """No labels for task b in a batch: b's loss is NaN (left out of the training loss). Its row and column do not
    count in that step; every other entry is measured as usual."""
    clean = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True, engine=engine)
    torch.manual_seed(0)
    fit(TinyMTL(), tiny_loader(n=48), [clean], max_epochs=1)  # 6 steps; training is the same in both runs
    cb = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True, engine=engine)
    pair = AffinityCallback("encoder", every_n_steps=1, tasks=["a", "c"], engine=engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no skip, no "not attached" warning
        torch.manual_seed(0)
        fit(TinyMTL(nan_steps={2, 4}), tiny_loader(n=48), [cb, pair], max_epochs=1)
    res = cb.result
    assert res.measured_steps == 6 and res.skipped_steps == 0 and res.absent_steps == {"b": 2}
    assert_b_absent_at_steps_2_and_4(res, clean.result.step_matrices)
    b = TASKS.index("b")
    other = [i for i in range(len(TASKS)) if i != b]
    ac = [TASKS.index("a"), TASKS.index("c")]
    # float32 products of two tasks' gradients summed in another blocking than with three tasks: ~1e-8 apart on
    # some CPUs (a b-dependent bug would move these entries by a share of the steps, far beyond float32 rounding)
    np.testing.assert_allclose(pair.result.matrix, res.matrix[np.ix_(ac, ac)], rtol=1e-6, atol=1e-9)
    # a pair never present together: its entries are NaN, said at the end of the fit
    alternating = AffinityCallback("encoder", every_n_steps=1, engine=engine)
    with pytest.warns(RuntimeWarning, match=r"no measured step scored a->b, b->a \(the two tasks were never"):
        fit(Alternating(), tiny_loader(n=48), [alternating], max_epochs=1)
    unknown = np.isnan(alternating.result.matrix)
    assert unknown[0, 1] and unknown[1, 0] and unknown.sum() == 2
    # absent from every measured step: NaN row and column, said at the end of the fit
    never = AffinityCallback("encoder", every_n_steps=2, engine=engine)
    with pytest.warns(RuntimeWarning, match=r"task\(s\) \['b'\] had a NaN / inf loss at every measured step"):
        fit(TinyMTL(nan_steps={0, 2, 4}), tiny_loader(n=48), [never], max_epochs=1)
    assert never.result.absent_steps == {"b": 3} and np.isnan(never.result.matrix[b]).all()
    assert np.isfinite(never.result.matrix[np.ix_(other, other)]).all()


class CountedSteps(TinyMTL):
    """Counts training_step calls (the step's own forward and TAG's lookahead forwards)."""

    calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return super().training_step(batch, batch_idx)


def test_tag_leaves_an_absent_task_out_of_that_step_only():
    """TAG with a task whose loss is NaN in some batches: as ETAP, its row and column do not count there, every
    other entry is the clean run's, and no lookahead forward is spent on it."""
    clean = AffinityCallback("encoder", every_n_steps=1, method="tag", keep_step_scores=True)
    torch.manual_seed(0)
    plain = CountedSteps()
    fit(plain, tiny_loader(n=48), [clean], max_epochs=1)  # 6 steps
    cb = AffinityCallback("encoder", every_n_steps=1, method="tag", keep_step_scores=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no skipped step
        torch.manual_seed(0)
        sparse = CountedSteps(nan_steps={2, 4})
        fit(sparse, tiny_loader(n=48), [cb], max_epochs=1)
    res = cb.result
    assert res.measured_steps == 6 and res.skipped_steps == 0 and res.absent_steps == {"b": 2}
    assert plain.calls == 6 * (1 + len(TASKS)) and sparse.calls == plain.calls - 2
    assert_b_absent_at_steps_2_and_4(res, clean.result.step_matrices)


class Alternating(TinyMTL):
    """Task a has no labels at even steps, task b none at odd steps: the two are never measured together."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        gone = "a" if self.trainer.global_step % 2 == 0 else "b"
        out["task_losses"][gone] = out["task_losses"][gone] * float("nan")
        return out


class NaNTotal(TinyMTL):
    """At the last step the training loss is NaN while every task loss is finite."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.trainer.global_step == 5:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_a_step_whose_training_loss_is_not_finite_is_skipped():
    cb = AffinityCallback("encoder", every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="skipping a step with a non-finite training loss"):
        fit(NaNTotal(), tiny_loader(n=48), [cb], max_epochs=1)  # 6 steps
    assert cb.result.measured_steps == 5 and cb.result.skipped_steps == 1


class DetachedB(TinyMTL):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["task_losses"]["b"] = out["task_losses"]["b"].detach()
        return out


def test_detached_task_loss_warns_once_and_counts_as_zero_gradient():
    cb = AffinityCallback("encoder", every_n_steps=1, normalize_by_loss=False)
    with pytest.warns(RuntimeWarning, match=r"\['b'\] are not attached") as record:
        fit(DetachedB(), tiny_loader(), [cb], max_epochs=1)
    assert sum("not attached" in str(w.message) for w in record) == 1
    assert np.all(cb.result.matrix[1] == 0) and np.all(cb.result.matrix[:, 1] == 0)


def test_zero_task_loss_leaves_its_column_out_and_says_its_row_counts_the_step():
    """A loss of exactly 0 (here `0 * loss`, as users write for "no labels in this batch") leaves the column out
    but counts the row with the zero gradient, which biases the row silently; the end of the fit says so and
    points to NaN, the convention for an absent task."""
    cb = AffinityCallback("encoder", every_n_steps=1)
    with pytest.warns(RuntimeWarning, match=r"task\(s\) c \(3 of 3\) had a loss of exactly 0.*return NaN") as record:
        fit(TinyMTL(zero_task="c"), tiny_loader(), [cb], max_epochs=1)
    assert sum("exactly 0" in str(w.message) for w in record) == 1
    res = cb.result
    assert res.zero_loss_skips == {"a": 0, "b": 0, "c": 3}
    assert np.isnan(res.matrix[:, 2]).all() and np.isfinite(res.matrix[:, :2]).all()
    assert (res.matrix[2, :2] == 0).all()  # plain SGD: the zero gradient's update moves nothing


def test_a_task_present_in_fewer_than_half_of_the_measured_steps_is_named_at_the_end():
    cb = AffinityCallback("encoder", every_n_steps=1)
    with pytest.warns(RuntimeWarning, match=r"task\(s\) b \(2 of 6\) were present in fewer than half"):
        fit(TinyMTL(nan_steps={0, 1, 2, 4}), tiny_loader(n=48), [cb], max_epochs=1)
    assert cb.result.absent_steps == {"b": 4}
    half = AffinityCallback("encoder", every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # present in 3 of 6: no warning
        fit(TinyMTL(nan_steps={0, 2, 4}), tiny_loader(n=48), [half], max_epochs=1)


class PythonNaN(TinyMTL):
    """Task b has no labels at steps 2 and 4, said with a Python float NaN (not a tensor)."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.trainer.global_step in (2, 4):
            out["task_losses"]["b"] = float("nan")
        return out


def test_a_python_nan_loss_is_an_absent_task_like_a_nan_tensor():
    """The docs say to return NaN for a task without labels; a plain float('nan') was refused as a .item()
    mistake. It is now the same absent task as a NaN tensor, to the bit."""
    tensor = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True)
    torch.manual_seed(0)
    fit(TinyMTL(nan_steps={2, 4}), tiny_loader(n=48), [tensor], max_epochs=1)
    number = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.manual_seed(0)
        fit(PythonNaN(), tiny_loader(n=48), [number], max_epochs=1)
    assert number.result.absent_steps == tensor.result.absent_steps == {"b": 2}
    np.testing.assert_array_equal(number.result.step_matrices, tensor.result.step_matrices)


class ItemLoss(TinyMTL):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["task_losses"]["b"] = out["task_losses"]["b"].item()
        return out


class ReturnsTensor(TinyMTL):
    def training_step(self, batch, batch_idx):
        return sum(self.task_losses(batch).values())


class IntKeys(TinyMTL):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return {"loss": out["loss"], "task_losses": dict(enumerate(out["task_losses"].values()))}


class RenamesAtStep2(TinyMTL):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if batch_idx == 2:
            losses = dict(out["task_losses"])
            losses["renamed"] = losses.pop(TASKS[-1])
            out = {"loss": out["loss"], "task_losses": losses}
        return out


class EncoderOffPath(TinyMTL):
    """Has an ``encoder`` the task losses never pass through (they use ``trunk``)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 3), nn.Tanh())

    def task_losses(self, batch):
        x, y = batch
        h = self.trunk(x)
        return {t: F.mse_loss(head(h).squeeze(-1), y[:, k]) for k, (t, head) in enumerate(zip(TASKS, self.heads, strict=True))}


class RowsPerTask(TinyMTL):
    """Per-task inputs in one batch: task k owns rows k, k + 3, ..."""

    def task_losses(self, batch):
        x, y = batch
        h = self.encoder(x)
        return {t: F.mse_loss(head(h[k::3]).squeeze(-1), y[k::3, k])
                for k, (t, head) in enumerate(zip(TASKS, self.heads, strict=True))}


class Manual(TinyMTL):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize("engine", ["fast", "autograd"])
def test_a_shared_module_off_the_loss_path_warns(engine):
    with pytest.warns(RuntimeWarning, match="every task's gradient on the shared parameters was 0"):
        fit(EncoderOffPath(), tiny_loader(), [cb := AffinityCallback("encoder", every_n_steps=1, engine=engine)],
            max_epochs=1)
    assert not cb.result.matrix.any()
    with pytest.warns(RuntimeWarning, match="every task's gradient on the shared parameters was 0"):
        fit(EncoderOffPath(), tiny_loader(), [AffinityCallback("encoder", every_n_steps=1, method="tag")],
            max_epochs=1)


def test_a_step_without_gradient_is_not_a_warning_when_later_steps_have_one():
    # zero-initialised heads: the shared parameters get no gradient at step 0 only
    model = TinyMTL()
    for head in model.heads:
        nn.init.zeros_(head.weight)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient on the shared parameters.*")
        fit(model, tiny_loader(), [cb := AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True)],
            max_epochs=1)
    assert not cb.result.step_matrices[0].any() and cb.result.matrix.any()


def test_representation_scope_with_per_task_rows_warns_and_the_shared_scope_does_not():
    with pytest.warns(RuntimeWarning, match="never share a row: use scope='shared'"):
        fit(RowsPerTask(), tiny_loader(), [AffinityCallback("encoder", every_n_steps=1, scope="representation")],
            max_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exactly 0.*")
        fit(RowsPerTask(), tiny_loader(), [cb := AffinityCallback("encoder", every_n_steps=1)], max_epochs=1)
    assert (cb.result.matrix[~np.eye(3, dtype=bool)] != 0).all()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="duplicate"):
        AffinityCallback(tasks=["a", "a"])
    with pytest.raises(ValueError, match="every_n_steps"):
        AffinityCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="method"):
        AffinityCallback(method="grad")
    with pytest.raises(ValueError, match="reduction"):
        AffinityCallback(reduction="sum")
    bad = ReturnsTensor()
    with pytest.raises(ValueError, match='"task_losses"'):
        fit(bad, tiny_loader(), [AffinityCallback()], max_epochs=1)
    assert "training_step" not in bad.__dict__  # a failed fit leaves the module unwrapped
    with pytest.raises(ValueError, match=r"\['zzz'\].*not in this step's task_losses"):
        fit(TinyMTL(), tiny_loader(), [AffinityCallback(tasks=["a", "zzz"])], max_epochs=1)
    with pytest.raises(ValueError, match=r"task_losses\['b'\] is a Python number .*\.item\(\).*Return the loss tensor"):
        fit(ItemLoss(), tiny_loader(), [AffinityCallback()], max_epochs=1)
    with pytest.raises(TypeError, match=r"keys of task_losses must be task names \(str\); got 0 \(int\)"):
        fit(IntKeys(), tiny_loader(), [AffinityCallback()], max_epochs=1)
    # names are checked at every step, not only at measured ones (steps 1-3 are not measured)
    with pytest.raises(ValueError, match=r"\['c'\] named in the first step's task_losses are not in this step's.*'renamed'"):
        fit(RenamesAtStep2(), tiny_loader(), [AffinityCallback(every_n_steps=4)], max_epochs=1)
    with pytest.raises(ValueError, match="no submodule 'backbone'.*encoder"):
        fit(TinyMTL(), tiny_loader(), [AffinityCallback("backbone")], max_epochs=1)
    with pytest.raises(ValueError, match=r"'encoder.0.weight' is a parameter: pass shared=\[module.get_parameter"):
        fit(TinyMTL(), tiny_loader(), [AffinityCallback("encoder.0.weight")], max_epochs=1)
    with pytest.raises(TypeError, match="shared must be a submodule name.*got int 123"):
        AffinityCallback(123)
    with pytest.raises(TypeError, match=r"module object \(Linear\): pass its name.*shared='encoder'"):
        AffinityCallback(nn.Linear(2, 2))
    one = TinyMTL()
    single = AffinityCallback(one.encoder[0].weight, every_n_steps=1)  # one parameter
    fit(one, tiny_loader(), [single], max_epochs=1)
    assert len(single.shared) == 1 and single.shared[0] is one.encoder[0].weight and single.result.measured_steps
    frozen = TinyMTL()
    frozen.encoder.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        fit(frozen, tiny_loader(), [AffinityCallback("encoder")], max_epochs=1)
    with pytest.raises(ValueError, match="not parameters of the LightningModule"):
        fit(TinyMTL(), tiny_loader(), [AffinityCallback([nn.Parameter(torch.ones(2))])], max_epochs=1)
    with pytest.raises(ValueError, match=r"torch.optim.SGD.*RMSprop"):
        fit(TinyMTL(optimizer="rmsprop"), tiny_loader(), [AffinityCallback(update="optimizer")], max_epochs=1)
    with pytest.raises(NotImplementedError, match="manual optimization"):
        fit(Manual(), tiny_loader(), [AffinityCallback()], max_epochs=1)
    # sharded strategies (FSDP needs a GPU to fit, so the callback's setup sees a stand-in trainer)
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        with pytest.raises(NotImplementedError, match=rf"{type(strategy).__name__}: it shards.*strategy='ddp'"):
            AffinityCallback().setup(SimpleNamespace(strategy=strategy), TinyMTL(), "fit")
    with pytest.raises(RuntimeError, match="no training step"):
        AffinityCallback().result  # noqa: B018
    # a subset of the returned tasks, in the requested order
    cb = AffinityCallback(tasks=["c", "a"], every_n_steps=1)
    fit(TinyMTL(), tiny_loader(), [cb], max_epochs=1)
    assert cb.result.task_names == ("c", "a")


# ---------------------------------------------------------------------- checkpoint resume
class DigitsData(L.LightningDataModule):
    """Digits, three tasks, in a fixed order (so a resumed fit sees the batches an uninterrupted one does)."""

    def __init__(self, tasks):
        super().__init__()
        ds = load_digits()
        self.x = ds.split(tasks[0], "train")[0]
        self.y = {t: ds.split(t, "train")[1] for t in tasks}

    def train_dataloader(self):
        n = self.x.shape[0]
        batches = [{"x": self.x[i:i + 100], "y": {t: y[i:i + 100] for t, y in self.y.items()}}
                   for i in range(0, n, 100)]
        return DataLoader(batches, batch_size=None, shuffle=False)


RESUME_TASKS = ["digit_2", "digit_5", "digit_8"]


def _digits_fit(tmp_path, data, callbacks, max_epochs, ckpt_path=None):
    """A seeded fit of the small digits model (resumed from ``ckpt_path``): the model and its warnings' texts."""
    torch.manual_seed(0)
    model = MultiTaskMLP(16, RESUME_TASKS, hidden=(8,), lr=0.05, momentum=0.9)
    L.seed_everything(0, verbose=False)
    with quiet_lightning(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
                            default_root_dir=tmp_path)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, [str(w.message) for w in caught]


def test_resume_from_checkpoint_gives_the_uninterrupted_matrix(tmp_path):
    data = DigitsData(RESUME_TASKS)

    def run(callbacks, max_epochs, ckpt_path=None):
        return _digits_fit(tmp_path, data, callbacks, max_epochs, ckpt_path)[0]

    full = AffinityCallback("encoder", every_n_steps=1, update="optimizer", keep_step_scores=True)
    full_cv = AffinityCallback("encoder", every_n_steps=2, control_variate=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model_full = run([full, full_cv, ckpt], 3)
    resumed = AffinityCallback("encoder", every_n_steps=1, update="optimizer", keep_step_scores=True)
    resumed_cv = AffinityCallback("encoder", every_n_steps=2, control_variate=True)
    model_resumed = run([resumed, resumed_cv], 3, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model_full.parameters(), model_resumed.parameters(), strict=True))
    assert resumed.result == full.result
    assert resumed_cv.result == full_cv.result and full_cv.result.settings["proxy_steps"] > 0
    assert np.array_equal(resumed.result.matrix, full.result.matrix) and full.result.epochs.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="other settings"):
        AffinityCallback("encoder", update="gradient").load_state_dict(full.state_dict())


def test_a_second_fit_of_the_same_trainer_goes_on_measuring(tmp_path):
    data = DigitsData(RESUME_TASKS)
    torch.manual_seed(0)
    model = MultiTaskMLP(16, RESUME_TASKS, hidden=(8,), lr=0.05, momentum=0.9)
    L.seed_everything(0, verbose=False)
    staged = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True)
    with quiet_lightning(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[staged], num_sanity_val_steps=0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=data)
        first = staged.result
        trainer.fit_loop.max_epochs = 3  # staged training: fit on with the same Trainer
        trainer.fit(model, datamodule=data)
    assert not [w for w in caught if "new measurement" in str(w.message)]
    # (Lightning's second fit builds a new optimizer, so the steps after it are not those of one 3-epoch fit)
    got = staged.result
    assert first.epochs.tolist() == [0] and got.epochs.tolist() == [0, 1, 2]
    assert got.measured_steps == 3 * first.measured_steps and got.steps.tolist() == list(range(got.measured_steps))
    np.testing.assert_array_equal(got.step_matrices[:first.measured_steps], first.step_matrices)
    np.testing.assert_allclose(got.matrix, got.epoch_matrices.sum(0), rtol=1e-12)

    # the same callback in a new Trainer starts anew, and says what it drops
    with quiet_lightning(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[staged], num_sanity_val_steps=0, default_root_dir=tmp_path).fit(model, datamodule=data)
    assert [w for w in caught if "new measurement" in str(w.message)]
    assert staged.result.epochs.tolist() == [0]

    # the same callback in a new Trainer resumed from a checkpoint drops nothing: the checkpoint's measurement goes on
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _digits_fit(tmp_path, data, [staged, ckpt], 2)
    saved = staged.result
    with quiet_lightning(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[staged], num_sanity_val_steps=0, default_root_dir=tmp_path).fit(
            model, datamodule=data, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert not [w for w in caught if "new measurement" in str(w.message)]
    assert staged.result.epochs.tolist() == [0, 1, 2] and staged.result.measured_steps == saved.measured_steps * 3 // 2


def test_resume_with_other_settings_is_refused_and_with_another_engine_continues(tmp_path):
    # Lightning passes a callback its state only under the same state_key, which holds the settings
    data = DigitsData(RESUME_TASKS)

    def run(callbacks, max_epochs, ckpt_path=None):
        return _digits_fit(tmp_path, data, callbacks, max_epochs, ckpt_path)[1]

    full = AffinityCallback("encoder", every_n_steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    run([full, ckpt], 2)
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    for changed in ({"every_n_steps": 1}, {"method": "tag"}, {"every_n_steps": 2, "update": "optimizer"}):
        with pytest.raises(ValueError, match="other settings") as err:
            run([AffinityCallback("encoder", **changed)], 2, ckpt_path=path)
        assert "resume with the checkpoint's settings" in str(err.value) and "del ckpt['callbacks']" in str(err.value)
    other_engine = AffinityCallback("encoder", every_n_steps=2, engine="autograd")  # same numbers, other state_key
    run([other_engine], 2, ckpt_path=path)
    assert other_engine.result.measured_steps == full.result.measured_steps
    np.testing.assert_allclose(other_engine.result.matrix, full.result.matrix, rtol=1e-9, atol=1e-12)
    # two callbacks: one continues under another engine, the other is new and measures from the checkpoint on
    continued = AffinityCallback("encoder", every_n_steps=2, engine="autograd")
    new = AffinityCallback("encoder", method="tag", every_n_steps=1)
    messages = run([new, continued], 2, ckpt_path=path)
    assert continued.result.measured_steps == full.result.measured_steps
    assert new.result.epochs.tolist() == [1] and any("holds no measurement" in m for m in messages)
    # the removal the error message suggests lets a new measurement start from the checkpoint
    state = torch.load(path, weights_only=False)
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if not k.startswith("AffinityCallback")}
    torch.save(state, tmp_path / "stripped.ckpt")
    fresh = AffinityCallback("encoder", every_n_steps=1)
    messages = run([fresh], 2, ckpt_path=tmp_path / "stripped.ckpt")
    assert any("holds no measurement for this callback" in m for m in messages)
    assert fresh.result.epochs.tolist() == [1] and fresh.result.measured_steps > 0  # the second epoch only
    # validate / test from a checkpoint neither refuse it nor replace the measurement the callback holds
    model = MultiTaskMLP(16, RESUME_TASKS, hidden=(8,), lr=0.05, momentum=0.9)
    for cb in (AffinityCallback("encoder", every_n_steps=1), fresh):
        before = None if cb is not fresh else fresh.result.matrix.copy()
        with quiet_lightning(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                                default_root_dir=tmp_path)
            trainer.validate(model, dataloaders=data.train_dataloader(), ckpt_path=path)
        if before is not None:
            assert np.array_equal(fresh.result.matrix, before)


# ---------------------------------------------------------------------- the result object
def hand_result(**kw):
    m = np.array([[9.0, 1.0, 2.0], [3.0, 9.0, -4.0], [5.0, 0.5, 9.0]])
    return AffinityResult(("x", "y", "z"), m, m[None], [0], **kw)


def test_group_score_pairwise_and_pandas_by_hand():
    res = hand_result()
    # z_G->x = mean(M[y,x], M[z,x]) = (3 + 5)/2 ; z_G->y = (1 + 0.5)/2 ; z_G->z = (2 - 4)/2
    assert res.member_scores(["x", "y", "z"]) == pytest.approx({"x": 4.0, "y": 0.75, "z": -1.0})
    assert res.group_score(["x", "y", "z"]) == pytest.approx((4.0 + 0.75 - 1.0) / 3)
    assert res.group_score(["z", "y"]) == pytest.approx((-4.0 + 0.5) / 2)
    assert res.pairwise() == pytest.approx({("x", "y"): 2.0, ("x", "z"): 3.5, ("y", "z"): -1.75})
    assert res.score("y", "z") == -4.0
    with pytest.raises(ValueError, match="singleton has no affinity"):
        res.group_score(["x"])
    with pytest.raises(ValueError, match=r"the group is empty: name at least two of the tasks \['x', 'y', 'z'\]"):
        res.group_score([])
    with pytest.raises(ValueError, match="unknown task"):
        res.group_score(["x", "w"])
    with pytest.raises(ValueError, match="duplicate"):
        res.group_score(["x", "x"])
    pytest.importorskip("pandas")
    df = res.to_pandas()
    assert df.loc["y", "z"] == -4.0 and df.index.name == "source" and df.columns.name == "target"


def test_save_load_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    res = hand_result(step_matrices=rng.normal(size=(4, 3, 3)) / 7, steps=[0, 2, 4, 6], measured_steps=4,
                      skipped_steps=1, zero_loss_skips={"x": 0, "y": 2, "z": 0},
                      settings={"method": "etap", "divide_by_lr": True, "every_n_steps": 2})
    res = AffinityResult(res.task_names, res.matrix / 3, np.stack([res.matrix / 7, np.full((3, 3), np.nan)]), [0, 1],
                         res.step_matrices, res.steps, 4, 1, res.zero_loss_skips, res.settings)
    back = AffinityResult.load(res.save(tmp_path / "aff"))
    assert back == res and back.matrix.tobytes() == res.matrix.tobytes()
    assert np.isnan(back.epoch_matrices[1]).all()
    plain = hand_result()
    assert AffinityResult.load(plain.save(tmp_path / "plain")) == plain
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["affinity.json", "affinity.npz"]  # no temp files
    other = AffinityResult(("x", "y", "z"), np.ones((3, 3)), np.ones((1, 3, 3)), [0])
    other.save(tmp_path / "other")
    (tmp_path / "plain" / "affinity.npz").write_bytes((tmp_path / "other" / "affinity.npz").read_bytes())
    with pytest.raises(ValueError, match="interrupted"):  # arrays of another save beside this json
        AffinityResult.load(tmp_path / "plain")


def test_subset_keeps_each_entry_of_the_whole_fit(tmp_path):
    """subset(): rows and columns of the chosen tasks in every matrix, in the chosen order; saved and loaded."""
    rng = np.random.default_rng(0)
    names = ("a", "b", "c", "d")
    steps = rng.normal(size=(6, 4, 4))
    res = AffinityResult(names, steps.mean(0), np.stack([steps[:3].mean(0), steps[3:].mean(0)]), [0, 1],
                         step_matrices=steps, steps=np.arange(6), measured_steps=6, skipped_steps=1,
                         zero_loss_skips={"a": 1, "c": 2}, absent_steps={"d": 3}, settings={"method": "etap"},
                         half_matrices=np.stack([steps[::2].mean(0), steps[1::2].mean(0)]))
    sub = res.subset(["c", "a", "d"])
    idx = [2, 0, 3]
    assert sub.task_names == ("c", "a", "d")
    for k, i in enumerate(idx):
        for m, j in enumerate(idx):
            assert sub.matrix[k, m] == res.matrix[i, j] == res.score(names[i], names[j])
            assert np.array_equal(sub.step_matrices[:, k, m], steps[:, i, j])
            assert np.array_equal(sub.epoch_matrices[:, k, m], res.epoch_matrices[:, i, j])
            assert np.array_equal(sub.half_matrices[:, k, m], res.half_matrices[:, i, j])
    assert sub.group_score(["a", "c"]) == res.group_score(["a", "c"])
    assert sub.zero_loss_skips == {"a": 1, "c": 2} and sub.absent_steps == {"d": 3}
    assert (sub.measured_steps, sub.skipped_steps) == (6, 1) and sub.settings["subset_of"] == list(names)
    assert sub.subset(["a", "c"]).settings["subset_of"] == list(names)  # the fit's tasks, not the subset's
    assert AffinityResult.load(sub.save(tmp_path / "sub")) == sub
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['e'\]"):
        res.subset(["a", "e"])
    with pytest.raises(ValueError, match="duplicate"):
        res.subset(["a", "a"])


def test_docstring_examples_run():
    import doctest

    import lightning_etap.affinity.result as module

    outcome = doctest.testmod(module)
    assert outcome.failed == 0


def test_auto_schedule_is_decided_from_shapes_at_the_first_step_and_resumes(tmp_path):
    """The first step is measured; k comes from the multiply-add model, the same on every run; checkpointed."""
    from lightning_etap.affinity.gram import FIXED_CALL_MACS, FIXED_MEASURE_MACS, FIXED_STEP_MACS

    runs = []
    for _ in range(2):
        cb = AffinityCallback("encoder", overhead=0.1)
        torch.manual_seed(0)
        fit(TinyMTL(), tiny_loader(n=96), [cb], max_epochs=1)  # 12 steps
        runs.append(cb.result)
    res = runs[0]
    k = res.settings["every_n_steps_chosen"]
    # TinyMTL: shared inputs (dense), encoder 4 -> 5 -> 3, batch 8, 3 tasks, SGD (Gram shortcut allowed)
    n, R, layers = 3, 8, [(4, 5), (5, 3)]
    forward = sum(R * a * b for a, b in layers)
    extra = FIXED_MEASURE_MACS + FIXED_CALL_MACS * (len(layers) + 2)
    for a, b in layers:
        direct = n * R * a * b + n * n * a * b
        trick = R * R * a + n * R * R * b + n * n * R * b
        extra += n * R * a * b + min(direct, trick)
    expected_k = max(1, math.ceil(extra / (3 * forward + FIXED_STEP_MACS) / 0.1 - 1e-9))
    assert res.settings["every_n_steps"] == "auto" and k == expected_k > 1
    assert res.measured_steps == len(range(0, 12, k)) and runs[1] == res  # same steps, same numbers
    state = cb.state_dict()
    assert state["schedule"] == {"anchor": 0, "chosen": k, "control_variate": False, "proxy_every": 1}  # proxy too dear here
    again = AffinityCallback("encoder", overhead=0.1)
    again.load_state_dict(state)
    assert again._chosen == k and again._anchor == 0
    tag = AffinityCallback("encoder", method="tag", overhead=0.5)
    fit(TinyMTL(), tiny_loader(n=96), [tag], max_epochs=1)
    assert tag.result.settings["every_n_steps_chosen"] == 6  # n / overhead: about n plain steps per lookahead
    with pytest.raises(ValueError, match="every_n_steps"):
        AffinityCallback(every_n_steps="sometimes")
    with pytest.raises(ValueError, match="overhead"):
        AffinityCallback(overhead=0)


def test_engines_and_scopes_agree_with_the_autograd_reference():
    """engine='fast' == engine='autograd' on one fit; last_layer / representation by hand on the same steps."""
    torch.manual_seed(3)
    model = TinyMTL(optimizer="sgd", lr=0.1, opt_kwargs={"momentum": 0.9})
    cbs = {
        "fast": AffinityCallback("encoder", every_n_steps=1, update="optimizer", keep_step_scores=True),
        "autograd": AffinityCallback("encoder", every_n_steps=1, update="optimizer", engine="autograd",
                                     keep_step_scores=True),
        "last": AffinityCallback("encoder", every_n_steps=1, scope="last_layer", keep_step_scores=True),
        "rep": AffinityCallback("encoder", every_n_steps=1, scope="representation", keep_step_scores=True),
    }
    rec = Recorder()
    fit(model, tiny_loader(), [rec, *cbs.values()])
    np.testing.assert_allclose(cbs["fast"].result.step_matrices, cbs["autograd"].result.step_matrices,
                               rtol=1e-5, atol=1e-10)
    assert cbs["last"].result.measured_steps == cbs["rep"].result.measured_steps == 6
    assert cbs["rep"].result.settings["scope"] == "representation"
    with pytest.raises(ValueError, match="update='gradient'"):
        AffinityCallback("encoder", scope="representation", update="optimizer")
    with pytest.raises(ValueError, match="submodule"):
        AffinityCallback(lambda m: m.encoder.parameters(), scope="representation")
    with pytest.raises(ValueError, match="method='etap'"):
        AffinityCallback(method="tag", scope="last_layer")
    with pytest.raises(ValueError, match="engine"):
        AffinityCallback(engine="jax")


def test_curves_and_heatmap_reach_the_trainers_logger(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    cb = AffinityCallback("encoder", every_n_steps=1, log_every_n_steps=2)
    fit(TinyMTL(), tiny_loader(), [cb], logger=logger, log_every_n_steps=2)
    logger.finalize("success")
    import csv as _csv

    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        rows = [r for r in _csv.DictReader(fh) if r.get("affinity/a->b")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    folder = Path(logger.log_dir)
    assert (folder / "affinity_heatmap.png").stat().st_size > 1000
    with open(folder / "affinity_matrix.csv", newline="") as fh:
        table = list(_csv.reader(fh))
    assert table[0] == ["source", *TASKS]
    np.testing.assert_allclose(float(table[1][2]), cb.result.matrix[0, 1], rtol=1e-12)


# ---------------------------------------------------------------------- the control variate
def _hand_cv(exact, proxy, measured, epochs, reduction):
    """The control-variate matrix by hand: regression estimates at the unmeasured steps, then the reduction."""
    X, P = np.asarray(exact), np.asarray(proxy)
    m = np.asarray(measured)
    xs, ps = X[m], P[m]
    xbar, pbar = xs.mean(0), ps.mean(0)
    var = ((ps - pbar) ** 2).sum(0)
    beta = np.where(var > 0, ((xs - xbar) * (ps - pbar)).sum(0) / np.where(var > 0, var, 1), 0.0)
    if m.sum() < AffinityAccumulator.MIN_PAIRS:
        beta = np.zeros_like(beta)
    filled = np.where(m[:, None, None], X, xbar + beta * (P - pbar))
    epochs = np.asarray(epochs)
    if reduction == "mean":
        return filled.mean(0)
    return sum(filled[epochs == e].mean(0) for e in np.unique(epochs))


@pytest.mark.parametrize("reduction", ["mean", "epoch_mean_sum"])
@pytest.mark.parametrize("every", [2, 5, 30])
def test_control_variate_accumulator_matches_the_regression_by_hand(reduction, every):
    rng = np.random.default_rng(0)
    T, n = 30, 3
    P = rng.normal(size=(T, n, n))
    X = 2.0 * P + rng.normal(size=(n, n)) + 0.1 * rng.normal(size=(T, n, n))  # the proxy follows the exact score
    epochs = np.repeat(np.arange(3), 10)
    measured = np.arange(T) % every == 0
    acc = AffinityAccumulator(n)
    ok = torch.ones(n, dtype=torch.bool)
    for t in range(T):
        if measured[t]:
            acc.add(epochs[t], torch.as_tensor(X[t]), ok, step=t, proxy=torch.as_tensor(P[t]))
        else:
            acc.add_proxy(epochs[t], torch.as_tensor(P[t]), ok)
    np.testing.assert_allclose(acc.matrix(reduction).numpy(), _hand_cv(X, P, measured, epochs, reduction),
                               rtol=1e-10, atol=1e-12)
    assert acc.proxy_steps == int((~measured).sum())
    again = AffinityAccumulator.from_state_dict(acc.state_dict())
    assert torch.equal(again.matrix(reduction), acc.matrix(reduction))
    if every == 2:  # the estimate is far closer to the every-step average than the sample it starts from
        plain = X[measured].mean(0) if reduction == "mean" else sum(
            X[measured & (epochs == e)].mean(0) for e in range(3))
        truth = X.mean(0) if reduction == "mean" else sum(X[epochs == e].mean(0) for e in range(3))
        assert np.abs(acc.matrix(reduction).numpy() - truth).max() < 0.5 * np.abs(plain - truth).max()


def test_control_variate_leaves_unmeasured_columns_unknown_and_needs_three_pairs():
    acc = AffinityAccumulator(2)
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    acc.add(0, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), first, proxy=torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    acc.add_proxy(0, torch.tensor([[5.0, 5.0], [5.0, 5.0]]), both)
    m = acc.matrix("mean")
    assert torch.isnan(m[:, 1]).all()  # column 1 was never measured exactly: no estimate either
    assert torch.equal(m[:, 0], torch.tensor([1.0, 3.0], dtype=torch.float64))  # one pair: beta = 0, the mean


class RecordProxy:
    """Wraps ``GramEngine.proxy_products`` to keep every step's proxy products."""

    def __init__(self, monkeypatch):
        from lightning_etap.affinity.gram import GramEngine

        self.calls = []
        original = GramEngine.proxy_products

        def wrapped(engine, parts, rules, **kw):
            out = original(engine, parts, rules, **kw)
            self.calls.append((out.clone(), torch.stack([p.detach() for p in parts]).double()))
            return out

        monkeypatch.setattr(GramEngine, "proxy_products", wrapped)


def test_control_variate_callback_combines_exact_steps_and_proxy_steps(monkeypatch):
    """A fit with control_variate=True every 3rd step == the regression by hand from the exact every-step
    scores (a second callback on the same fit) and the proxy recorded at every step (the proxy by hand:
    test_control_variate_proxy_by_hand)."""
    rec = RecordProxy(monkeypatch)
    torch.manual_seed(0)
    cv = AffinityCallback("encoder", every_n_steps=3, control_variate=True, reduction="mean")
    every = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True, reduction="mean")
    fit(TinyMTL(), tiny_loader(n=96), [cv, every], max_epochs=2)  # 24 steps
    steps = every.result.step_matrices
    assert len(rec.calls) == len(steps) == 24
    proxy = np.stack([(P / L.unsqueeze(0)).numpy() for P, L in rec.calls])
    measured = np.arange(24) % 3 == 0
    res = cv.result
    assert res.measured_steps == 8 and res.settings["proxy_steps"] == 16 and res.settings["control_variate_chosen"]
    np.testing.assert_allclose(res.matrix, _hand_cv(steps, proxy, measured, np.zeros(24), "mean"),
                               rtol=1e-6, atol=1e-9)



def _engine_proxy(model, x, y, rules_lr=0.1):
    """The engine's proxy products of one step of ``model`` on ``(x, y)`` (and the step's per-task losses)."""
    from lightning_etap.affinity.gram import GramEngine
    from lightning_etap.affinity.scores import task_update_rules

    params = list(model.encoder.parameters())
    engine = GramEngine(model, params, root=model.encoder)
    engine.start_step(proxy=True)
    h = model.encoder(x)
    parts = [F.mse_loss(head(h).squeeze(-1), y[:, k]) for k, head in enumerate(model.heads)]
    rules = task_update_rules(torch.optim.SGD(model.parameters(), lr=rules_lr), params, "gradient", per_unit_lr=True)
    P = engine.proxy_products(parts, rules)
    engine.close()
    return P


@pytest.mark.parametrize("width", [5, 12])
def test_control_variate_proxy_by_hand(width):
    """The proxy: exact products of the last shared layer's bias gradients plus its weight gradients seen
    through the basis Q of the leading directions of its inputs (range finder from a fixed start Ω). With
    no more input columns than the basis holds, Q spans them all: the exact last-layer products."""
    from lightning_etap.affinity.gram import PROXY_RANK

    torch.manual_seed(1)
    model = TinyMTL(d=4, hidden=(width, 3))
    x, y = next(iter(tiny_loader()))
    last = model.encoder[2]
    store = {}
    handle = last.register_forward_hook(lambda m, a, out: store.update(A=a[0], z=out))
    h = model.encoder(x)
    handle.remove()
    losses = [F.mse_loss(head(h).squeeze(-1), y[:, k]) for k, head in enumerate(model.heads)]
    if width <= PROXY_RANK:
        G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, [last.weight, last.bias],
                                                                             retain_graph=True)])
                         for loss in losses])
    else:  # by hand: Δ_i at the layer's outputs, Q from AᵀAΩ with the engine's fixed start
        A = store["A"].detach()
        omega = torch.randn(width, PROXY_RANK, generator=torch.Generator().manual_seed(0))
        Q = torch.linalg.qr(A.T @ A @ omega).Q
        deltas = [torch.autograd.grad(loss, store["z"], retain_graph=True)[0] for loss in losses]
        G = torch.stack([torch.cat([d.sum(0), (d.T @ A @ Q).flatten()]) for d in deltas])
    expected = (G @ G.T).double()  # per_unit_lr: the released score, the update divided by the lr
    torch.testing.assert_close(_engine_proxy(model, x, y), expected, rtol=1e-5, atol=1e-8)


def test_control_variate_proxy_without_a_linear_layer_is_the_representation_bias():
    """A shared root with no nn.Linear: the products of the gradients of a bias on the representation."""
    class Elementwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

        def forward(self, x):
            return torch.tanh(x * self.scale)

    model = TinyMTL(d=4, hidden=(5, 4))
    model.encoder = Elementwise()
    model.heads = nn.ModuleList([nn.Linear(4, 1) for _ in TASKS])
    x, y = next(iter(tiny_loader()))
    h = model.encoder(x)
    losses = [F.mse_loss(head(h).squeeze(-1), y[:, k]) for k, head in enumerate(model.heads)]
    b = torch.stack([torch.autograd.grad(loss, h, retain_graph=True)[0].sum(0) for loss in losses])
    torch.testing.assert_close(_engine_proxy(model, x, y), (b @ b.T).double(), rtol=1e-5, atol=1e-8)


def test_control_variate_auto_scores_the_proxy_every_step_or_every_other_step_by_its_cost():
    """The auto schedule: proxy at every unmeasured step when it costs at most overhead / 2, at every other one
    when it costs up to overhead, off beyond; the exact steps get the whole overhead either way."""

    class Recording(AffinityCallback):
        def _decide_interval(self, trainer, n):
            if self._engine is not None and self._engine.last_costs is not None:
                self.costs = (self._engine.last_costs, self._engine.last_proxy_macs)
            super()._decide_interval(trainer, n)

    def model():  # wide enough that an exact step costs far more than the proxy
        torch.manual_seed(0)
        return TinyMTL(hidden=(1024, 1024), lr=1e-3)

    probe = Recording("encoder")
    fit(model(), tiny_loader(n=1536, batch_size=128), [probe], max_epochs=1)
    (plain, extra), proxy = probe.costs
    p = proxy / plain
    for overhead, cv, every in ((2.5 * p, True, 1), (1.5 * p, True, 2), (0.8 * p, False, 1)):
        cb = AffinityCallback("encoder", overhead=overhead)
        fit(model(), tiny_loader(n=1536, batch_size=128), [cb], max_epochs=2)  # 24 steps
        res = cb.result
        k = res.settings["every_n_steps_chosen"]
        assert k == max(1, math.ceil(extra / plain / overhead - 1e-9)) >= 3
        assert res.settings["control_variate_chosen"] is cv and res.settings["proxy_every"] == every
        unmeasured = [t for t in range(24) if t % k]
        expected = len([t for t in unmeasured if t % every == 0]) if cv else 0
        assert res.measured_steps == len(range(0, 24, k)) and res.settings["proxy_steps"] == expected
        state = cb.state_dict()
        assert state["schedule"]["proxy_every"] == every
        again = AffinityCallback("encoder", overhead=overhead)
        again.load_state_dict(state)
        assert (again._cv, again._proxy_every, again._chosen) == (cv, every, k)


def test_control_variate_with_every_other_step_measured_scores_the_proxy_at_the_others():
    """Forced on under "auto": with every 2nd step measured the proxy scores all the others (the offset rule
    would never pick one), and with every step measured it is off (nothing to estimate)."""
    for overhead, k, proxies in ((0.3, 2, 12), (0.5, 1, 0)):
        torch.manual_seed(0)
        cb = AffinityCallback("encoder", control_variate=True, overhead=overhead)
        fit(TinyMTL(hidden=(32, 32)), tiny_loader(n=96), [cb], max_epochs=2)  # 24 steps
        settings = cb.result.settings
        assert settings["every_n_steps_chosen"] == k and settings["proxy_steps"] == proxies
        assert settings["control_variate_chosen"] is (k > 1)


def test_control_variate_auto_turns_on_only_where_the_proxy_is_cheap():
    tiny = AffinityCallback("encoder")  # tiny model: a per-task backward call costs more than the budget allows
    fit(TinyMTL(), tiny_loader(n=96), [tiny], max_epochs=1)
    assert tiny.result.settings["control_variate_chosen"] is False and tiny.result.settings["proxy_steps"] == 0
    off = AffinityCallback("encoder", every_n_steps=4)  # an explicit schedule keeps the plain sample
    fit(TinyMTL(), tiny_loader(n=96), [off], max_epochs=1)
    assert "control_variate_chosen" not in off.result.settings
    with pytest.raises(ValueError, match="control_variate"):
        AffinityCallback("encoder", method="tag", control_variate=True)
    with pytest.raises(ValueError, match="control_variate"):
        AffinityCallback("encoder", control_variate="sometimes")
