"""The ``stacklevel`` that points a warning at the caller's own code (private)."""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def outside_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the function that calls this one, such that the warning
    names the first frame outside this package (the user's line), however deep inside the package it is made."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
