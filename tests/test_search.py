"""Search strategies (lightning_etap.search): planted optimum, quick-reject schedule, resume after a crash."""

from __future__ import annotations

import doctest
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, RegressorMixin

from lightning_etap.groundtruth import CollectionError, FingerprintMismatchError, GainStore, GroupGains
from lightning_etap.groups import all_groups
from lightning_etap.predictors import BayesianETAPPredictor, ETAPPredictor
from lightning_etap.search import (
    QUICK_REJECT_SCHEDULE,
    OracleTrainer,
    active_etap_search,
    mtgnet_search,
    quick_reject_probability,
    quick_reject_search,
    random_search,
    random_selection,
    swap_improvements,
    total_test_loss,
)

TASKS = ("a", "b", "c", "d", "e", "f")
CLUSTER = np.array([0, 0, 0, 1, 1, 1])
STL = np.array([1.0, 0.8, 1.2, 0.9, 1.1, 1.0])


def planted_table(seeds=(0,), jitter: float = 0.0) -> GroupGains:
    """Two planted clusters {a, b, c} and {d, e, f}.

    A member's gain is 0.1 * (same-cluster minus other-cluster share of the
    other members) + 0.01 per member beyond two, so every task gains most
    (0.11) in its own cluster's triple: the optimum for any budget >= 2 is
    the two triples. ``jitter`` adds seed-dependent noise (for the two-seed table).
    """
    masks = all_groups(len(TASKS), min_size=2)
    rows, losses, gains, seed_col = [], [], [], []
    stl = {}
    for s in seeds:
        rng = np.random.default_rng(100 + s)
        stl[s] = STL * (1 + jitter * rng.normal(size=len(TASKS)))
        for row in masks:
            members = np.flatnonzero(row)
            g = np.full(len(TASKS), np.nan)
            for t in members:
                others = members[members != t]
                same = int((CLUSTER[others] == CLUSTER[t]).sum())
                g[t] = 0.1 * (2 * same - len(others)) / len(others) + 0.01 * (len(members) - 2)
            g[members] += jitter * rng.normal(size=len(members))
            rows.append(row)
            gains.append(g)
            losses.append(stl[s] * (1 - g))
            seed_col.append(s)
    return GroupGains(TASKS, np.array(rows), np.array(losses), np.array(gains), np.array(seed_col), stl)


AFFINITY = np.where(CLUSTER[:, None] == CLUSTER[None, :], 1.0, -1.0)
OPTIMUM = (("a", "b", "c"), ("d", "e", "f"))


def brute_force_best(table: GroupGains, budget: int, groups=None) -> tuple[float, set]:
    """The lowest total test loss over every choice of at most ``budget`` groups (STL models included)."""
    options = [tuple(g) for g in (groups if groups is not None else table.groups)] + [(t,) for t in TASKS]
    best, arg = np.inf, None
    for k in range(1, budget + 1):
        for choice in itertools.combinations(options, k):
            if set().union(*map(set, choice)) != set(TASKS):
                continue
            loss = total_test_loss(choice, table)
            if loss < best - 1e-12:
                best, arg = loss, set(choice)
    return best, arg


@pytest.fixture(scope="module")
def table() -> GroupGains:
    return planted_table()


@pytest.fixture
def store(tmp_path):
    return tmp_path / "search.sqlite"


def etap() -> ETAPPredictor:
    return ETAPPredictor(AFFINITY, task_names=list(TASKS))


def test_planted_optimum_is_the_two_clusters(table):
    loss, groups = brute_force_best(table, 2)
    assert groups == set(OPTIMUM)
    assert loss == pytest.approx(float((STL * 0.89).sum()))
    assert brute_force_best(table, 3)[0] == pytest.approx(loss)  # a third group cannot help


# --------------------------------------------------------------------------- the oracle


def test_oracle_answers_from_the_table_and_counts_trainings(table):
    oracle = OracleTrainer(table)
    out = oracle.train([(("a", "b", "c"), 0), (("d",), 5)])
    assert out[0].test_losses == pytest.approx({t: STL[i] * 0.89 for i, t in enumerate("abc")})
    assert out[1].test_losses == {"d": pytest.approx(0.9)}
    assert (oracle.n_calls, oracle.n_jobs, oracle.n_trained) == (1, 2, 1)
    with pytest.raises(KeyError, match="no measurement"):
        OracleTrainer(GroupGains(TASKS, table.masks[:1], table.test_losses[:1], table.gains[:1],
                                 table.seeds[:1], table.stl_losses)).train([(("a", "c"), 0)])


def test_oracle_reduces_seeds_by_mean_or_by_seed():
    two = planted_table(seeds=(0, 1), jitter=0.05)
    mean, per_seed = OracleTrainer(two), OracleTrainer(two, reduce="seed")
    group = ("a", "d", "e")
    row = [r for r, g in enumerate(two.groups) if g == group]
    expected = two.test_losses[row].mean(axis=0)
    assert mean.train([(group, 7)])[0].test_losses["d"] == pytest.approx(expected[3])
    assert per_seed.train([(group, 1)])[0].test_losses["d"] == pytest.approx(two.test_losses[row[1], 3])
    with pytest.raises(KeyError):
        per_seed.train([(group, 7)])
    assert mean.fingerprint() != per_seed.fingerprint() != OracleTrainer(planted_table()).fingerprint()
    assert mean.fingerprint() == OracleTrainer(two).fingerprint()
    with pytest.raises(ValueError, match="reduce"):
        OracleTrainer(two, reduce="median")


