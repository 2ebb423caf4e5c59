"""A LightningDataModule that serves any group of a dataset's tasks.

Batches are plain dicts, the same for both layouts::

    {"x": Tensor[B, d] | {task: Tensor[B_t, d]},   # shared inputs | per-task inputs
     "y": {task: Tensor[B_t, k_t]}}

* shared layout: one input batch labelled by every task of the group;
* per-task layout: one batch *per task* per step. In a group, smaller tasks are
  oversampled (with replacement; class-balanced for binary tasks) up to the
  largest task's train size, as the paper does, so an epoch has the same number
  of steps for every task. A one-task group is never oversampled.

Validation and test batches walk every example of every task exactly once (a
task with fewer examples simply drops out of the later batches), so a model
that weights each batch loss by its size gets exact split means.

Training batches are drawn by an ordinary :class:`torch.utils.data.DataLoader`
whose :class:`EpochShuffle` sampler makes the order of epoch ``e`` a function
of ``(seed, e)`` alone (not of the global RNG), so the same seed gives the same
batches whatever else consumed random numbers, and a batched re-implementation
of training can reproduce them. Under DDP Lightning wraps the sampler in its
distributed wrapper. Rows are gathered a whole batch at a time through
``__getitems__``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_etap.data.base import MultiTaskDataset


def _identity(batch):
    return batch


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The training order of epoch ``epoch``: ``randperm(n)`` from a generator seeded with ``seed * 100_003 + epoch``."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=g)


class EpochShuffle(torch.utils.data.Sampler[int]):
    """Shuffle with an order that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every training epoch; without it
    (a plain loop) every new iteration moves on to the next epoch's order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = epoch_permutation(self.n, self.seed, self.epoch)
        self.epoch += 1
        return iter(order.tolist())


class _TrainRows(Dataset):
    """Row ``i`` of every task; fetched a batch of indices at a time."""

    def __init__(self, x: Tensor | dict[str, Tensor], y: dict[str, Tensor]):
        self.x, self.y = x, y
        self.length = next(iter(y.values())).shape[0]

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if isinstance(self.x, Tensor):
            x = self.x.index_select(0, idx)
        else:
            x = {t: v.index_select(0, idx) for t, v in self.x.items()}
        return {"x": x, "y": {t: v.index_select(0, idx) for t, v in self.y.items()}}

    def __getitem__(self, index: int) -> dict:  # used only by tools that fetch single rows
        return self.__getitems__([index])


class _EvalChunks(Dataset):
    """Chunk ``k`` holds rows ``[k*B, (k+1)*B)`` of every task that still has rows."""

    def __init__(self, x: Tensor | dict[str, Tensor], y: dict[str, Tensor], batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        longest = max(v.shape[0] for v in y.values())
        self.length = max(1, math.ceil(longest / batch_size))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict:
        lo, hi = k * self.batch_size, (k + 1) * self.batch_size
        y = {t: v[lo:hi] for t, v in self.y.items() if v.shape[0] > lo}
        if isinstance(self.x, Tensor):
            x = self.x[lo:hi]
        else:
            x = {t: self.x[t][lo:hi] for t in y}
        return {"x": x, "y": y}


def oversample_indices(
    y: Tensor, target_size: int, binary: bool, generator: torch.Generator
) -> Tensor:
    """Indices that grow a task's train set to ``target_size`` rows.

    All original rows are kept once; the deficit is drawn with replacement,
    half from each class for binary tasks (the released code's rule; an odd
    deficit gives the extra row to a class chosen at random, and a task with a
    single class draws from it alone), uniformly otherwise.
    """
    n = y.shape[0]
    base = torch.arange(n)
    deficit = target_size - n
    if deficit <= 0:
        return base
    if binary:
        labels = y.reshape(n, -1)[:, 0]
        classes = [torch.nonzero(labels == c).flatten() for c in (0.0, 1.0)]
        classes = [c for c in classes if c.numel() > 0]
        counts = [deficit // len(classes)] * len(classes)
        for _ in range(deficit - sum(counts)):
            counts[int(torch.randint(len(classes), (1,), generator=generator))] += 1
        extra = [c[torch.randint(c.numel(), (k,), generator=generator)] for c, k in zip(classes, counts)]
        extra_idx = torch.cat(extra)
    else:
        extra_idx = torch.randint(n, (deficit,), generator=generator)
    return torch.cat([base, extra_idx])


class MultiTaskDataModule(L.LightningDataModule):
    """Serve a group of a :class:`MultiTaskDataset`'s tasks to a Lightning Trainer.

    Args:
        dataset: the dataset.
        tasks: the group (task names); ``None`` means every task.
        batch_size: training batch size (per task in the per-task layout).
        eval_batch_size: validation / test chunk size (per task); default 4096.
        oversample: grow smaller tasks to the largest train size (per-task layout
            only; ignored for one-task groups).
        seed: seed of the oversampling draw and of the batch order.
        num_workers: DataLoader workers (0: load in the main process, fastest
            for in-memory tensors).

    Example:
        >>> from lightning_etap.data import load_dataset
        >>> dm = MultiTaskDataModule(load_dataset("digits"), tasks=["digit_3", "digit_8"], batch_size=64)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch["y"]), tuple(batch["x"].shape)
        (['digit_3', 'digit_8'], (64, 16))
    """

    def __init__(
        self,
        dataset: MultiTaskDataset,
        tasks: Sequence[str] | None = None,
        *,
        batch_size: int = 256,
        eval_batch_size: int = 4096,
        oversample: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        self.dataset = dataset
        self.tasks = dataset.check_tasks(dataset.task_names if tasks is None else tasks)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.oversample = bool(oversample)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self._train: _TrainRows | None = None

    # ----------------------------------------------------------------- tensors
    def _split(self, split: str) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        ds = self.dataset
        y = {t: ds.split(t, split)[1] for t in self.tasks}
        if ds.layout == "shared":
            return ds.split(self.tasks[0], split)[0], y
        return {t: ds.split(t, split)[0] for t in self.tasks}, y

    def train_rows(self) -> _TrainRows:
        """The (oversampled) training rows, built once."""
        if self._train is None:
            x, y = self._split("train")
            if isinstance(x, dict) and self.oversample and len(self.tasks) > 1:
                g = torch.Generator().manual_seed(self.seed)
                size = max(v.shape[0] for v in y.values())
                for t in self.tasks:
                    idx = oversample_indices(y[t], size, self.dataset.kind(t) == "binary", g)
                    x[t], y[t] = x[t][idx], y[t][idx]
            elif isinstance(x, dict) and len(self.tasks) > 1:
                size = min(v.shape[0] for v in y.values())  # no oversampling: truncate to the smallest
                x = {t: v[:size] for t, v in x.items()}
                y = {t: v[:size] for t, v in y.items()}
            self._train = _TrainRows(x, y)
        return self._train

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_rows()) / self.batch_size)

    # ------------------------------------------------------------- Lightning
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_rows()

    def train_dataloader(self) -> DataLoader:
        rows = self.train_rows()
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(rows), self.seed),
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        x, y = self._split(split)
        return DataLoader(_EvalChunks(x, y, self.eval_batch_size), batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
