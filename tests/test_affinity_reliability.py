"""Split-half reproducibility of the affinity matrix: the halves, their agreement, the warning.

The measured steps go to two halves in turn; each half is reduced like the
whole matrix. Checked against the per-step record reduced by hand (NumPy),
against SciPy's Spearman correlation, through save/load and checkpoints, and
the end-of-fit warning's threshold.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_affinity import TinyMTL, fit, tiny_loader

from lightning_etap.affinity import AffinityCallback, AffinityResult
from lightning_etap.affinity import callback as callback_module
from lightning_etap.affinity.scores import AffinityAccumulator


def epoch_mean_sum(mats: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """The released code's reduction by hand: mean of the steps within each epoch, summed over epochs."""
    return sum(mats[epochs == e].mean(0) for e in np.unique(epochs))


def offdiag_spearman(a: np.ndarray, b: np.ndarray) -> float:
    off = ~np.eye(a.shape[0], dtype=bool)
    return float(spearmanr(a[off], b[off]).statistic)


def test_halves_are_alternate_steps_reduced_like_the_whole():
    rng = np.random.default_rng(0)
    n, epochs = 4, np.repeat([0, 1, 2], [5, 4, 6])
    mats = rng.normal(size=(len(epochs), n, n))
    acc = AffinityAccumulator(n, split=True)
    for k, (e, m) in enumerate(zip(epochs, mats, strict=True)):
        acc.add(int(e), torch.tensor(m), torch.ones(n, dtype=torch.bool), step=k)
    for reduction, reduce in (("epoch_mean_sum", lambda m, e: epoch_mean_sum(m, e)),
                              ("mean", lambda m, e: m.mean(0))):
        halves = acc.half_matrices(reduction).numpy()
        for h in (0, 1):
            np.testing.assert_allclose(halves[h], reduce(mats[h::2], epochs[h::2]), rtol=1e-12)
        np.testing.assert_allclose(acc.matrix(reduction).numpy(), reduce(mats, epochs), rtol=1e-12)
    # without split, or before the second half has a step, there are no halves
    assert AffinityAccumulator(n).half_matrices() is None
    one = AffinityAccumulator(n, split=True)
    one.add(0, torch.tensor(mats[0]), torch.ones(n, dtype=torch.bool))
    assert one.half_matrices() is None


def test_halves_route_proxy_steps_in_turn_and_fit_their_own_control_variate():
    rng = np.random.default_rng(1)
    n, valid = 3, torch.ones(3, dtype=torch.bool)
    acc = AffinityAccumulator(n, split=True)
    by_hand = [AffinityAccumulator(n), AffinityAccumulator(n)]
    measured = proxied = 0
    for step in range(40):
        x, p = torch.tensor(rng.normal(size=(n, n))), torch.tensor(rng.normal(size=(n, n)))
        epoch = step // 10
        if step % 4 == 0:
            acc.add(epoch, x, valid, proxy=p)
            by_hand[measured % 2].add(epoch, x, valid, proxy=p)
            measured += 1
        else:
            acc.add_proxy(epoch, p, valid)
            by_hand[proxied % 2].add_proxy(epoch, p, valid)
            proxied += 1
    halves = acc.half_matrices()
    for h in (0, 1):
        assert torch.equal(halves[h], by_hand[h].matrix())
        assert by_hand[h].control_variate() is not None  # each half estimates its proxy steps itself
    again = AffinityAccumulator.from_state_dict(acc.state_dict())
    assert torch.equal(again.half_matrices(), halves) and again.routed == acc.routed == [10, 30]
    # a checkpoint written before halves existed restores without them
    old = acc.state_dict()
    del old["halves"], old["routed"]
    assert AffinityAccumulator.from_state_dict(old).half_matrices() is None


def test_split_half_is_spearman_of_finite_offdiagonal_entries(tmp_path):
    rng = np.random.default_rng(2)
    m = rng.normal(size=(5, 5))
    halves = np.stack([m + 0.3 * rng.normal(size=(5, 5)), m + 0.3 * rng.normal(size=(5, 5))])
    halves[1, 0, 3] = np.nan  # a column never counted in one half: the pair is left out
    res = AffinityResult(tuple("abcde"), m, m[None], [0], half_matrices=halves)
    off = ~np.eye(5, dtype=bool) & np.isfinite(halves[1])
    assert res.split_half == pytest.approx(spearmanr(halves[0][off], halves[1][off]).statistic, abs=1e-12)
    assert "split half" in repr(res)
    back = AffinityResult.load(res.save(tmp_path / "r"))
    assert back == res and back.split_half == res.split_half
    assert AffinityResult(tuple("abcde"), m, m[None], [0]).split_half is None
    flat = np.stack([np.ones((5, 5)), m])
    assert AffinityResult(tuple("abcde"), m, m[None], [0], half_matrices=flat).split_half is None
    with pytest.raises(ValueError, match="half_matrices must be 2x5x5"):
        AffinityResult(tuple("abcde"), m, m[None], [0], half_matrices=halves[:1])


def test_callback_halves_match_the_step_record():
    torch.manual_seed(0)
    cb = AffinityCallback("encoder", every_n_steps=1, keep_step_scores=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit(TinyMTL(), tiny_loader(n=48), [cb], max_epochs=3)  # 6 steps an epoch
    res = cb.result
    epochs = res.steps // 6
    assert res.measured_steps == 18
    for h in (0, 1):
        np.testing.assert_allclose(res.half_matrices[h], epoch_mean_sum(res.step_matrices[h::2], epochs[h::2]),
                                   rtol=1e-12)
    assert res.split_half == pytest.approx(offdiag_spearman(*res.half_matrices), abs=1e-12)


@pytest.mark.parametrize("threshold, warns", [(1.01, True), (-1.01, False)])
def test_end_of_fit_warns_when_the_halves_disagree(monkeypatch, threshold, warns):
    monkeypatch.setattr(callback_module, "SPLIT_HALF_WARN", threshold)
    torch.manual_seed(0)
    cb = AffinityCallback("encoder", every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TinyMTL(), tiny_loader(n=48), [cb], max_epochs=2)
    messages = [str(w.message) for w in caught if "not reproducible" in str(w.message)]
    assert cb.result.split_half is not None
    if warns:
        assert len(messages) == 1
        assert f"Spearman {cb.result.split_half:.2f}" in messages[0] and "one step in 2" in messages[0]
        assert "smaller every_n_steps" in messages[0]
    else:
        assert messages == []
