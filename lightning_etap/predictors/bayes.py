"""Bayesian ETAP: ETAP's two stages as one Gaussian linear model, with a posterior to sample from.

The point predictors of this package answer "what gain do we expect?"; an
active search (:func:`~lightning_etap.search.active_etap_search`) also has
to know how sure it is. This model keeps ETAP's ingredients and puts a
Gaussian prior on every weight, so that the posterior over predictions has a
closed form and can be sampled exactly, and lets the data choose the
strength of every prior by marginal likelihood instead of cross-validation,
which has nothing to split when only a handful of groups are measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy.interpolate import BSpline

from ._baseline import BaselinePredictor, check_training_groups
from ._validation import check_affinity, check_masks
from .etap import group_affinity

__all__ = ["BayesianETAPPredictor", "PRIOR_GRID"]

#: Candidate prior standard deviations of :class:`BayesianETAPPredictor`, in
#: units of the typical measured gain (the median of the absolute member
#: gains of the training groups). Every combination is a candidate; the one
#: of largest marginal likelihood is used.
PRIOR_GRID: dict[str, tuple[float, ...]] = {
    "level": (1.0,),
    "intercept": (1.0,),
    "affinity": (0.3,),
    "shared": (0.1, 0.3, 1.0),
    "pairwise": (0.03, 0.1, 0.3),
    "size": (0.0, 0.3),
    "noise": (0.03, 0.1, 0.3),
}

_BLOCKS = ("level", "intercept", "affinity", "shared", "pairwise", "size")


class BayesianETAPPredictor(BaselinePredictor):
    """ETAP with Gaussian priors: per-task gains of any group, with a posterior to sample.

    For a member ``t`` of a group ``G`` of ``k >= 2`` tasks, with
    ``z = z[G -> t]`` (:func:`~lightning_etap.predictors.group_affinity`)::

        gain[G -> t] = a[t]                                   task intercept
                     + sum_b beta[b] phi_b(z)                 stage 1: a spline of the group affinity
                     + sum_{s in G, s != t} (c[s] + w[t, s])  stage 2: membership effects
                     + d[t] / (k - 1)                         group size
                     + noise

    * Stage 1 is ETAP's mapping of the group affinity to the gain, pooled over
      tasks: a B-spline basis ``phi`` (``n_basis`` functions, degree
      ``min(3, n_basis - 1)``, no interior knot at the default 4: a cubic)
      over the range of every possible group affinity (the smallest to the
      largest off-diagonal entry of ``affinity``).
    * Stage 2 is ETAP's per-task residual ridge on membership, ``w[t, s]``,
      plus an effect ``c[s]`` of a member shared by every task it joins. The
      shared effect is what lets a few measured groups inform every task: a
      task that helps (or hurts) most others is found from the groups it is
      in, whichever tasks they hold.
    * Every weight has an independent zero-mean Gaussian prior with a
      standard deviation per block (``a``, ``beta``, ``c``, ``w``, ``d``),
      and the noise is Gaussian. The standard deviations are chosen among
      ``prior_grid`` (:data:`PRIOR_GRID`, in units of the median absolute
      measured member gain) by the largest log marginal likelihood of the
      measured gains (type-II maximum likelihood, as Bayesian ridge
      regression does), which needs no held-out groups.

    The posterior of the weights is Gaussian in closed form: ``predict``
    gives its mean (the ridge solution with those penalties),
    :meth:`predict_std` the posterior standard deviation of each prediction,
    and :meth:`sample` exact joint draws of the gains of any groups. With the
    ``size`` and ``shared`` blocks fixed at zero and one penalty, the mean is
    ETAP's stage 2 fitted jointly with a parametric stage 1.

    Args:
        affinity: ``(n, n)`` task-affinity matrix, ``affinity[i, j] = z[i -> j]``.
        task_names: optional ``n`` task names.
        n_basis: B-spline basis functions of stage 1 (at least 2; default 4).
        prior_grid: candidate standard deviations per block, keys as
            :data:`PRIOR_GRID` (default ``None`` = :data:`PRIOR_GRID`); a
            missing key takes the default's candidates.

    Attributes:
        n_tasks_, task_names_: the tasks.
        affinity_: the checked affinity (zero diagonal).
        z_range_: ``(lo, hi)``, the range of the stage-1 basis.
        scale_: the gain unit of the prior grid.
        prior_: the chosen standard deviations per block and ``noise`` (in gain units, scale included).
        log_evidence_: log marginal likelihood of the training gains under ``prior_``.
        coef_: ``(p,)`` posterior mean of the weights.
        precision_cholesky_: ``(p, p)`` lower Cholesky factor of the posterior precision.
        n_observations_: member gains fitted on.

    Example:
        >>> import numpy as np
        >>> from lightning_etap.groups import all_groups
        >>> rng = np.random.default_rng(0)
        >>> A = rng.normal(size=(4, 4))
        >>> masks = all_groups(4, min_size=2)
        >>> gains = np.where(masks, 0.1 + 0.05 * masks.sum(axis=1, keepdims=True), np.nan)
        >>> model = BayesianETAPPredictor(A).fit(masks, gains)
        >>> bool(np.allclose(model.predict(masks)[masks], gains[masks], atol=0.01))
        True
        >>> model.sample(masks[:2], n_samples=3, random_state=0).shape
        (3, 2, 4)
    """

    _FORMAT = "lightning_etap.BayesianETAPPredictor"
    _SAVED_FIELDS = ("n_tasks_", "task_names_", "z_range_", "scale_", "prior_", "log_evidence_", "coef_",
                     "precision_cholesky_", "n_observations_")
    _ARRAY_FIELDS = frozenset({"coef_", "precision_cholesky_"})
    _ARRAY_PARAMS = frozenset({"affinity"})
    _CHUNK = 1 << 12

    def __init__(self, affinity, *, task_names: Sequence[str] | None = None, n_basis: int = 4,
                 prior_grid: dict | None = None):
        self.affinity = affinity
        self.task_names = task_names
        self.n_basis = n_basis
        self.prior_grid = prior_grid

    # ------------------------------------------------------------------ design
    def _grid(self) -> list[dict[str, float]]:
        given = {} if self.prior_grid is None else dict(self.prior_grid)
        unknown = set(given) - set(PRIOR_GRID)
        if unknown:
            raise ValueError(f"prior_grid has unknown keys {sorted(unknown)}; the keys are {list(PRIOR_GRID)}")
        grid = {}
        for key, default in PRIOR_GRID.items():
            values = tuple(float(v) for v in np.atleast_1d(given.get(key, default)))
            if not values or not all(np.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"prior_grid[{key!r}] must be finite standard deviations >= 0; got {values}")
            if key == "noise" and min(values) <= 0:
                raise ValueError(f"prior_grid['noise'] must be > 0 (the gains are never fitted exactly); got {values}")
            grid[key] = values
        return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]

    def _layout(self) -> dict[str, slice]:
        n, b = self.n_tasks_, self.n_basis
        sizes = {"level": 1, "intercept": n, "affinity": b, "shared": n, "pairwise": n * n, "size": n}
        out, start = {}, 0
        for key in _BLOCKS:
            out[key] = slice(start, start + sizes[key])
            start += sizes[key]
        return out

    def _design(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, rows, tasks)``: one design row per member of a group of >= 2 tasks."""
        n = self.n_tasks_
        layout = self._layout()
        multi = masks.sum(axis=1) >= 2
        rows, tasks = np.nonzero(masks & multi[:, None])
        x = np.zeros((rows.size, layout["size"].stop))
        entry = np.arange(rows.size)
        others = masks[rows].astype(np.float64)
        others[entry, tasks] = 0.0
        x[:, layout["level"]] = 1.0
        x[entry, layout["intercept"].start + tasks] = 1.0
        z = group_affinity(self.affinity_, masks)[rows, tasks]
        x[:, layout["affinity"]] = self._basis(z)
        x[:, layout["shared"]] = others
        pair = layout["pairwise"].start + tasks[:, None] * n + np.arange(n)[None, :]
        x[entry[:, None], pair] = others
        x[entry, layout["size"].start + tasks] = 1.0 / (others.sum(axis=1))
        return x, rows, tasks

    def _basis(self, z: np.ndarray) -> np.ndarray:
        lo, hi = self.z_range_
        degree = min(3, self.n_basis - 1)
        inner = np.linspace(lo, hi, self.n_basis - degree + 1)
        knots = np.r_[[lo] * degree, inner, [hi] * degree]
        return BSpline.design_matrix(np.clip(z, lo, hi), knots, degree).toarray()

    def _variances(self, prior: dict[str, float]) -> np.ndarray:
        v = np.empty(self._layout()["size"].stop)
        for key, part in self._layout().items():
            v[part] = max(prior[key], 1e-9 * self.scale_) ** 2  # a zero prior: a weight pinned at 0
        return v

    # --------------------------------------------------------------------- fit
    def fit(self, masks, gains) -> BayesianETAPPredictor:
        """Choose the priors by marginal likelihood and compute the posterior of the weights.

        Args:
            masks: ``(m, n)`` bool training masks (singletons ignored).
            gains: ``(m, n)`` measured relative gains; non-member entries ignored.

        Returns:
            self

        Raises:
            ValueError: invalid options, affinity, masks or gains, or no
                training group with two or more tasks.
        """
        nb = self.n_basis
        if isinstance(nb, bool) or not isinstance(nb, (int, np.integer)) or nb < 2:
            raise ValueError(f"n_basis must be an integer >= 2; got {nb!r}")
        grid = self._grid()
        affinity = check_affinity(self.affinity)
        n = affinity.shape[0]
        masks, gains = check_training_groups(masks, gains, n, minimum=1, who="BayesianETAPPredictor")
        self.n_tasks_ = n
        self.task_names_ = self._resolve_names(n)
        self.affinity_ = affinity
        off = affinity[~np.eye(n, dtype=bool)]
        lo, hi = float(off.min()), float(off.max())
        self.z_range_ = (lo, hi if hi > lo else lo + 1.0)
        x, rows, tasks = self._design(masks)
        y = gains[rows, tasks]
        typical = float(np.median(np.abs(y)))
        self.scale_ = typical if typical > 0 else 1.0
        best = None
        for candidate in grid:
            prior = {k: v * self.scale_ for k, v in candidate.items()}
            value = log_evidence(x, y, self._variances(prior), prior["noise"] ** 2)
            if best is None or value > best[0]:
                best = (value, prior)
        self.log_evidence_, self.prior_ = float(best[0]), best[1]
        v, s2 = self._variances(self.prior_), self.prior_["noise"] ** 2
        precision = x.T @ x / s2
        precision[np.diag_indices_from(precision)] += 1.0 / v
        chol = np.linalg.cholesky(precision)
        self.coef_ = _chol_solve(chol, x.T @ y / s2)
        self.precision_cholesky_ = chol
        self.n_observations_ = int(y.size)
        return self

    def _restore_fitted(self, fitted: dict) -> None:
        super()._restore_fitted(fitted)
        self.z_range_ = tuple(self.z_range_)
        self.affinity_ = check_affinity(self.affinity)

    # ----------------------------------------------------------------- predict
    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        x, rows, tasks = self._design(masks)
        out = np.full(masks.shape, np.nan)
        out[rows, tasks] = x @ self.coef_
        return out

    def predict_std(self, masks) -> np.ndarray:
        """``(m, n)`` posterior standard deviation of each member's predicted gain (noise excluded).

        NaN for non-members, 0 for the member of a singleton (as :meth:`predict`).
        """
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        out = np.where(masks, 0.0, np.nan)
        for start in range(0, masks.shape[0], self._CHUNK):
            block = masks[start:start + self._CHUNK]
            x, rows, tasks = self._design(block)
            if rows.size:
                half = np.linalg.solve(self.precision_cholesky_, x.T)  # L^-1 x^T: cov = L^-T L^-1
                out[start + rows, tasks] = np.sqrt((half * half).sum(axis=0))
        return out

    def sample(self, masks, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Joint draws from the posterior of the gains of the given groups.

        One draw of the weights gives the gains of every member of every
        group, so the draws keep the correlations between groups that share
        tasks (noise excluded: a draw is a possible *mean* gain).

        Args:
            masks: ``(m, n)`` bool group masks.
            n_samples: number of draws.
            random_state: seed or ``numpy.random.Generator``.

        Returns:
            ``(n_samples, m, n)``: NaN for non-members, 0 for the member of a singleton.
        """
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
        rng = np.random.default_rng(random_state)
        eps = rng.standard_normal((self.coef_.size, int(n_samples)))
        weights = self.coef_[:, None] + np.linalg.solve(self.precision_cholesky_.T, eps)  # cov = (L L^T)^-1
        out = np.repeat(np.where(masks, 0.0, np.nan)[None], n_samples, axis=0)
        for start in range(0, masks.shape[0], self._CHUNK):
            block = masks[start:start + self._CHUNK]
            x, rows, tasks = self._design(block)
            if rows.size:
                out[:, start + rows, tasks] = (x @ weights).T
        return out


def log_evidence(x: np.ndarray, y: np.ndarray, prior_var: np.ndarray, noise_var: float) -> float:
    """Log marginal likelihood of ``y ~ N(0, X diag(prior_var) X^T + noise_var I)``.

    Computed in whichever space is smaller: the ``(N, N)`` covariance of the
    observations, or the ``(p, p)`` posterior precision of the weights (by the
    matrix determinant lemma and the Woodbury identity); both give the same value.
    """
    nobs, p = x.shape
    if nobs <= p:
        cov = (x * prior_var) @ x.T
        cov[np.diag_indices_from(cov)] += noise_var
        chol = np.linalg.cholesky(cov)
        white = np.linalg.solve(chol, y)
        quad, logdet = white @ white, 2.0 * np.log(np.diag(chol)).sum()
    else:
        precision = x.T @ x / noise_var
        precision[np.diag_indices_from(precision)] += 1.0 / prior_var
        chol = np.linalg.cholesky(precision)
        half = np.linalg.solve(chol, x.T @ y / noise_var)
        quad = y @ y / noise_var - half @ half
        logdet = 2.0 * np.log(np.diag(chol)).sum() + np.log(prior_var).sum() + nobs * np.log(noise_var)
    return float(-0.5 * (quad + logdet + nobs * np.log(2.0 * np.pi)))


def _chol_solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.linalg import cho_solve

    return cho_solve((chol, True), b)