def test_total_test_loss_takes_each_tasks_best_group(table):
    # a, b, c from {a,b,c}; d from STL; e, f from {d, e, f} would be better, but only {a,b,c,e,f} is given
    groups = [("a", "b", "c"), ("d",), ("a", "b", "c", "e", "f")]
    losses = {g: table.test_losses[table.groups.index(g)] for g in (("a", "b", "c"), ("a", "b", "c", "e", "f"))}
    expected = (losses[("a", "b", "c")][:3].sum() + STL[3]
                + losses[("a", "b", "c", "e", "f")][4:].sum())
    assert total_test_loss(groups, table) == pytest.approx(expected)
    with pytest.raises(ValueError, match="in no group"):
        total_test_loss([("a", "b")], table)


# --------------------------------------------------------------------------- each strategy finds the optimum


def test_random_search_returns_the_best_measured_grouping(table, store):
    result = random_search(OracleTrainer(table), 12, budget=2, store=store, random_state=3, checkpoints=[4, 12])
    assert result.trained[0] == TASKS and len(set(result.trained)) == 12 and result.measured
    best, _ = brute_force_best(table, 2, result.trained)
    assert total_test_loss(result.groups, table) == pytest.approx(best)
    assert result.estimated_loss == pytest.approx(best)
    # the answer after 4 trainings is that of a search with n_trainings=4
    short = random_search(OracleTrainer(table), 4, budget=2, store=store.with_name("short.sqlite"), random_state=3)
    assert result.history[0].n_trainings == 4 and result.history[0].groups == short.groups
    everything = random_search(OracleTrainer(table), 57, budget=2, store=store.with_name("all.sqlite"))
    assert set(everything.groups) == set(OPTIMUM)


