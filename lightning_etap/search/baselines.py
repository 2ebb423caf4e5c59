"""The two non-adaptive references: random groups, with or without a predictor."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from lightning_etap.groundtruth.base import GroupTrainer
from lightning_etap.groundtruth.executors import Executor
from lightning_etap.groundtruth.store import GainStore

from ._common import SearchResult, Session, check_predictor, random_order

__all__ = ["random_search", "random_selection"]


def _random_session(name, trainer, n_trainings, budget, store, seeds, executor, objective, candidates,
                    checkpoints, task_names, random_state, skip_failed, predictor=None):
    session = Session(name, trainer, n_trainings=n_trainings, budget=budget, store=store, seeds=seeds,
                      executor=executor, objective=objective, candidates=candidates, task_names=task_names,
                      checkpoints=checkpoints, predictor=predictor, skip_failed=skip_failed)
    order = random_order(session, np.random.default_rng(random_state))
    session.measure_first(order, session.n_trainings)  # all at once: a parallel executor trains them together
    return session


def random_search(
    trainer: GroupTrainer,
    n_trainings: int,
    *,
    budget: int,
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
    """Pure random search: train random groups, return the best grouping made of them.

    The all-task group first (the paper's released code always trains it),
    then groups drawn uniformly without replacement from the candidates; the
    answer is the exact best selection of at most ``budget`` groups among the
    measured ones and the STL models (:func:`~lightning_etap.selection.select_groups`
    on measured values). No predictor.

    Args:
        trainer: any :class:`~lightning_etap.groundtruth.GroupTrainer` (e.g.
            :class:`~lightning_etap.search.OracleTrainer`).
        n_trainings: multi-task groups to train (the all-task group included;
            the STL models are trained too but not counted). One training is
            one group, trained once per seed in ``seeds``.
        budget: the largest number of groups in the answer (STL models count).
        store: the :class:`~lightning_etap.groundtruth.GainStore` (or its path)
            every result goes to; groups it already holds are not trained again.
        seeds: training seeds of every group (losses are averaged over them).
        executor: where to train (default: in this process).
        objective: ``"loss"`` (summed test loss, default) or ``"gain"`` (summed relative gain).
        candidates: the groups the search may train (default: every group of
            two or more tasks, up to 16 tasks); the all-task group is added.
        checkpoints: training counts at which to record the answer so far in
            ``result.history`` (the groups are drawn in a fixed order, so the
            answer after ``k`` trainings is that of a search with
            ``n_trainings=k``).
        random_state: seed of the draw (an int, so a rerun draws the same groups).
        task_names: the task order (default ``trainer.task_names``).
        skip_failed: a group whose training still fails after the
            collection's retries (it raises, or returns a NaN loss) ends the
            search with :class:`~lightning_etap.groundtruth.CollectionError`
            (default: everything trained is in the store, a rerun retries
            it). With ``True`` the search leaves that group out of its
            candidates with a warning, does not count it as a training, and
            goes on (a rerun retries it and, failing again, leaves it out
            the same way); ``result.failed`` lists such groups. The STL
            models and the all-task group cannot be left out.

    Returns:
        A :class:`~lightning_etap.search.SearchResult` (``measured`` is always True).
    """
    session = _random_session("random_search", trainer, n_trainings, budget, store, seeds, executor, objective,
                              candidates, checkpoints, task_names, random_state, skip_failed)
    for k in session.checkpoints:
        if k <= session.spent:
            found = session.incumbent(upto=k)
            session.record(None if found is None else found[0], n_trainings=k)
    found = session.incumbent()
    return session.result(None if found is None else found[0])


def random_selection(
    trainer: GroupTrainer,
    n_trainings: int,
    *,
    predictor,
    budget: int,
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
    """The ETAP paper's protocol: random training groups, a gain predictor, exact selection.

    The same groups as :func:`random_search` with the same ``random_state``
    (the all-task group, then uniform draws) are trained; ``predictor`` is
    fitted on them, predicts every candidate, and the answer is the exact
    best selection of at most ``budget`` groups over all candidates, with
    the measured values in place of the predictions for the measured groups.
    The answer may contain groups not trained yet (``result.measured`` is
    then False): they are the ones a user trains next.

    Args:
        predictor: an unfitted gain predictor (e.g.
            ``ETAPPredictor(affinity_matrix)``); cloned for every fit. It needs
            at least two measured groups: with fewer the answer is the best
            measured grouping.
        n_trainings, budget, store, seeds, executor, objective, candidates,
        checkpoints, random_state, task_names, skip_failed: as for :func:`random_search`
            (a checkpoint costs one predictor fit).

    Returns:
        A :class:`~lightning_etap.search.SearchResult`; ``details["model"]`` is
        the predictor fitted on all the measured groups.
    """
    check_predictor(predictor)
    session = _random_session("random_selection", trainer, n_trainings, budget, store, seeds, executor,
                              objective, candidates, checkpoints, task_names, random_state, skip_failed, predictor)

    def answer(k: int):
        if k < 2:
            found = session.incumbent(upto=k)
            return (None if found is None else found[0]), None
        model = session.fit(predictor, upto=k)
        return session.predicted_answer(model.predict(session.cands), upto=k), model

    for k in session.checkpoints:
        if k < session.spent:
            session.record(answer(k)[0], n_trainings=k)
    final, model = answer(session.spent)
    if session.spent in session.checkpoints:
        session.record(final)
    return session.result(final, {"model": model})
