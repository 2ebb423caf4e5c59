"""Shared machinery of the baseline gain predictors (private).

Every baseline is a scikit-learn regressor over group masks with the same
contract as :class:`~lightning_etap.predictors.ETAPPredictor`:
``predict(masks)`` returns ``(m, n)`` per-task gains, NaN for non-members and
exactly 0 for the member of a singleton; ``predict_total``, ``score``,
``save`` and ``load`` behave alike. A subclass implements only
``_member_gains`` (predictions for groups with two or more tasks) and lists
the fitted attributes that ``save`` stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import r2_score
from sklearn.utils.validation import check_is_fitted

from ._persist import array_from_json, read_document, write_document
from ._validation import (
    affinity_values,
    as_float_array,
    check_gains,
    check_masks,
    resolve_task_names,
    training_table,
)

__all__ = [
    "BaselinePredictor",
    "check_training_groups",
    "format_pairs",
    "missing_pairs",
    "pair_gain_matrix",
]


class BaselinePredictor(RegressorMixin, BaseEstimator):
    """Common ``predict`` / ``predict_total`` / ``score`` / ``save`` / ``load`` (private base)."""

    #: the ``format`` field of saved files
    _FORMAT: str = ""
    #: fitted attributes written by ``save`` (in this order)
    _SAVED_FIELDS: tuple[str, ...] = ()
    #: saved fields restored as float arrays (``null`` -> NaN)
    _ARRAY_FIELDS: frozenset[str] = frozenset()
    #: constructor parameters restored as float arrays
    _ARRAY_PARAMS: frozenset[str] = frozenset()
    #: groups per block in ``predict``
    _CHUNK: int = 1 << 16
    #: how to fit, quoted in the NotFittedError message
    _FIT_HINT: str = "fit(masks, gains) with measured training groups"

    # ------------------------------------------------------------- subclass API
    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        """``(k, n)`` predictions for ``k`` groups that all have >= 2 members (non-member cells ignored)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- helpers
    def _resolve_names(self, n: int) -> list[str] | None:
        """``task_names=``, or the names the predictor's affinity carries (an AffinityResult, a DataFrame)."""
        return resolve_task_names(getattr(self, "task_names", None), getattr(self, "affinity", None), n)

    def _known_names(self) -> list[str] | None:
        """The task names the predictor knows before ``fit`` (``task_names=`` or its affinity's), unchecked."""
        given = getattr(self, "task_names", None)
        if given is not None:
            return [str(t) for t in given]
        affinity = getattr(self, "affinity", None)
        return affinity_values(affinity)[1] if affinity is not None else None

    def _training_groups(self, masks, gains, *, minimum: int, n_tasks: int | None = None):
        """``fit``'s training groups checked by :func:`check_training_groups`: ``(masks, gains, columns)``, a
        ``GroupGains`` matched by name to the tasks this predictor knows (its affinity's order, if it has one)."""
        return check_training_groups(masks, gains, n_tasks, minimum=minimum, who=type(self).__name__,
                                     names=self._known_names(), ordered=getattr(self, "affinity", None) is not None)

    def _label(self, tasks) -> list:
        names = getattr(self, "task_names_", None)
        return [names[t] for t in tasks] if names else [int(t) for t in tasks]

    def _check_fitted(self) -> None:
        check_is_fitted(
            self,
            "n_tasks_",
            msg=f"This {type(self).__name__} is not fitted yet: call {self._FIT_HINT}, "
            f"or {type(self).__name__}.load(path), before predicting.",
        )

    def _blocks(self, masks: np.ndarray):
        """Yield ``(rows, predictions)`` per block of groups (singletons 0, non-members NaN)."""
        for start in range(0, masks.shape[0], self._CHUNK):
            block = masks[start : start + self._CHUNK]
            size = block.sum(axis=1)
            multi = size >= 2
            out = np.full(block.shape, np.nan)
            if multi.any():
                values = np.asarray(self._member_gains(block[multi]), dtype=np.float64)
                out[multi] = np.where(block[multi], values, np.nan)
            out[block & ~multi[:, None]] = 0.0
            yield slice(start, start + self._CHUNK), out

    # ------------------------------------------------------------------ public
    def predict(self, masks) -> np.ndarray:
        """Predicted relative gain of every member of every group.

        Args:
            masks: ``(m, n)`` bool group masks (0/1 accepted).

        Returns:
            ``(m, n)`` float array: the prediction for members, exactly 0 for
            the member of a singleton, NaN for non-members.

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
        pred = self.predict(masks)
        return np.where(np.isnan(pred), 0.0, pred).sum(axis=1)

    def score(self, masks, gains, sample_weight=None) -> float:
        """R² over the member entries of groups with two or more tasks (singletons left out).

        ``sample_weight`` is accepted for scikit-learn compatibility and must be None.
        """
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__}.score does not support sample_weight")
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        gains = check_gains(gains, masks)
        used = masks & (masks.sum(axis=1) >= 2)[:, None]
        if not used.any():
            raise ValueError("score needs at least one group with two or more tasks")
        return float(r2_score(gains[used], self.predict(masks)[used]))

    # ------------------------------------------------------------- persistence
    def _saved_params(self) -> dict:
        params = self.get_params(deep=False)
        if "task_names" in params:  # the names in use, also those the affinity carried
            names = getattr(self, "task_names_", None)
            params["task_names"] = None if names is None else [str(t) for t in names]
        if "random_state" in params and not (
            params["random_state"] is None or isinstance(params["random_state"], (int, np.integer))
        ):
            params["random_state"] = None  # a RandomState object cannot be stored; it only seeds refits
        for name in self._ARRAY_PARAMS:
            if params.get(name) is not None:
                value = params[name]  # an affinity is read by label (as the fit reads it), other arrays as given
                params[name] = as_float_array(affinity_values(value)[0] if name == "affinity" else value)
        return params

    @classmethod
    def _restored_params(cls, params: dict) -> dict:
        params = dict(params)
        for name in cls._ARRAY_PARAMS:
            if params.get(name) is not None:
                params[name] = array_from_json(params[name])
        for name, value in params.items():
            if isinstance(value, list) and name not in cls._ARRAY_PARAMS and name != "task_names":
                params[name] = tuple(value)
        return params

    def _fitted_document(self) -> dict:
        return {name: getattr(self, name) for name in self._SAVED_FIELDS}

    def _restore_fitted(self, fitted: dict) -> None:
        for name in self._SAVED_FIELDS:
            value = fitted[name]
            if name in self._ARRAY_FIELDS and value is not None:
                value = array_from_json(value)
            setattr(self, name, value)

    def save(self, path: str | Path) -> Path:
        """Write the fitted predictor to ``path`` as plain JSON (no pickle); floats are stored exactly.

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
        """
        self._check_fitted()
        from lightning_etap import __version__

        return write_document(path, self._FORMAT, self._saved_params(), self._fitted_document(), __version__)

    @classmethod
    def load(cls, path: str | Path):
        """Rebuild a predictor written by :meth:`save` (predictions are reproduced exactly).

        Raises:
            ValueError: the file is not a saved predictor of this class and format version.
        """
        doc = read_document(path, cls._FORMAT)
        model = cls(**cls._restored_params(doc["params"]))
        model._restore_fitted(doc["fitted"])
        return model


# --------------------------------------------------------------------- helpers
def check_training_groups(masks, gains, n_tasks: int | None, *, minimum: int, who: str, names=None,
                          ordered: bool = False):
    """Validate training masks/gains; return ``(masks, gains, columns)`` of the groups with >= 2 tasks.

    ``masks`` may be a ``GroupGains`` passed alone (``gains=None``): its
    columns are put in the predictor's task order ``names`` (when known) by
    name; ``columns`` is then the columns' task names, else ``None``
    (``ordered``: see :func:`training_table`). Raises
    ``ValueError`` when fewer than ``minimum`` such groups remain.
    """
    masks, gains, columns = training_table(masks, gains, names, who, ordered=ordered)
    masks = check_masks(masks, n_tasks)
    gains = check_gains(gains, masks, task_names=columns or names)
    keep = masks.sum(axis=1) >= 2
    if keep.sum() < minimum:
        raise ValueError(
            f"{who} needs at least {minimum} training group(s) with two or more tasks; got "
            f"{int(keep.sum())} (singleton groups have gain 0 by definition and are ignored): "
            "measure more groups"
        )
    return masks[keep], gains[keep], columns


def pair_gain_matrix(masks: np.ndarray, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Measured pairwise gains from the two-task training groups.

    Returns ``(pair_gain, n_measured)``: ``pair_gain[s, t]`` is the gain of
    task ``t`` when trained with ``s`` alone (source row, destination column,
    as an affinity matrix), NaN when the pair ``{s, t}`` was not measured and
    on the diagonal; a pair measured more than once gets the mean of its
    measurements. ``n_measured[s, t]`` counts the measurements (symmetric).
    Groups of other sizes are ignored.
    """
    n = masks.shape[1]
    total = np.zeros((n, n))
    count = np.zeros((n, n), dtype=np.int64)
    for g in np.flatnonzero(masks.sum(axis=1) == 2):
        s, t = np.flatnonzero(masks[g])
        total[s, t] += gains[g, t]
        total[t, s] += gains[g, s]
        count[s, t] += 1
        count[t, s] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        pair_gain = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return pair_gain, count


def missing_pairs(masks: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """``(k, 2)`` unordered pairs ``s < t`` that are members together in some group but not ``measured``."""
    missing = (~measured).astype(np.float64)
    np.fill_diagonal(missing, 0.0)
    u = masks.astype(np.float64)
    needed = np.zeros_like(missing, dtype=bool)
    touched = ((u @ missing) * u).sum(axis=1) > 0  # groups with a missing pair among their members
    for g in np.flatnonzero(touched):
        idx = np.flatnonzero(masks[g])
        needed[np.ix_(idx, idx)] = True
    pairs = np.argwhere(np.triu(needed & (missing > 0), k=1))
    return pairs


def format_pairs(pairs: np.ndarray, names: Sequence[str] | None, limit: int = 10) -> str:
    """``"(a, b), (a, c), ... (and 3 more)"`` for an error message."""
    label = (lambda i: repr(names[i])) if names else (lambda i: str(int(i)))
    shown = ", ".join(f"({label(s)}, {label(t)})" for s, t in pairs[:limit])
    more = f" (and {len(pairs) - limit} more)" if len(pairs) > limit else ""
    return shown + more