def test_a_search_closes_the_store_it_opened(table, store):
    # after it returns, the store's one file holds every row (the write-ahead log is folded in)
    import shutil

    result = random_search(OracleTrainer(table), 5, budget=2, store=store, random_state=1)
    wal = store.with_name(store.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    copy = store.with_name("copy.sqlite")
    shutil.copy(store, copy)  # the file alone, as a user would copy it
    with GainStore(copy) as again:
        assert again.done_among([(g, 0) for g in result.trained]) == {(g, 0) for g in result.trained}


@pytest.mark.parametrize("name", ["random_selection", "quick_reject_search", "mtgnet_search", "active_etap_search"])
def test_a_predictor_for_other_tasks_is_refused_before_any_training(name, table, store):
    """A wrong task order or size, a NaN in the affinity, or a class instead of an instance: refused before the
    first training."""
    pd = pytest.importorskip("pandas")
    from lightning_etap.search import STRATEGIES as registry

    search = registry[name]
    kwargs = {"budget": 2, "store": store}
    reordered = ETAPPredictor(AFFINITY[::-1, ::-1], task_names=list(TASKS[::-1]))
    labelled = ETAPPredictor(pd.DataFrame(AFFINITY, index=list(TASKS[::-1]), columns=list(TASKS[::-1])))
    oracle = OracleTrainer(table)
    for predictor in (reordered, labelled):
        with pytest.raises(ValueError, match=r"predictor's tasks \['f', 'e'.*not the trainer's \['a', 'b'"):
            search(oracle, 6, predictor=predictor, **kwargs)
    with pytest.raises(ValueError, match=r"affinity covers 5 tasks, the trainer 6"):
        search(oracle, 6, predictor=ETAPPredictor(AFFINITY[:5, :5]), **kwargs)
    holed = AFFINITY.copy()
    holed[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"predictor's affinity has 1 non-finite off-diagonal entries \(first at \[1, 3\]\)"):
        search(oracle, 6, predictor=ETAPPredictor(holed), **kwargs)
    with pytest.raises(TypeError, match=r"not the class ETAPPredictor: pass e.g. ETAPPredictor\(affinity\)"):
        search(oracle, 6, predictor=ETAPPredictor, **kwargs)
    assert oracle.n_trained == 0  # not even the STL models


def test_a_store_of_another_experiment_is_refused_with_advice_that_works(table, store):
    random_search(OracleTrainer(table), 3, budget=2, store=store)
    other = OracleTrainer(table, reduce="seed")
    with pytest.raises(FingerprintMismatchError, match=r"(?s)new store path for this search.*overwrite=True\)") as err:
        random_search(other, 3, budget=2, store=store)
    assert "pass overwrite=True" not in str(err.value)
    GainStore(store, other.fingerprint(), overwrite=True).close()  # the advice, followed
    assert random_search(other, 3, budget=2, store=store).n_trainings == 3


def test_a_quick_reject_walk_that_cannot_move_says_so(store):
    """Every neighbour of a partition measured and none better: the walk stops with trainings left, and warns."""
    table = _random_table(5, seed=1)
    with pytest.warns(UserWarning, match=r"stopped after 2600 proposals with \d+ of 26 trainings left"):
        result = quick_reject_search(OracleTrainer(table), 26, predictor=ConstantGain(), store=store,
                                     random_state=1, max_proposals=2600)
    assert result.details["stalled"] and result.n_trainings < 26
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        done = quick_reject_search(OracleTrainer(table), 3, predictor=ConstantGain(), store=store, random_state=1)
    assert not done.details["stalled"]
    # opt-in random restarts spend every training, never one twice, and return the best measured partition
    oracle = OracleTrainer(table)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again = quick_reject_search(oracle, 26, predictor=ConstantGain(), store=store.with_name("restart.sqlite"),
                                    random_state=1, restart_after=50, max_proposals=20000)
    assert again.n_trainings == 26 and again.details["restarts"] > 0 and not again.details["stalled"]
    assert len(set(again.trained)) == 26 and oracle.n_trained == 26  # every group once
    assert again.estimated_loss <= result.estimated_loss + 1e-12
    assert again.estimated_loss == pytest.approx(total_test_loss(again.groups, table))


def test_more_trainings_than_candidates_warns(table, store):
    with pytest.warns(UserWarning, match="n_trainings=80 is more than the 57 candidate groups"):
        result = random_search(OracleTrainer(table), 80, budget=2, store=store)
    assert result.n_trainings == 57


def test_random_selection_finds_the_optimum_with_etap(table, store):
    result = random_selection(OracleTrainer(table), 10, predictor=etap(), budget=2, store=store)
    assert set(result.groups) == set(OPTIMUM)
    assert total_test_loss(result.groups, table) == pytest.approx(brute_force_best(table, 2)[0])
    assert result.details["model"].n_train_groups_ == 10


def test_active_etap_measures_the_optimum_within_ten_trainings(table, store):
    result = active_etap_search(OracleTrainer(table), 10, predictor=etap(), budget=2, store=store, ensemble=4,
                                checkpoints=[3, 10])
    assert set(result.groups) == set(OPTIMUM) and result.measured
    assert result.estimated_loss == pytest.approx(brute_force_best(table, 2)[0])
    assert set(OPTIMUM) <= set(result.trained)
    assert [s.n_trainings for s in result.history] == [3, 10]
    assert len(result.details["rule"]) == 7 and len(result.details["expected_improvement"]) == 7


def test_active_etap_with_a_posterior_measures_the_optimum(table, store):
    oracle = OracleTrainer(table)
    result = active_etap_search(oracle, 10, predictor=BayesianETAPPredictor(AFFINITY, task_names=TASKS), budget=2,
                                store=store, checkpoints=[1, 10], random_state=3)
    assert set(result.groups) == set(OPTIMUM) and result.measured
    assert result.estimated_loss == pytest.approx(brute_force_best(table, 2)[0])
    assert result.trained[0] == TASKS  # the all-task group, then only active choices
    assert len(result.details["rule"]) == 9 and result.details["uncertainty"] == "posterior"
    assert result.details["expected_improvement"][0] > 0 and isinstance(result.details["model"], BayesianETAPPredictor)
    assert [s.n_trainings for s in result.history] == [1, 10]
    assert oracle.n_trained == 10


def test_active_etap_with_a_posterior_models_the_selection_values_with_the_search_grid(table, tmp_path):
    """The posterior model is fitted on each member's STL loss minus its loss (the objective's units), with
    SEARCH_PRIOR_GRID unless the predictor sets a grid; with objective="gain" on the gains themselves."""
    from lightning_etap.search.active import SEARCH_PRIOR_GRID

    fitted = []

    class Recording(BayesianETAPPredictor):
        def fit(self, masks, gains):
            fitted.append((np.asarray(masks).copy(), np.asarray(gains).copy(), self.prior_grid))
            return super().fit(masks, gains)

    result = active_etap_search(OracleTrainer(table), 5, predictor=Recording(AFFINITY, task_names=TASKS), budget=2,
                                store=tmp_path / "a.sqlite", random_state=3)
    masks, values, grid = fitted[-1]
    truth = table.mean_over_seeds()
    for m, v in zip(masks, values, strict=True):
        row = int(np.flatnonzero((truth.masks == m).all(axis=1))[0])
        np.testing.assert_allclose(v[m], (STL - truth.test_losses[row])[m], rtol=1e-12)  # values, not gains
    assert grid == SEARCH_PRIOR_GRID
    assert result.details["model"].get_params()["prior_grid"] == SEARCH_PRIOR_GRID
    fitted.clear()
    mine = {"shared": (0.3,)}
    active_etap_search(OracleTrainer(table), 4, predictor=Recording(AFFINITY, task_names=TASKS, prior_grid=mine),
                       budget=2, store=tmp_path / "b.sqlite", random_state=3, objective="gain")
    masks, gains, grid = fitted[-1]
    assert grid == mine  # a grid the user set is kept
    for m, g in zip(masks, gains, strict=True):
        row = int(np.flatnonzero((truth.masks == m).all(axis=1))[0])
        np.testing.assert_allclose(g[m], truth.gains[row][m], rtol=1e-12)  # gains under objective="gain"


def test_active_etap_posterior_draws_and_batches(table, tmp_path):
    def run(path, **kw):
        return active_etap_search(OracleTrainer(table), 7, predictor=BayesianETAPPredictor(AFFINITY), budget=3,
                                  store=path, random_state=1, **kw)

    batched = run(tmp_path / "b.sqlite", batch_size=3, ensemble=16)
    assert batched.n_trainings == 7 and len(set(batched.trained)) == 7
    same = run(tmp_path / "c.sqlite", batch_size=3, ensemble=16)
    assert same.trained == batched.trained  # the draws are seeded per step
    with pytest.raises(ValueError, match="ensemble"):
        run(tmp_path / "d.sqlite", ensemble=1)
    crowded = run(tmp_path / "e.sqlite", batch_size=100)  # more picks than trainings left: only 6 trained
    assert crowded.n_trainings == 7 and len(crowded.details["rule"]) == 6
    assert len(crowded.details["expected_improvement"]) == 6


def test_active_etap_singleton_gain_is_the_selection_s(table, tmp_path):
    """singleton_gain: the search's groupings value a task alone as select_groups does (forbidden with -inf: no
    answer holds a single-task model); it is a relative gain, so objective='loss' refuses it."""
    def run(path, **kw):
        return active_etap_search(OracleTrainer(table), 6, predictor=BayesianETAPPredictor(AFFINITY, task_names=TASKS),
                                  budget=4, store=path, random_state=4, objective="gain", **kw)

    free = run(tmp_path / "a.sqlite")
    banned = run(tmp_path / "b.sqlite", singleton_gain=-np.inf, checkpoints=[2, 4, 6])
    assert all(len(g) >= 2 for g in banned.groups)
    assert all(len(g) >= 2 for step in banned.history for g in step.groups)
    # the answer is the best grouping of the trained groups without singletons (brute force)
    truth = table.mean_over_seeds()
    rows = [r for r, g in enumerate(truth.groups) if tuple(g) in set(banned.trained)]
    def objective(chosen):
        return np.max([np.where(truth.masks[r], truth.gains[r], -np.inf) for r in chosen], axis=0).sum()

    best = max(objective(combo) for k in range(1, 5) for combo in itertools.combinations(rows, k)
               if truth.masks[list(combo)].any(axis=0).all())
    answer = [r for r, g in enumerate(truth.groups) if tuple(g) in set(banned.groups)]
    assert len(answer) == len(banned.groups) and objective(answer) == pytest.approx(best, abs=1e-12)
    assert free.n_trainings == banned.n_trainings == 6
    with pytest.raises(ValueError, match="needs objective='gain'"):
        active_etap_search(OracleTrainer(table), 3, predictor=BayesianETAPPredictor(AFFINITY, task_names=TASKS),
                           budget=2, store=tmp_path / "c.sqlite", singleton_gain=-1e8)


def test_active_etap_with_a_posterior_on_the_gain_objective(table, store):
    result = active_etap_search(OracleTrainer(table), 8, predictor=BayesianETAPPredictor(AFFINITY), budget=2,
                                objective="gain", store=store, answer="predicted", checkpoints=[1, 8])
    assert result.n_trainings == 8 and [s.n_trainings for s in result.history] == [1, 8]
    assert set(result.groups) == set(OPTIMUM)  # the triples are also the groups of largest total gain


def test_mtgnet_loop_finds_the_optimum(table, store):
    result = mtgnet_search(OracleTrainer(table), 15, predictor=etap(), budget=2, store=store, refit_every=2)
    assert set(result.groups) == set(OPTIMUM) and result.measured
    assert result.details["fits"] >= 6


def test_mtgnet_loop_runs_with_its_own_predictor(table, store):
    from lightning_etap.predictors import MTGNetPredictor

    result = mtgnet_search(OracleTrainer(table), 6, predictor=MTGNetPredictor(hidden_dim=8, max_epochs=20),
                           budget=2, store=store, refit_every=3)
    assert result.n_trainings == 6 and result.measured and result.details["fits"] == 2
    assert np.isnan(result.details["predicted_improvement"][0])  # the second group is drawn at random
    best, _ = brute_force_best(table, 2, result.trained)
    assert result.estimated_loss == pytest.approx(best)


def test_quick_reject_search_finds_the_optimal_partition(table, store):
    result = quick_reject_search(OracleTrainer(table), 20, predictor=etap(), budget=2, store=store)
    assert set(result.groups) == set(OPTIMUM)
    groups = [set(g) for g in result.groups]
    assert sum(map(len, groups)) == len(TASKS) and set().union(*groups) == set(TASKS)  # a partition
    assert result.estimated_loss == pytest.approx(total_test_loss(result.groups, table))


# --------------------------------------------------------------------------- quick-reject probabilities


def test_quick_reject_probability_follows_the_schedule():
    assert QUICK_REJECT_SCHEDULE == ((0.0, 0.1), (1 / 3, 0.05), (2 / 3, 0.005))
    assert quick_reject_probability(0.0, False) == 0.1
    assert quick_reject_probability(0.33, False) == 0.1
    assert quick_reject_probability(1 / 3, False) == 0.05
    assert quick_reject_probability(0.66, False) == 0.05
    assert quick_reject_probability(2 / 3, False) == 0.005
    assert quick_reject_probability(1.0, False) == 0.005
    assert quick_reject_probability(0.5, True) == 0.99
    with pytest.raises(ValueError):
        quick_reject_probability(0.5, False, worse_schedule=[(0.5, 0.1)])


class ConstantGain(RegressorMixin, BaseEstimator):
    """Predicts the same relative gain for every member of every group."""

    def __init__(self, gain: float = 0.0):
        self.gain = gain

    def fit(self, masks, gains):
        self.n_tasks_ = np.asarray(masks).shape[1]
        return self

    def predict(self, masks):
        masks = np.asarray(masks, dtype=bool)
        return np.where(masks, np.where(masks.sum(axis=1, keepdims=True) > 1, self.gain, 0.0), np.nan)


def _phase_counts(log, n_trainings):
    """(trained, proposed) per third of the training budget."""
    phase = np.searchsorted([1 / 3, 2 / 3], log["spent"] / n_trainings, side="right")
    return phase, [(int(log["trained"][phase == k].sum()), int((phase == k).sum())) for k in range(3)]


def _random_table(n: int = 8, seed: int = 0) -> GroupGains:
    names = tuple(f"t{i}" for i in range(n))
    masks = all_groups(n, min_size=2)
    gains = np.where(masks, np.random.default_rng(seed).uniform(-0.2, 0.2, masks.shape), np.nan)
    stl = np.ones(n)
    return GroupGains(names, masks, stl * (1 - gains), gains, np.zeros(len(masks), int), {0: stl})


def test_quick_reject_search_trains_predicted_worse_proposals_by_the_schedule(store):
    # 10 tasks (1013 groups, so that most proposals need a training); the predictor scores every
    # proposal far worse than anything measured
    n_trainings = 120
    result = quick_reject_search(OracleTrainer(_random_table(10)), n_trainings, predictor=ConstantGain(-10.0),
                                 budget=None, store=store, random_state=1)
    log = result.details["log"]
    assert result.n_trainings == n_trainings and not log["predicted_better"].any()
    phase, counts = _phase_counts(log, n_trainings)
    schedule = np.array([0.1, 0.05, 0.005])
    assert (log["probability"] == schedule[phase]).all()  # the probability each proposal was given
    for k, ((trained, proposed), p) in enumerate(zip(counts, schedule)):
        assert trained >= 25, counts  # about a third of the budget in each phase (a proposal may train two)
        # the rate actually trained: trained ~ Binomial(proposed, p), within 4 standard deviations ...
        rate, sd = trained / proposed, np.sqrt(p * (1 - p) / proposed)
        assert abs(rate - p) <= 4 * sd, (k, trained, proposed, p)
        # ... and closer to its own probability than to either neighbour of the schedule (log scale)
        assert np.argmin(np.abs(np.log(rate) - np.log(schedule))) == k, (k, rate)


def test_quick_reject_search_trains_predicted_better_proposals_with_probability_099(store):
    result = quick_reject_search(OracleTrainer(_random_table()), 120, predictor=ConstantGain(10.0), budget=None,
                                 store=store, random_state=2)
    log = result.details["log"]
    assert log["predicted_better"].all() and (log["probability"] == 0.99).all()
    declined = int((~log["trained"]).sum())
    proposed = len(log["trained"])
    # declined ~ Binomial(proposed, 0.01): at most 4 standard deviations above its mean
    assert declined <= 0.01 * proposed + 4 * np.sqrt(proposed * 0.01 * 0.99) + 1, (declined, proposed)


def test_quick_reject_accept_rules(store):
    # a predictor that calls every proposal better: nearly every proposal is trained, most are worse
    table = _random_table(seed=3)
    kwargs = {"predictor": ConstantGain(10.0), "budget": None, "random_state": 4}
    climb = quick_reject_search(OracleTrainer(table), 40, store=store, accept="better", **kwargs)
    path = climb.details["path"]
    assert (np.diff(path) > 0).all() and climb.details["moves"] == len(path) - 1
    assert climb.details["best_value"] == pytest.approx(path[-1])
    walk = quick_reject_search(OracleTrainer(table), 40, store=store.with_name("walk.sqlite"), **kwargs)
    assert (np.diff(walk.details["path"]) < 0).any()  # the walk also moves to worse partitions
    assert walk.details["best_value"] == pytest.approx(walk.details["path"].max())
    for result in (climb, walk):  # the returned partition is the best one visited, measured
        assert result.measured and sum(map(len, result.groups)) == len(table.task_names)
        stl_total = float(table.stl_losses[0].sum())
        assert total_test_loss(result.groups, table) == pytest.approx(stl_total - result.details["best_value"])


# --------------------------------------------------------------------------- resume after a crash


class CrashingOracle(OracleTrainer):
    """An oracle that fails (or is interrupted) once it has answered ``after`` multi-task jobs."""

    def __init__(self, table, after: int, exc: type[BaseException] = RuntimeError):
        super().__init__(table)
        self.after, self.exc = after, exc

    def train(self, jobs):
        if any(len(g) > 1 for g, _ in jobs) and self.n_trained >= self.after:
            raise self.exc("the machine went down")
        return super().train(jobs)


STRATEGIES = {
    "random_search": lambda oracle, n, store: random_search(oracle, n, budget=2, store=store, random_state=5),
    "random_selection": lambda oracle, n, store: random_selection(oracle, n, predictor=etap(), budget=2,
                                                                  store=store, random_state=5),
    "active_etap_search": lambda oracle, n, store: active_etap_search(
        oracle, n, predictor=etap(), budget=3, ensemble=3, store=store, random_state=5),
    "mtgnet_search": lambda oracle, n, store: mtgnet_search(oracle, n, predictor=etap(), budget=2, store=store,
                                                            random_state=5, refit_every=2),
    "quick_reject_search": lambda oracle, n, store: quick_reject_search(
        oracle, n, predictor=etap(), budget=3, store=store, random_state=5),
}


RESUMABLE = {**STRATEGIES, "active_etap_search_posterior": lambda oracle, n, store: active_etap_search(
    oracle, n, predictor=BayesianETAPPredictor(AFFINITY), budget=3, store=store, random_state=5)}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_after_a_crash_repeats_no_training(name, table, tmp_path):
    run = RESUMABLE[name]
    n, k = 9, 5
    reference = run(OracleTrainer(table), n, tmp_path / "reference.sqlite")
    crashing = CrashingOracle(table, after=k)
    path = tmp_path / "crashed.sqlite"
    with pytest.raises(CollectionError):
        run(crashing, n, path)
    assert crashing.n_trained == k
    with GainStore(path) as opened:
        assert sum(len(g) > 1 for g, _ in opened.done_jobs()) == k  # nothing lost
    fresh = OracleTrainer(table)
    resumed = run(fresh, n, path)
    assert fresh.n_trained == n - k == resumed.trained_now  # nothing trained twice
    assert resumed.trained == reference.trained and resumed.groups == reference.groups
    assert resumed.estimated_loss == pytest.approx(reference.estimated_loss)
    again = OracleTrainer(table)
    assert run(again, n, path).trained_now == 0 and again.n_trained == 0  # a finished search costs nothing


def test_resume_after_an_interrupt(table, tmp_path):
    path = tmp_path / "interrupted.sqlite"
    with pytest.raises(KeyboardInterrupt):
        STRATEGIES["active_etap_search"](CrashingOracle(table, after=4, exc=KeyboardInterrupt), 8, path)
    fresh = OracleTrainer(table)
    resumed = STRATEGIES["active_etap_search"](fresh, 8, path)
    reference = STRATEGIES["active_etap_search"](OracleTrainer(table), 8, tmp_path / "reference.sqlite")
    assert fresh.n_trained == 4 and resumed.trained == reference.trained


def test_groups_in_the_store_are_reused_across_strategies(table, store):
    first = random_search(OracleTrainer(table), 8, budget=2, store=store, random_state=2)
    oracle = OracleTrainer(table)
    second = random_selection(oracle, 10, predictor=etap(), budget=2, store=store, random_state=2)
    assert second.trained[:8] == first.trained  # the same draw
    assert oracle.n_trained == second.trained_now == 2


# --------------------------------------------------------------------------- pieces and checks


def test_swap_improvements_match_brute_force():
    rng = np.random.default_rng(4)
    n, budget = 5, 3
    grouping_masks = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=bool)
    grouping = np.where(grouping_masks, rng.normal(size=(3, n)), -np.inf)
    cands_masks = all_groups(n, min_size=2)
    cands = np.where(cands_masks, rng.normal(size=cands_masks.shape), -np.inf)

    def objective(rows):
        best = np.max(rows, axis=0)
        return best.sum() if np.isfinite(best).all() else -np.inf

    base = objective(grouping)
    got = swap_improvements(grouping, cands, budget)
    for i, row in enumerate(cands):
        options = [objective(np.vstack([np.delete(grouping, j, axis=0), row])) for j in range(3)]
        assert got[i] == pytest.approx(max(options) - base) if np.isfinite(max(options)) else got[i] == -np.inf
    roomy = swap_improvements(grouping, cands, budget=4)  # room for a fourth group: adding is allowed too
    assert (roomy >= got).all() and (roomy >= 0).all()


