"""Gain predictors and their evaluation.

* :class:`ETAPPredictor`: the two-stage ETAP ensemble (B-spline mapping of
  group affinity + per-task residual ridge), a scikit-learn estimator.
* :class:`BayesianETAPPredictor`: the same two stages as one Gaussian linear
  model (priors chosen by marginal likelihood), with posterior standard
  deviations and joint posterior draws, for active search.
* :func:`group_affinity`: the group feature ``z[G -> t]`` (paper eq. 7).
* Baselines with the same interface: :class:`TAGPredictor` (TAG group
  scores), :class:`HOAPredictor` (Standley et al.'s pairwise approximation),
  :class:`LinearSurrogate` (Li et al. 2023), :class:`MTGNetPredictor`
  (Song et al. 2022), :class:`Ayman2023Predictor` (feature-based MLP) and
  :class:`GradTAEPredictor` (Li et al. 2024: one all-task model linearised
  over :func:`projected_gradients`; needs no training groups).
* :func:`evaluate_predictions`, :func:`paired_wilcoxon`: R², Pearson,
  Spearman and sign F1 per task and per group; paired tests over seeds.
"""

from .ayman2023 import Ayman2023Predictor
from .bayes import PRIOR_GRID, BayesianETAPPredictor
from .etap import RELEASED_ALPHA_GRID, RESIDUAL_ALPHA_GRID, ETAPPredictor, group_affinity
from .gradtae import GradTAEPredictor, ProjectedGradients, projected_gradients, projection_matrix
from .hoa import HOAPredictor
from .metrics import WilcoxonResult, evaluate_predictions, paired_wilcoxon
from .mtgnet import MTGNetPredictor
from .surrogate import LinearSurrogate
from .tag import TAGPredictor

__all__ = [
    "Ayman2023Predictor",
    "BayesianETAPPredictor",
    "ETAPPredictor",
    "GradTAEPredictor",
    "HOAPredictor",
    "LinearSurrogate",
    "MTGNetPredictor",
    "PRIOR_GRID",
    "ProjectedGradients",
    "RELEASED_ALPHA_GRID",
    "RESIDUAL_ALPHA_GRID",
    "TAGPredictor",
    "WilcoxonResult",
    "evaluate_predictions",
    "group_affinity",
    "paired_wilcoxon",
    "projected_gradients",
    "projection_matrix",
]
