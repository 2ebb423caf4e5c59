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
from scipy import sparse
from scipy.interpolate import BSpline
from scipy.linalg import cho_solve, solve_triangular

from ._baseline import BaselinePredictor
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
    "noise": (0.01, 0.03, 0.1, 0.3),
}

_BLOCKS = ("level", "intercept", "affinity", "shared", "pairwise", "size")


class BayesianETAPPredictor(BaselinePredictor):
    """ETAP with Gaussian priors: per-task gains of any group, with a posterior to sample.

    For a member ``t`` of a group ``G`` of ``k >= 2`` tasks, with
    ``z = z[G -> t]`` (:func:`~lightning_etap.predictors.group_affinity`)::

        gain[G -> t] = a0 + a[t]                              common level + task intercept
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
      standard deviation per block (``a0``, ``a``, ``beta``, ``c``, ``w``,
      ``d``: keys ``level``, ``intercept``, ``affinity``, ``shared``,
      ``pairwise``, ``size`` of the grid), and the noise is Gaussian. The
      common level lets the task intercepts shrink towards the tasks'
      shared gain rather than towards zero. The standard deviations are chosen among
      ``prior_grid`` (:data:`PRIOR_GRID`, in units of the median absolute
      measured member gain) by the largest log marginal likelihood of the
      measured gains (type-II maximum likelihood, as Bayesian ridge
      regression does), which needs no held-out groups. The unit is the
      gains' size, not their spread: gains far from zero with little spread
      get wide priors (cautious draws; the means are unaffected). A unit
      from the spread (standard deviation or median absolute deviation)
      made the active search worse on both exhaustive benchmark tables.

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
        n_observations_: member gains fitted on (``N``).
        posterior_space_: where the posterior is factored: ``"weights"``
            (``N >= p``: the ``(p, p)`` precision) or ``"observations"``
            (``N < p``: the ``(N, N)`` covariance of the observed gains), so
            that memory and time grow with the smaller of the two.
        train_masks_, train_gains_: the training groups (groups of two or
            more tasks) and their gains; ``load`` refactors the posterior from them.

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
                     "n_observations_", "posterior_space_", "train_masks_", "train_gains_")
    _ARRAY_FIELDS = frozenset({"coef_", "train_gains_"})
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

    def _design(self, masks: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
        """``(X, rows, tasks)``: one sparse design row per member of a group of >= 2 tasks.

        A row holds about ``2 k + n_basis + 3`` non-zeros for a group of ``k``
        tasks, whatever the number of weights (``n^2 + 3 n + n_basis + 1``).
        """
        n = self.n_tasks_
        layout = self._layout()
        multi = masks.sum(axis=1) >= 2
        rows, tasks = np.nonzero(masks & multi[:, None])
        entry = np.arange(rows.size)
        member_row, others = np.nonzero(masks[rows] & (np.arange(n)[None, :] != tasks[:, None]))
        count = np.bincount(member_row, minlength=rows.size).astype(np.float64)
        z = group_affinity(self.affinity_, masks)[rows, tasks]
        basis = self._basis(z)
        nb = basis.shape[1]
        ones = np.ones(rows.size)
        row_index = np.concatenate([entry, entry, np.repeat(entry, nb), member_row, member_row, entry])
        col_index = np.concatenate([
            np.full(rows.size, layout["level"].start),
            layout["intercept"].start + tasks,
            np.tile(np.arange(layout["affinity"].start, layout["affinity"].stop), rows.size),
            layout["shared"].start + others,
            layout["pairwise"].start + tasks[member_row] * n + others,
            layout["size"].start + tasks,
        ])
        values = np.concatenate([ones, ones, basis.ravel(), np.ones(others.size), np.ones(others.size),
                                 1.0 / count])
        x = sparse.csr_matrix((values, (row_index, col_index)), shape=(rows.size, layout["size"].stop))
        return x, rows, tasks

    def _basis(self, z: np.ndarray) -> np.ndarray:
        lo, hi = self.z_range_
        degree = min(3, self.n_basis - 1)
        inner = np.linspace(lo, hi, self.n_basis - degree + 1)
        knots = np.r_[[lo] * degree, inner, [hi] * degree]
        return BSpline.design_matrix(np.clip(z, lo, hi), knots, degree).toarray()

    def _variances(self, prior: dict[str, float]) -> np.ndarray:
        layout = self._layout()
        v = np.empty(layout["size"].stop)
        for key, part in layout.items():
            v[part] = max(prior[key], 1e-9 * self.scale_) ** 2  # a zero prior: a weight pinned at 0
        return v

    # --------------------------------------------------------------------- fit
    def fit(self, masks, gains=None) -> BayesianETAPPredictor:
        """Choose the priors by marginal likelihood and compute the posterior of the weights.

        Args:
            masks: ``(m, n)`` bool training masks (singletons ignored).
            gains: ``(m, n)`` measured relative gains; non-member entries ignored. Or pass a
                :class:`~lightning_etap.groundtruth.GroupGains` (``store.gains()``)
                alone as ``masks``: its columns are matched to the tasks by name.

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
        masks, gains, columns = self._training_groups(masks, gains, minimum=1, n_tasks=n)
        self.n_tasks_ = n
        self.task_names_ = self._resolve_names(n) or columns
        self.affinity_ = affinity
        off = affinity[~np.eye(n, dtype=bool)]
        lo, hi = float(off.min()), float(off.max())
        self.z_range_ = (lo, hi if hi > lo else lo + 1.0)
        x, rows, tasks = self._design(masks)
        y = gains[rows, tasks]
        typical = float(np.median(np.abs(y)))
        if not typical > 0:  # more than half the gains exactly 0
            typical = float(np.mean(np.abs(y)))
        self.scale_ = typical if typical > 0 else 1.0
        xtx = (x.T @ x).toarray() if x.shape[0] >= x.shape[1] else None  # weight space: once for the grid
        best = None
        for candidate in grid:
            prior = {k: v * self.scale_ for k, v in candidate.items()}
            value = log_evidence(x, y, self._variances(prior), prior["noise"] ** 2, xtx=xtx)
            if best is None or value > best[0]:
                best = (value, prior)
        self.log_evidence_, self.prior_ = float(best[0]), best[1]
        self.train_masks_, self.train_gains_ = masks, np.where(masks, gains, np.nan)
        self.n_observations_ = int(y.size)
        self.coef_ = self._posterior(x, y, xtx)
        return self

    def _posterior(self, x: sparse.csr_matrix, y: np.ndarray, xtx: np.ndarray | None = None) -> np.ndarray:
        """Factor the posterior (in the smaller of the two spaces); return its mean. ``xtx``: ``X^T X`` if at hand."""
        v, s2 = self._variances(self.prior_), self.prior_["noise"] ** 2
        self._prior_var, self._noise_var = v, s2
        if x.shape[0] >= x.shape[1]:  # weights: precision = X^T X / s2 + V^-1
            self.posterior_space_ = "weights"
            precision = ((x.T @ x).toarray() if xtx is None else xtx) / s2
            precision[np.diag_indices_from(precision)] += 1.0 / v
            self._chol = np.linalg.cholesky(precision)
            return cho_solve((self._chol, True), x.T @ y / s2)
        self.posterior_space_ = "observations"  # K = X V X^T + s2 I over the observations
        xv = x.multiply(v[None, :]).tocsr()
        cov = (xv @ x.T).toarray()
        cov[np.diag_indices_from(cov)] += s2
        self._chol, self._x, self._xv = np.linalg.cholesky(cov), x, xv
        return xv.T @ cho_solve((self._chol, True), y)

    def _restore_fitted(self, fitted: dict) -> None:
        super()._restore_fitted(fitted)
        self.z_range_ = tuple(self.z_range_)
        self.affinity_ = check_affinity(self.affinity)
        self.train_masks_ = np.asarray(self.train_masks_, dtype=bool)
        x, rows, tasks = self._design(self.train_masks_)
        self._posterior(x, self.train_gains_[rows, tasks])  # the factor only: coef_ is the stored one

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
            if not rows.size:
                continue
            if self.posterior_space_ == "weights":  # x Sigma x^T = |L^-1 x^T|^2
                half = solve_triangular(self._chol, x.T.toarray(), lower=True)
                var = (half * half).sum(axis=0)
            else:  # x V x^T - |L_K^-1 X V x^T|^2
                half = solve_triangular(self._chol, (self._xv @ x.T).toarray(), lower=True)
                var = np.asarray(x.multiply(x).multiply(self._prior_var[None, :]).sum(axis=1)).ravel()
                var = np.maximum(var - (half * half).sum(axis=0), 0.0)
            out[start + rows, tasks] = np.sqrt(var)
        return out

    def sample(self, masks, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Joint draws from the posterior of the gains of the given groups.

        One draw of the weights gives the gains of every member of every
        group, so the draws keep the correlations between groups that share
        tasks (noise excluded: a draw is a possible *mean* gain). With fewer
        observations than weights the draws are made without forming the
        weights' covariance, by the pathwise update of a prior draw
        (Matheron's rule), which is exact.

        Args:
            masks: ``(m, n)`` bool group masks.
            n_samples: number of draws.
            random_state: seed or ``numpy.random.Generator``.

        Returns:
            ``(n_samples, m, n)``: NaN for non-members, 0 for the member of a singleton.
        """
        return np.stack(list(self.iter_samples(masks, n_samples, random_state)))

    def iter_samples(self, masks, n_samples: int = 1, random_state=None):
        """The draws of :meth:`sample` (the same ones for the same seed), one ``(m, n)`` array at a time.

        Memory holds one draw and the groups' sparse design, not all draws:
        what an active search over every group of 16 tasks needs.
        """
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
        weights = self._draw_weights(int(n_samples), np.random.default_rng(random_state))
        x, rows, tasks = self._design(masks)
        empty = np.where(masks, 0.0, np.nan)
        for j in range(int(n_samples)):
            out = empty.copy()
            out[rows, tasks] = x @ weights[:, j]
            yield out

    def _draw_weights(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """``(p, k)`` posterior draws of the weights."""
        p = self.coef_.size
        if self.posterior_space_ == "weights":  # covariance (L L^T)^-1: mean + L^-T eps
            eps = rng.standard_normal((p, k))
            return self.coef_[:, None] + solve_triangular(self._chol.T, eps, lower=False)
        # Matheron: theta0 ~ N(0, V), e ~ N(0, s2 I): mean + theta0 - V X^T K^-1 (X theta0 + e)
        prior_draw = np.sqrt(self._prior_var)[:, None] * rng.standard_normal((p, k))
        noise = np.sqrt(self._noise_var) * rng.standard_normal((self._x.shape[0], k))
        update = self._xv.T @ cho_solve((self._chol, True), self._x @ prior_draw + noise)
        return self.coef_[:, None] + prior_draw - update


def log_evidence(x, y: np.ndarray, prior_var: np.ndarray, noise_var: float, *, xtx=None) -> float:
    """Log marginal likelihood of ``y ~ N(0, X diag(prior_var) X^T + noise_var I)``.

    ``x`` dense or scipy-sparse. Computed in whichever space is smaller: the
    ``(N, N)`` covariance of the observations, or the ``(p, p)`` posterior
    precision of the weights (by the matrix determinant lemma and the
    Woodbury identity; ``xtx``, ``X^T X`` if already computed); both give
    the same value.
    """
    nobs, p = x.shape
    if nobs < p:
        xv = x.multiply(prior_var[None, :]) if sparse.issparse(x) else x * prior_var
        cov = xv @ x.T
        cov = cov.toarray() if sparse.issparse(cov) else np.asarray(cov)
        cov[np.diag_indices_from(cov)] += noise_var
        chol = np.linalg.cholesky(cov)
        white = solve_triangular(chol, y, lower=True)
        quad, logdet = white @ white, 2.0 * np.log(np.diag(chol)).sum()
    else:
        if xtx is None:
            xtx = x.T @ x
            xtx = xtx.toarray() if sparse.issparse(xtx) else np.asarray(xtx)
        precision = xtx / noise_var
        precision[np.diag_indices_from(precision)] += 1.0 / prior_var
        chol = np.linalg.cholesky(precision)
        half = solve_triangular(chol, np.asarray(x.T @ y).ravel() / noise_var, lower=True)
        quad = y @ y / noise_var - half @ half
        logdet = 2.0 * np.log(np.diag(chol)).sum() + np.log(prior_var).sum() + nobs * np.log(noise_var)
    return float(-0.5 * (quad + logdet + nobs * np.log(2.0 * np.pi)))
