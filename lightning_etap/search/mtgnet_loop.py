"""MTG-Net's active loop (Song et al. 2022): train the group predicted to improve the best grouping most."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from lightning_etap.groundtruth.base import GroupTrainer
from lightning_etap.groundtruth.executors import Executor
from lightning_etap.groundtruth.store import GainStore

from ._common import SearchResult, Session, check_count, check_predictor, random_order

__all__ = ["mtgnet_search", "swap_improvements"]


def swap_improvements(grouping_values: np.ndarray, candidate_values: np.ndarray, budget: int) -> np.ndarray:
    """How much each candidate group would improve a grouping it joins, replacing at most one group.

    The grouping's objective is the sum over tasks of the best value any of
    its groups gives the task. A candidate may replace any one group of the
    grouping, or join it as an extra group when it has fewer than
    ``budget`` groups; the best of these choices counts. Choices that leave
    a task uncovered are not allowed.

    Args:
        grouping_values: ``(k, n)`` per-task values of the grouping's groups
            (``-inf`` or NaN for non-members).
        candidate_values: ``(m, n)`` per-task values of the candidates (the same convention).
        budget: the largest number of groups.

    Returns:
        ``(m,)`` best objective with the candidate minus the grouping's
        objective (``-inf`` where no choice covers every task).

    Example:
        >>> inf = np.inf
        >>> grouping = np.array([[1.0, 1.0, -inf], [-inf, -inf, 0.0]])  # {a, b}, {c}
        >>> candidates = np.array([[2.0, -inf, 1.0], [-inf, 3.0, 3.0]])  # {a, c}, {b, c}
        >>> swap_improvements(grouping, candidates, budget=2)  # {a,c} + {a,b}: 2+1+1; {b,c} + {a,b}: 1+3+3
        array([2., 5.])
    """
    g = np.where(np.isnan(grouping_values), -np.inf, np.asarray(grouping_values, dtype=float))
    c = np.where(np.isnan(candidate_values), -np.inf, np.asarray(candidate_values, dtype=float))
    k = g.shape[0]
    base = g.max(axis=0).sum() if k else -np.inf
    bases = [np.delete(g, j, axis=0).max(axis=0) if k > 1 else np.full(g.shape[1], -np.inf) for j in range(k)]
    if k < budget:
        bases.append(g.max(axis=0) if k else np.full(g.shape[1], -np.inf))
    if not bases:
        return np.full(c.shape[0], -np.inf)
    rest = np.stack(bases)  # (choices, n)
    with np.errstate(invalid="ignore"):
        totals = np.maximum(rest[None, :, :], c[:, None, :]).sum(axis=2)  # -inf if a task stays uncovered
    return totals.max(axis=1) - base


def mtgnet_search(
    trainer: GroupTrainer,
    n_trainings: int,
    *,
    predictor=None,
    budget: int,
    refit_every: int = 5,
    store: GainStore | str | os.PathLike = "gains.sqlite",
    seeds: Iterable[int] = (0,),
    executor: Executor | None = None,
    objective: str = "loss",
    candidates=None,
    checkpoints: Iterable[int] | None = None,
    random_state: int | None = 0,
    task_names: Sequence[str] | None = None,
    skip_failed: bool = False,
) -> SearchResult:
    """MTG-Net's active sampling loop (Song et al. 2022) as a training-selection strategy.

    Start from the STL models and the all-task group. Until the budget of
    trainings is spent: fit the gain predictor on the measured groups, take
    the current best grouping (the exact best selection of at most
    ``budget`` measured groups and STL models), and train the unmeasured
    group whose *predicted* improvement of that grouping is largest, the
    group replacing one of the grouping's groups or joining it while there
    is room (:func:`swap_improvements`). When no group is predicted to
    improve it, the unmeasured group of largest predicted total value is
    trained instead. Returns the best measured grouping.

    The predictor needs two measured multi-task groups: until then (after
    the all-task group) the next group is drawn at random (the draw of
    :func:`~lightning_etap.search.random_search`).

    Args:
        trainer: any :class:`~lightning_etap.groundtruth.GroupTrainer`.
        n_trainings: multi-task trainings to spend (the all-task group included).
        budget: the largest number of groups of the answer (STL models count).
        predictor: an unfitted gain predictor (default
            :class:`~lightning_etap.predictors.MTGNetPredictor` with its defaults).
        refit_every: refit the predictor after this many new trainings (the
            MTG-Net fit is slow; between refits the last fit's predictions
            are used, with every new measurement plugged in).
        store, seeds, executor, objective, candidates, checkpoints,
        random_state, task_names, skip_failed: as for :func:`~lightning_etap.search.random_search`
            (a checkpoint records the best measured grouping so far).

    Returns:
        A :class:`~lightning_etap.search.SearchResult` (``measured`` is always
        True); ``details["predicted_improvement"]``: the predicted improvement
        of each chosen group (NaN for random and fallback choices),
        ``details["fits"]``: number of predictor fits.
    """
    if predictor is None:
        from lightning_etap.predictors import MTGNetPredictor

        predictor = MTGNetPredictor()
    check_predictor(predictor)
    refit_every = check_count(refit_every, "refit_every")
    session = Session("mtgnet_search", trainer, n_trainings=n_trainings, budget=budget, store=store, seeds=seeds,
                      executor=executor, objective=objective, candidates=candidates, task_names=task_names,
                      checkpoints=checkpoints, predictor=predictor, skip_failed=skip_failed)
    order = random_order(session, np.random.default_rng(random_state))
    session.measure([session.full])
    predicted, since_fit, fits, chosen_gain = None, 0, 0, []

    def checkpoint() -> None:
        if session.spent in session.checkpoints:
            found = session.incumbent()
            session.record(None if found is None else found[0])

    checkpoint()
    while session.remaining > 0 and session.unmeasured.any():
        open_ = session.unmeasured
        if session.spent < 2:
            pick, improvement = next(i for i in order if open_[i]), np.nan
        else:
            if predicted is None or since_fit >= refit_every:
                predicted = session.fit(predictor).predict(session.cands)
                since_fit, fits = 0, fits + 1
            values = session.values(predicted)
            found = session.incumbent()
            rows = np.flatnonzero(open_)
            if found is None:
                gains = np.full(len(rows), -np.inf)
            else:
                answer = found[0]
                grouping = np.full((len(answer.groups), session.n), -np.inf)
                for r, g in enumerate(answer.groups):
                    if len(g) == 1:
                        grouping[r, g[0]] = 0.0
                    else:
                        grouping[r] = values[session.code_index(g)]
                gains = swap_improvements(grouping, values[rows], session.budget)
            if np.isfinite(gains).any() and np.nanmax(gains) > 0:
                pick, improvement = int(rows[int(np.argmax(gains))]), float(np.max(gains))
            else:  # nothing predicted to improve the grouping: the group of largest predicted value
                totals = np.where(session.cands[rows], values[rows], 0.0).sum(axis=1)
                pick, improvement = int(rows[int(np.argmax(totals))]), np.nan
        if not session.measure([pick]):  # failed and left out (skip_failed): choose again
            continue
        since_fit += 1
        chosen_gain.append(improvement)
        checkpoint()
    found = session.incumbent()
    return session.result(None if found is None else found[0],
                          {"predicted_improvement": np.asarray(chosen_gain, dtype=float), "fits": fits})