@pytest.mark.parametrize("call, match", [
    (lambda t, s: random_search(OracleTrainer(t), 0, budget=2, store=s), "n_trainings"),
    (lambda t, s: active_etap_search(OracleTrainer(t), 5, predictor=etap(), budget=None, store=s), "budget"),
    (lambda t, s: active_etap_search(OracleTrainer(t), 5, predictor=etap(), budget=2, n_initial=1, store=s),
     "n_initial"),
    (lambda t, s: active_etap_search(OracleTrainer(t), 5, predictor=etap(), budget=2, answer="x", store=s),
     "answer"),
    (lambda t, s: random_selection(OracleTrainer(t), 5, predictor="etap", budget=2, store=s), "predictor"),
    (lambda t, s: quick_reject_search(OracleTrainer(t), 5, predictor=etap(), worse_schedule=[(0.0, 2.0)],
                                      store=s), "probability"),
    (lambda t, s: random_search(OracleTrainer(t), 5, budget=2, objective="accuracy", store=s), "objective"),
    (lambda t, s: quick_reject_search(OracleTrainer(t), 5, predictor=etap(), accept="always", store=s), "accept"),
])
def test_invalid_arguments_raise(call, match, table, store):
    with pytest.raises(ValueError, match=match):
        call(table, store)


