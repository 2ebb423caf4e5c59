"""Name -> loader registry behind :func:`load_dataset`."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_etap.data.base import MultiTaskDataset

#: dataset name -> "module:function" of its loader (imported on first use).
DATASETS: dict[str, str] = {
    "ettm1": "lightning_etap.data.ettm1:load_ettm1",
    "digits": "lightning_etap.data.digits:load_digits",
    "chemical": "lightning_etap.data.chemical:load_chemical",
    "school": "lightning_etap.data.school:load_school",
    "parkinsons": "lightning_etap.data.parkinsons:load_parkinsons",
    "landmine": "lightning_etap.data.landmine:load_landmine",
}


def load_dataset(name: str, root: str | None = None, **options: Any) -> MultiTaskDataset:
    """Load a dataset by name.

    Args:
        name: one of :data:`DATASETS` (case-insensitive).
        root: data directory; defaults to ``$LIGHTNING_ETAP_DATA`` or the
            per-user cache directory.
        **options: loader-specific options (seed, split fractions, ...).

    Raises:
        ValueError: unknown dataset name.
    """
    key = str(name).lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    module, func = DATASETS[key].split(":")
    loader = getattr(importlib.import_module(module), func)
    return loader(root, **options)
