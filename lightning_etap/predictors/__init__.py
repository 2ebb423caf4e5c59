"""Gain predictors and their evaluation.

* :class:`ETAPPredictor`: the two-stage ETAP ensemble (B-spline mapping of
  group affinity + per-task residual ridge), a scikit-learn estimator.
* :func:`group_affinity`: the group feature ``z[G -> t]`` (paper eq. 7).
* :func:`evaluate_predictions`, :func:`paired_wilcoxon`: R², Pearson,
  Spearman and sign F1 per task and per group; paired tests over seeds.
"""

from .etap import RELEASED_ALPHA_GRID, RESIDUAL_ALPHA_GRID, ETAPPredictor, group_affinity
from .metrics import WilcoxonResult, evaluate_predictions, paired_wilcoxon

__all__ = [
    "ETAPPredictor",
    "RELEASED_ALPHA_GRID",
    "RESIDUAL_ALPHA_GRID",
    "WilcoxonResult",
    "evaluate_predictions",
    "group_affinity",
    "paired_wilcoxon",
]
