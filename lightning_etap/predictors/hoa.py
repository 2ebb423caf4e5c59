"""Higher-order approximation from measured pairs (HOA; Standley et al. 2020, "Which tasks should be
learned together in multi-task learning?").

The gain of task ``t`` in a group is approximated by the average of the gains
``t`` showed when trained with each other member alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._baseline import BaselinePredictor, format_pairs, missing_pairs, pair_gain_matrix

__all__ = ["HOAPredictor"]


class HOAPredictor(BaselinePredictor):
    """Predict each member's gain as the mean of its measured pairwise gains with the other members.

    ``predict(masks)[g, t] = mean over s in G \\ {t} of pair_gain[s, t]``, where
    ``pair_gain[s, t]`` is the measured relative gain of ``t`` in the two-task
    group ``{s, t}``. For a pair this returns the measured gain itself.

    ``fit`` reads the pairwise gains from the two-task groups among the
    training groups. Larger training groups (and singletons) are ignored; a
    pair measured more than once gets the mean of its measurements. Not every
    pair has to be measured, but ``predict`` raises a ``ValueError`` naming the
    missing pairs for any group whose members include an unmeasured pair
    (``measured_pairs_`` tells which are available). Standley et al. measure
    all ``n (n - 1) / 2`` pairs.

    Args:
        task_names: optional ``n`` task names (used in messages; exposed as ``task_names_``).

    Attributes:
        n_tasks_: number of tasks.
        task_names_: list of task names, or None.
        pair_gain_: ``(n, n)`` measured pairwise gains, ``pair_gain_[s, t]`` =
            gain of ``t`` with ``s`` (source row, destination column); NaN when
            unmeasured and on the diagonal.
        measured_pairs_: ``(n, n)`` bool, True where the pair was measured (symmetric).
        n_pairs_: number of distinct measured pairs.
        n_ignored_groups_: training groups with three or more tasks (not used).

    Raises:
        ValueError: (in ``fit``) invalid masks/gains, or no two-task training group.

    Example:
        >>> import numpy as np
        >>> pairs = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=bool)
        >>> gains = np.array([[0.1, 0.2, np.nan], [0.3, np.nan, 0.4], [np.nan, 0.5, 0.6]])
        >>> HOAPredictor().fit(pairs, gains).predict(np.ones((1, 3), dtype=bool))
        array([[0.2 , 0.35, 0.5 ]])
    """

    _FORMAT = "lightning_etap.HOAPredictor"
    _SAVED_FIELDS = ("n_tasks_", "task_names_", "pair_gain_", "n_pairs_", "n_ignored_groups_")
    _ARRAY_FIELDS = frozenset({"pair_gain_"})

    def __init__(self, *, task_names: Sequence[str] | None = None):
        self.task_names = task_names

    def fit(self, masks, gains=None) -> HOAPredictor:
        """Collect the measured pairwise gains from the two-task training groups.

        Args:
            masks: ``(m, n)`` bool training masks (groups other than pairs are ignored).
            gains: ``(m, n)`` measured relative gains; non-member entries ignored. Or pass a
                :class:`~lightning_etap.groundtruth.GroupGains` (``store.gains()``)
                alone as ``masks``: its columns are matched to the tasks by name.

        Returns:
            self
        """
        masks, gains, columns = self._training_groups(masks, gains, minimum=1)
        size = masks.sum(axis=1)
        if not (size == 2).any():
            raise ValueError(
                "HOAPredictor needs measured pairwise gains: none of the training groups has exactly two "
                "tasks (larger groups are ignored by HOA); train the pairs {s, t} and pass their gains"
            )
        pair_gain, count = pair_gain_matrix(masks, gains)
        self.n_tasks_ = masks.shape[1]
        self.task_names_ = self._resolve_names(self.n_tasks_) or columns
        self.pair_gain_ = pair_gain
        self.n_pairs_ = int(np.triu(count > 0, k=1).sum())
        self.n_ignored_groups_ = int((size > 2).sum())
        return self

    @property
    def measured_pairs_(self) -> np.ndarray:
        self._check_fitted()
        return np.isfinite(self.pair_gain_)

    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        measured = np.isfinite(self.pair_gain_)
        pairs = missing_pairs(masks, measured)
        if len(pairs):
            raise ValueError(
                f"HOAPredictor has no measured gain for {len(pairs)} pair(s) that appear in the groups to "
                f"predict: {format_pairs(pairs, self.task_names_)}; train those pairs and refit, or leave out "
                "the groups containing them"
            )
        u = masks.astype(np.float64)
        size = u.sum(axis=1)
        return (u @ np.where(measured, self.pair_gain_, 0.0)) / (size - 1.0)[:, None]
