"""Ground-truth multi-task gains for sampled task groups.

The pipeline step between measuring affinities and fitting a gain predictor:

1. choose groups: :func:`sample_groups`;
2. say how a group is trained: :class:`LightningGroupTrainer` (the reference
   model on a named dataset), :class:`FactoryGroupTrainer` (your own
   LightningModule / DataModule) or any :class:`GroupTrainer`;
3. train them, resumably, in this process, a process pool or on Ray:
   :func:`collect_gains` with :class:`InProcessExecutor`,
   :class:`ProcessPoolExecutor` or :class:`RayExecutor`, writing to a
   :class:`GainStore` (one SQLite file);
4. use the result: :class:`GroupGains` (``masks``, ``gains`` for any
   predictor's ``fit``), or :class:`GroupGainDataModule` for learned predictors.

Example:
    >>> import tempfile, os
    >>> from lightning_etap.groundtruth import LightningGroupTrainer, collect_gains, sample_groups
    >>> from lightning_etap.training import TrainConfig
    >>> trainer = LightningGroupTrainer("digits", TrainConfig(hidden=(8,), max_epochs=2, patience=1))
    >>> groups = sample_groups(trainer.task_names[:3], method="pairs")
    >>> path = os.path.join(tempfile.mkdtemp(), "gains.sqlite")
    >>> gains = collect_gains(trainer, groups, seeds=[0], store=path, progress=False)
    >>> gains.masks.shape, gains.gains.shape
    ((3, 10), (3, 10))
"""

from lightning_etap.groundtruth.base import GroupOutcome, GroupTrainer
from lightning_etap.groundtruth.collect import CollectionError, collect_gains, plan_jobs
from lightning_etap.groundtruth.executors import (
    ChunkResult,
    Executor,
    InProcessExecutor,
    ProcessPoolExecutor,
    RayClusterError,
    RayExecutor,
)
from lightning_etap.groundtruth.gains import GroupGains, SeedSpread
from lightning_etap.groundtruth.sampling import SAMPLING_METHODS, canonical_group, group_key, sample_groups
from lightning_etap.groundtruth.store import FingerprintMismatchError, GainStore
from lightning_etap.groundtruth.trainers import (
    DatasetSpec,
    FactoryGroupTrainer,
    LightningGroupTrainer,
    module_test_losses,
)

__all__ = [
    "SAMPLING_METHODS",
    "ChunkResult",
    "CollectionError",
    "DatasetSpec",
    "Executor",
    "FactoryGroupTrainer",
    "FingerprintMismatchError",
    "GainStore",
    "GroupGainDataModule",
    "GroupGains",
    "GroupOutcome",
    "GroupTrainer",
    "InProcessExecutor",
    "LightningGroupTrainer",
    "ProcessPoolExecutor",
    "RayClusterError",
    "RayExecutor",
    "SeedSpread",
    "canonical_group",
    "collect_gains",
    "group_key",
    "module_test_losses",
    "plan_jobs",
    "sample_groups",
]


def __getattr__(name: str):
    # The data module needs Lightning; importing it lazily keeps `import lightning_etap.groundtruth`
    # light for processes that only read or write a store.
    if name == "GroupGainDataModule":
        from lightning_etap.groundtruth.datamodule import GroupGainDataModule

        return GroupGainDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
