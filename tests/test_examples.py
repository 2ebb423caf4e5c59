"""The examples run (tiny settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_stl_vs_mtl_example_runs():
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / "stl_vs_mtl.py"), "--max-epochs", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("gain") == 3
