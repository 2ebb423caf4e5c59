"""The whole job in one run directory: affinity → ground truth → ETAP → selection → report.

``lightning-etap run`` is :class:`Pipeline` with the command line's config:

>>> from lightning_etap.pipeline import Pipeline, PipelineConfig
>>> cfg = PipelineConfig(dataset="digits", tasks=["digit_1", "digit_7", "digit_9"], executor="local")
>>> Pipeline(cfg).run()          # doctest: +SKIP
>>> print(Pipeline(cfg).summary())  # doctest: +SKIP

* :class:`PipelineConfig`: every setting, validated (from YAML with :func:`read_yaml`);
* :class:`RunDirectory`: the files of one run and which stages are up to date;
* :class:`Pipeline`: the stages ``affinity``, ``gains``, ``predict``, ``select``, ``report``;
* :class:`UserError`: a mistake the command line reports in one line.

The names load lazily, so importing this package (or :class:`UserError`) is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Pipeline": "lightning_etap.pipeline.stages",
    "evaluate_selection": "lightning_etap.pipeline.stages",
    "PipelineConfig": "lightning_etap.pipeline.config",
    "read_yaml": "lightning_etap.pipeline.config",
    "RunDirectory": "lightning_etap.pipeline.rundir",
    "STAGES": "lightning_etap.pipeline.rundir",
    "UserError": "lightning_etap.pipeline.errors",
    "write_report": "lightning_etap.pipeline.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
