"""Split-half reproducibility of the affinity matrix: the halves, their agreement, the warning.

The measured steps go to two halves in alternate blocks; each half is reduced
like the whole matrix. Checked against the per-step record reduced by hand
(NumPy), against SciPy's Spearman correlation and an independent fit of the
per-task effects, through save/load, checkpoints and gradient accumulation,
and the end-of-fit warning's rule.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_affinity import AllNaN, TinyMTL, fit, tiny_loader

from lightning_etap.affinity import AffinityCallback, AffinityResult
from lightning_etap.affinity import callback as callback_module
from lightning_etap.affinity.callback import reproducibility_warning
from lightning_etap.affinity.scores import AffinityAccumulator

ALL = torch.ones(4, dtype=torch.bool)


def epoch_mean_sum(mats: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """The released code's reduction by hand: mean of the steps within each epoch, summed over epochs."""
    return sum(mats[epochs == e].mean(0) for e in np.unique(epochs))


def block_halves(count: int, block: int) -> np.ndarray:
    """Which half each of ``count`` measured steps goes to, in alternate blocks of ``block``."""
    return (np.arange(count) // block) % 2


@pytest.mark.parametrize("block", [1, 3])
def test_halves_are_alternate_blocks_reduced_like_the_whole(block):
    rng = np.random.default_rng(0)
    n, epochs = 4, np.repeat([0, 1, 2], [5, 4, 6])
    mats = rng.normal(size=(len(epochs), n, n))
    acc = AffinityAccumulator(n, split=True)
    acc.block = block
    for k, (e, m) in enumerate(zip(epochs, mats, strict=True)):
        acc.add(int(e), torch.tensor(m), ALL, step=k)
    half = block_halves(len(mats), block)
    assert acc.half_steps == [int((half == 0).sum()), int((half == 1).sum())]
    for reduction, reduce in (("epoch_mean_sum", epoch_mean_sum), ("mean", lambda m, e: m.mean(0))):
        halves = acc.half_matrices(reduction).numpy()
        for h in (0, 1):
            np.testing.assert_allclose(halves[h], reduce(mats[half == h], epochs[half == h]), rtol=1e-12)
        np.testing.assert_allclose(acc.matrix(reduction).numpy(), reduce(mats, epochs), rtol=1e-12)
    # without split, or while the second half has no measured step, there are no halves
    assert AffinityAccumulator(n).half_matrices() is None
    one = AffinityAccumulator(n, split=True)
    one.add(0, torch.tensor(mats[0]), ALL)
    assert one.half_matrices() is None


def test_proxy_steps_follow_their_measured_step_and_each_half_fits_its_control_variate():
    rng = np.random.default_rng(1)
    n = 4
    acc = AffinityAccumulator(n, split=True)
    acc.block = 2
    by_hand = [AffinityAccumulator(n), AffinityAccumulator(n)]
    measured = 0
    for step in range(48):
        x = torch.tensor(rng.normal(size=(n, n)))
        p = 0.8 * x + 0.2 * torch.tensor(rng.normal(size=(n, n)))  # a proxy that follows the exact score
        epoch = step // 12
        if step % 4 == 0:
            h = (measured // 2) % 2
            acc.add(epoch, x, ALL, proxy=p)
            by_hand[h].add(epoch, x, ALL, proxy=p)
            measured += 1
        else:
            acc.add_proxy(epoch, p, ALL)
            by_hand[h].add_proxy(epoch, p, ALL)  # the half of the measured step before it
    halves = acc.half_matrices()
    for h in (0, 1):
        assert torch.equal(halves[h], by_hand[h].matrix())
        xbar, pbar, beta = acc.halves[h].control_variate()  # each half estimates its own proxy steps
        assert (beta != 0).all() and acc.halves[h].proxy_steps == 18
    again = AffinityAccumulator.from_state_dict(acc.state_dict())
    assert torch.equal(again.half_matrices(), halves) and again.half_steps == acc.half_steps == [6, 6]
    assert (again.block, again.half, again.in_block) == (acc.block, acc.half, acc.in_block)
    # a checkpoint written before halves existed restores without them
    old = acc.state_dict()
    del old["halves"], old["half_routing"]
    assert AffinityAccumulator.from_state_dict(old).half_matrices() is None
    # one measured step and proxy steps only: the second half has no measured step, so no halves
    lone = AffinityAccumulator(n, split=True)
    lone.add(0, torch.tensor(rng.normal(size=(n, n))), ALL, proxy=torch.zeros(n, n, dtype=torch.float64))
    lone.add_proxy(0, torch.ones(n, n, dtype=torch.float64), ALL)
    assert lone.half_matrices() is None


def residual_by_alternating_projections(m: np.ndarray) -> np.ndarray:
    """Off-diagonal entries minus a level and row and column effects, by removing row and column means in
    turn until nothing changes (converges to the least-squares residual of the additive model)."""
    n = m.shape[0]
    off = ~np.eye(n, dtype=bool)
    r = np.where(off, m - m[off].mean(), np.nan)
    for _ in range(5000):
        r = r - np.nanmean(r, axis=1, keepdims=True)
        r = r - np.nanmean(r, axis=0, keepdims=True)
    return r[off]


def test_split_half_and_pairs_against_independent_computations(tmp_path):
    rng = np.random.default_rng(2)
    n = 6
    rows, cols = rng.normal(size=(n, 1)) * 3, rng.normal(size=(1, n)) * 3
    pairs = rng.normal(size=(n, n))
    halves = np.stack([rows + cols + pairs + 0.3 * rng.normal(size=(n, n)),
                       rows + cols + pairs + 0.3 * rng.normal(size=(n, n))])
    res = AffinityResult(tuple("abcdef"), halves.mean(0), halves.mean(0)[None], [0], half_matrices=halves)
    off = ~np.eye(n, dtype=bool)
    assert res.split_half == pytest.approx(spearmanr(halves[0][off], halves[1][off]).statistic, abs=1e-12)
    by_projection = [residual_by_alternating_projections(h) for h in halves]
    assert res.split_half_pairs == pytest.approx(spearmanr(*by_projection).statistic, abs=1e-9)
    assert res.split_half_pairs > 0.8  # the pair effects are shared by both halves
    # only per-task effects are shared: the entries' ranking is reproducible, what is specific to pairs is not
    effects = np.stack([rows + cols + rng.normal(size=(n, n)), rows + cols + rng.normal(size=(n, n))])
    only = AffinityResult(tuple("abcdef"), effects.mean(0), effects.mean(0)[None], [0], half_matrices=effects)
    assert only.split_half > 0.8 and abs(only.split_half_pairs) < 0.3
    assert "split half" in repr(res)
    back = AffinityResult.load(res.save(tmp_path / "r"))
    assert back == res and back.split_half == res.split_half and back.split_half_pairs == res.split_half_pairs


def test_split_half_edge_cases():
    m = np.arange(25.0).reshape(5, 5)
    halves = np.stack([m, m + 1.0])
    halves[1, 0, 3] = np.nan  # a column never counted in one half: the entry is left out
    res = AffinityResult(tuple("abcde"), m, m[None], [0], half_matrices=halves)
    assert res.split_half == pytest.approx(1.0)
    assert AffinityResult(tuple("abcde"), m, m[None], [0]).split_half is None
    flat = np.stack([np.ones((5, 5)), m])
    assert AffinityResult(tuple("abcde"), m, m[None], [0], half_matrices=flat).split_half is None
    two = AffinityResult(("a", "b"), m[:2, :2], m[None, :2, :2], [0], half_matrices=halves[:, :2, :2])
    assert two.split_half is None and two.split_half_pairs is None  # two entries: no correlation
    three = AffinityResult(tuple("abc"), m[:3, :3], m[None, :3, :3], [0], half_matrices=halves[:, :3, :3])
    assert three.split_half is not None and three.split_half_pairs is None
    with pytest.raises(ValueError, match="half_matrices must be 2x5x5"):
        AffinityResult(tuple("abcde"), m, m[None], [0], half_matrices=halves[:1])


def test_callback_halves_are_blocks_of_ten_steps_of_the_step_record():
    torch.manual_seed(0)
    cb = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True)
    fit(TinyMTL(), tiny_loader(n=48), [cb], max_epochs=5)  # 6 steps an epoch, 30 steps
    res = cb.result
    epochs = res.steps // 6
    half = block_halves(res.measured_steps, 10)  # every step measured: blocks of 10 steps
    for h in (0, 1):
        np.testing.assert_allclose(res.half_matrices[h],
                                   epoch_mean_sum(res.step_matrices[half == h], epochs[half == h]), rtol=1e-12)
    off = ~np.eye(3, dtype=bool)
    assert res.split_half == pytest.approx(spearmanr(res.half_matrices[0][off],
                                                     res.half_matrices[1][off]).statistic, abs=1e-12)


def test_gradient_accumulation_hands_each_optimizer_step_to_one_half():
    torch.manual_seed(0)
    cb = AffinityCallback("encoder", every_n_steps=2)  # blocks of 5 measured steps
    fit(TinyMTL(), tiny_loader(n=96), [cb], max_epochs=2, accumulate_grad_batches=2)  # 6 steps an epoch
    acc = cb._acc
    assert sum(acc.half_steps) == cb.result.measured_steps == 6 and acc.block == 5
    assert acc.half_steps == [5, 1]


def test_warning_rule():
    assert reproducibility_warning(None, 50, 10, 1, False) is None
    assert reproducibility_warning(0.34, 50, 10, 1, False) is None  # whole-matrix reliability above 0.5
    assert reproducibility_warning(0.2, 50, 3, 1, False) is None  # three tasks: too few entries to tell
    few = reproducibility_warning(0.9, 3, 10, 1, False)  # three measured steps: too few, whatever the halves say
    assert "only 3 step(s) measured (every step)" in few and "train longer" in few
    few = reproducibility_warning(0.5, 2, 6, 17, True)
    assert "only 2 step(s) measured (one step in 17, chosen by every_n_steps='auto')" in few
    assert "pass a smaller every_n_steps for a fit this short" in few
    assert reproducibility_warning(None, 0, 6, 17, True) is None  # nothing measured: result raises anyway
    every = reproducibility_warning(0.3, 50, 10, 1, False)
    assert "Spearman 0.30" in every and "about 0.46" in every and "every step" in every
    assert "train longer or on larger batches" in every
    auto = reproducibility_warning(0.1, 6, 30, 104, True)
    assert "one step in 104, chosen by every_n_steps='auto'" in auto and "raise overhead" in auto
    fixed = reproducibility_warning(-0.05, 20, 30, 10, False)
    assert "Spearman -0.05" in fixed and "reliability" not in fixed and "smaller every_n_steps" in fixed
    # a short fit whose measured steps never reached the second half: no figure, and it says so
    short = reproducibility_warning(None, 8, 6, 1, False, halves=False)
    assert "8 steps measured (every step) all fell in the first split half" in short and "train longer" in short
    assert "smaller every_n_steps" in reproducibility_warning(None, 5, 6, 2, False, halves=False)
    assert reproducibility_warning(None, 8, 3, 1, False, halves=False) is None  # three tasks: no figure anyway


@pytest.mark.parametrize("threshold, warns", [(1.01, True), (-1.01, False)])
def test_end_of_fit_warns_when_the_halves_disagree(monkeypatch, threshold, warns):
    monkeypatch.setattr(callback_module, "SPLIT_HALF_WARN", threshold)
    monkeypatch.setattr(callback_module, "WARN_MIN_TASKS", 3)  # the tiny model has three tasks
    torch.manual_seed(0)
    cb = AffinityCallback("encoder", every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TinyMTL(), tiny_loader(n=96), [cb], max_epochs=4)  # 12 steps an epoch: 24 measured
    messages = [str(w.message) for w in caught if "not reproducible" in str(w.message)]
    assert cb.result.split_half is not None
    if warns:
        assert len(messages) == 1
        assert f"Spearman {cb.result.split_half:.2f}" in messages[0] and "one step in 2" in messages[0]
    else:
        assert messages == []


def test_skipped_steps_reach_neither_half():
    cb = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True)
    with pytest.warns(RuntimeWarning, match="skipping a step"):
        fit(AllNaN(nan_steps={3, 12}), tiny_loader(n=120), [cb], max_epochs=2)  # 30 steps, two skipped
    res = cb.result
    assert res.skipped_steps == 2 and res.measured_steps == 28 and sum(cb._acc.half_steps) == 28
    # blocks of 10 measured steps, counted over the steps that were scored
    half = block_halves(res.measured_steps, 10)
    epochs = res.steps // 15
    for h in (0, 1):
        np.testing.assert_allclose(res.half_matrices[h],
                                   epoch_mean_sum(res.step_matrices[half == h], epochs[half == h]), rtol=1e-12)
