"""Feature-based gain predictor after Ayman et al. 2023, "Task Grouping for Automated Multi-Task Machine
Learning via Task Affinity Prediction" (arXiv 2310.16241).

Hand-made features of a task in a group — statistics of the pairwise MTL
gains within the group, task descriptors such as target variance and dataset
size, the group's size — feed a small feed-forward network.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.neural_network import MLPRegressor

from ._baseline import BaselinePredictor, format_pairs, missing_pairs, pair_gain_matrix
from ._persist import array_from_json
from ._validation import check_masks

__all__ = ["Ayman2023Predictor"]

_PAIR_FEATURES = ("pair_gain_mean", "pair_gain_var", "pair_gain_std", "group_size")


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.array(value, dtype=np.float64)


class Ayman2023Predictor(BaselinePredictor):
    """Predict each member's gain with an MLP on pairwise-gain statistics and task descriptors.

    Features of member ``t`` of group ``G`` (``|G| >= 2``), in this order
    (``feature_names_``):

    * ``pair_gain_mean``, ``pair_gain_var``, ``pair_gain_std``: mean, variance
      (population, ``ddof=0``) and standard deviation of the pairwise gains
      ``P[s, t]`` over the other members ``s`` — ``P[s, t]`` is the measured
      gain of ``t`` when trained with ``s`` alone (the per-task version of
      the 2023 paper's group features "mean, variance and standard deviation
      of the pairwise relative MTL gains"). For a pair the variance is 0.
    * ``group_size``: ``|G|``.
    * for each per-task descriptor ``d`` in ``task_features`` (an ``(n,)``
      array, e.g. ``target_variance``, ``target_std``, ``dataset_size``, an
      STL learning-curve slope): its value ``d[t]``, named by its key.
    * for each pairwise descriptor ``D`` in ``task_features`` (an ``(n, n)``
      array, e.g. ``distance`` between the tasks' data): the mean of
      ``D[s, t]`` over the other members, named ``"<key>_mean"``.

    Without ``task_features`` only the pairwise-gain features and the group
    size are used.

    Where ``P`` comes from: by default from the two-task groups among the
    training groups (as :class:`HOAPredictor`; every pair among the members
    of the training groups and of the groups to predict must have been
    measured, else a ``ValueError`` names the missing pairs). Alternatively
    pass ``pairwise``: an ``(n, n)`` matrix used instead — measured pairwise
    gains from elsewhere, or, as a cheaper fallback, a pairwise task-affinity
    matrix (then the features are affinity statistics, not gain statistics).

    Each feature is standardised with its training mean and standard deviation
    (a constant feature is only centred), the target likewise; then a
    ``sklearn.neural_network.MLPRegressor`` (ReLU, Adam, no early stopping)
    is fitted on the member rows of the training groups with two or more
    tasks. Not reproduced from the 2023 paper: its features that need trained
    MTL models' parameters (dot products of task-specific weights) and its
    ~70 dataset descriptors beyond those a user passes; it predicted a
    group's total gain from group-level features, whereas this class predicts
    each member's gain (``predict_total`` sums them, as the ETAP paper's
    Table 5 does for ETAP).

    Args:
        pairwise: optional ``(n, n)`` matrix replacing the measured pairwise
            gains (source row, destination column; diagonal ignored).
        task_features: optional mapping ``name -> (n,)`` or ``(n, n)`` array
            of task descriptors (suggested keys: ``"target_variance"``,
            ``"target_std"``, ``"dataset_size"``, ``"distance"``), or an
            ``(n, k)`` array of ``k`` per-task descriptors (named
            ``task_feature_0`` ...). Must be finite (off the diagonal for
            ``(n, n)`` arrays).
        hidden_layer_sizes: MLP hidden layers (default ``(32,)``).
        alpha: MLP L2 penalty (default 1e-4).
        learning_rate_init: Adam step size (default 1e-3).
        max_iter: maximum MLP epochs (default 500; scikit-learn's warning that
            the optimiser reached ``max_iter`` is silenced, ``mlp_.n_iter_``
            tells how many ran).
        task_names: optional ``n`` task names.
        random_state: seed of the MLP's initialisation and batch shuffling (default 0).

    Attributes:
        n_tasks_, task_names_: as the other predictors.
        pairwise_: ``(n, n)`` the pairwise matrix used for the features.
        feature_names_: list of feature names.
        feature_mean_, feature_scale_: the feature standardisation.
        target_mean_, target_scale_: the target standardisation.
        mlp_: the fitted ``MLPRegressor``.

    Raises:
        ValueError: (in ``fit``) invalid descriptors, masks/gains, missing
            pairwise gains, or fewer than 2 training groups with two or more tasks.

    Example:
        >>> import numpy as np
        >>> from lightning_etap.groups import all_groups
        >>> groups = all_groups(4, min_size=2)
        >>> P = np.arange(16.0).reshape(4, 4) / 100
        >>> gains = np.where(groups, 0.05, np.nan)
        >>> model = Ayman2023Predictor(pairwise=P, task_features={"dataset_size": [100, 200, 300, 400]})
        >>> model.fit(groups, gains).feature_names_
        ['pair_gain_mean', 'pair_gain_var', 'pair_gain_std', 'group_size', 'dataset_size']
    """

    _FORMAT = "lightning_etap.Ayman2023Predictor"
    _SAVED_FIELDS = ("n_tasks_", "task_names_", "pairwise_", "feature_names_", "feature_mean_", "feature_scale_",
                     "target_mean_", "target_scale_")
    _ARRAY_FIELDS = frozenset({"pairwise_", "feature_mean_", "feature_scale_"})
    _ARRAY_PARAMS = frozenset({"pairwise"})

    def __init__(
        self,
        *,
        pairwise=None,
        task_features=None,
        hidden_layer_sizes: Sequence[int] = (32,),
        alpha: float = 1e-4,
        learning_rate_init: float = 1e-3,
        max_iter: int = 500,
        task_names: Sequence[str] | None = None,
        random_state=0,
    ):
        self.pairwise = pairwise
        self.task_features = task_features
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.task_names = task_names
        self.random_state = random_state

    # ---------------------------------------------------------------- features
    def _descriptors(self, n: int) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
        """``(per_task, pairwise)`` lists of ``(name, array)`` from ``task_features``."""
        tf = self.task_features
        if tf is None:
            return [], []
        if isinstance(tf, Mapping):
            items = [(str(k), _as_array(v)) for k, v in tf.items()]
        else:
            arr = _as_array(tf)
            if arr.ndim == 1:
                arr = arr[:, None]
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(
                    f"task_features as an array must have shape (n_tasks, k) = ({n}, k); got {arr.shape}"
                )
            items = [(f"task_feature_{j}", arr[:, j]) for j in range(arr.shape[1])]
        per_task, pairwise = [], []
        for name, value in items:
            if value.shape == (n,):
                if not np.isfinite(value).all():
                    raise ValueError(f"task_features[{name!r}] has non-finite values")
                per_task.append((name, value))
            elif value.shape == (n, n):
                value = value.copy()
                np.fill_diagonal(value, 0.0)
                if not np.isfinite(value).all():
                    raise ValueError(f"task_features[{name!r}] has non-finite off-diagonal values")
                pairwise.append((name, value))
            else:
                raise ValueError(
                    f"task_features[{name!r}] must have shape ({n},) (per task) or ({n}, {n}) (per pair); "
                    f"got {value.shape}"
                )
        return per_task, pairwise

    def _features(self, masks: np.ndarray) -> np.ndarray:
        """``(k, n, f)`` features of every task of ``k`` groups with >= 2 members (non-members: garbage)."""
        u = masks.astype(np.float64)
        others = (u.sum(axis=1) - 1.0)[:, None]
        P = np.where(np.isfinite(self.pairwise_), self.pairwise_, 0.0)
        mean = (u @ P) / others
        var = np.maximum((u @ (P * P)) / others - mean * mean, 0.0)
        columns = [mean, var, np.sqrt(var), np.broadcast_to(others + 1.0, masks.shape)]
        per_task, pairwise = self._descriptors(self.n_tasks_)
        columns += [np.broadcast_to(value, masks.shape) for _, value in per_task]
        columns += [(u @ value) / others for _, value in pairwise]
        return np.stack(columns, axis=-1)

    def member_features(self, masks) -> np.ndarray:
        """The raw (unstandardised) features of every member of every group.

        Args:
            masks: ``(m, n)`` bool group masks.

        Returns:
            ``(m, n, len(feature_names_))`` float array; NaN for non-members
            and for the member of a singleton (singletons have no features).

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
            ValueError: invalid masks, or a pair among some group's members
                without a pairwise gain.
        """
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        multi = masks.sum(axis=1) >= 2
        out = np.full((*masks.shape, len(self.feature_names_)), np.nan)
        if multi.any():
            self._check_pairs(masks[multi], "groups")
            block = masks[multi]
            out[multi] = np.where(block[..., None], self._features(block), np.nan)
        return out

    def _check_pairs(self, masks: np.ndarray, where: str) -> None:
        pairs = missing_pairs(masks, np.isfinite(self.pairwise_))
        if len(pairs):
            raise ValueError(
                f"Ayman2023Predictor has no pairwise gain for {len(pairs)} pair(s) among the members of the "
                f"{where}: {format_pairs(pairs, self.task_names_)}; train those pairs, or pass a complete "
                "`pairwise` matrix (e.g. measured pair gains or a task-affinity matrix)"
            )

    # --------------------------------------------------------------------- fit
    def fit(self, masks, gains=None) -> Ayman2023Predictor:
        """Build the features of every member of the training groups and fit the MLP.

        Args:
            masks: ``(m, n)`` bool training masks (singletons ignored).
            gains: ``(m, n)`` measured relative gains; non-member entries ignored. Or pass a
                :class:`~lightning_etap.groundtruth.GroupGains` (``store.gains()``)
                alone as ``masks``: its columns are matched to the tasks by name.

        Returns:
            self
        """
        masks, gains, columns = self._training_groups(masks, gains, minimum=2)
        n = masks.shape[1]
        self.n_tasks_ = n
        self.task_names_ = self._resolve_names(n) or columns
        if self.pairwise is None:
            self.pairwise_ = pair_gain_matrix(masks, gains)[0]
        else:
            pairwise = _as_array(self.pairwise)
            if pairwise.shape != (n, n):
                raise ValueError(f"pairwise must have shape ({n}, {n}) to match the masks; got {pairwise.shape}")
            pairwise = pairwise.copy()
            np.fill_diagonal(pairwise, np.nan)
            if not np.isfinite(pairwise[~np.eye(n, dtype=bool)]).all():
                raise ValueError("pairwise has non-finite off-diagonal values")
            self.pairwise_ = pairwise
        self._check_pairs(masks, "training groups")
        per_task, pairwise = self._descriptors(n)
        self.feature_names_ = [*_PAIR_FEATURES, *(k for k, _ in per_task), *(f"{k}_mean" for k, _ in pairwise)]

        X = self._features(masks)[masks]
        y = gains[masks]
        self.feature_mean_ = X.mean(axis=0)
        scale = X.std(axis=0)
        self.feature_scale_ = np.where(scale > 0, scale, 1.0)
        self.target_mean_ = float(y.mean())
        self.target_scale_ = float(y.std()) if y.std() > 0 else 1.0
        self.mlp_ = MLPRegressor(
            hidden_layer_sizes=tuple(int(h) for h in self.hidden_layer_sizes),
            alpha=self.alpha,
            learning_rate_init=self.learning_rate_init,
            max_iter=self.max_iter,
            early_stopping=False,
            random_state=self.random_state,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Stochastic Optimizer.*", category=UserWarning)
            self.mlp_.fit((X - self.feature_mean_) / self.feature_scale_, (y - self.target_mean_) / self.target_scale_)
        return self

    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        self._check_pairs(masks, "groups to predict")
        features = self._features(masks)
        out = np.zeros(masks.shape)
        rows = (features[masks] - self.feature_mean_) / self.feature_scale_
        out[masks] = self.mlp_.predict(rows) * self.target_scale_ + self.target_mean_
        return out

    # ------------------------------------------------------------- persistence
    def _saved_params(self) -> dict:
        params = super()._saved_params()
        tf = params["task_features"]
        if tf is not None:
            params["task_features"] = (
                {str(k): _as_array(v) for k, v in tf.items()} if isinstance(tf, Mapping) else _as_array(tf)
            )
        params["hidden_layer_sizes"] = [int(h) for h in params["hidden_layer_sizes"]]
        return params

    @classmethod
    def _restored_params(cls, params: dict) -> dict:
        tf = params.get("task_features")
        params = super()._restored_params({k: v for k, v in params.items() if k != "task_features"})
        if isinstance(tf, dict):
            params["task_features"] = {k: array_from_json(v) for k, v in tf.items()}
        elif tf is not None:
            params["task_features"] = array_from_json(tf)
        else:
            params["task_features"] = None
        return params

    def _fitted_document(self) -> dict:
        doc = super()._fitted_document()
        doc["mlp_coefs_"] = self.mlp_.coefs_
        doc["mlp_intercepts_"] = self.mlp_.intercepts_
        return doc

    def _restore_fitted(self, fitted: dict) -> None:
        super()._restore_fitted(fitted)
        self.target_mean_ = float(self.target_mean_)
        self.target_scale_ = float(self.target_scale_)
        coefs = [array_from_json(c) for c in fitted["mlp_coefs_"]]
        intercepts = [array_from_json(b) for b in fitted["mlp_intercepts_"]]
        mlp = MLPRegressor(
            hidden_layer_sizes=tuple(int(h) for h in self.hidden_layer_sizes),
            alpha=self.alpha,
            learning_rate_init=self.learning_rate_init,
            max_iter=self.max_iter,
            early_stopping=False,
            random_state=self.random_state,
        )
        # the attributes MLPRegressor.predict reads; the network is rebuilt without pickle
        mlp.coefs_, mlp.intercepts_ = coefs, intercepts
        mlp.n_layers_ = len(coefs) + 1
        mlp.n_outputs_ = coefs[-1].shape[1]
        mlp.n_features_in_ = coefs[0].shape[0]
        mlp.out_activation_ = "identity"
        self.mlp_ = mlp
