"""benchmarks/control_variate_offline.py: its replay against hand reductions, and a tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("control_variate_offline")


def _record(n=4, steps=30, per_epoch=7, seed=0, proxy_noise=1.0):
    rng = np.random.default_rng(seed)
    exact = rng.normal(size=(steps, n, n))
    proxy = exact + proxy_noise * rng.normal(size=(steps, n, n))
    epochs = np.arange(steps) // per_epoch
    # the released code's reduction by hand: per-epoch mean of the step scores, summed over epochs
    whole = sum(exact[epochs == e].mean(0) for e in np.unique(epochs))
    return {"tasks": n, "steps": steps, "reduction": "epoch_mean_sum", "whole": whole, "epochs": epochs,
            "exact": exact, "proxy": proxy}


def test_plain_sample_replay_is_the_sampled_steps_reduced_by_hand(script):
    rec = _record()
    k, o = 4, 1
    got = script.replay(rec, k, o, 0)
    keep = (np.arange(rec["steps"]) - o) % k == 0
    keep &= np.arange(rec["steps"]) >= o
    want = sum(rec["exact"][keep & (rec["epochs"] == e)].mean(0) for e in np.unique(rec["epochs"][keep]))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(script.replay(rec, 1, 0, 0), rec["whole"], rtol=1e-12)


def test_control_variate_replay_by_hand(script):
    # the estimate of a proxied step is X̄ + β (P_t − P̄), β = cov(X, P) / var(P) per entry over the measured steps
    rec = _record(steps=23, per_epoch=6)
    k, o, pe = 5, 2, 2
    s = np.arange(rec["steps"])
    measured = (s >= o) & ((s - o) % k == 0)
    proxied = ~measured & ((s - o) % pe == 0)
    X, P = rec["exact"][measured], rec["proxy"][measured]
    xbar, pbar = X.mean(0), P.mean(0)
    beta = ((X - xbar) * (P - pbar)).mean(0) / ((P - pbar) ** 2).mean(0)
    est = np.where(measured[:, None, None], rec["exact"], xbar + beta * (rec["proxy"] - pbar))
    used = measured | proxied
    want = sum(est[used & (rec["epochs"] == e)].mean(0) for e in np.unique(rec["epochs"][used]))
    np.testing.assert_allclose(script.replay(rec, k, o, pe), want, rtol=1e-9)


def test_a_perfect_proxy_recovers_the_every_step_matrix(script):
    rec = _record(proxy_noise=0.0)
    rec["proxy"] = 3.0 * rec["exact"] - 1.0  # any exact affine function of the score: β undoes it
    for k, o in ((4, 0), (7, 3)):
        np.testing.assert_allclose(script.replay(rec, k, o, 1), rec["whole"], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_tiny_fit_end_to_end(script, tmp_path):
    out = tmp_path / "cv.json"
    assert script.main(["--tasks", "3", "--steps", "6", "--out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    assert res["replay_all_steps_rho"] == pytest.approx(1.0)  # the replay of every step is the fit's own matrix
    assert -1 <= res["per_step_pearson_proxy_exact"]["median"] <= 1
    sched = res["schedules"]["every 20, proxy every step"]
    assert sched["offsets"] == 6 and sched["min"] <= sched["mean"] <= sched["max"]
