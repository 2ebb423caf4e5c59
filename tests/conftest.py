"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The read-only copies of the real datasets, next to the repository (``../shared/data``).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data root; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (needed for real-data tests)")
    return SHARED_DATA