def test_gain_objective_and_restricted_candidates(table, store):
    cands = [("a", "b"), ("a", "b", "c"), ("d", "e", "f"), ("c", "d")]
    result = random_search(OracleTrainer(table), 10, budget=2, store=store, candidates=cands, objective="gain")
    assert set(result.trained) == {*cands, TASKS}  # the all-task group is always a candidate
    assert set(result.groups) == set(OPTIMUM)


def test_registry_and_result_text(table, store):
    from lightning_etap.search import STRATEGIES as registry

    assert sorted(registry) == sorted(STRATEGIES)
    with pytest.raises(KeyError, match=r"no search strategy 'quick_reject'; the strategies are \['active_etap"):
        registry["quick_reject"]  # noqa: B018
    result = random_search(OracleTrainer(table), 3, budget=2, store=store)
    assert str(result).startswith("random_search: ") and "3 trainings" in str(result)
    import json

    for found in (result, active_etap_search(OracleTrainer(table), 4, predictor=etap(), budget=2, store=store,
                                             checkpoints=[2, 4])):
        data = json.loads(json.dumps(found.to_dict()))  # plain JSON, the fitted model left out
        assert data["groups"] == [list(g) for g in found.groups] and data["n_trainings"] == found.n_trainings
        assert [h["n_trainings"] for h in data["history"]] == [h.n_trainings for h in found.history]
        assert "model" not in data["details"]
    assert result.masks.shape == (len(result.groups), len(TASKS))


