"""Linear surrogate models of task transfer (Li et al. 2023, "Identification of negative transfers in
multitask learning using surrogate models").

One linear model per task over the membership vector of the groups that
contain it: ``gain[G -> t] ~ b_t + sum over s != t of w[t, s] u_G[s]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import Ridge

from ._baseline import BaselinePredictor

__all__ = ["LinearSurrogate"]


class LinearSurrogate(BaselinePredictor):
    """Per-task linear model of a member's gain on which other tasks are in its group.

    For every task ``t``, the training groups that contain ``t`` (with two or
    more tasks) give rows ``(u_G without column t, gain[G -> t])``; the model
    ``gain[G -> t] = intercept_[t] + sum_s coef_[t, s] u_G[s]`` is fitted to
    them. ``coef_[t, s]`` is the (additive) effect of adding ``s`` to a group
    containing ``t``: negative values flag negative transfer.

    * ``alpha=0`` (default): ordinary least squares with an unpenalised
      intercept, solved on the centred design with ``numpy.linalg.lstsq``
      (as ``LinearRegression``). When a task is in fewer groups than there are
      other tasks the system is under-determined and the minimum-norm
      solution is used (the ``alpha -> 0`` limit of ridge).
    * ``alpha > 0``: ``sklearn.linear_model.Ridge(alpha)`` (intercept not
      penalised); a small alpha such as 1e-3 stabilises near-collinear designs.

    A task in fewer than ``min_groups`` training groups gets no linear model:
    its prediction is the mean of its measured gains (or, when it is in no
    training group at all, the mean of all measured member gains), and a
    ``UserWarning`` names such tasks. Singleton training groups are ignored.

    Li et al. use the surrogate to classify transfer as positive or negative;
    the ETAP paper (appendix D.2) compares its Pearson correlation and sign F1.

    Args:
        alpha: ridge penalty (default 0.0 = least squares).
        min_groups: minimum number of training groups containing a task for it
            to get a linear model (default 2).
        task_names: optional ``n`` task names (used in warnings).

    Attributes:
        n_tasks_: number of tasks.
        task_names_: list of task names, or None.
        coef_: ``(n, n)``, row ``t`` = weights of task ``t``'s model; the diagonal is 0.
        intercept_: ``(n,)`` intercepts ``b_t``.
        n_groups_per_task_: ``(n,)`` training groups (>= 2 tasks) containing each task.
        fallback_tasks_: list of the task indices predicted by a mean.

    Raises:
        ValueError: (in ``fit``) invalid options, invalid masks/gains, or no
            training group with two or more tasks.

    Example:
        >>> import numpy as np
        >>> from lightning_etap.groups import all_groups
        >>> groups = all_groups(4, min_size=2)
        >>> W = np.array([[0, .1, -.2, .3], [.2, 0, .1, 0], [-.1, .3, 0, .2], [0, 0, .1, 0]])
        >>> gains = np.where(groups, groups @ W.T + 0.05, np.nan)
        >>> model = LinearSurrogate().fit(groups, gains)
        >>> bool(np.allclose(model.coef_, W)), bool(np.allclose(model.intercept_, 0.05))
        (True, True)
    """

    _FORMAT = "lightning_etap.LinearSurrogate"
    _SAVED_FIELDS = ("n_tasks_", "task_names_", "coef_", "intercept_", "n_groups_per_task_", "fallback_tasks_")
    _ARRAY_FIELDS = frozenset({"coef_", "intercept_"})

    def __init__(self, *, alpha: float = 0.0, min_groups: int = 2, task_names: Sequence[str] | None = None):
        self.alpha = alpha
        self.min_groups = min_groups
        self.task_names = task_names

    def fit(self, masks, gains=None) -> LinearSurrogate:
        """Fit one linear model per task on the training groups containing it.

        Args:
            masks: ``(m, n)`` bool training masks (singletons ignored).
            gains: ``(m, n)`` measured relative gains; non-member entries ignored. Or pass a
                :class:`~lightning_etap.groundtruth.GroupGains` (``store.gains()``)
                alone as ``masks``: its columns are matched to the tasks by name.

        Returns:
            self
        """
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not (
            np.isfinite(alpha) and alpha >= 0
        ):
            raise ValueError(f"alpha must be a finite float >= 0; got {alpha!r}")
        if isinstance(self.min_groups, bool) or not isinstance(self.min_groups, (int, np.integer)) or (
            self.min_groups < 1
        ):
            raise ValueError(f"min_groups must be an integer >= 1; got {self.min_groups!r}")
        masks, gains, columns = self._training_groups(masks, gains, minimum=1)
        n = masks.shape[1]
        self.n_tasks_ = n
        self.task_names_ = self._resolve_names(n) or columns
        coef = np.zeros((n, n))
        intercept = np.zeros(n)
        counts = masks.sum(axis=0).astype(np.int64)
        overall = float(gains[masks].mean())
        fallback = []
        for t in range(n):
            rows = np.flatnonzero(masks[:, t])
            y = gains[rows, t]
            if rows.size < self.min_groups:
                fallback.append(t)
                intercept[t] = float(y.mean()) if rows.size else overall
                continue
            others = np.flatnonzero(np.arange(n) != t)
            X = masks[np.ix_(rows, others)].astype(np.float64)
            if alpha > 0:
                ridge = Ridge(alpha=float(alpha)).fit(X, y)
                w, b = ridge.coef_, float(ridge.intercept_)
            else:
                x_mean, y_mean = X.mean(axis=0), y.mean()
                w = np.linalg.lstsq(X - x_mean, y - y_mean, rcond=None)[0]
                b = float(y_mean - x_mean @ w)
            coef[t, others] = w
            intercept[t] = b
        if fallback:
            warnings.warn(
                f"tasks {self._label(fallback)} are in fewer than min_groups={self.min_groups} training "
                "groups with two or more tasks: they are predicted by the mean of their measured gains "
                "(or of all gains when they have none)",
                UserWarning,
                stacklevel=2,
            )
        self.coef_ = coef
        self.intercept_ = intercept
        self.n_groups_per_task_ = counts
        self.fallback_tasks_ = fallback
        return self

    def _restore_fitted(self, fitted: dict) -> None:
        super()._restore_fitted(fitted)
        self.n_groups_per_task_ = np.asarray(self.n_groups_per_task_, dtype=np.int64)

    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        return masks.astype(np.float64) @ self.coef_.T + self.intercept_
