"""Speed and memory of ETAPPredictor: fitting with the full CV grid, predicting every group.

Run: ``python benchmarks/bench_predictor.py [--out results.json] [--no-naive]``.

* fit: n = 10 tasks, |G_train| = 50 random groups, the default (released)
  grid: degree 2-6 x knots 2..floor(sqrt(N))+9 x 24 alphas x 10 group folds,
  then 10 residual ridges (20 alphas x 5 folds). Side by side: scikit-learn's
  ``GridSearchCV(Pipeline(SplineTransformer, Ridge))`` on the same folds for
  one degree, extrapolated to five degrees (the naive way).
* predict: n = 20 tasks, all 2**20 - 1 groups; wall and CPU time of
  ``predict``, peak traced memory (``tracemalloc``) and the process's peak RSS.

Times depend on the machine and its load; CPU time is printed beside wall
time for that reason.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import tracemalloc
import warnings

import numpy as np


def _problem(n: int, n_train: int, seed: int):
    from lightning_etap.groups import all_groups
    from lightning_etap.predictors import group_affinity

    rng = np.random.default_rng(seed)
    affinity = rng.normal(size=(n, n))
    candidates = all_groups(n, min_size=2)
    train = candidates[rng.choice(len(candidates), n_train, replace=False)]
    weights = rng.normal(scale=0.2, size=(n, n))
    gains = np.sin(2 * group_affinity(affinity, train)) + train @ weights.T
    gains = np.where(train, gains + 0.05 * rng.normal(size=train.shape), np.nan)
    return affinity, train, gains


def _timed(fn, repeats: int = 1):
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return result, float(np.median(walls)), float(np.median(cpus))


def bench_fit(compare_naive: bool = True) -> dict:
    """Measure ``ETAPPredictor.fit`` (n=10, |G_train|=50, full CV, median of 3); print and return the figures."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import SplineTransformer

    import lightning_etap.predictors.etap as etap_module
    from lightning_etap.predictors import RELEASED_ALPHA_GRID, ETAPPredictor

    results: dict = {}
    affinity, train, gains = _problem(10, 50, 0)
    model, wall, cpu = _timed(lambda: ETAPPredictor(affinity).fit(train, gains), repeats=3)
    n_grid = len(model.cv_results_["params"])
    results["fit"] = {
        "n_tasks": 10, "n_train_groups": 50, "n_train_rows": model.n_train_rows_,
        "grid_points": n_grid, "folds": model.stage1_n_splits_,
        "wall_s": wall, "cpu_s": cpu, "best_params": model.best_params_,
    }
    print(f"fit  n=10 |G_train|=50 rows={model.n_train_rows_}: {n_grid} grid points x "
          f"{model.stage1_n_splits_} folds + 10 residual ridges: {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"(best {model.best_params_})")

    if compare_naive:
        # the same folds, scikit-learn's pipeline refitted per grid point, for one degree
        folds = []
        original = etap_module._group_folds

        def spy(group_ids, n_splits, random_state):
            result = original(group_ids, n_splits, random_state)
            folds.append(result)
            return result

        etap_module._group_folds = spy
        try:
            ETAPPredictor(affinity, stage2=None).fit(train, gains)
        finally:
            etap_module._group_folds = original
        used = train & (train.sum(axis=1) >= 2)[:, None]
        z = etap_module.group_affinity(affinity, train)[used]
        x = model.rescale_intercept_ + model.rescale_slope_ * z
        knots = sorted({p["n_knots"] for p in model.cv_results_["params"]})
        search = GridSearchCV(
            Pipeline([("spline", SplineTransformer(include_bias=True)), ("ridge", Ridge())]),
            {"spline__degree": [3], "spline__n_knots": knots, "ridge__alpha": list(RELEASED_ALPHA_GRID)},
            cv=folds[0], scoring="neg_mean_squared_error", n_jobs=1,
        )
        _, naive_wall, naive_cpu = _timed(lambda: search.fit(x[:, None], gains[used]))
        naive_total = naive_cpu * 5
        ours_stage1 = _timed(lambda: ETAPPredictor(affinity, stage2=None).fit(train, gains), repeats=3)[2]
        results["fit"]["naive_gridsearch_one_degree_cpu_s"] = naive_cpu
        results["fit"]["naive_gridsearch_extrapolated_cpu_s"] = naive_total
        results["fit"]["stage1_only_cpu_s"] = ours_stage1
        results["fit"]["speedup_stage1_vs_naive"] = naive_total / ours_stage1
        print(f"     naive GridSearchCV(SplineTransformer+Ridge), 1 of 5 degrees: {naive_wall:.2f} s wall, "
              f"{naive_cpu:.2f} s CPU -> ~{naive_total:.1f} s CPU for the grid; ours (stage 1 only) "
              f"{ours_stage1:.2f} s CPU: {naive_total / ours_stage1:.0f}x")

    return results["fit"]


def bench_predict() -> dict:
    """Measure ``ETAPPredictor.predict`` on all 2**20 - 1 groups of n=20 (time and memory); print and return."""
    from lightning_etap.groups import all_groups
    from lightning_etap.predictors import ETAPPredictor

    results: dict = {}
    affinity, train, gains = _problem(20, 50, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few groups per task for n=20: fewer residual folds
        model = ETAPPredictor(affinity).fit(train, gains)
    groups = all_groups(20)
    pred, wall, cpu = _timed(lambda: model.predict(groups))
    totals, wall_total, cpu_total = _timed(lambda: model.predict_total(groups))
    assert np.isfinite(pred[groups]).all() and np.allclose(totals, np.nansum(pred, axis=1))
    del pred, totals
    tracemalloc.start()
    model.predict(groups)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    output_mb = groups.size * 8 / 2**20
    results["predict"] = {
        "n_tasks": 20, "n_groups": int(groups.shape[0]), "member_entries": int(groups.sum()),
        "degree": model.degree_, "n_knots": model.n_knots_,
        "wall_s": wall, "cpu_s": cpu, "predict_total_wall_s": wall_total, "predict_total_cpu_s": cpu_total,
        "peak_traced_mb": peak / 2**20, "output_mb": output_mb, "process_peak_rss_mb": rss,
    }
    print(f"predict all {groups.shape[0]:,} groups of n=20 ({int(groups.sum()):,} member entries, "
          f"spline degree {model.degree_}, {model.n_knots_} knots): {wall:.2f} s wall, {cpu:.2f} s CPU; "
          f"predict_total {wall_total:.2f} s wall")
    print(f"     peak traced memory {peak / 2**20:.0f} MiB (output alone {output_mb:.0f} MiB, "
          f"masks {groups.nbytes / 2**20:.0f} MiB); process peak RSS {rss:.0f} MiB")
    return results["predict"]


def bench_fit_predict(compare_naive: bool = True, out: str | None = None) -> dict:
    """Both measurements; optionally written as JSON to ``out``."""
    results: dict = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    results["fit"] = bench_fit(compare_naive)
    results["predict"] = bench_predict()
    if out:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"results written to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive GridSearchCV comparison")
    args = parser.parse_args()
    bench_fit_predict(compare_naive=not args.no_naive, out=args.out)
