"""AffinityCallback under mixed precision and gradient accumulation.

* bf16 autocast (``precision="bf16-mixed"``, the CPU's mixed precision): the
  callback leaves training bit-for-bit unchanged and scores the same steps as
  a float32 run up to bf16 rounding.
* fp16 autocast with loss scaling (an explicit ``MixedPrecision`` plugin with a
  CPU ``GradScaler``; Lightning itself maps ``"16-mixed"`` to bf16 on a CPU):
  the scale multiplies the seeds of the callback's own backward passes and is
  divided out again, so the scores do not depend on it.
"""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_etap.affinity import AffinityCallback
from lightning_etap.training import quiet_lightning

TASKS = ("a", "b", "c")


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in TASKS])

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.encoder(x)
        losses = {t: F.mse_loss(head(h).squeeze(-1).float(), y[:, k]) for k, (t, head) in enumerate(zip(TASKS, self.heads))}
        return {"loss": sum(losses.values()), "task_losses": losses}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 2], x[:, 3] * x[:, 4]], 1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def fit(callbacks, loader_=None, **kw):
    L.seed_everything(0, verbose=False)
    model = Model()
    args = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    args.update(kw)
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        trainer = L.Trainer(callbacks=callbacks, **args)
        trainer.fit(model, train_dataloaders=loader_ or loader())
    return model


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_bf16_training_is_untouched_and_scores_match_float32():
    plain = fit([], precision="bf16-mixed")
    fast = AffinityCallback("encoder", every_n_steps=1, update="optimizer", keep_step_scores=True)
    exact = AffinityCallback("encoder", every_n_steps=1, update="optimizer", engine="autograd",
                             keep_step_scores=True)
    measured = fit([fast, exact], precision="bf16-mixed")
    torch.testing.assert_close(params(plain), params(measured), rtol=0, atol=0)
    a, b = fast.result.step_matrices, exact.result.step_matrices
    assert np.isfinite(a).all() and fast.result.measured_steps == exact.result.measured_steps == 8
    np.testing.assert_allclose(a, b, rtol=0.03, atol=0.01 * np.abs(b).max())  # bf16 keeps 8 significant bits
    ref = AffinityCallback("encoder", every_n_steps=1, update="optimizer", keep_step_scores=True)
    fit([ref], max_steps=1)  # step 0 starts from the same parameters in float32
    np.testing.assert_allclose(a[0], ref.result.step_matrices[0], rtol=0.05, atol=0.01 * np.abs(b[0]).max())


def test_tag_lookahead_under_bf16_compares_losses_of_one_precision():
    # the step's losses come from its bf16 autocast forward, the lookahead's from a float32 forward outside it:
    # TAG's ratio must take both from the same forward, or it measures bf16 rounding instead of the update
    plain = fit([], precision="bf16-mixed")
    tag = AffinityCallback("encoder", method="tag", every_n_steps=1, keep_step_scores=True)
    measured = fit([tag], precision="bf16-mixed")
    torch.testing.assert_close(params(plain), params(measured), rtol=0, atol=0)
    ref = AffinityCallback("encoder", method="tag", every_n_steps=1, keep_step_scores=True)
    fit([ref], max_steps=1)  # step 0 starts from the same parameters in float32
    a, b = tag.result.step_matrices[0], ref.result.step_matrices[0]
    assert tag.result.measured_steps == 8 and np.isfinite(tag.result.step_matrices).all()
    np.testing.assert_allclose(a, b, rtol=0.02, atol=1e-3 * np.abs(b).max())


@pytest.mark.parametrize("scale", [2.0**4, 2.0**12])
def test_fp16_loss_scale_is_divided_out(scale):
    def plugin():
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale,
                                                                             growth_interval=10**6))

    cb = AffinityCallback("encoder", every_n_steps=1, engine="fast")
    ag = AffinityCallback("encoder", every_n_steps=1, engine="autograd")
    fit([cb, ag], plugins=[plugin()])
    ref = AffinityCallback("encoder", every_n_steps=1)
    fit([ref])
    for got in (cb, ag):
        a, b = got.result.matrix, ref.result.matrix
        assert got.result.measured_steps == 8
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.01 * np.abs(b).max())


def test_gradient_accumulation_leaves_training_untouched():
    """Two micro-batches per optimizer step (the scores themselves are checked by hand in test_affinity.py)."""
    plain = fit([], accumulate_grad_batches=2, loader_=loader(8))
    cb = AffinityCallback("encoder", every_n_steps=1)
    measured = fit([cb], accumulate_grad_batches=2, loader_=loader(8))
    torch.testing.assert_close(params(plain), params(measured), rtol=0, atol=0)
    assert cb.result.measured_steps == 8  # 64 rows / 8 per micro-batch / 2 per step, 2 epochs
