"""TAG group scores as a gain predictor (Fifty et al. 2021, "Efficiently identifying task groupings").

TAG (inter-task affinity, ITA) scores a group by averaging pairwise
affinities: member ``t`` of ``G`` gets the mean affinity of the other members
onto ``t`` — the same group feature as ETAP's eq. 7
(:func:`~lightning_etap.predictors.group_affinity`). Nothing is learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._baseline import BaselinePredictor
from ._validation import check_affinity, check_gains, check_masks, training_table
from .etap import group_affinity

__all__ = ["TAGPredictor"]


class TAGPredictor(BaselinePredictor):
    """Predict each member's gain by its TAG group score (mean affinity of the other members onto it).

    ``predict(masks)[g, t] = mean over s in G \\ {t} of affinity[s, t]``
    (paper eq. 7). The scores are affinities, **not gains**: they are not on
    the gain scale, so only scale-free comparisons are meaningful (Pearson or
    Spearman correlation, rankings, signs relative to each other; the ETAP
    paper's Table 3 reports correlation for this reason). ``score`` (R²) is
    provided for interface compatibility but is usually meaningless.

    No training groups are needed: ``fit()`` only validates and stores the
    affinity matrix. ``fit(masks, gains)`` is accepted (so the predictor drops
    into the same evaluation loop as the others); the groups are validated
    and ignored.

    Args:
        affinity: ``(n, n)`` task-affinity matrix, ``affinity[i, j]`` = the
            affinity of source task ``i`` onto destination task ``j`` (TAG's
            lookahead score, or any other pairwise affinity); the diagonal is
            ignored. A numpy array, torch tensor or pandas DataFrame.
        task_names: optional ``n`` task names (defaults to a DataFrame's columns).

    Attributes:
        n_tasks_: number of tasks.
        task_names_: list of task names, or None.
        affinity_: the validated affinity (diagonal zeroed).

    Raises:
        ValueError: (in ``fit``) an affinity that is not square and finite off
            the diagonal; masks/gains that are invalid when given.

    Example:
        >>> import numpy as np
        >>> A = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0], [5.0, 6.0, 0.0]])
        >>> TAGPredictor(A).fit().predict(np.array([[True, True, True], [True, False, False]]))
        array([[4. , 3.5, 3. ],
               [0. , nan, nan]])
    """

    _FORMAT = "lightning_etap.TAGPredictor"
    _SAVED_FIELDS = ("n_tasks_", "task_names_", "affinity_")
    _ARRAY_FIELDS = frozenset({"affinity_"})
    _ARRAY_PARAMS = frozenset({"affinity"})
    _FIT_HINT = "fit() (no training groups needed)"

    def __init__(self, affinity, *, task_names: Sequence[str] | None = None):
        self.affinity = affinity
        self.task_names = task_names

    def fit(self, masks=None, gains=None) -> TAGPredictor:
        """Validate and store the affinity matrix; training groups, if given, are checked and ignored.

        Args:
            masks: optional ``(m, n)`` training masks (ignored).
            gains: optional ``(m, n)`` training gains (ignored; needs ``masks``).

        Returns:
            self
        """
        affinity = check_affinity(self.affinity)
        n = affinity.shape[0]
        names = self._resolve_names(n)
        masks, gains, _ = training_table(masks, gains, names, "TAGPredictor", ordered=True, required=False)
        if masks is not None:
            checked = check_masks(masks, n)
            if gains is not None:
                check_gains(gains, checked)
        elif gains is not None:
            raise ValueError("gains were given without masks: pass fit(masks, gains) or fit()")
        self.n_tasks_ = n
        self.task_names_ = names
        self.affinity_ = affinity
        return self

    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        return group_affinity(self.affinity_, masks)
