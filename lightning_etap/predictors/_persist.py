"""Plain-JSON persistence for fitted predictors (private; no pickle).

Arrays become nested lists; NaN becomes ``null``. Python's ``json`` writes
floats with ``repr``, which round-trips every float64 exactly, so a reloaded
predictor reproduces the saved one's predictions bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["array_from_json", "read_document", "to_json", "write_document"]

FORMAT_VERSION = 1


def to_json(value: Any) -> Any:
    """Convert numpy scalars/arrays (and containers of them) to JSON-ready Python values."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else value
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


def array_from_json(value: Any, dtype=np.float64) -> np.ndarray:
    """Inverse of :func:`to_json` for arrays: ``null`` becomes NaN for float arrays."""
    if dtype is np.float64:
        return np.array(_nulls_to_nan(value), dtype=np.float64)
    return np.array(value, dtype=dtype)


def _nulls_to_nan(value: Any) -> Any:
    if isinstance(value, list):
        return [_nulls_to_nan(v) for v in value]
    return math.nan if value is None else value


def write_document(path: str | Path, kind: str, params: dict, fitted: dict, library_version: str) -> Path:
    """Write ``{"format", "format_version", "library_version", "params", "fitted"}`` as JSON."""
    path = Path(path)
    doc = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "library_version": library_version,
        "params": to_json(params),
        "fitted": to_json(fitted),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, allow_nan=False, indent=1))
    return path


def read_document(path: str | Path, kind: str) -> dict:
    """Read a document written by :func:`write_document` and check its kind and version."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a saved predictor (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != kind:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{path} does not hold a saved {kind} (format field: {found!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written with format version {doc.get('format_version')}; "
            f"this library reads version {FORMAT_VERSION}"
        )
    return doc
