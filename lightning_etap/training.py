"""Train one task group the way the paper trains it, and return its test losses.

``train_group(dataset, tasks, preset, seed)`` builds the reference
:class:`~lightning_etap.models.MultiTaskMLP` and
:class:`~lightning_etap.data.MultiTaskDataModule`, fits with early stopping on
the summed validation loss (best weights restored, as the released code does),
and evaluates every task on the test split. Same seed, same numbers (CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from lightning_etap.data.base import MultiTaskDataset
from lightning_etap.data.datamodule import MultiTaskDataModule
from lightning_etap.models.mtl_mlp import MultiTaskMLP

__all__ = ["PRESETS", "GroupTrainResult", "TrainConfig", "get_preset", "relative_gain", "train_group"]


@dataclass(frozen=True)
class TrainConfig:
    """Model and training recipe for one group.

    Args:
        hidden: encoder widths (Linear + ReLU each).
        optimizer, lr, momentum, nesterov, weight_decay: optimizer settings.
        batch_size: training batch size (per task for per-task inputs).
        max_epochs: epoch cap.
        patience: early-stopping patience in epochs on the summed validation
            loss; the weights of the best epoch are restored before testing.
        lr_decay_start, lr_decay_every, lr_decay_factor: the released Chemical
            step schedule (see :class:`MultiTaskMLP`); ``None`` disables it.
        dropout: encoder dropout.
        oversample: oversample smaller tasks in a per-task-input group.
        eval_batch_size: validation / test chunk size.
        init: weight initialisation, ``"torch"`` or ``"glorot"`` (Keras' default,
            used by the paper's released code).
        gradient_surgery: ``None`` or ``"pcgrad"`` (PCGrad on the shared
            encoder, Yu et al. 2020; the paper's Table 10 baseline).
    """

    hidden: tuple[int, ...] = (32, 16)
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 264
    max_epochs: int = 1000
    patience: int = 20
    lr_decay_start: int | None = None
    lr_decay_every: int | None = None
    lr_decay_factor: float = 0.5
    dropout: float = 0.0
    oversample: bool = True
    eval_batch_size: int = 4096
    init: str = "torch"
    gradient_surgery: str | None = None

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON data (part of ground-truth store fingerprints).

        Fields added after the first release are left out while at their
        default, so stores written before them stay valid.
        """
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        for key, default in _LATER_FIELDS.items():
            if out.get(key) == default:
                del out[key]
        return out


#: fields added after the first release, with their defaults (see TrainConfig.to_dict)
_LATER_FIELDS: dict[str, Any] = {"gradient_surgery": None}


#: Named recipes. ``chemical`` is the paper's (appendix B.1 + released code).
PRESETS: dict[str, TrainConfig] = {
    "chemical": TrainConfig(
        hidden=(32, 16), optimizer="sgd", lr=1e-3, momentum=0.9, batch_size=264,
        max_epochs=1000, patience=20, lr_decay_start=100, lr_decay_every=75, lr_decay_factor=0.5,
        init="glorot",
    ),
    # ETTm1 as measured in ETAP-NOTES: a 2-layer MLP (64, 32) over windows of all 7 series, SGD.
    "ettm1": TrainConfig(
        hidden=(64, 32), optimizer="sgd", lr=0.01, momentum=0.9, batch_size=256,
        max_epochs=30, patience=3,
    ),
    "digits": TrainConfig(
        hidden=(32, 16), optimizer="sgd", lr=0.05, momentum=0.9, batch_size=32,
        max_epochs=150, patience=10,
    ),
    "school": TrainConfig(
        hidden=(16,), optimizer="sgd", lr=0.01, momentum=0.9, batch_size=32,
        max_epochs=200, patience=10,
    ),
    "parkinsons": TrainConfig(
        hidden=(32, 16), optimizer="sgd", lr=0.01, momentum=0.9, batch_size=32,
        max_epochs=200, patience=10,
    ),
    "landmine": TrainConfig(
        hidden=(32, 16), optimizer="sgd", lr=0.01, momentum=0.9, batch_size=64,
        max_epochs=200, patience=10,
    ),
}


def get_preset(name: str | TrainConfig) -> TrainConfig:
    """A preset by name (or a :class:`TrainConfig` passed through)."""
    if isinstance(name, TrainConfig):
        return name
    key = str(name).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or pass a TrainConfig")
    return PRESETS[key]


@dataclass(frozen=True)
class GroupTrainResult:
    """What training one group produced.

    Attributes:
        tasks: the group.
        test_losses: task -> mean test loss (BCE or MSE) with the best weights.
        val_loss: best summed validation loss.
        best_epoch: 0-based epoch of the restored weights.
        epochs: epochs run before early stopping (or the cap).
        seconds: wall time of fit + test.
        seed: the seed used.
    """

    tasks: tuple[str, ...]
    test_losses: dict[str, float]
    val_loss: float
    best_epoch: int
    epochs: int
    seconds: float
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_test_loss(self) -> float:
        return float(sum(self.test_losses.values()))


class RestoreBestWeights(Callback):
    """Keep an in-memory copy of the weights at the best ``monitor`` value; restore them at fit end.

    Compares strictly (``<``), like :class:`EarlyStopping` with ``min_delta=0``,
    so the restored weights are those of the epoch early stopping counts from.
    """

    def __init__(self, monitor: str = "val_loss") -> None:
        self.monitor = monitor
        self.best = math.inf
        self.best_epoch = -1
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if value < self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self._state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)

    def state_dict(self) -> dict[str, Any]:
        # in a checkpoint of the fit, so a fit resumed from it restores the same best weights
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch, "weights": self._state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.best_epoch = int(state_dict["best_epoch"])
        weights = state_dict["weights"]
        self._state = None if weights is None else {k: v.detach().clone() for k, v in weights.items()}


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` torch intra-op threads (``None``: unchanged), restoring the count after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's per-Trainer banners and the harmless warnings of small in-memory fits.

    Training hundreds of groups would otherwise print the same accelerator
    lines and tips hundreds of times. Real warnings still pass.
    """
    names = ["lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
             "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def build_model(dataset: MultiTaskDataset, tasks: Sequence[str], config: TrainConfig) -> MultiTaskMLP:
    """The reference model for ``tasks`` of ``dataset`` with ``config``'s recipe."""
    return MultiTaskMLP(
        input_dim=dataset.feature_dim,
        task_names=list(tasks),
        task_kinds=[dataset.kind(t) for t in tasks],
        target_dims=[dataset.target_dim(t) for t in tasks],
        hidden=config.hidden,
        dropout=config.dropout,
        optimizer=config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        lr_decay_start=config.lr_decay_start,
        lr_decay_every=config.lr_decay_every,
        lr_decay_factor=config.lr_decay_factor,
        init=config.init,
        gradient_surgery=config.gradient_surgery,
    )


def train_group(
    dataset: MultiTaskDataset,
    tasks: Sequence[str] | None = None,
    config: str | TrainConfig = "chemical",
    seed: int = 0,
    *,
    callbacks: Sequence[Callback] = (),
    logger: Any = False,
    threads: int | None = 1,
    engine: str = "lightning",
    ckpt_path: str | os.PathLike[str] | None = None,
    **trainer_kwargs: Any,
) -> GroupTrainResult:
    """Train one group with early stopping and return every member's test loss.

    Args:
        dataset: the dataset.
        tasks: the group; ``None`` means all tasks; one task is single-task learning.
        config: a preset name (see :data:`PRESETS`) or a :class:`TrainConfig`.
        seed: seeds model initialisation, batch order and oversampling.
        callbacks: extra Lightning callbacks (e.g. an ``AffinityCallback``).
        logger: a Lightning logger, or ``False`` (default) for none.
        threads: torch intra-op threads during this call (restored afterwards).
            The reference models are small, and on a CPU they train fastest on
            one thread (measured 10x faster than two threads on a busy 2-core
            machine); ``None`` keeps torch's current setting.
        engine: ``"lightning"`` (default): a :class:`lightning.Trainer` with
            early stopping and best-weight restoring callbacks. ``"loop"``: the
            same steps in a plain PyTorch loop (same initialisation, batches,
            optimizer and schedule, validation every epoch, the same stopping
            and restoring rules), for ground truth at scale: the reference
            models are so small that the Trainer's per-step bookkeeping is
            most of their training time (ETTm1: 1.6-2.2x less CPU time, the same
            test losses to the bit on the CPU). It takes no ``callbacks``,
            ``logger`` or Trainer arguments.
        ckpt_path: resume the fit from this Lightning checkpoint of the same call (same dataset, tasks,
            config, seed and callbacks), as ``Trainer.fit(ckpt_path=...)`` does; the early stopping and
            best-weight states are in it. Loaded with ``weights_only=False``: pass only checkpoints you
            wrote. Only with ``engine="lightning"``.
        **trainer_kwargs: passed to :class:`lightning.Trainer` (e.g. ``accelerator``).

    Returns:
        A :class:`GroupTrainResult`.

    Raises:
        ValueError: an unknown ``engine``, or ``engine="loop"`` with callbacks,
            a logger, Trainer arguments or ``ckpt_path``.
    """
    if engine not in ("lightning", "loop"):
        raise ValueError(f"engine must be 'lightning' or 'loop', got {engine!r}")
    if engine == "loop" and ckpt_path is not None:
        raise ValueError("engine='loop' trains without a Lightning Trainer: it cannot resume from a checkpoint")
    if engine == "loop" and (callbacks or logger or trainer_kwargs):
        raise ValueError("engine='loop' trains without a Lightning Trainer: it takes no callbacks, logger or "
                         f"Trainer arguments (got {sorted(trainer_kwargs) or 'callbacks / a logger'})")
    cfg = get_preset(config)
    group = dataset.check_tasks(dataset.task_names if tasks is None else tasks)
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = MultiTaskDataModule(
        dataset, group, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        oversample=cfg.oversample, seed=seed,
    )
    model = build_model(dataset, group, cfg)
    if engine == "loop":
        with torch_threads(threads):
            test_losses, val_loss, best_epoch, epochs = _fit_loop(model, datamodule, cfg)
        return GroupTrainResult(tuple(group), test_losses, val_loss, best_epoch, epochs,
                                time.perf_counter() - start, int(seed))
    restore = RestoreBestWeights("val_loss")
    stopper = EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min", check_finite=True)
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(trainer_kwargs)
    with torch_threads(threads), quiet_lightning():
        trainer = L.Trainer(callbacks=[*callbacks, stopper, restore], **kwargs)
        if ckpt_path is None:
            trainer.fit(model, datamodule=datamodule)
        else:  # our own checkpoint: it may hold what weights_only refuses (e.g. a numpy random state)
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        trainer.test(model, datamodule=datamodule, verbose=False)
    return GroupTrainResult(
        tasks=tuple(group),
        test_losses=dict(model.test_losses),
        val_loss=float(restore.best),
        best_epoch=int(restore.best_epoch),
        epochs=int(trainer.current_epoch),
        seconds=time.perf_counter() - start,
        seed=int(seed),
    )


def _split_losses(model: MultiTaskMLP, loader) -> dict[str, torch.Tensor]:
    """Exact per-task mean loss over a split (the arithmetic of the model's ``MeanMetric``)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            for t, loss in model.task_losses(batch).items():
                n = batch["y"][t].shape[0]
                sums[t] = sums.get(t, torch.zeros((), dtype=torch.float32)) + loss * n
                counts[t] = counts.get(t, 0) + n
    model.train()
    return {t: sums[t] / counts[t] for t in model.task_names}


def _fit_loop(model: MultiTaskMLP, datamodule: MultiTaskDataModule, cfg: TrainConfig):
    """``train_group(engine="loop")``: fit, stop early, restore the best weights, test.

    Mirrors what the Trainer does with :class:`EarlyStopping` and
    :class:`RestoreBestWeights`: zero the gradients, back-propagate the summed
    task losses and step the optimizer for every batch; validate after every
    epoch; step an epoch-interval lr schedule; stop on a non-finite validation
    loss or after ``patience`` epochs without strict improvement.
    """
    configured = model.configure_optimizers()
    if isinstance(configured, dict):
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    else:
        optimizer, scheduler = configured, None
    datamodule.setup("fit")
    train = datamodule.train_dataloader()
    val = datamodule.val_dataloader()
    model.train()
    best, best_epoch, best_state, waited, epochs = math.inf, -1, None, 0, 0
    for epoch in range(cfg.max_epochs):
        train.sampler.set_epoch(epoch)
        for batch in train:
            optimizer.zero_grad(set_to_none=True)
            losses = model.task_losses(batch)
            model.prepare_surgery(losses)
            torch.stack(list(losses.values())).sum().backward()
            model.apply_surgery()
            optimizer.step()
        val_loss = float(torch.stack(list(_split_losses(model, val).values())).sum())
        epochs = epoch + 1
        if scheduler is not None:
            scheduler.step()
        if not math.isfinite(val_loss):
            break
        if val_loss < best:
            best, best_epoch, waited = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    test = {t: float(v) for t, v in _split_losses(model, datamodule.test_dataloader()).items()}
    model.test_losses = dict(test)
    return test, float(best), int(best_epoch), int(epochs)


def relative_gain(stl_loss: float | torch.Tensor, mtl_loss: float | torch.Tensor):
    """Relative MTL gain of a task (paper eq. 1): ``(L_STL - L_MTL) / L_STL``.

    Positive means training in the group lowered the task's test loss. Works on
    floats, numpy arrays and tensors (element-wise).

    Raises:
        ValueError: an STL loss that is zero, negative or not finite (the gain
            is undefined; a near-zero STL loss makes gains explode, see the
            digits dataset notes).
    """
    import numpy as np

    stl = np.asarray(stl_loss.detach().cpu() if isinstance(stl_loss, torch.Tensor) else stl_loss, dtype=float)
    mtl = np.asarray(mtl_loss.detach().cpu() if isinstance(mtl_loss, torch.Tensor) else mtl_loss, dtype=float)
    if not np.all(np.isfinite(stl)) or np.any(stl <= 0):
        raise ValueError(
            f"relative gain needs a positive, finite single-task loss; got {stl.tolist()}. "
            "A zero STL loss makes eq. 1 undefined: check the task or use a harder setting."
        )
    gain = (stl - mtl) / stl
    return float(gain) if gain.ndim == 0 else gain
