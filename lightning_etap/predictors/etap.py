"""The ETAP ensemble gain predictor (paper section 3.2, appendices B.2 and E).

Stage 1 maps each member's group affinity ``z[G -> t]`` (eq. 7) to a
predicted relative gain with a B-spline basis expansion and ridge regression
(eqs. 8-9); stage 2 corrects the stage-1 residual from the group's multi-hot
membership vector ``u_G`` with one ridge regression per task (eqs. 10-12).
Both stages are tuned by cross-validation on the training groups only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsRegressor
from sklearn.preprocessing import SplineTransformer
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from ._numerics import group_folds as _group_folds
from ._numerics import ridge_path_predict, spline_basis, spline_predict, uniform_knots
from ._numerics import same_group_ids as _same_group_ids
from ._persist import array_from_json, read_document, write_document
from ._validation import (
    affinity_values,
    as_float_array,
    check_affinity,
    check_gains,
    check_masks,
    resolve_task_names,
    training_table,
)

__all__ = [
    "RELEASED_ALPHA_GRID",
    "RESIDUAL_ALPHA_GRID",
    "ETAPPredictor",
    "group_affinity",
]

#: Stage-1 ridge alphas of the authors' released code: 0.001-0.005, 0.01-0.1, 0.2-1 (24 values).
RELEASED_ALPHA_GRID: tuple[float, ...] = tuple(
    np.r_[np.arange(1, 6) / 1000, np.arange(1, 11) / 100, np.arange(2, 11) / 10].tolist()
)
#: Stage-2 ridge alphas of the released code: ``logspace(-6, 2, 20)``.
RESIDUAL_ALPHA_GRID: tuple[float, ...] = tuple(np.logspace(-6, 2, 20).tolist())

_STAGE1 = ("bspline", "affine", "knn", "random_forest")
_STAGE2 = ("ridge", "gradient_boosting", None)
_CHUNK = 1 << 16  # groups per block in predict: bounds memory at ~ a few x 65536 x n floats
_FORMAT = "lightning_etap.ETAPPredictor"


def _member_features(affinity: np.ndarray, masks: np.ndarray):
    """Feature ``z[G -> t]`` of every member of every group with >= 2 tasks.

    ``affinity`` must have a zero diagonal (``check_affinity`` guarantees it), so
    ``(u_G @ A)[t]`` already sums over the *other* members only.
    Returns ``(pair, z, u)``: the bool ``(m, n)`` mask of those members, their
    features in row-major order (``z = Z[pair]``) and the float masks ``u``.
    """
    u = masks.astype(np.float64)
    size = u.sum(axis=1)
    pair = masks & (size >= 2)[:, None]
    z = ((u @ affinity) / np.maximum(size - 1.0, 1.0)[:, None])[pair]
    return pair, z, u


def group_affinity(affinity, masks) -> np.ndarray:
    """Group affinity ``z[G -> t]`` of every member of every group (paper eq. 7).

    ``z[G -> t] = mean over s in G \\ {t} of affinity[s, t]``: the mean
    affinity of the other members (sources, rows) onto ``t`` (destination,
    column). The diagonal of ``affinity`` is ignored.

    Args:
        affinity: ``(n, n)`` matrix, ``affinity[i, j] = z[i -> j]``.
        masks: ``(m, n)`` bool membership masks.

    Returns:
        ``(m, n)`` float array; NaN for non-members and for the member of a
        singleton group (a singleton has no affinity).

    Raises:
        ValueError: affinity not square/finite, masks not 0/1 or of the wrong
            width, or an empty group.

    Example:
        >>> import numpy as np
        >>> A = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0], [5.0, 6.0, 0.0]])
        >>> group_affinity(A, np.array([[True, True, True], [True, False, False]]))
        array([[4. , 3.5, 3. ],
               [nan, nan, nan]])
    """
    a = check_affinity(affinity)
    m = check_masks(masks, a.shape[0])
    out = np.full(m.shape, np.nan)
    for start in range(0, m.shape[0], _CHUNK):
        block = m[start : start + _CHUNK]
        pair, z, _ = _member_features(a, block)
        out[start : start + _CHUNK][pair] = z
    return out


class ETAPPredictor(RegressorMixin, BaseEstimator):
    """Predict the relative multi-task gain of every member of any task group (ETAP).

    The input is one task-affinity matrix measured during a single multi-task
    training run and the measured gains ``y[G -> t]`` of a few training groups
    (paper eq. 1). For member ``t`` of group ``G`` the feature is the group
    affinity ``z[G -> t]`` (eq. 7, see :func:`group_affinity`).

    * Stage 1 (``stage1="bspline"``): rescale ``z`` linearly to the gain scale
      (slope ``corr(z, y) * std(y) / std(z)``, intercept matching the means),
      expand it in a B-spline basis (``SplineTransformer(include_bias=True)``,
      uniform knots, constant extrapolation) and fit a ``Ridge``. Spline degree,
      number of knots and ridge alpha are chosen by a K-fold grid search on the
      training groups (mean squared error).
    * Stage 2 (``stage2="ridge"``): for each task ``t``, a ``Ridge`` on the
      multi-hot membership vector ``u_G`` of the training groups containing
      ``t`` predicts stage 1's in-sample residual ``y - y_hat``; alpha by
      K-fold cross-validation. Final prediction = stage 1 + stage 2.

    A singleton group has no affinity and its gain is 0 by definition: it is
    ignored in ``fit`` and predicted as exactly 0. Non-members are NaN.

    Cross-validation folds always split by *group*: all rows ``(G, t)`` of a
    group fall in the same fold (the released code used plain row-wise
    ``KFold``, which can put members of one group on both sides).

    Args:
        affinity: ``(n, n)`` task-affinity matrix, ``affinity[i, j] = z[i -> j]``
            (source row, destination column); the diagonal is ignored (may be
            NaN). A numpy array, torch tensor or pandas DataFrame.
        task_names: optional ``n`` task names (exposed as ``task_names_``).
            Defaults to a DataFrame's columns when ``affinity`` is one.
        stage1: ``"bspline"`` (default, the paper's method), ``"affine"``
            (ordinary least squares on the feature, the Table 8 ablation),
            ``"knn"`` (``KNeighborsRegressor``, grid over ``n_neighbors`` in
            1-20 and ``weights``) or ``"random_forest"``
            (``RandomForestRegressor`` with 50 trees, grid over ``max_depth``
            in {None, 3} and ``min_samples_leaf`` in {1, 5}), the appendix E.1
            alternatives; both tuned by the same group folds (MSE).
        stage2: ``"ridge"`` (default), ``"gradient_boosting"`` (one
            ``GradientBoostingRegressor`` with 100 trees over all rows on
            ``[u_G, one-hot(t), stage-1 prediction]``, grid over ``max_depth``
            in {2, 3} and ``learning_rate`` in {0.05, 0.1} with ``residual_cv``
            group folds; appendix E.2 used XGBoost) or ``None`` (stage 1
            only, the appendix C ablation). Only the default pair
            ``("bspline", "ridge")`` is tuned for speed.
        knots_range: candidate numbers of knots. ``"released"`` (default):
            ``2 .. floor(sqrt(N)) + 9`` with ``N`` the number of training rows
            ``(G, t)``, as the released code. ``"paper"``:
            ``2 .. floor(sqrt(|G_train|))`` (the paper's text; at least 2).
            Or an explicit sequence of integers >= 2.
        degrees: candidate spline degrees; default ``(2, 3, 4, 5, 6)`` (paper
            and released code agree).
        alpha_grid: candidate stage-1 ridge alphas; default ``None`` =
            :data:`RELEASED_ALPHA_GRID` (24 values in ``[0.001, 1]``; the paper
            only states the interval).
        residual_alpha_grid: candidate stage-2 alphas; default ``None`` =
            :data:`RESIDUAL_ALPHA_GRID` = ``logspace(-6, 2, 20)`` (released code;
            the paper says "a similar range" to stage 1).
        cv: folds of the stage-1 grid search (default 10, as released). With
            fewer non-singleton training groups than folds, one fold per group
            is used (at least 2) and a ``UserWarning`` says so.
        residual_cv: folds of each stage-2 search (default 5, as released);
            tasks in fewer training groups use fewer folds, with a warning.
        rescale: apply the linear rescaling before stage 1 (default True, as
            released; the paper does not state it). Every stage-1 variant
            (uniform-knot spline, least squares, KNN, forests) is invariant
            to an affine map of its single input, so this changes
            predictions only by rounding; it is kept for fidelity and puts
            the stage-1 input on the gain scale. When the slope is
            undefined or zero the feature is left unscaled.
        random_state: seed of the group shuffling into folds and of the tree
            ensembles (default 0, so fits are reproducible; ``None`` =
            fresh randomness).

    Attributes:
        n_tasks_: number of tasks ``n``.
        task_names_: list of task names, or None.
        affinity_: validated affinity used for prediction (diagonal zeroed).
        n_train_groups_: number of training groups with >= 2 tasks (used).
        n_train_rows_: number of training rows ``(G, t)``.
        rescale_slope_, rescale_intercept_: the stage-1 input rescaling.
        stage1_kind_: ``"bspline"``, ``"affine"``, ``"knn"``,
            ``"random_forest"`` or ``"constant"`` (a constant feature: stage 1
            predicts the mean training gain).
        stage1_n_splits_: folds used by the stage-1 search.
        cv_results_: stage-1 search results, a dict with ``params`` (list of
            dicts), ``mean_test_mse``, ``std_test_mse``, ``rank_test_mse``.
        best_params_: the chosen stage-1 hyper-parameters.
        degree_, n_knots_, alpha_: chosen spline degree, knots and ridge alpha
            (None for other stage-1 variants).
        spline_knots_, spline_coef_, spline_intercept_: the fitted spline
            ``f(x) = intercept + sum_i coef_i B_i(x)`` on the full knot vector.
        affine_slope_, affine_intercept_: the affine variant's fit.
        stage1_estimator_: the fitted scikit-learn regressor of the
            ``"knn"``/``"random_forest"`` variants.
        residual_alphas_: ``(n,)`` chosen stage-2 alpha per task (NaN for a
            task in fewer than 2 training groups: no correction).
        residual_coef_, residual_intercept_: ``(n, n)`` and ``(n,)``; row
            ``t`` is task ``t``'s ridge on ``u_G``.
        residual_cv_results_: dict with ``alphas``, ``mean_test_mse``
            ``(n, n_alphas)`` and ``n_splits`` ``(n,)``.
        stage2_kind_: the ``stage2`` option the model was fitted with
            (prediction follows the fitted state, not later ``set_params``).
        stage2_estimator_: the fitted ``GradientBoostingRegressor`` of the
            ``"gradient_boosting"`` variant.

    Raises:
        ValueError: (in ``fit``) invalid options, an affinity that is not
            square/finite, masks that are not 0/1 or of the wrong width, empty
            groups, gains of the wrong shape or non-finite at member positions,
            or fewer than 2 training groups with >= 2 tasks.

    Example:
        >>> import numpy as np
        >>> from lightning_etap.groups import all_groups
        >>> rng = np.random.default_rng(0)
        >>> A = rng.normal(size=(6, 6))
        >>> groups = all_groups(6, min_size=2)
        >>> train = groups[rng.choice(len(groups), 30, replace=False)]
        >>> gains = np.tanh(group_affinity(A, train)) + 0.01 * rng.normal(size=train.shape)
        >>> model = ETAPPredictor(A).fit(train, gains)
        >>> model.predict(groups).shape
        (57, 6)
        >>> bool(model.score(groups, np.tanh(group_affinity(A, groups))) > 0.9)
        True
    """

    def __init__(
        self,
        affinity,
        *,
        task_names: Sequence[str] | None = None,
        stage1: str = "bspline",
        stage2: str | None = "ridge",
        knots_range: str | Sequence[int] = "released",
        degrees: Sequence[int] = (2, 3, 4, 5, 6),
        alpha_grid: Sequence[float] | None = None,
        residual_alpha_grid: Sequence[float] | None = None,
        cv: int = 10,
        residual_cv: int = 5,
        rescale: bool = True,
        random_state: int | None = 0,
    ):
        self.affinity = affinity
        self.task_names = task_names
        self.stage1 = stage1
        self.stage2 = stage2
        self.knots_range = knots_range
        self.degrees = degrees
        self.alpha_grid = alpha_grid
        self.residual_alpha_grid = residual_alpha_grid
        self.cv = cv
        self.residual_cv = residual_cv
        self.rescale = rescale
        self.random_state = random_state

    # ------------------------------------------------------------------ options
    def _checked_options(self) -> dict:
        if self.stage1 not in _STAGE1:
            raise ValueError(f"stage1 must be one of {_STAGE1}; got {self.stage1!r}")
        if self.stage2 not in _STAGE2:
            raise ValueError(f"stage2 must be one of {_STAGE2}; got {self.stage2!r}")
        for name in ("cv", "residual_cv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2 (number of folds); got {value!r}")
        if not isinstance(self.rescale, (bool, np.bool_)):
            raise ValueError(f"rescale must be True or False; got {self.rescale!r}")
        if isinstance(self.knots_range, str):
            if self.knots_range not in ("released", "paper"):
                raise ValueError(
                    f"knots_range must be 'released', 'paper' or a sequence of integers >= 2; "
                    f"got {self.knots_range!r}"
                )
        else:
            _int_grid(self.knots_range, "knots_range", minimum=2)
        degrees = _int_grid(self.degrees, "degrees", minimum=1)
        alphas = _alpha_grid(self.alpha_grid, RELEASED_ALPHA_GRID, "alpha_grid")
        residual_alphas = _alpha_grid(self.residual_alpha_grid, RESIDUAL_ALPHA_GRID, "residual_alpha_grid")
        return {"degrees": degrees, "alphas": alphas, "residual_alphas": residual_alphas}

    def _knot_grid(self, n_rows: int, n_groups: int) -> np.ndarray:
        if self.knots_range == "released":
            return np.arange(2, math.isqrt(n_rows) + 10)
        if self.knots_range == "paper":
            return np.arange(2, max(2, math.isqrt(n_groups)) + 1)
        return _int_grid(self.knots_range, "knots_range", minimum=2)

    def _resolve_names(self, n: int) -> list[str] | None:
        return resolve_task_names(self.task_names, self.affinity, n)

    # ---------------------------------------------------------------------- fit
    def fit(self, masks, gains=None) -> ETAPPredictor:
        """Fit both stages on measured training groups.

        The released code always puts the all-task group into the training
        set; do the same when sampling training groups (this method uses
        whatever groups it is given).

        Args:
            masks: ``(m, n)`` bool masks of the training groups (0/1 accepted).
                Singleton groups are ignored.
            gains: ``(m, n)`` measured relative gains ``y[G -> t]``; entries of
                non-members are ignored (NaN customary). Or pass a
                :class:`~lightning_etap.groundtruth.GroupGains` (``store.gains()``)
                alone as ``masks``: its columns are matched to the predictor's
                tasks by name.

        Returns:
            self

        Raises:
            ValueError: see the class docstring.
        """
        options = self._checked_options()
        affinity = check_affinity(self.affinity)
        n = affinity.shape[0]
        masks, gains, columns = training_table(masks, gains, self._resolve_names(n), "ETAPPredictor", ordered=True)
        names = self._resolve_names(n) or columns
        masks = check_masks(masks, n)
        gains = check_gains(gains, masks, task_names=names)
        keep = masks.sum(axis=1) >= 2
        masks, gains = masks[keep], gains[keep]
        # rows of one group (measured with several seeds) share an id: cross-validation keeps them in one fold
        same = _same_group_ids(masks)
        n_groups = int(np.unique(same).size)
        if n_groups < 2:
            if n == 2:
                raise ValueError(
                    "with 2 tasks there is one multi-task group, whose gains are measured: nothing is left to "
                    "predict (ETAPPredictor needs at least 2 distinct training groups of two or more tasks)")
            raise ValueError(
                f"ETAPPredictor needs at least 2 distinct training groups with two or more tasks; got {n_groups} "
                "(singleton groups carry no affinity and are ignored): measure more groups"
            )
        pair, z, u = _member_features(affinity, masks)
        gi, ti = np.nonzero(pair)
        y = gains[pair]

        slope, intercept = _rescale_coefficients(z, y) if self.rescale else (1.0, 0.0)
        x = intercept + slope * z

        n_splits = self.cv
        if n_groups < n_splits:
            warnings.warn(
                f"only {n_groups} training groups with two or more tasks for cv={self.cv}: "
                f"stage 1 uses {n_groups}-fold cross-validation (one group per fold)",
                UserWarning,
                stacklevel=2,
            )
            n_splits = n_groups
        folds = _group_folds(same[gi], n_splits, self.random_state)

        self.n_tasks_ = n
        self.task_names_ = names
        self.affinity_ = affinity
        self.n_train_groups_ = n_groups
        self.n_train_rows_ = int(y.size)
        self.rescale_slope_ = float(slope)
        self.rescale_intercept_ = float(intercept)
        self.stage1_n_splits_ = n_splits
        # thousands of tiny SVDs and products: BLAS threads only add overhead here
        with threadpool_limits(limits=1, user_api="blas"):
            self._fit_stage1(x, y, folds, options, n_groups)
            stage1 = self._stage1_predict(x)
            self._fit_stage2(masks, u, pair, stage1, y - stage1, options)
        return self

    def _fit_stage1(self, x, y, folds, options, n_groups) -> None:
        for attr in ("degree_", "n_knots_", "alpha_", "spline_knots_", "spline_coef_", "spline_intercept_",
                     "affine_slope_", "affine_intercept_", "stage1_estimator_", "stage1_constant_"):
            setattr(self, attr, None)
        self.cv_results_ = {"params": [], "mean_test_mse": np.empty(0), "std_test_mse": np.empty(0),
                            "rank_test_mse": np.empty(0, dtype=int)}
        self.best_params_ = {}
        if self.stage1 == "bspline" and not x.max() > x.min():
            warnings.warn(
                "the group-affinity feature is constant over the training groups, so no spline can be "
                "fitted: stage 1 predicts the mean training gain (check the affinity matrix)",
                UserWarning,
                stacklevel=3,
            )
            self.stage1_kind_ = "constant"
            self.stage1_constant_ = float(y.mean())
            return
        self.stage1_kind_ = self.stage1
        if self.stage1 == "affine":
            reg = LinearRegression().fit(x[:, None], y)
            self.affine_slope_ = float(reg.coef_[0])
            self.affine_intercept_ = float(reg.intercept_)
            return
        if self.stage1 == "bspline":
            degrees = options["degrees"]
            knots = self._knot_grid(y.size, n_groups)
            alphas = options["alphas"]
            mse = _spline_grid_mse(x, y, folds, degrees, knots, alphas)  # (D, K, A, F)
            mean, std = mse.mean(axis=-1), mse.std(axis=-1)
            d, k, a = np.unravel_index(int(np.argmin(mean)), mean.shape)
            self.cv_results_ = {
                "params": [{"degree": int(dd), "n_knots": int(kk), "alpha": float(aa)}
                           for dd in degrees for kk in knots for aa in alphas],
                "mean_test_mse": mean.ravel(),
                "std_test_mse": std.ravel(),
                "rank_test_mse": _rank(mean.ravel()),
            }
            self.degree_, self.n_knots_, self.alpha_ = int(degrees[d]), int(knots[k]), float(alphas[a])
            self.best_params_ = {"degree": self.degree_, "n_knots": self.n_knots_, "alpha": self.alpha_}
            spline = SplineTransformer(n_knots=self.n_knots_, degree=self.degree_, include_bias=True)
            basis = spline.fit_transform(x[:, None])
            ridge = Ridge(alpha=self.alpha_).fit(basis, y)
            self.spline_knots_ = spline.bsplines_[0].t.copy()
            self.spline_coef_ = ridge.coef_.copy()
            self.spline_intercept_ = float(ridge.intercept_)
            return
        min_train = min(len(tr) for tr, _ in folds)
        if self.stage1 == "knn":
            estimator = KNeighborsRegressor()
            grid = {"n_neighbors": [k for k in (1, 2, 3, 5, 7, 10, 15, 20) if k <= min_train],
                    "weights": ["uniform", "distance"]}
        else:
            estimator = RandomForestRegressor(n_estimators=50, random_state=self.random_state, n_jobs=1)
            grid = {"max_depth": [None, 3], "min_samples_leaf": [1, 5]}
        search = GridSearchCV(estimator, grid, cv=folds, scoring="neg_mean_squared_error", n_jobs=1)
        search.fit(x[:, None], y)
        self.stage1_estimator_ = search.best_estimator_
        self.best_params_ = dict(search.best_params_)
        self.cv_results_ = _search_results(search)
        if self.stage1 == "knn":  # enough to rebuild the regressor exactly after load()
            self._knn_train_x_ = x.copy()
            self._knn_train_y_ = y.copy()

    def _fit_stage2(self, masks, u, pair, stage1, residual, options) -> None:
        n = self.n_tasks_
        self.residual_alphas_ = None
        self.residual_coef_ = None
        self.residual_intercept_ = None
        self.residual_cv_results_ = None
        self.stage2_estimator_ = None
        self.stage2_kind_ = self.stage2
        if self.stage2 is None:
            return
        gi, ti = np.nonzero(pair)
        same = _same_group_ids(masks)  # repeated measurements of a group stay in one fold
        if self.stage2 == "gradient_boosting":
            features = _boosting_features(u, pair, stage1)
            n_splits = min(self.residual_cv, int(np.unique(same).size))
            if n_splits < self.residual_cv:
                warnings.warn(
                    f"only {n_splits} training groups with two or more tasks for residual_cv="
                    f"{self.residual_cv}: the gradient-boosting search uses {n_splits}-fold cross-validation",
                    UserWarning,
                    stacklevel=3,
                )
            folds = _group_folds(same[gi], n_splits, self.random_state)
            grid = {"max_depth": [2, 3], "learning_rate": [0.05, 0.1]}
            search = GridSearchCV(GradientBoostingRegressor(n_estimators=100, random_state=self.random_state),
                                  grid, cv=folds, scoring="neg_mean_squared_error", n_jobs=1)
            search.fit(features, residual)
            self.stage2_estimator_ = search.best_estimator_
            self.residual_cv_results_ = _search_results(search)
            return
        alphas = options["residual_alphas"]
        resid = np.full(masks.shape, np.nan)
        resid[pair] = residual
        coef = np.zeros((n, n))
        intercept = np.zeros(n)
        chosen = np.full(n, np.nan)
        mean_mse = np.full((n, alphas.size), np.nan)
        splits = np.zeros(n, dtype=int)
        untrained, fewer = [], []
        for t in range(n):
            rows = np.flatnonzero(masks[:, t])
            distinct = int(np.unique(same[rows]).size)
            if distinct < 2:
                untrained.append(t)
                continue
            k = min(self.residual_cv, distinct)
            if k < self.residual_cv:
                fewer.append(t)
            design, target = u[rows], resid[rows, t]
            mse = np.empty((len(alphas), k))
            for f, (tr, va) in enumerate(_group_folds(same[rows], k, self.random_state)):
                pred = ridge_path_predict(design[tr], target[tr], design[va], alphas)
                mse[:, f] = ((pred - target[va, None]) ** 2).mean(axis=0)
            mean_mse[t] = mse.mean(axis=1)
            best = int(np.argmin(mean_mse[t]))
            ridge = Ridge(alpha=float(alphas[best])).fit(design, target)
            coef[t], intercept[t], chosen[t], splits[t] = ridge.coef_, ridge.intercept_, alphas[best], k
        label = (lambda ts: [self.task_names_[t] for t in ts]) if self.task_names_ else (lambda ts: ts)
        if untrained:
            warnings.warn(
                f"tasks {label(untrained)} are in fewer than 2 training groups with two or more tasks: "
                "no residual correction for them (stage 1 only)",
                UserWarning,
                stacklevel=3,
            )
        if fewer:
            warnings.warn(
                f"tasks {label(fewer)} are in fewer than residual_cv={self.residual_cv} training groups: "
                "their residual alpha is chosen with one fold per group",
                UserWarning,
                stacklevel=3,
            )
        self.residual_alphas_ = chosen
        self.residual_coef_ = coef
        self.residual_intercept_ = intercept
        self.residual_cv_results_ = {"alphas": alphas.copy(), "mean_test_mse": mean_mse, "n_splits": splits}

    # ------------------------------------------------------------------ predict
    def _stage1_predict(self, x: np.ndarray) -> np.ndarray:
        kind = self.stage1_kind_
        if kind == "bspline":
            return spline_predict(x, self.spline_knots_, self.spline_coef_, self.spline_intercept_, self.degree_)
        if kind == "affine":
            return self.affine_intercept_ + self.affine_slope_ * x
        if kind == "constant":
            return np.full(x.shape, self.stage1_constant_)
        if x.size == 0:
            return np.empty(0)
        return self.stage1_estimator_.predict(x[:, None])

    def _predict_block(self, masks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Predictions for one block of groups; ``weights`` = ``[affinity_ | residual_coef_.T]``."""
        n = self.n_tasks_
        u = masks.astype(np.float64)
        size = u.sum(axis=1)
        pair = masks & (size >= 2)[:, None]
        product = u @ weights  # one pass: group affinity sums and (stage 2) residual ridge
        z = (product[:, :n] / np.maximum(size - 1.0, 1.0)[:, None])[pair]
        value = self._stage1_predict(self.rescale_intercept_ + self.rescale_slope_ * z)
        if self.stage2_kind_ == "ridge":
            out = product[:, n:]
            out += self.residual_intercept_
        else:
            out = np.zeros(masks.shape)
            if self.stage2_kind_ == "gradient_boosting" and value.size:
                value = value + self.stage2_estimator_.predict(_boosting_features(u, pair, value))
        np.copyto(out, 0.0, where=masks & ~pair)  # singleton members: gain 0 by definition
        np.copyto(out, np.nan, where=~masks)
        out[pair] += value
        return out

    def _block_weights(self) -> np.ndarray:
        if self.stage2_kind_ == "ridge":
            return np.hstack([self.affinity_, self.residual_coef_.T])
        return self.affinity_

    def _blocks(self, masks: np.ndarray):
        """Yield ``(slice, predictions)`` per block of 65,536 groups.

        Large inputs run with single-threaded BLAS: the products are skinny
        ``(65536, n) @ (n, 2n)`` ones, for which threads only add overhead
        (about 4x slower on a loaded 2-core machine).
        """
        weights = self._block_weights()
        limit = threadpool_limits(limits=1, user_api="blas") if masks.shape[0] > _CHUNK else nullcontext()
        with limit:
            for start in range(0, masks.shape[0], _CHUNK):
                rows = slice(start, start + _CHUNK)
                yield rows, self._predict_block(masks[rows], weights)

    def _check_fitted(self) -> None:
        check_is_fitted(
            self,
            ["n_tasks_", "stage1_kind_", "stage2_kind_"],
            msg="This ETAPPredictor is not fitted yet: call fit(masks, gains) with measured training "
            "groups, or ETAPPredictor.load(path), before predicting.",
        )

    def predict(self, masks) -> np.ndarray:
        """Predicted relative gain of every member of every group.

        Args:
            masks: ``(m, n)`` bool group masks (any groups, e.g.
                ``lightning_etap.groups.all_groups(n)``).

        Returns:
            ``(m, n)`` float array: the prediction for members, exactly 0 for
            the member of a singleton, NaN for non-members. Computed in blocks
            of 65,536 groups, so memory stays a few times the output size.

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
            ValueError: masks not 0/1, of the wrong width, or an empty group.
        """
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        out = np.empty(masks.shape)
        for rows, block in self._blocks(masks):
            out[rows] = block
        return out

    def predict_total(self, masks) -> np.ndarray:
        """``(m,)`` predicted total gain of each group: the sum over its members."""
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        out = np.empty(masks.shape[0])
        for rows, block in self._blocks(masks):
            out[rows] = np.where(masks[rows], block, 0.0).sum(axis=1)
        return out

    def score(self, masks, gains, sample_weight=None) -> float:
        """R² of the predictions over the member entries of groups with two or more tasks.

        Singletons are left out (their gain is 0 by definition, so they would
        inflate the score). ``sample_weight`` is accepted for scikit-learn
        compatibility and must be None.
        """
        if sample_weight is not None:
            raise ValueError("ETAPPredictor.score does not support sample_weight")
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        gains = check_gains(gains, masks)
        used = masks & (masks.sum(axis=1) >= 2)[:, None]
        if not used.any():
            raise ValueError("score needs at least one group with two or more tasks")
        return float(r2_score(gains[used], self.predict(masks)[used]))

    # -------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the fitted predictor to ``path`` as plain JSON (no pickle).

        The file holds the hyper-parameters and everything prediction needs:
        the affinity matrix, the rescaling, the spline's knots, coefficients and
        intercept (or the affine fit, or the KNN training points), the residual
        ridges' coefficients and intercepts, the chosen hyper-parameters and
        the cross-validation tables. Floats are written exactly, so
        :meth:`load` reproduces predictions bit for bit.

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
            NotImplementedError: for ``stage1="random_forest"`` or
                ``stage2="gradient_boosting"``: tree ensembles cannot be
                stored without pickle; refit them (same data and
                ``random_state`` give the same model).
        """
        self._check_fitted()
        if self.stage1_kind_ == "random_forest" or self.stage2_kind_ == "gradient_boosting":
            raise NotImplementedError(
                "save() supports stage1 in ('bspline', 'affine', 'knn') with stage2 in ('ridge', None); "
                "tree ensembles (random_forest, gradient_boosting) cannot be stored without pickle: "
                "refit them from the same data and random_state instead"
            )
        from lightning_etap import __version__

        params = self.get_params(deep=False)
        params["affinity"] = as_float_array(affinity_values(self.affinity)[0])
        params["task_names"] = None if self.task_names_ is None else [str(t) for t in self.task_names_]
        for key in ("degrees", "alpha_grid", "residual_alpha_grid"):
            if params[key] is not None:
                params[key] = np.asarray(params[key]).tolist()
        if not isinstance(params["knots_range"], str):
            params["knots_range"] = np.asarray(params["knots_range"]).tolist()
        if not (params["random_state"] is None or isinstance(params["random_state"], (int, np.integer))):
            params["random_state"] = None  # a RandomState object cannot be stored; it only seeds refits
        fitted = {name: getattr(self, name) for name in _SAVED_FIELDS}
        if self.stage1_kind_ == "knn":
            fitted["_knn_train_x_"] = self._knn_train_x_
            fitted["_knn_train_y_"] = self._knn_train_y_
        return write_document(path, _FORMAT, params, fitted, __version__)

    @classmethod
    def load(cls, path: str | Path) -> ETAPPredictor:
        """Rebuild a predictor written by :meth:`save`.

        Raises:
            ValueError: the file is not a saved ETAPPredictor of this format version.
        """
        doc = read_document(path, _FORMAT)
        params = dict(doc["params"])
        params["affinity"] = array_from_json(params["affinity"])
        if isinstance(params.get("degrees"), list):
            params["degrees"] = tuple(params["degrees"])
        model = cls(**params)
        fitted = doc["fitted"]
        for name in _SAVED_FIELDS:
            value = fitted[name]
            if name in _ARRAY_FIELDS and value is not None:
                value = array_from_json(value)
            setattr(model, name, value)
        for key, dtype in (("mean_test_mse", np.float64), ("std_test_mse", np.float64),
                           ("rank_test_mse", np.int64)):
            model.cv_results_[key] = array_from_json(model.cv_results_[key], dtype)
        if model.residual_cv_results_ is not None:
            rcv = model.residual_cv_results_
            rcv["alphas"] = array_from_json(rcv["alphas"])
            rcv["mean_test_mse"] = array_from_json(rcv["mean_test_mse"])
            rcv["n_splits"] = array_from_json(rcv["n_splits"], np.int64)
        if model.stage1_kind_ == "knn":
            model._knn_train_x_ = array_from_json(fitted["_knn_train_x_"])
            model._knn_train_y_ = array_from_json(fitted["_knn_train_y_"])
            model.stage1_estimator_ = KNeighborsRegressor(**model.best_params_).fit(
                model._knn_train_x_[:, None], model._knn_train_y_
            )
        return model


_ARRAY_FIELDS = frozenset(
    {"affinity_", "spline_knots_", "spline_coef_", "residual_alphas_", "residual_coef_", "residual_intercept_"}
)
_SAVED_FIELDS = (
    "n_tasks_", "task_names_", "affinity_", "n_train_groups_", "n_train_rows_", "rescale_slope_",
    "rescale_intercept_", "stage1_kind_", "stage1_n_splits_", "cv_results_", "best_params_", "degree_",
    "n_knots_", "alpha_", "spline_knots_", "spline_coef_", "spline_intercept_", "affine_slope_",
    "affine_intercept_", "stage1_constant_", "residual_alphas_", "residual_coef_", "residual_intercept_",
    "residual_cv_results_", "stage2_kind_",
)


# ----------------------------------------------------------------------- helpers
def _rescale_coefficients(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Linear map of the feature onto the gain scale: slope ``corr * std(y) / std(z)``, matching means.

    Falls back to the identity when the slope is undefined (constant ``z`` or
    ``y``) or zero, since a zero slope would collapse the feature.
    """
    sz, sy = z.std(), y.std()
    if sz > 0 and sy > 0:
        slope = float(np.corrcoef(z, y)[0, 1] * sy / sz)
        if np.isfinite(slope) and slope != 0.0:
            return slope, float(y.mean() - slope * z.mean())
    return 1.0, 0.0


def _spline_grid_mse(x, y, folds, degrees, knots, alphas) -> np.ndarray:
    """Validation MSE ``(len(degrees), len(knots), len(alphas), len(folds))`` of spline + ridge.

    For every fold the spline's knots come from that fold's training rows
    (as a pipeline refitted per fold in ``GridSearchCV``), and all alphas are
    solved from one SVD per (degree, knots, fold).
    """
    mse = np.empty((len(degrees), len(knots), len(alphas), len(folds)))
    for f, (tr, va) in enumerate(folds):
        x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
        both = np.concatenate([x_tr, x_va])
        lo, hi = x_tr.min(), x_tr.max()
        if not hi > lo:  # degenerate fold: every model predicts the fold's mean gain
            mse[..., f] = ((y_va - y_tr.mean()) ** 2).mean()
            continue
        for di, degree in enumerate(degrees):
            for ki, n_knots in enumerate(knots):
                basis = spline_basis(both, uniform_knots(lo, hi, int(n_knots), int(degree)), int(degree))
                pred = ridge_path_predict(basis[: x_tr.size], y_tr, basis[x_tr.size :], alphas)
                mse[di, ki, :, f] = ((pred - y_va[:, None]) ** 2).mean(axis=0)
    return mse


def _boosting_features(u: np.ndarray, pair: np.ndarray, stage1: np.ndarray) -> np.ndarray:
    """Rows ``[u_G, one-hot(t), stage-1 prediction]`` for the gradient-boosting residual model."""
    gi, ti = np.nonzero(pair)
    n = u.shape[1]
    features = np.zeros((gi.size, 2 * n + 1), dtype=np.float32)
    features[:, :n] = u[gi]
    features[np.arange(gi.size), n + ti] = 1.0
    features[:, -1] = stage1
    return features


def _rank(values: np.ndarray) -> np.ndarray:
    """Rank 1 = smallest, ties share the lowest rank (as ``GridSearchCV.rank_test_score``)."""
    from scipy.stats import rankdata

    return rankdata(values, method="min").astype(np.int64)


def _search_results(search: GridSearchCV) -> dict:
    res = search.cv_results_
    mean = -np.asarray(res["mean_test_score"], dtype=np.float64)
    return {
        "params": [dict(p) for p in res["params"]],
        "mean_test_mse": mean,
        "std_test_mse": np.asarray(res["std_test_score"], dtype=np.float64),
        "rank_test_mse": _rank(mean),
    }


def _int_grid(values, name: str, minimum: int) -> np.ndarray:
    try:
        arr = np.asarray(list(values))
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers >= {minimum}; got {values!r}") from None
    if arr.size == 0 or arr.dtype.kind not in "iu" or (arr < minimum).any():
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {minimum}; got {values!r}")
    return arr.astype(np.int64)


def _alpha_grid(values, default, name: str) -> np.ndarray:
    if values is None:
        return np.asarray(default, dtype=np.float64)
    try:
        arr = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive floats; got {values!r}") from None
    if arr.size == 0 or not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"{name} must be a non-empty sequence of positive finite floats; got {values!r}")
    return arr
