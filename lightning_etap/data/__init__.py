"""Multi-task datasets: one uniform object for every source.

``load_dataset(name, root=None, **options)`` returns a
:class:`~lightning_etap.data.base.MultiTaskDataset`. ``root`` (or the
``LIGHTNING_ETAP_DATA`` environment variable, or a per-user cache directory)
is where the source files live; missing files are downloaded from their origin
with a sha256 check.
"""

from lightning_etap.data.base import SPLITS, MultiTaskDataset, TaskSplits
from lightning_etap.data.datamodule import MultiTaskDataModule
from lightning_etap.data.registry import DATASETS, load_dataset

__all__ = ["DATASETS", "SPLITS", "MultiTaskDataModule", "MultiTaskDataset", "TaskSplits", "load_dataset"]
