"""lightning-etap: which tasks should train together?

Measure gradient-based task affinities during an ordinary Lightning fit,
train a few sampled task groups for ground-truth multi-task gains, fit the
ETAP ensemble predictor, predict every group's gain and select the best
grouping under a budget.

The main objects are importable from here; they load lazily, so
``import lightning_etap`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "AffinityCallback": "lightning_etap.affinity",
    "AffinityResult": "lightning_etap.affinity",
    "MultiTaskDataModule": "lightning_etap.data",
    "MultiTaskDataset": "lightning_etap.data",
    "load_dataset": "lightning_etap.data",
    "MultiTaskMLP": "lightning_etap.models",
    "TrainConfig": "lightning_etap.training",
    "train_group": "lightning_etap.training",
    "relative_gain": "lightning_etap.training",
    "ETAPPredictor": "lightning_etap.predictors",
    "evaluate_predictions": "lightning_etap.predictors",
    "collect_gains": "lightning_etap.groundtruth",
    "sample_groups": "lightning_etap.groundtruth",
    "GroupGainDataModule": "lightning_etap.groundtruth",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_etap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
