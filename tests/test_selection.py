"""Exact group selection: every algorithm against brute force, known answers, errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lightning_etap.selection as sel_mod
from lightning_etap.groups import all_groups, groups_to_masks
from lightning_etap.selection import Selection, select_groups, selection_objective

TOL = 1e-6
SINGLETON_GAINS = (0.0, -1e8, -0.3, -math.inf)


@st.composite
def instances(draw):
    n = draw(st.integers(1, 6))
    m = draw(st.integers(1, 10))
    codes = draw(st.lists(st.integers(1, 2**n - 1), min_size=m, max_size=m))
    masks = ((np.array(codes)[:, None] >> np.arange(n)) & 1).astype(bool)
    vals = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=m * n, max_size=m * n))
    gains = np.where(masks, np.array(vals).reshape(m, n), np.nan)
    singleton_gain = draw(st.sampled_from(SINGLETON_GAINS))
    disjoint = draw(st.booleans())
    if draw(st.booleans()):
        costs = None
        budget = draw(st.integers(1, 4))
    else:
        costs = np.array(draw(st.lists(st.floats(0.3, 2.0), min_size=m, max_size=m)))
        budget = draw(st.floats(0.5, 4.5))
    return {
        "masks": masks,
        "gains": gains,
        "budget": budget,
        "singleton_gain": singleton_gain,
        "disjoint": disjoint,
        "costs": costs,
    }


def _solve(inst, method, **kw):
    """Objective, or "infeasible"; also checks the selection is valid."""
    try:
        sel = select_groups(
            inst["masks"],
            inst["gains"],
            inst["budget"],
            method=method,
            singleton_gain=inst["singleton_gain"],
            disjoint=inst["disjoint"],
            costs=inst["costs"],
            **kw,
        )
    except ValueError as err:
        assert "no feasible selection" in str(err)
        return "infeasible"
    _check_valid(sel, inst)
    return sel.objective


def _check_valid(sel: Selection, inst) -> None:
    n = inst["masks"].shape[1]
    assert sel.optimal
    assert sel.masks.shape == (len(sel.chosen), n)
    assert sel.masks.any(axis=0).all()  # every task covered
    if inst["disjoint"]:
        assert (sel.masks.sum(axis=0) == 1).all()
    if inst["costs"] is None:
        assert len(sel.chosen) <= inst["budget"]
    else:
        assert sel.cost <= inst["budget"] + 1e-9
    obj = selection_objective(inst["masks"], inst["gains"], sel.chosen, singleton_gain=inst["singleton_gain"])
    assert obj == pytest.approx(sel.objective, rel=1e-12, abs=1e-9)
    assert sel.task_gain.sum() == pytest.approx(sel.objective, rel=1e-12, abs=1e-9)
    assert set(sel.served_by.tolist()) <= set(sel.chosen)
    assert sel.gap == 0.0 and sel.bound == sel.objective


def _agree(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(a - b) <= TOL * max(1.0, abs(a))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances())
def test_methods_agree_with_brute_force(inst):
    ref = _solve(inst, "brute")
    event("infeasible" if ref == "infeasible" else "feasible")
    for method in ("bnb", "milp", "auto"):
        got = _solve(inst, method)
        assert _agree(got, ref), (method, got, ref)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(), colgen=st.booleans())
def test_large_instance_path_agrees_with_brute_force(inst, colgen):
    """Column generation / subgradient prices + reduced-cost fixing, forced on small instances."""
    ref = _solve(inst, "brute")
    old = sel_mod._DIRECT_NNZ, sel_mod._COLGEN_MAX_N
    sel_mod._DIRECT_NNZ, sel_mod._COLGEN_MAX_N = 0, (40 if colgen else 0)
    try:
        for method in ("bnb", "milp"):
            got = _solve(inst, method)
            assert _agree(got, ref), (method, colgen, got, ref)
    finally:
        sel_mod._DIRECT_NNZ, sel_mod._COLGEN_MAX_N = old


# --------------------------------------------------------------------------- a known answer

NAMES = ["a", "b", "c", "d"]
HAND_GROUPS = [("a", "b"), ("c", "d"), ("a", "b", "c", "d"), ("b", "c")]
HAND_GAINS = {
    0: {"a": 0.2, "b": 0.1},
    1: {"c": 0.05, "d": 0.3},
    2: {"a": -0.1, "b": -0.1, "c": -0.1, "d": -0.1},
    3: {"b": 0.4, "c": 0.4},
}


def _hand():
    masks = groups_to_masks(HAND_GROUPS, NAMES)
    gains = np.full(masks.shape, np.nan)
    for g, row in HAND_GAINS.items():
        for t, v in row.items():
            gains[g, NAMES.index(t)] = v
    return masks, gains


@pytest.mark.parametrize("method", ["brute", "bnb", "milp", "auto"])
@pytest.mark.parametrize(
    ("budget", "kwargs", "objective", "groups"),
    [
        (1, {}, -0.4, {("a", "b", "c", "d")}),
        (2, {}, 0.65, {("a", "b"), ("c", "d")}),
        (3, {}, 1.3, {("a", "b"), ("c", "d"), ("b", "c")}),
        (3, {"disjoint": True}, 0.8, {("b", "c"), ("a",), ("d",)}),
        (3, {"disjoint": True, "singleton_gain": -math.inf}, 0.65, {("a", "b"), ("c", "d")}),
        (2, {"costs": [1.0, 2.0, 0.5, 2.0]}, 0.1, {("a", "b"), ("a", "b", "c", "d")}),
        (2.5, {"costs": [1.0, 2.0, 0.5, 2.0]}, 0.6, {("a", "b", "c", "d"), ("b", "c")}),
    ],
)
def test_hand_made_instance(method, budget, kwargs, objective, groups):
    masks, gains = _hand()
    sel = select_groups(masks, gains, budget, method=method, task_names=NAMES, **kwargs)
    assert sel.objective == pytest.approx(objective)
    assert set(sel.groups) == groups
    assert sel.optimal and sel.gap == 0.0
    assert sel.task_names == tuple(NAMES)


def test_hand_made_details():
    masks, gains = _hand()
    sel = select_groups(masks, gains, 3, disjoint=True, task_names=NAMES)
    # implicit singletons are appended after the given rows, in task order
    assert sel.n_candidates == 4 + 4
    assert sorted(sel.chosen) == [3, 4, 7]
    assert sel.served_by.tolist() == [4, 3, 3, 7]
    assert sel.task_gain.tolist() == pytest.approx([0.0, 0.4, 0.4, 0.0])
    text = str(sel)
    assert "objective 0.8" in text and "optimal" in text and "(b, c)" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.objective = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        sel.task_gain[0] = 1.0  # read-only


def test_singleton_rows_take_singleton_gain():
    masks = np.array([[True, False], [False, True], [True, True]])
    gains = np.array([[np.nan, np.nan], [5.0, 7.0], [-0.1, -0.2]])  # row 1's gains are ignored
    sel = select_groups(masks, gains, 2, singleton_gain=-0.05)
    assert sel.objective == pytest.approx(-0.1)  # singletons at -0.05 each
    assert sel.n_candidates == 3
    sel = select_groups(masks, gains, 2, singleton_gain=-1e8)
    assert sel.objective == pytest.approx(-0.3) and sel.chosen == (2,)


def test_released_code_penalty_uses_singletons_only_when_forced():
    masks, gains = _hand()
    # {a,b} and {b,c} leave d uncovered: one penalised singleton is unavoidable
    for method in ("brute", "bnb", "milp"):
        sel = select_groups(
            masks[[0, 3]], gains[[0, 3]], 3, singleton_gain=-1e8, task_names=NAMES, method=method
        )
        assert sel.objective == pytest.approx(-1e8 + 1.0, abs=1e-6)
        assert set(sel.groups) == {("a", "b"), ("b", "c"), ("d",)}


# --------------------------------------------------------------------------- infeasible and invalid input


def test_infeasible_instances_raise():
    masks, gains = _hand()
    sub = masks[[0, 1, 3]], gains[[0, 1, 3]]
    for method in ("brute", "bnb", "milp", "auto"):
        with pytest.raises(ValueError, match="no feasible selection"):
            select_groups(*sub, 1, singleton_gain=-math.inf, method=method)
        with pytest.raises(ValueError, match="no feasible selection"):
            select_groups(
                masks[[0, 3]], gains[[0, 3]], 3, singleton_gain=-math.inf, disjoint=True, method=method
            )
        with pytest.raises(ValueError, match="no feasible selection"):
            select_groups(masks, gains, 1.5, costs=[2.0, 2.0, 2.0, 2.0], method=method)
    with pytest.raises(ValueError, match="no feasible selection"):  # task d in no usable group
        select_groups(masks[[0, 3]], gains[[0, 3]], 4, singleton_gain=-math.inf)
    # with task_names, errors name the tasks (they gave column indices)
    with pytest.raises(ValueError, match=r"tasks \['d'\] are in no usable candidate group.*finite singleton_gain"):
        select_groups(masks[[0, 3]], gains[[0, 3]], 4, singleton_gain=-math.inf, task_names=list("abcd"))
    holed = gains.copy()
    holed[np.argwhere(masks & (masks.sum(axis=1) >= 2)[:, None])[0][0],
          np.argwhere(masks & (masks.sum(axis=1) >= 2)[:, None])[0][1]] = np.nan
    with pytest.raises(ValueError, match=r"gain of member task '[abcd]' in group \d+ is nan"):
        select_groups(masks, holed, 2, task_names=list("abcd"))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.ones((2, 3), bool), np.zeros((2, 2)), 1), {}, "shape"),
        ((np.ones(3, bool), np.zeros(3), 1), {}, "2-D"),
        ((np.array([[1, 2]]), np.zeros((1, 2)), 1), {}, "boolean"),
        ((np.array([[True, True]]), np.array([[0.1, np.nan]]), 1), {}, "finite"),
        ((np.array([[True, True]]), np.array([[0.1, np.inf]]), 1), {}, "finite"),
        ((np.array([[True, False], [False, False]]), np.zeros((2, 2)), 1), {}, "empty"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 0), {}, "at least 1"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 2.5), {}, "integer"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), True), {}, "bool"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), math.inf), {}, "finite"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), "two"), {}, "number"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"costs": [1.0, 2.0]}, "costs must have shape"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"costs": [-1.0]}, "positive"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), -1.0), {"costs": [1.0]}, "positive"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"method": "greedy"}, "method"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"singleton_gain": math.nan}, "singleton_gain"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"singleton_gain": math.inf}, "singleton_gain"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"task_names": ["x"]}, "task_names"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"task_names": ["x", "x"]}, "unique"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"time_limit": 0}, "time_limit"),
        ((np.ones((1, 2), bool), np.zeros((1, 2)), 1), {"disjoint": "yes"}, "disjoint"),
    ],
)
def test_invalid_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_groups(*args, **kwargs)


def test_selection_objective_errors_and_values():
    masks, gains = _hand()
    assert selection_objective(masks, gains, [0, 1]) == pytest.approx(0.65)
    assert selection_objective(masks, gains, [3, 4, 7]) == pytest.approx(0.8)  # with implicit singletons
    with pytest.raises(ValueError, match="not covered"):
        selection_objective(masks, gains, [0])
    with pytest.raises(ValueError, match="out of range"):
        selection_objective(masks, gains, [0, 8])
    with pytest.raises(ValueError, match="forbidden singleton"):
        selection_objective(masks, gains, [3, 4, 7], singleton_gain=-math.inf)


# --------------------------------------------------------------------------- larger instances


def _affinity_gains(masks: np.ndarray, seed: int) -> np.ndarray:
    """Pairwise-affinity-driven relative gains in [-0.5, 0.2] (as in the benchmark)."""
    rng = np.random.default_rng(seed)
    n = masks.shape[1]
    cluster = rng.integers(0, 3, n)
    same = cluster[:, None] == cluster[None, :]
    aff = np.where(same, rng.normal(0.06, 0.04, (n, n)), rng.normal(-0.06, 0.05, (n, n)))
    np.fill_diagonal(aff, 0.0)
    size = masks.sum(axis=1, keepdims=True)
    mean = (masks @ aff) / np.maximum(size - 1, 1)
    g = mean - 0.004 * (size - 2) + rng.normal(0.0, 0.02, masks.shape)
    return np.where(masks, np.clip(g, -0.5, 0.2), np.nan)


@pytest.mark.parametrize("disjoint", [False, True])
def test_all_groups_of_ten_bnb_and_milp_agree(disjoint):
    masks = all_groups(10)
    gains = _affinity_gains(masks, seed=3)
    for budget in (2, 3, 4):
        a = select_groups(masks, gains, budget, method="bnb", disjoint=disjoint)
        b = select_groups(masks, gains, budget, method="milp", disjoint=disjoint)
        assert a.optimal and b.optimal
        assert a.objective == pytest.approx(b.objective, abs=TOL)
        assert a.seconds < 10 and b.seconds < 10


def test_all_groups_of_ten_large_path_agrees():
    masks = all_groups(10)
    gains = _affinity_gains(masks, seed=4)
    direct = select_groups(masks, gains, 3, method="milp")
    old = sel_mod._DIRECT_NNZ
    sel_mod._DIRECT_NNZ = 0
    try:
        for method in ("bnb", "milp"):
            sel = select_groups(masks, gains, 3, method=method)
            assert sel.optimal and sel.objective == pytest.approx(direct.objective, abs=TOL)
            assert sel.n_active < len(masks)  # reduced-cost fixing pruned candidates
    finally:
        sel_mod._DIRECT_NNZ = old


def test_time_limit_reports_gap():
    rng = np.random.default_rng(0)
    masks = all_groups(10)
    gains = np.where(masks, rng.uniform(-0.5, 0.2, masks.shape), np.nan)
    sel = select_groups(masks, gains, 4, method="bnb", time_limit=1e-4)
    assert not sel.optimal
    assert math.isfinite(sel.bound) and sel.bound >= sel.objective
    assert math.isfinite(sel.gap) and sel.gap >= 0.0
    full = select_groups(masks, gains, 4)
    assert full.optimal
    assert sel.objective <= full.objective + TOL <= sel.bound + 2 * TOL

    small = all_groups(6)
    g6 = np.where(small, rng.uniform(-0.5, 0.2, small.shape), np.nan)
    sel = select_groups(small, g6, 4, method="brute", time_limit=1e-3)
    assert not sel.optimal and math.isfinite(sel.gap) and sel.bound >= sel.objective
