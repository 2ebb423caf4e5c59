"""The one multi-task dataset object every loader returns.

A :class:`MultiTaskDataset` holds, for every task, a train / validation / test
split as tensors. Two layouts exist:

* ``"shared"``: every task labels the same examples (ETTm1, digits). The input
  tensors of all tasks are the *same* tensor objects, so memory is paid once and
  a model can encode a batch once for all tasks.
* ``"per_task"``: every task has its own examples (Chemical, School, ...).

Targets are always 2-D, ``(n_examples, target_dim)``: ``target_dim`` is 1 for
binary and scalar regression tasks and the horizon for forecasting tasks.
Binary targets are float ``0.0`` / ``1.0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

TaskKind = Literal["binary", "regression"]
Layout = Literal["shared", "per_task"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSplits:
    """The three splits of one task: ``(inputs, targets)`` pairs of tensors."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    def __getitem__(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)


@dataclass(frozen=True)
class MultiTaskDataset:
    """Tasks, their kinds, and per-task splits as tensors.

    Args:
        name: dataset name, e.g. ``"chemical"``.
        task_names: task names, in the dataset's canonical order.
        task_kinds: ``"binary"`` or ``"regression"`` for every task, same order.
        layout: ``"shared"`` (one input set labelled by every task) or
            ``"per_task"`` (each task has its own inputs).
        splits: task name -> :class:`TaskSplits`.
        metadata: free-form facts about how the dataset was built (seed,
            split fractions, source file checksum, ...). Part of the dataset's
            fingerprint.

    Raises:
        ValueError: on inconsistent shapes, duplicate task names or an unknown
            layout / kind.
    """

    name: str
    task_names: tuple[str, ...]
    task_kinds: tuple[TaskKind, ...]
    layout: Layout
    splits: dict[str, TaskSplits]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = tuple(str(t) for t in self.task_names)
        object.__setattr__(self, "task_names", names)
        object.__setattr__(self, "task_kinds", tuple(self.task_kinds))
        if len(set(names)) != len(names):
            dup = sorted({t for t in names if names.count(t) > 1})
            raise ValueError(f"duplicate task names {dup} in dataset {self.name!r}")
        if len(self.task_kinds) != len(names):
            raise ValueError(
                f"dataset {self.name!r}: {len(names)} task names but {len(self.task_kinds)} task kinds"
            )
        bad = [k for k in self.task_kinds if k not in ("binary", "regression")]
        if bad:
            raise ValueError(f"unknown task kind(s) {bad}; expected 'binary' or 'regression'")
        if self.layout not in ("shared", "per_task"):
            raise ValueError(f"unknown layout {self.layout!r}; expected 'shared' or 'per_task'")
        if set(self.splits) != set(names):
            raise ValueError(
                f"dataset {self.name!r}: splits given for {sorted(self.splits)} but tasks are {list(names)}"
            )
        dims = set()
        for t in names:
            for s in SPLITS:
                x, y = self.splits[t][s]
                if x.ndim != 2 or y.ndim != 2:
                    raise ValueError(
                        f"task {t!r} split {s!r}: inputs and targets must be 2-D, got {tuple(x.shape)} "
                        f"and {tuple(y.shape)}"
                    )
                if x.shape[0] != y.shape[0]:
                    raise ValueError(
                        f"task {t!r} split {s!r}: {x.shape[0]} inputs but {y.shape[0]} targets"
                    )
                dims.add(x.shape[1])
        if len(dims) != 1:
            raise ValueError(f"dataset {self.name!r}: tasks disagree on the feature dimension: {sorted(dims)}")

    # ------------------------------------------------------------------ facts
    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def feature_dim(self) -> int:
        return int(self.splits[self.task_names[0]].train[0].shape[1])

    def target_dim(self, task: str) -> int:
        """Width of a task's target (1, or the forecasting horizon)."""
        return int(self.splits[self.check_tasks([task])[0]].train[1].shape[1])

    def kind(self, task: str) -> TaskKind:
        return self.task_kinds[self.task_names.index(self.check_tasks([task])[0])]

    def split(self, task: str, split: str) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of one task in one split."""
        return self.splits[self.check_tasks([task])[0]][split]

    def n_examples(self, task: str, split: str = "train") -> int:
        return int(self.split(task, split)[0].shape[0])

    def check_tasks(self, tasks: Iterable[str]) -> list[str]:
        """Validate a group of task names and return it as a list of str.

        Raises:
            ValueError: empty group, duplicates, or names the dataset does not have.
        """
        if isinstance(tasks, str):
            raise ValueError(f"a group of tasks must be a sequence of names, not the string {tasks!r}")
        group = [str(t) for t in tasks]
        if not group:
            raise ValueError("a group must contain at least one task")
        unknown = [t for t in group if t not in self.splits]
        if unknown:
            raise ValueError(
                f"unknown task(s) {unknown} for dataset {self.name!r}; known tasks: {list(self.task_names)}"
            )
        if len(set(group)) != len(group):
            raise ValueError(f"duplicate task(s) in group {group}")
        return group

    def subset(self, tasks: Sequence[str]) -> MultiTaskDataset:
        """The same dataset restricted to ``tasks`` (in the given order)."""
        group = self.check_tasks(tasks)
        return MultiTaskDataset(
            name=self.name,
            task_names=tuple(group),
            task_kinds=tuple(self.kind(t) for t in group),
            layout=self.layout,
            splits={t: self.splits[t] for t in group},
            metadata=dict(self.metadata),
        )

    def summary(self) -> str:
        """One line per task: kind and split sizes."""
        lines = [f"{self.name}: {self.n_tasks} tasks, layout={self.layout}, features={self.feature_dim}"]
        for t, k in zip(self.task_names, self.task_kinds):
            sizes = "/".join(str(self.n_examples(t, s)) for s in SPLITS)
            lines.append(f"  {t:>12s}  {k:10s} train/val/test={sizes}  target_dim={self.target_dim(t)}")
        return "\n".join(lines)


def stratified_split(
    y: Tensor, fraction: float, generator: torch.Generator, stratify: bool = True
) -> tuple[Tensor, Tensor]:
    """Split row indices into ``(rest, taken)`` with ``taken`` about ``fraction`` of the rows.

    With ``stratify=True`` (binary targets) every class contributes the same
    fraction, rounded, and at least one example of each class stays in ``rest``.
    Deterministic given ``generator``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    n = y.shape[0]
    if stratify:
        labels = y.reshape(n, -1)[:, 0]
        taken_parts = []
        for c in torch.unique(labels):
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(idx.numel(), generator=generator)]
            k = min(int(round(fraction * idx.numel())), idx.numel() - 1)
            taken_parts.append(idx[:k])
        taken = torch.cat(taken_parts).sort().values
    else:
        perm = torch.randperm(n, generator=generator)
        k = max(1, int(round(fraction * n)))
        taken = perm[:k].sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[taken] = False
    rest = torch.nonzero(mask).flatten()
    return rest, taken