def test_docstring_examples_run():
    import lightning_etap.search as search
    from lightning_etap.search import _common, mtgnet_loop, oracle, quick_reject

    for module in (search, _common, oracle, mtgnet_loop, quick_reject):
        outcome = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert outcome.failed == 0, module.__name__


def _active_search_script():
    from _benchmarks import load_benchmark

    return load_benchmark("active_search")


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_benchmark_counts_near_optimal_selections_exactly(budget):
    """The benchmark's exact counts of covering / near-optimal selections agree with brute force."""
    script = _active_search_script()
    rng = np.random.default_rng(budget)
    n = 5
    masks = all_groups(n, min_size=2)
    stl = rng.uniform(0.5, 1.0, n)
    losses = np.where(masks, stl * rng.uniform(0.7, 1.2, masks.shape), np.inf)
    rows = np.vstack([losses, np.where(np.eye(n, dtype=bool), stl[None, :], np.inf)])
    totals = []
    for k in range(1, budget + 1):
        for chosen in itertools.combinations(range(len(rows)), k):
            total = rows[list(chosen)].min(axis=0).sum()
            if np.isfinite(total):
                totals.append(total)
    totals = np.array(totals)
    assert script.covering_selections(rows, budget) == len(totals)
    best = totals.min()
    for gap in (0.0, 0.01, 0.05, 0.2):
        counts = script.near_optimal_counts(rows, budget, best * (1 + gap) + 1e-12)
        assert counts["selections"] == int((totals <= best * (1 + gap) + 1e-12).sum())
        assert counts["irredundant"] == sum(counts["core_sizes"]) <= counts["selections"]


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "ettm1_repro").is_dir(),
                    reason="the ETTm1 exhaustive table is not in this checkout")
