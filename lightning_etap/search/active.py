"""Active ETAP: train the groups whose measurement is expected to improve the selection most."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from sklearn.base import clone

from lightning_etap.groundtruth.base import GroupTrainer
from lightning_etap.groundtruth.executors import Executor
from lightning_etap.groundtruth.store import GainStore
from lightning_etap.predictors.bayes import PRIOR_GRID

from ._common import SearchResult, Session, check_count, check_predictor, fit_quietly, random_order
from .mtgnet_loop import swap_improvements

__all__ = ["ANSWERS", "INITIAL_DESIGNS", "SEARCH_PRIOR_GRID", "active_etap_search", "bootstrap_template",
           "has_posterior"]

#: How :func:`active_etap_search` chooses its first groups after the all-task
#: group: ``"affinity"`` (the group of largest mean group affinity first, then
#: random ones) or ``"random"`` (the draw of :func:`~lightning_etap.search.random_search`).
INITIAL_DESIGNS: tuple[str, ...] = ("affinity", "random")

#: What :func:`active_etap_search` returns: ``"measured"`` (the best grouping of
#: measured groups) or ``"predicted"`` (the exact selection over every candidate
#: with the predictions of the full fit for the unmeasured groups).
ANSWERS: tuple[str, ...] = ("measured", "predicted")


def has_posterior(predictor) -> bool:
    """Whether ``predictor`` can draw from a posterior of its predictions (a ``sample`` method).

    :class:`~lightning_etap.predictors.BayesianETAPPredictor` can; for any
    other predictor :func:`active_etap_search` stands a bootstrap ensemble in
    for the posterior.
    """
    return callable(getattr(predictor, "sample", None))


def bootstrap_template(fitted, predictor):
    """The estimator the bootstrap members are fitted with.

    For an :class:`~lightning_etap.predictors.ETAPPredictor` whose stage 1 is
    a spline, a clone whose grids hold only the hyper-parameters the full
    fit chose by cross-validation (spline degree, knots, ridge alpha, and the
    median of the per-task residual alphas): cross-validating on a bootstrap
    sample would be slow and would be fooled by the repeated groups. Any
    other predictor is used as it is.
    """
    from lightning_etap.predictors import ETAPPredictor

    if not isinstance(fitted, ETAPPredictor) or getattr(fitted, "stage1_kind_", None) != "bspline":
        return predictor
    params = {"degrees": (fitted.degree_,), "knots_range": (fitted.n_knots_,), "alpha_grid": (fitted.alpha_,),
              "cv": 2, "residual_cv": 2}  # one candidate each: the folds only have to exist
    alphas = getattr(fitted, "residual_alphas_", None)
    if alphas is not None and np.isfinite(alphas).any():
        params["residual_alpha_grid"] = (float(np.median(alphas[np.isfinite(alphas)])),)
    return clone(predictor).set_params(**params)


def active_etap_search(
    trainer: GroupTrainer,
    n_trainings: int,
    *,
    predictor,
    budget: int,
    n_initial: int | None = None,
    initial: str = "affinity",
    ensemble: int | None = None,
    batch_size: int | Callable[[int], int] = 1,
    answer: str = "measured",
    store: GainStore | str | os.PathLike = "gains.sqlite",
    seeds: Iterable[int] = (0,),
    executor: Executor | None = None,
    objective: str = "loss",
    candidates=None,
    checkpoints: Iterable[int] | None = None,
    random_state: int | None = 0,
    task_names: Sequence[str] | None = None,
    progress: bool = False,
    singleton_gain: float = 0.0,
    skip_failed: bool = False,
) -> SearchResult:
    """Active ETAP: train the groups of largest expected improvement of the selection.

    1. Train the all-task group, then, up to ``n_initial`` groups (by
       default 1 with a posterior, so none, and 3 without), the group of
       largest mean group affinity ``z[G -> t]`` (with ``initial="affinity"``
       and a predictor holding an ``affinity`` matrix, as both ETAP
       predictors do) and random groups (the draw of
       :func:`~lightning_etap.search.random_search`).
    2. Fit ``predictor`` on the measured groups and draw ``ensemble``
       possible values of every unmeasured group:
       * a predictor with a posterior (:func:`has_posterior`, e.g.
         :class:`~lightning_etap.predictors.BayesianETAPPredictor`, the
         recommended one): the model is fitted to the selection values
         (with ``objective="loss"`` each member's STL loss minus its loss,
         the objective's own units, so that a task weighs in the fit as it
         weighs in the objective), with :data:`SEARCH_PRIOR_GRID` unless
         the predictor sets ``prior_grid``; joint draws from its posterior
         of the mean values (noise left out: the improvement is judged as
         the model would predict it once the group is measured; adding the
         fitted noise to the draws changed nothing measurable on the
         benchmark tables);
       * any other predictor: ``ensemble`` bootstrap copies, each fitted on a
         resample (with replacement) of the measured groups other than the
         all-task group, which every copy keeps (:func:`bootstrap_template`:
         the copies reuse the full fit's cross-validated hyper-parameters).
    3. The incumbent is the exact best selection of at most ``budget``
       measured groups and STL models. For every unmeasured candidate ``g``
       and every draw ``k``, ``I_k(g)`` is the improvement of the
       incumbent's objective if ``g`` had the values of draw ``k`` and
       joined the incumbent, replacing one of its groups or added while
       there is room (:func:`~lightning_etap.search.swap_improvements`).
    4. Train the ``batch_size`` groups of largest expected improvement
       ``EI(g) = mean_k max(0, I_k(g))``. When no draw expects any
       improvement, train the unmeasured group whose predicted total value
       the draws disagree on most (largest standard deviation).
    5. Repeat from 2 until ``n_trainings`` groups are measured.

    Why this rule. What the user pays for is the grouping, not the
    predictions, and what the search can promise is a grouping whose
    groups are measured. Measuring ``g`` improves that grouping by
    ``max(0, I(g))`` with the true values of ``g`` (when ``g`` enters by one
    replacement), so ``EI`` is the expected improvement of the objective
    per training, the rule of Bayesian optimisation. Unlike the point
    prediction MTG-Net's loop ranks by (:func:`~lightning_etap.search.mtgnet_search`),
    the expectation also rewards groups that are uncertain rather than
    predicted best, which is where the winner's curse of selecting over
    many noisy predictions hides; groups no draw expects to pay are never
    trained. The improvement is counted on the measured incumbent, not on
    a selection of predicted groups, because a selection of several
    unmeasured groups pays off only once all of them are trained.

    Why the posterior. With a handful of measured groups, a bootstrap of
    the point predictor is a poor stand-in for uncertainty: it resamples
    three to ten groups, and its copies cannot fit more than the full fit
    could. The Bayesian model's posterior is exact for its assumptions,
    shares what one group teaches about a task with every task it holds,
    and is fitted in milliseconds, so the search can start right after the
    all-task group. On the exhaustive Chemical and ETTm1 tables it found
    better groupings with 5 and 10 trainings than the bootstrap of
    :class:`~lightning_etap.predictors.ETAPPredictor`
    (``docs/results/active.md``).

    Why the initial design without a posterior. ETAP's stage 1 is a spline
    of the group affinity, extrapolated as a constant beyond the range of
    the training groups; the all-task group sits near the middle of that
    range and random groups rarely reach its top, where the groups worth
    training are. Until some measured group has a high affinity, every
    high-affinity group is predicted like the best measured one and no
    bootstrap copy can tell them apart; training the group of largest
    affinity first opens that range. (The Bayesian model's spline spans
    every possible group affinity and is held by its prior.)

    Args:
        trainer: any :class:`~lightning_etap.groundtruth.GroupTrainer`.
        predictor: an unfitted gain predictor, normally
            ``BayesianETAPPredictor(affinity_matrix)``, or
            ``ETAPPredictor(affinity_matrix)`` (bootstrap); cloned for every fit.
        n_trainings: multi-task trainings to spend (the initial ones included).
        budget: the largest number of groups of the answer (STL models count).
        n_initial: groups measured before the active choices (the all-task
            group included). Default ``None``: 1 with a posterior, 3
            without; at least 2 without a posterior (the predictor's minimum).
        initial: ``"affinity"`` (default) or ``"random"``, see step 1 and
            :data:`INITIAL_DESIGNS`.
        ensemble: posterior draws or bootstrap copies per step (at least 2).
            Default ``None``: 64 posterior draws, or 8 bootstrap copies.
        batch_size: groups chosen per step (the top ``batch_size`` by
            ``EI``, trained in one call, so a parallel executor trains them
            together); an int, or a function of the trainings spent so far.
        answer: ``"measured"`` (default): return the best grouping of
            measured groups (its loss is known and its models exist);
            ``"predicted"``: the exact selection with the full fit's
            predictions for the unmeasured groups (see :data:`ANSWERS`).
        store, seeds, executor, objective, candidates, checkpoints,
        random_state, task_names, skip_failed: as for :func:`~lightning_etap.search.random_search`
            (a checkpoint ``k`` records the answer from the first ``k``
            trainings; with ``answer="predicted"`` it costs one fit).
            ``random_state`` also seeds the draws (per step, so a resumed
            search repeats the same choices).
        progress: show the trainings of every step (and of the STL models)
            as progress bars on stderr.
        singleton_gain: with ``objective="gain"``, the value of a task on
            its own in a grouping, as in
            :func:`~lightning_etap.selection.select_groups` (0: its own
            baseline; ``-1e8``: the released code's near-ban; ``-inf``:
            forbidden).

    Returns:
        A :class:`~lightning_etap.search.SearchResult`. ``details``:
        ``"expected_improvement"`` (``EI`` of each chosen group, in training
        order after the initial ones; 0 for disagreement choices),
        ``"rule"`` (``"improvement"`` or ``"disagreement"`` per choice),
        ``"uncertainty"`` (``"posterior"`` or ``"bootstrap"``),
        ``"model"`` (the predictor fitted on every measured group; with a
        posterior, on their selection values, see step 2: with
        ``objective="loss"`` its predictions are STL loss minus loss, divide
        them by the STL losses for relative gains).
    """
    check_predictor(predictor)
    posterior = has_posterior(predictor)
    fits_from = 1 if posterior else 2  # measured groups the predictor needs
    if n_initial is None:
        n_initial = 1 if posterior else 3
    n_initial = check_count(n_initial, "n_initial", minimum=fits_from)
    ensemble = check_count((64 if posterior else 8) if ensemble is None else ensemble, "ensemble", minimum=2)
    if callable(batch_size):
        batch = batch_size
    else:
        fixed = check_count(batch_size, "batch_size")

        def batch(spent: int) -> int:
            return fixed

    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
    if initial not in INITIAL_DESIGNS:
        raise ValueError(f"initial must be one of {INITIAL_DESIGNS}, got {initial!r}")
    session = Session("active_etap_search", trainer, n_trainings=n_trainings, budget=budget, store=store,
                      seeds=seeds, executor=executor, objective=objective, candidates=candidates,
                      task_names=task_names, checkpoints=checkpoints, predictor=predictor, progress=progress,
                      singleton_gain=singleton_gain, skip_failed=skip_failed)
    order = random_order(session, np.random.default_rng(random_state))
    first = [session.full]
    affinity = getattr(predictor, "affinity", None)
    if initial == "affinity" and affinity is not None and n_initial >= 2:
        first.append(_top_affinity_group(session, affinity))
    first += [i for i in order if i not in first][: n_initial - len(first)]
    session.measure_first(first + [i for i in order if i not in first], min(len(first), session.n_trainings))
    seed = 0 if random_state is None else int(random_state)
    improvements: list[float] = []
    rules: list[str] = []

    # with a posterior: the model of the selection values themselves (the objective's units, so that a task's
    # weight in the fit is its weight in the objective), with the search's wider prior grid unless one is set
    estimator = _posterior_estimator(predictor) if posterior else predictor

    def fit(upto: int | None = None):
        return session.fit(estimator, upto=upto, values=posterior)

    def predicted_gains(model) -> np.ndarray:
        out = model.predict(session.cands)
        return out / session.stl if posterior and session.objective == "loss" else out

    def answer_after(k: int):
        if answer == "predicted" and k >= fits_from:
            model = fit(upto=k)
            return session.predicted_answer(predicted_gains(model), upto=k)
        found = session.incumbent(upto=k)
        return None if found is None else found[0]

    model = None
    while session.spent >= fits_from:
        model = fit()
        if session.remaining <= 0 or not session.unmeasured.any():
            break
        size = check_count(batch(session.spent), "batch_size")
        picks, expected, rule = _choose(session, model, predictor, ensemble, size, seed, posterior)
        done = session.measure(picks)  # the picks beyond the trainings left are dropped (and failed ones)
        chosen = dict(zip(picks, expected))
        improvements.extend(chosen[i] for i in done)
        rules.extend([rule] * len(done))
    for k in session.checkpoints:
        if k < session.spent:
            session.record(answer_after(k), n_trainings=k)
    if answer == "predicted" and model is not None:
        final = session.predicted_answer(predicted_gains(model))
    else:
        found = session.incumbent()
        final = None if found is None else found[0]
    if session.spent in session.checkpoints:
        session.record(final)
    details = {"expected_improvement": np.asarray(improvements, dtype=float), "rule": rules,
               "uncertainty": "posterior" if posterior else "bootstrap", "model": model}
    return session.result(final, details)


#: The prior grid of a posterior predictor inside :func:`active_etap_search` (when the predictor sets none):
#: :data:`~lightning_etap.predictors.bayes.PRIOR_GRID` with one larger candidate for the shared and the pairwise
#: membership effects, which fits of selection values on the ETTm1 table reached the top of.
SEARCH_PRIOR_GRID: dict[str, tuple[float, ...]] = {
    **PRIOR_GRID,
    "shared": (*PRIOR_GRID["shared"], 3.0),
    "pairwise": (*PRIOR_GRID["pairwise"], 1.0),
}


def _posterior_estimator(predictor):
    """``predictor`` with :data:`SEARCH_PRIOR_GRID` when it has a ``prior_grid`` left at ``None``."""
    params = predictor.get_params(deep=False)
    if "prior_grid" in params and params["prior_grid"] is None:
        return clone(predictor).set_params(prior_grid=SEARCH_PRIOR_GRID)
    return predictor


def _top_affinity_group(session: Session, affinity) -> int:
    """The candidate (other than the all-task group) of largest mean group affinity (paper eq. 7)."""
    from lightning_etap.predictors import group_affinity

    z = group_affinity(affinity, session.cands)
    mean = np.where(session.cands, z, 0.0).sum(axis=1) / session.cands.sum(axis=1)
    mean[session.full] = -np.inf
    return int(np.argmax(mean))


def _choose(session: Session, model, predictor, ensemble: int, batch_size: int, seed: int, posterior: bool):
    """The next groups: largest expected improvement over the draws, else largest disagreement."""
    rng = np.random.default_rng((seed, session.spent))
    rows = np.flatnonzero(session.unmeasured)
    found = session.incumbent()
    grouping = None
    if found is not None:  # the incumbent's groups are measured: the same values under every draw
        measured = session.values(None)
        grouping = np.full((len(found[0].groups), session.n), -np.inf)
        for r, g in enumerate(found[0].groups):
            if len(g) == 1:
                grouping[r, g[0]] = session.singleton_gain
            else:
                grouping[r] = measured[session.code_index(g)]
    expected = np.zeros(len(rows))
    totals = []
    for values in _draws(session, model, predictor, ensemble, rows, rng, posterior):
        totals.append(np.where(session.cands[rows], values, 0.0).sum(axis=1))
        if grouping is not None:
            expected += np.maximum(swap_improvements(grouping, values, session.budget), 0.0) / ensemble
    tol = 1e-9 * max(1.0, float(np.abs(session.stl).sum()))
    best = np.argsort(-expected, kind="stable")
    picks = [int(rows[i]) for i in best[:batch_size] if expected[i] > tol]
    if picks:
        return picks, [float(expected[i]) for i in best[: len(picks)]], "improvement"
    spread = np.std(np.stack(totals), axis=0)
    best = np.argsort(-spread, kind="stable")[:batch_size]
    return [int(rows[i]) for i in best], [0.0] * len(best), "disagreement"


def _draws(session: Session, model, predictor, ensemble: int, rows: np.ndarray, rng, posterior: bool):
    """``ensemble`` possible selection values ``(len(rows), n)`` of the unmeasured candidates ``rows``."""
    if posterior:  # the model is fitted on the selection values (Session.fit(values=True)): draws are values
        draws = model.iter_samples(session.cands[rows], ensemble, rng) if hasattr(model, "iter_samples") else \
            model.sample(session.cands[rows], ensemble, rng)
        for draw in draws:  # one (rows, n) draw at a time: the draws of 2^16 groups would not fit at once
            yield np.where(session.cands[rows], draw, np.nan)
        return
    template = bootstrap_template(model, predictor)
    order = np.array(session.order)
    positions = np.arange(session.spent)
    keep, rest = positions[order == session.full], positions[order != session.full]
    _, masks, gains = session.known_arrays()
    for _ in range(ensemble):
        sample = np.concatenate([keep, rng.choice(rest, size=len(rest), replace=True)]) if len(rest) else keep
        member = fit_quietly(template, masks[sample], gains[sample])
        yield session.values(member.predict(session.cands))[rows]
