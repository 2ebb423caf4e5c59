"""Ground-truth gains as a LightningDataModule (for learned gain predictors such as MTGNet)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_etap.groundtruth.base import GroupTrainer
from lightning_etap.groundtruth.collect import _resolve_task_names, collect_gains, plan_jobs
from lightning_etap.groundtruth.executors import Executor
from lightning_etap.groundtruth.gains import GroupGains
from lightning_etap.groundtruth.store import GainStore

__all__ = ["GroupGainDataModule"]


class GroupGainDataModule(L.LightningDataModule):
    """Collect ground-truth gains in ``prepare_data`` and serve them as ``(masks, gains)`` batches.

    ``prepare_data()`` runs :func:`~lightning_etap.groundtruth.collect_gains`
    (resumable: only jobs missing from the store are trained); ``setup()``
    loads the store into :attr:`gains`. Lightning calls ``prepare_data`` on
    one process per node (``prepare_data_per_node``). On one machine that is
    one collector, and the store on its local disk is safe. Under multi-node
    training every node runs its own collector: on one store on a network
    file system that is *not* safe (SQLite's WAL mode needs shared memory,
    see :class:`~lightning_etap.groundtruth.GainStore`), and even where it
    works the collectors would train nearly the same jobs. So collect once
    before training (one process, or a
    :class:`~lightning_etap.groundtruth.RayExecutor` driver, which alone
    writes the store), copy the finished store to every node's local disk
    (:meth:`GainStore.backup <lightning_etap.groundtruth.GainStore.backup>`
    makes a single-file copy) and point ``store_path`` at it there:
    ``prepare_data`` then finds every job done and trains nothing.

    Batches are ``(masks, gains)``: float ``(B, n)`` 0/1 membership and float
    ``(B, n)`` relative gains, NaN for non-members (mask them out of the loss,
    e.g. ``loss = ((pred - gains)[masks.bool()] ** 2).mean()``).

    Args:
        trainer: the group trainer (e.g. :class:`~lightning_etap.groundtruth.LightningGroupTrainer`).
        groups: the groups to measure (see :func:`~lightning_etap.groundtruth.sample_groups`).
        seeds: training seeds.
        store_path: the SQLite file of results.
        executor: where to train (default: in this process).
        average_seeds: serve one row per group with gains averaged over seeds
            (default) instead of one row per ``(group, seed)``.
        batch_size: rows per batch (default: all in one batch).
        shuffle: shuffle the training rows every epoch.
        retries, chunk_size, progress, task_names, overwrite: as in
            :func:`~lightning_etap.groundtruth.collect_gains`.

    Example:
        >>> import os, tempfile
        >>> from lightning_etap.groundtruth import LightningGroupTrainer, sample_groups
        >>> from lightning_etap.training import TrainConfig
        >>> trainer = LightningGroupTrainer("digits", TrainConfig(hidden=(8,), max_epochs=2, patience=1))
        >>> groups = sample_groups(trainer.task_names[:3], method="pairs")
        >>> path = os.path.join(tempfile.mkdtemp(), "gains.sqlite")
        >>> dm = GroupGainDataModule(trainer, groups, seeds=[0], store_path=path, progress=False)
        >>> dm.prepare_data()
        >>> dm.setup("fit")
        >>> masks, gains = next(iter(dm.train_dataloader()))
        >>> masks.shape, gains.shape
        (torch.Size([3, 10]), torch.Size([3, 10]))
    """

    def __init__(
        self,
        trainer: GroupTrainer,
        groups: Iterable[Sequence[str]],
        seeds: Iterable[int] = (0,),
        store_path: str | os.PathLike = "gains.sqlite",
        executor: Executor | None = None,
        *,
        average_seeds: bool = True,
        batch_size: int | None = None,
        shuffle: bool = True,
        retries: int = 1,
        chunk_size: int = 1,
        progress: bool = True,
        task_names: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.group_trainer = trainer
        self.task_names = _resolve_task_names(trainer, task_names, None)
        self.groups = [tuple(g) for g in groups]
        self.seeds = [int(s) for s in seeds]
        plan_jobs(self.groups, self.seeds, self.task_names)  # validate the groups now, not after training
        self.store_path = os.fspath(store_path)
        self.executor = executor
        self.average_seeds = average_seeds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.collect_kwargs: dict[str, Any] = dict(retries=retries, chunk_size=chunk_size, progress=progress,
                                                   overwrite=overwrite)
        self._gains: GroupGains | None = None

    def prepare_data(self) -> None:
        collect_gains(self.group_trainer, self.groups, self.seeds, self.store_path, self.executor,
                      task_names=self.task_names, **self.collect_kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self._gains is not None:
            return
        if not os.path.isfile(self.store_path):
            raise RuntimeError(f"no gain store at {self.store_path}: call prepare_data() first")
        store = GainStore(self.store_path, self.group_trainer.fingerprint(), task_names=self.task_names)
        try:
            gains = GroupGains.from_store(store, groups=self.groups, seeds=self.seeds)
        finally:
            store.close()
        self._gains = gains.mean_over_seeds() if self.average_seeds else gains

    @property
    def gains(self) -> GroupGains:
        """The measured gains (after :meth:`setup`)."""
        if self._gains is None:
            raise RuntimeError("the gains are not loaded yet: call prepare_data() and setup() first")
        return self._gains

    def _dataset(self) -> TensorDataset:
        g = self.gains
        return TensorDataset(torch.as_tensor(g.masks, dtype=torch.float32),
                             torch.as_tensor(g.gains, dtype=torch.float32))

    def train_dataloader(self) -> DataLoader:
        data = self._dataset()
        return DataLoader(data, batch_size=self.batch_size or max(1, len(data)), shuffle=self.shuffle)

    def predict_dataloader(self) -> DataLoader:
        data = self._dataset()
        return DataLoader(data, batch_size=self.batch_size or max(1, len(data)), shuffle=False)