def test_pipeline_sampling_benchmark_scores_each_choice_against_brute_force():
    """benchmarks/pipeline_sampling.py at a tiny size: active ETAP's choice is the best grouping of the groups it
    trained (brute force over them, scored on the table), and no choice beats the table's optimum."""
    from _benchmarks import load_benchmark

    from lightning_etap.groundtruth import GroupGains

    script = load_benchmark("pipeline_sampling")
    run = script.one_run("ettm1", 0, 4)
    best = script.optimum("ettm1")
    table = GroupGains.from_csv(script.TABLES["ettm1"][0]).mean_over_seeds()
    names = list(table.task_names)
    n = len(names)
    by_group = {tuple(g): table.gains[r] for r, g in enumerate(table.groups) if len(g) >= 2}
    assert len(run["active_groups"]) == 5 and tuple(run["active_groups"][0]) == tuple(names)
    rows = [np.where([t in g for t in names], by_group[tuple(g)], -np.inf) for g in run["active_groups"]]
    rows += [np.where(np.arange(n) == t, 0.0, -np.inf) for t in range(n)]
    for b in (2, 3, 4):
        brute = max(np.max([rows[c] for c in combo], axis=0).sum()
                    for k in range(1, b + 1) for combo in itertools.combinations(range(len(rows)), k)
                    if np.isfinite(np.max([rows[c] for c in combo], axis=0)).all())
        assert run["mean_gain"]["active ETAP"][b] == pytest.approx(brute / n, abs=1e-12)
        for method in script.METHODS:
            assert run["mean_gain"][method][b] <= best[b] + 1e-12


