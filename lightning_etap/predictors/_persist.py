"""Plain-JSON persistence for fitted predictors (private; no pickle).

Arrays become nested lists; NaN becomes ``null``. Python's ``json`` writes
floats with ``repr``, which round-trips every float64 exactly, so a reloaded
predictor reproduces the saved one's predictions bit for bit. Predictors with
large array state use the ``.npz`` variant: the same JSON header beside the
arrays in numpy's binary format, read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_etap._atomic import atomic_file, atomic_write_text

__all__ = [
    "array_from_json",
    "read_document",
    "read_npz_document",
    "to_json",
    "write_document",
    "write_npz_document",
]

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
    atomic_write_text(path, json.dumps(doc, allow_nan=False, indent=1))
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


def write_npz_document(
    path: str | Path, kind: str, params: dict, fitted: dict, arrays: dict, library_version: str, **header: Any
) -> Path:
    """Write a JSON header (as :func:`write_document`, plus ``header``) and named arrays to one ``.npz`` file.

    For predictors whose fitted state is large arrays. The file is written at
    ``path`` as given (numpy adds no suffix to an open file) and holds no
    pickled objects; :func:`read_npz_document` reads it back.
    """
    doc = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "library_version": library_version,
        "params": to_json(params),
        "fitted": to_json(fitted),
        **to_json(header),
    }
    path = Path(path)
    with atomic_file(path, "wb") as f:
        np.savez(f, __header__=np.array(json.dumps(doc, allow_nan=False)), **arrays)
    return path


def read_npz_document(path: str | Path, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a file written by :func:`write_npz_document` (``allow_pickle=False``); check kind and version.

    Returns ``(header, arrays)``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            doc = json.loads(str(data["__header__"]))
            arrays = {key: data[key] for key in data.files if key != "__header__"}
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path} is not a saved {kind} ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != kind:
        raise ValueError(f"{path} does not hold a saved {kind}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written with format version {doc.get('format_version')}; "
            f"this library reads version {FORMAT_VERSION}"
        )
    return doc, arrays
