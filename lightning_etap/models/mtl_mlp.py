"""The reference shared-bottom multi-task model.

The affinity contract
---------------------
Anything the :class:`~lightning_etap.AffinityCallback` measures needs two
things from a LightningModule, and this module shows the whole of it:

1. ``training_step`` returns a dict with the total loss under ``"loss"`` and
   the step's per-task losses (scalar tensors, still attached to the graph)
   under ``"task_losses"``::

       return {"loss": sum(losses.values()), "task_losses": losses}

2. the shared parameters can be named: a submodule name (``"encoder"``), a list
   of parameters, or a callable ``module -> parameters``.

A user's own module needs nothing else from this library, no base class and
no mixin.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric


def _lr_factor(epoch: int, start: int | None, every: int | None, factor: float) -> float:
    """Multiplier of the base lr in epoch ``epoch`` (0-based).

    The released Chemical code multiplies the lr by ``factor`` at the start of
    every epoch ``k > start`` with ``(k + 1) % every == 0``.
    """
    if start is None or every is None:
        return 1.0
    n = sum(1 for k in range(start + 1, epoch + 1) if (k + 1) % every == 0)
    return factor**n


class MultiTaskMLP(L.LightningModule):
    """Shared MLP encoder with one linear head per task.

    Works for any group of tasks, a single task (STL) included. Binary tasks
    use binary cross-entropy on the head's logit (a sigmoid unit trained with
    BCE, computed stably); regression tasks use mean-squared error averaged
    over the target's width.

    Args:
        input_dim: number of input features.
        task_names: the group's tasks.
        task_kinds: ``"binary"`` or ``"regression"`` per task (default all binary).
        target_dims: output width per task (int for all, or a sequence).
        hidden: encoder widths; each layer is Linear + ReLU. ``()`` gives linear heads.
        dropout: dropout after every encoder layer.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr, momentum, nesterov, weight_decay: optimizer settings (momentum and
            nesterov apply to SGD).
        lr_decay_start, lr_decay_every, lr_decay_factor: step schedule of the
            released Chemical code (``100, 75, 0.5``): from epoch ``start + 1``
            the lr is multiplied by ``factor`` whenever ``(epoch + 1) % every == 0``.
            ``None`` disables it.
        init: ``"torch"`` (PyTorch's default Linear initialisation) or
            ``"glorot"`` (Glorot-uniform weights and zero biases, the default of
            the Keras layers the paper's released code uses; with the paper's
            small learning rate it trains much faster than torch's default).

    Raises:
        ValueError: empty or duplicated task names, mismatched kinds / dims,
            unknown optimizer or kind.

    Example:
        >>> model = MultiTaskMLP(180, ["83", "78"], hidden=(32, 16))
        >>> [n for n, _ in model.encoder.named_parameters()]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """

    def __init__(
        self,
        input_dim: int,
        task_names: Sequence[str],
        task_kinds: Sequence[str] | None = None,
        target_dims: int | Sequence[int] = 1,
        hidden: Sequence[int] = (32, 16),
        dropout: float = 0.0,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        lr_decay_start: int | None = None,
        lr_decay_every: int | None = None,
        lr_decay_factor: float = 0.5,
        init: str = "torch",
        gradient_surgery: str | None = None,
    ) -> None:
        super().__init__()
        names = [str(t) for t in task_names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"task_names must be non-empty and unique, got {names}")
        kinds = list(task_kinds) if task_kinds is not None else ["binary"] * len(names)
        dims = [int(target_dims)] * len(names) if isinstance(target_dims, int) else list(target_dims)
        if len(kinds) != len(names) or len(dims) != len(names):
            raise ValueError("task_kinds and target_dims must have one entry per task")
        if any(k not in ("binary", "regression") for k in kinds):
            raise ValueError(f"task kinds must be 'binary' or 'regression', got {kinds}")
        if init not in ("torch", "glorot"):
            raise ValueError(f"init must be 'torch' or 'glorot', got {init!r}")
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        if gradient_surgery not in (None, "pcgrad"):
            raise ValueError(f"gradient_surgery must be None or 'pcgrad', got {gradient_surgery!r}")
        self.save_hyperparameters()
        self.task_names = names
        self.task_kinds = kinds

        layers: list[nn.Module] = []
        width = int(input_dim)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(width, d) for d in dims])
        if init == "glorot":
            for layer in [*self.encoder, *self.heads]:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        self._index = {t: i for i, t in enumerate(names)}
        self.val_metrics = nn.ModuleList([MeanMetric() for _ in names])
        self.test_metrics = nn.ModuleList([MeanMetric() for _ in names])
        #: per-task test losses of the last ``trainer.test`` (task -> float)
        self.test_losses: dict[str, float] = {}
        self.gradient_surgery = gradient_surgery
        self._surgery_grad: Tensor | None = None

    # ----------------------------------------------------------------- model
    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters every task shares (the encoder's)."""
        return list(self.encoder.parameters())

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """Head outputs (logits for binary tasks) per task.

        ``x`` is one input batch for all tasks, or a dict of per-task batches
        (encoded in one pass over their concatenation).
        """
        if isinstance(x, Tensor):
            h = self.encoder(x)
            return {t: self.heads[i](h) for t, i in self._index.items()}
        tasks = [t for t in x if t in self._index]
        sizes = [x[t].shape[0] for t in tasks]
        h = self.encoder(torch.cat([x[t] for t in tasks]))
        return {t: self.heads[self._index[t]](ht) for t, ht in zip(tasks, torch.split(h, sizes))}

    def _loss(self, task: str, out: Tensor, y: Tensor) -> Tensor:
        if self.task_kinds[self._index[task]] == "binary":
            return F.binary_cross_entropy_with_logits(out, y)
        return F.mse_loss(out, y)

    def task_losses(self, batch: dict) -> dict[str, Tensor]:
        """Mean loss of every task present in ``batch`` (scalar tensors, in graph)."""
        outputs = self(batch["x"])
        return {t: self._loss(t, outputs[t], y) for t, y in batch["y"].items()}

    # -------------------------------------------------------------- training
    # ------------------------------------------------------- gradient surgery
    def prepare_surgery(self, losses: dict[str, Tensor]) -> None:
        """With ``gradient_surgery="pcgrad"``: the PCGrad update of the encoder, kept for :meth:`apply_surgery`.

        Per-task gradients of the shared parameters are taken from the live
        graph (one backward call per task); the step's own backward then runs
        as usual and :meth:`apply_surgery` replaces the encoder's summed
        gradient by the PCGrad combination. Heads keep their plain gradients.
        """
        if self.gradient_surgery is None:
            return
        from lightning_etap.models.surgery import pcgrad

        params = [p for p in self.encoder.parameters() if p.requires_grad]
        rows = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads, params)]))
        self._surgery_grad = pcgrad(torch.stack(rows))

    def apply_surgery(self) -> None:
        """Put the prepared PCGrad update into the encoder's ``.grad`` (after the step's backward)."""
        if self._surgery_grad is None:
            return
        flat, self._surgery_grad = self._surgery_grad, None
        offset = 0
        for p in self.encoder.parameters():
            if not p.requires_grad:
                continue
            size = p.numel()
            p.grad = flat[offset:offset + size].view_as(p).clone()
            offset += size

    def on_after_backward(self) -> None:
        self.apply_surgery()

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        losses = self.task_losses(batch)
        self.prepare_surgery(losses)
        total = torch.stack(list(losses.values())).sum()
        if self._trainer is not None:
            self.log("train_loss", total.detach(), on_step=False, on_epoch=True,
                     batch_size=next(iter(batch["y"].values())).shape[0])
        return {"loss": total, "task_losses": losses}

    def _eval_step(self, batch: dict, metrics: nn.ModuleList) -> None:
        for t, loss in self.task_losses(batch).items():
            metrics[self._index[t]].update(loss.detach(), batch["y"][t].shape[0])

    def _eval_epoch_end(self, metrics: nn.ModuleList, prefix: str) -> dict[str, float]:
        values = {t: metrics[i].compute() for t, i in self._index.items()}
        for m in metrics:
            m.reset()
        total = torch.stack(list(values.values())).sum()
        self.log(f"{prefix}_loss", total, prog_bar=prefix == "val")
        if len(values) > 1:
            self.log_dict({f"{prefix}_loss/{t}": v for t, v in values.items()})
        return {t: float(v) for t, v in values.items()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_losses = self._eval_epoch_end(self.test_metrics, "test")

    def configure_optimizers(self):
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                  weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_decay_start is None or hp.lr_decay_every is None:
            return opt
        start, every, factor = hp.lr_decay_start, hp.lr_decay_every, hp.lr_decay_factor
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: _lr_factor(e, start, every, factor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
