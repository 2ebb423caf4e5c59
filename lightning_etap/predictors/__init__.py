"""Gain predictors and their evaluation.

* :class:`ETAPPredictor`: the two-stage ETAP ensemble (B-spline mapping of
  group affinity + per-task residual ridge), a scikit-learn estimator.
* :func:`group_affinity`: the group feature ``z[G -> t]`` (paper eq. 7).
* Baselines with the same interface: :class:`TAGPredictor` (TAG group
  scores), :class:`HOAPredictor` (Standley et al.'s pairwise approximation),
  :class:`LinearSurrogate` (Li et al. 2023), :class:`MTGNetPredictor`
  (Song et al. 2022) and :class:`Ayman2023Predictor` (feature-based MLP).
* :func:`evaluate_predictions`, :func:`paired_wilcoxon`: R², Pearson,
  Spearman and sign F1 per task and per group; paired tests over seeds.
"""

from .ayman2023 import Ayman2023Predictor
from .etap import RELEASED_ALPHA_GRID, RESIDUAL_ALPHA_GRID, ETAPPredictor, group_affinity
from .hoa import HOAPredictor
from .metrics import WilcoxonResult, evaluate_predictions, paired_wilcoxon
from .mtgnet import MTGNetPredictor
from .surrogate import LinearSurrogate
from .tag import TAGPredictor

__all__ = [
    "Ayman2023Predictor",
    "ETAPPredictor",
    "HOAPredictor",
    "LinearSurrogate",
    "MTGNetPredictor",
    "RELEASED_ALPHA_GRID",
    "RESIDUAL_ALPHA_GRID",
    "TAGPredictor",
    "WilcoxonResult",
    "evaluate_predictions",
    "group_affinity",
    "paired_wilcoxon",
]