class FailingOracle(OracleTrainer):
    """The oracle, except that training ``bad`` always raises (a group that diverges or runs out of memory)."""

    def __init__(self, table, bad):
        super().__init__(table)
        self.bad = tuple(bad)

    def train(self, jobs):
        if any(tuple(g) == self.bad for g, _ in jobs):
            raise RuntimeError(f"out of memory in {'|'.join(self.bad)}")
        return super().train(jobs)


@pytest.mark.parametrize("name", ["random_search", "random_selection", "quick_reject_search", "mtgnet_search",
                                  "active_etap_search"])
def test_skip_failed_leaves_a_failing_group_out_and_spends_the_trainings_on_others(name, table, tmp_path):
    """A group that fails every time stopped every search, and every rerun, at the same CollectionError. With
    skip_failed=True the search leaves it out (warned, listed in result.failed, not counted), spends its
    trainings on other groups, and a rerun on the same store repeats the same decisions."""
    from lightning_etap.search import STRATEGIES as registry

    search = registry[name]
    kwargs = {"budget": 2, "random_state": 1}
    if name != "random_search":
        kwargs["predictor"] = etap()
    clean = search(OracleTrainer(table), 6, store=tmp_path / "clean.sqlite", **kwargs)
    bad = clean.trained[2]  # a group the search chooses (after the all-task group and one more)
    with pytest.raises(CollectionError, match="out of memory"):
        search(FailingOracle(table, bad), 6, store=tmp_path / "default.sqlite", **kwargs)
    path = tmp_path / "skip.sqlite"
    with pytest.warns(UserWarning, match=rf"1 group\(s\) failed to train and are left out.*{'|'.join(bad)}.*out of memory"):
        result = search(FailingOracle(table, bad), 6, store=path, skip_failed=True, **kwargs)
    assert result.failed == (bad,) and bad not in result.trained and bad not in result.groups
    assert result.n_trainings == 6 and len(set(result.trained)) == 6 and result.trained[0] == TASKS
    assert list(result.trained[:2]) == list(clean.trained[:2])  # the same until the failure
    with pytest.warns(UserWarning, match="left out"):  # the rerun retries it, fails, and decides the same
        again = search(FailingOracle(table, bad), 6, store=path, skip_failed=True, **kwargs)
    assert again.trained == result.trained and again.groups == result.groups and again.trained_now == 0
    with pytest.raises(CollectionError, match="the all-task group.*cannot leave it out"):
        search(FailingOracle(table, TASKS), 6, store=tmp_path / "full.sqlite", skip_failed=True, **kwargs)
    with pytest.raises(TypeError, match="skip_failed must be True or False"):
        search(OracleTrainer(table), 6, store=tmp_path / "x.sqlite", skip_failed="yes", **kwargs)
    data = result.to_dict()
    assert data["failed"] == [list(bad)] and "1 left out (failed)" in str(result)


class KernelGain(ConstantGain):
    """A user's own predictor whose `affinity` hyper-parameter is a kernel name, as in scikit-learn."""

    def __init__(self, gain: float = 0.0, affinity: str = "rbf"):
        super().__init__(gain)
        self.affinity = affinity


def test_an_affinity_parameter_of_a_users_own_predictor_is_not_taken_for_a_matrix(table, store):
    result = random_selection(OracleTrainer(table), 4, predictor=KernelGain(0.05), budget=2, store=store)
    assert result.n_trainings == 4


def test_a_search_over_more_than_63_tasks_keys_its_groups_exactly(tmp_path):
    """Group codes were int64: from 64 tasks on the all-task group's code overflowed (a KeyError traceback from
    `lightning-etap run --dataset school --sampling active`) and other codes could collide."""
    from lightning_etap.search._common import group_codes

    n = 70
    names = tuple(f"t{i:02d}" for i in range(n))
    rng = np.random.default_rng(0)
    masks = rng.random((6, n)) < 0.5
    masks[0] = True
    masks[1] = False
    masks[1, [0, 63, 64, 69]] = True  # bits beyond int64
    assert group_codes(masks) == [sum(1 << int(t) for t in np.flatnonzero(row)) for row in masks]
    assert group_codes(masks[:, :10]) == [sum(1 << int(t) for t in np.flatnonzero(row)) for row in masks[:, :10]]
    stl = rng.uniform(0.5, 1.0, n)
    losses = np.where(masks, stl * rng.uniform(0.8, 1.1, masks.shape), np.nan)
    table = GroupGains(names, masks, losses, np.where(masks, (stl - losses) / stl, np.nan), np.zeros(6, dtype=int),
                       {0: stl})
    result = random_search(OracleTrainer(table), 4, budget=3, candidates=masks, store=tmp_path / "s.sqlite",
                           random_state=0, task_names=list(names))
    assert result.trained[0] == names and result.n_trainings == 4
    assert result.estimated_loss == pytest.approx(total_test_loss(result.groups, table))
