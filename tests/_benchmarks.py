"""Load a script of ``benchmarks/`` as a module, so tests can run it at a tiny size and it cannot rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``<name>_benchmark``.

    It is registered in ``sys.modules`` (dataclasses resolve string annotations
    through it), and ``benchmarks/`` is on ``sys.path`` while it loads (scripts
    import each other, e.g. ``affinity_overhead``).
    """
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
