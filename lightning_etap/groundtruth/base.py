"""The interface between ground-truth collection and whatever trains a group.

A *group trainer* turns task groups into per-task test losses. Collection code
(sampling, the store, executors) only talks to this protocol, so the default
one-Trainer-per-group path, a user's own model factory and the many-models-at-
once path are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class GroupOutcome:
    """What training one group with one seed produced.

    Attributes:
        group: the group's task names (in the dataset's task order).
        seed: the training seed.
        test_losses: task -> test loss with the restored best weights.
        epochs: epochs run.
        best_epoch: 0-based epoch of the restored weights.
        seconds: wall time attributable to this group (for a batch of groups
            trained together: the batch's time divided by its size).
        extra: anything else worth keeping (JSON-serialisable).
    """

    group: tuple[str, ...]
    seed: int
    test_losses: dict[str, float]
    epochs: int = -1
    best_epoch: int = -1
    seconds: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class GroupTrainer(Protocol):
    """Trains groups of tasks and reports every member's test loss.

    ``fingerprint()`` returns a JSON-serialisable description of everything
    that determines the numbers (dataset identity and options, model and
    training recipe); the store refuses to mix results of different
    fingerprints. ``train`` trains each ``(group, seed)`` pair independently
    (single-task groups included: they are the reference of every gain) and
    returns one :class:`GroupOutcome` per pair, with a finite positive test
    loss for every member; the result for a pair must not depend on which
    other pairs are in the same call (so a resumed or re-batched collection
    gives the same table).

    A ``task_names`` attribute (the task order) is optional but used by
    default by :func:`~lightning_etap.groundtruth.collect_gains` and every
    search (else pass ``task_names=``). For process pools and Ray the trainer
    is pickled to the workers: a module-level class holding plain data.
    See "Your own trainer" in ``docs/ground-truth.md``.
    """

    def fingerprint(self) -> dict[str, Any]: ...

    def train(self, jobs: Sequence[tuple[tuple[str, ...], int]]) -> list[GroupOutcome]: ...
