"""AffinityCallback on torch.compile'd modules: the exact numbers of the eager module, training unchanged."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_etap.affinity import AffinityCallback

pytestmark = pytest.mark.slow  # compiling costs seconds per graph on a CPU

TASKS = ("a", "b", "c")


class SharedEncoder(L.LightningModule):
    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})
        self.momentum = momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.encoder(x)
        losses = {t: nn.functional.mse_loss(self.heads[t](h).squeeze(1), y[:, i]) for i, t in enumerate(TASKS)}
        return {"loss": sum(losses.values()), "task_losses": losses}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - 0.5 * x[:, 2], -x[:, 1]], dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


def _fit(compile_: str | None, callback: AffinityCallback | None = None):
    torch.manual_seed(0)
    module = SharedEncoder()
    model = module
    if compile_ == "module":  # Lightning unwraps it and compiles the steps
        model = torch.compile(module)
    elif compile_ == "submodule":
        module.encoder = torch.compile(module.encoder)
    elif compile_ == "in_place":
        module.compile()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[callback] if callback is not None else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=_loader())
    said = [str(w.message) for w in caught if "torch.compile'd" in str(w.message)]
    return module, said


@pytest.fixture(scope="module")
def eager():
    callback = AffinityCallback(shared="encoder", tasks=list(TASKS), every_n_steps=1)
    module, _ = _fit(None, callback)
    return callback.result.matrix, [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("how", ["module", "submodule", "in_place"])
def test_a_compiled_module_gets_the_eager_matrix_and_trains_as_without_the_callback(eager, how):
    matrix, _ = eager
    before = torch._functorch.config.donated_buffer
    callback = AffinityCallback(shared="encoder", tasks=list(TASKS), every_n_steps=1)
    module, said = _fit(how, callback)
    assert len(said) == 1 and "exact autograd" in said[0]
    # compiled kernels round differently from eager ones: agreement to float32 rounding, not bits
    np.testing.assert_allclose(callback.result.matrix, matrix, rtol=1e-4, atol=1e-7)
    assert callback.result.measured_steps == 8
    assert torch._functorch.config.donated_buffer == before  # restored at teardown
    plain, _ = _fit(how)  # the same compiled training without the callback: bit for bit
    for p, q in zip(module.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_two_callbacks_on_a_compiled_module_restore_torchs_setting():
    before = torch._functorch.config.donated_buffer
    callbacks = [AffinityCallback(shared="encoder", tasks=list(TASKS), every_n_steps=k) for k in (1, 2)]
    torch.manual_seed(0)
    module = SharedEncoder()
    module.encoder = torch.compile(module.encoder)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=_loader())
    assert all(cb.result.measured_steps for cb in callbacks)
    assert torch._functorch.config.donated_buffer == before


def test_tag_on_a_compiled_module_matches_eager():
    def tag(how):
        callback = AffinityCallback(shared="encoder", tasks=list(TASKS), method="tag", every_n_steps=1)
        _fit(how, callback)
        return callback.result.matrix

    np.testing.assert_allclose(tag("submodule"), tag(None), rtol=1e-4, atol=1e-7)


def test_activation_scopes_on_a_compiled_module_are_refused_with_the_fix():
    callback = AffinityCallback(shared="encoder", tasks=list(TASKS), scope="last_layer", every_n_steps=1)
    with pytest.raises(ValueError, match="scope='last_layer' reads the shared layers' activations .* "
                                         "Use scope='shared'"):
        _fit("submodule", callback)
