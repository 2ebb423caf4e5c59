"""The run's report: ``report/index.html`` (figures embedded) plus the PNG files, and the terminal summary.

Figures (matplotlib's Agg renderer; pyplot is never touched):

* ``affinity_heatmap.png``: the measured affinity matrix;
* ``affinity_curves.png``: the affinity over training (mean step score per epoch);
* ``predicted_vs_measured.png``: ETAP's predicted gain against the measured gain, for
  the training groups (leave-one-group-out, so out of sample) and the held-out
  measured groups;
* ``selection.png``: the chosen groups for every budget, coloured by predicted gain
  (and the true optimum beside them when every group was measured);
* ``timings.png``: wall time per stage.

The HTML page needs nothing else: styles are inline and every figure is a
``data:`` URI, so it can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lightning_etap._atomic import atomic_file, atomic_write_text
from lightning_etap.pipeline.config import PipelineConfig
from lightning_etap.pipeline.rundir import RunDirectory

__all__ = ["FIGURES", "prediction_quality", "terminal_summary", "write_report"]

#: The report's figures: file stem -> caption.
FIGURES: dict[str, str] = {
    "affinity_heatmap": "Task affinity measured during training (row: source task, column: target task).",
    "affinity_curves": "Affinity over training: the mean step score of every epoch.",
    "predicted_vs_measured": "Predicted against measured relative gain (eq. 1). Training groups are predicted by "
                             "leave-one-group-out refits; held-out groups were never seen by the predictor.",
    "selection": "The chosen groups for each budget; cells coloured by the predicted gain of the task in "
                 "the group, a dot marks the group a task is taken from.",
    "timings": "Wall time per stage.",
}


# ---------------------------------------------------------------------- data
def _load(run: RunDirectory) -> dict[str, Any]:
    from lightning_etap.affinity import AffinityResult

    config = PipelineConfig.from_dict(run.saved_config() or {}, str(run.config_path))
    # the seeds selection.json was computed from: a config given other seeds since (gains not redone yet) must
    # not mix the old selection with gains averaged over the new seeds
    config = dataclasses.replace(config, seeds=run.gains_seeds(config))
    with run.reading(run.affinity_dir):
        affinity = AffinityResult.load(run.affinity_dir)
    with run.reading(run.groups_path):
        groups = json.loads(run.groups_path.read_text())
    with run.reading(run.predictions_path), np.load(run.predictions_path, allow_pickle=False) as data:
        predictions = {k: data[k] for k in data.files}
    measured = run.measured(config.seeds)
    with run.reading(run.selection_path):
        selection = json.loads(run.selection_path.read_text())
    return {
        "config": config, "affinity": affinity, "groups": groups, "predictions": predictions,
        "measured": measured, "selection": selection, "timings": run.timings(),
        "names": tuple(groups["task_names"]),
        "environment": run.stage_record("gains").get("environment") or run.stage_record("affinity").get("environment"),
        "affinity_source": run.stage_record("affinity").get("imported_from"),
        "search": run.stage_record("gains").get("search"),
        "run_path": str(run.path),
    }


def _heldout(data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks, measured and predicted gains of the measured groups that are not training groups."""
    names = data["names"]
    train = {tuple(g) for g in data["groups"]["train"]}
    measured = data["measured"]
    pred = data["predictions"]
    index = {pred["candidates"][r].tobytes(): r for r in range(len(pred["candidates"]))}
    rows, cand_rows = [], []
    for r, group in enumerate(measured.groups):
        if tuple(group) in train or len(group) < 2:
            continue
        c = index.get(measured.masks[r].tobytes())
        if c is not None:
            rows.append(r)
            cand_rows.append(c)
    n = len(names)
    if not rows:
        return np.zeros((0, n), bool), np.zeros((0, n)), np.zeros((0, n))
    return measured.masks[rows], measured.gains[rows], pred["predicted"][cand_rows]


def prediction_quality(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Agreement of predicted and measured gains (:func:`~lightning_etap.predictors.evaluate_predictions`).

    Returns ``{"train_cv": {...}, "heldout": {...}}``; a part with no groups is left out.
    """
    from lightning_etap.predictors import evaluate_predictions

    out = {}
    p = data["predictions"]
    ok = ~np.isnan(np.where(p["train_masks"], p["train_cv"], 0.0)).any(axis=1)
    if ok.sum() >= 2:
        out["train_cv"] = evaluate_predictions(p["train_masks"][ok], p["train_measured"][ok], p["train_cv"][ok])
    masks, true, predicted = _heldout(data)
    if len(masks) >= 2:
        out["heldout"] = evaluate_predictions(masks, true, predicted)
    return out


# ---------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def _plot_curves(data: dict[str, Any], path: Path) -> Path:
    affinity = data["affinity"]
    names = affinity.task_names
    n = len(names)
    epochs = np.asarray(affinity.epochs) + 1
    mats = affinity.epoch_matrices
    fig = _figure(11, 4.2)
    left, right = fig.subplots(1, 2)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    values = {p: (mats[:, p[0], p[1]] + mats[:, p[1], p[0]]) / 2 for p in pairs}
    if len(pairs) > 10:  # the ten pairs with the largest final |affinity|
        pairs = sorted(pairs, key=lambda p: -abs(np.nan_to_num(affinity.matrix[p] + affinity.matrix[p[::-1]])))[:10]
    colors = _colors(len(pairs))
    for color, p in zip(colors, pairs):
        left.plot(epochs, values[p], marker="o", ms=3, lw=1.4, color=color, label=f"{names[p[0]]} ~ {names[p[1]]}")
    left.axhline(0, color="0.5", lw=0.8)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set(xlabel="epoch", ylabel="pair affinity (mean of both directions)",
             title="pairs" + (" (10 strongest)" if n * (n - 1) // 2 > 10 else ""))
    left.legend(fontsize=7, ncol=2 if len(pairs) > 5 else 1, loc="best")
    off = ~np.eye(n, dtype=bool)
    with np.errstate(invalid="ignore"), _quiet():
        incoming = np.array([[np.nanmean(m[:, t][off[:, t]]) for t in range(n)] for m in mats])
    shown = range(n) if n <= 12 else np.argsort(-np.abs(np.nan_to_num(incoming[-1])))[:12]
    for color, t in zip(_colors(len(shown)), shown):
        right.plot(epochs, incoming[:, t], marker="o", ms=3, lw=1.4, color=color, label=names[t])
    right.axhline(0, color="0.5", lw=0.8)
    right.set(xlabel="epoch", ylabel="mean affinity onto the task", title="onto each task (from the others)")
    right.legend(fontsize=7, ncol=2 if n > 6 else 1, loc="best")
    return _save(fig, path)


def _plot_predictions(data: dict[str, Any], quality: dict[str, Any], path: Path) -> Path:
    p = data["predictions"]
    fig = _figure(11, 4.6)
    tasks_ax, groups_ax = fig.subplots(1, 2)
    parts = [("training groups, leave-one-out", p["train_masks"], p["train_measured"], p["train_cv"],
              "#d62728", "train_cv")]
    masks, true, predicted = _heldout(data)
    if len(masks):
        parts.insert(0, ("held-out groups", masks, true, predicted, "#1f77b4", "heldout"))
    everything = []
    for label, m, t, q, color, key in parts:
        member = m & (m.sum(axis=1) >= 2)[:, None] & ~np.isnan(q)
        x, y = t[member], q[member]
        r = quality.get(key, {}).get("task_pearson", math.nan)
        tasks_ax.scatter(100 * x, 100 * y, s=18, alpha=0.7, color=color, label=f"{label} (r = {r:.2f})")
        ok = ~np.isnan(np.where(m, q, 0.0)).any(axis=1) & (m.sum(axis=1) >= 2)
        gx, gy = np.nansum(np.where(m, t, np.nan), 1)[ok], np.nansum(np.where(m, q, np.nan), 1)[ok]
        rg = quality.get(key, {}).get("group_pearson", math.nan)
        groups_ax.scatter(100 * gx, 100 * gy, s=22, alpha=0.75, color=color, label=f"{label} (r = {rg:.2f})")
        everything.append((x, y, gx, gy))
    for ax, (ix, iy), what in ((tasks_ax, (0, 1), "task in group"), (groups_ax, (2, 3), "group total")):
        xs = np.concatenate([e[ix] for e in everything]) if everything else np.zeros(0)
        ys = np.concatenate([e[iy] for e in everything]) if everything else np.zeros(0)
        if xs.size:
            lo, hi = 100 * min(xs.min(), ys.min()), 100 * max(xs.max(), ys.max())
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=0.9, ls="--", label="predicted = measured")
        ax.axhline(0, color="0.8", lw=0.7)
        ax.axvline(0, color="0.8", lw=0.7)
        ax.set(xlabel=f"measured gain, % ({what})", ylabel="predicted gain, %", title=f"per {what}")
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def selection_panels(selection: dict[str, Any]) -> list[str]:
    """The columns of ``selection.png``: active ETAP's choice first where the training groups were chosen
    actively (the summary's headline), ETAP's prediction-based choice, and the true optimum where measured."""
    active = any(entry.get("active") for entry in selection["budgets"])
    return (["active"] if active else []) + ["etap"] + (["optimum"] if selection.get("complete") else [])


def _plot_selection(data: dict[str, Any], path: Path) -> Path:
    from matplotlib.colors import TwoSlopeNorm

    sel = data["selection"]
    names = list(sel["task_names"])
    n = len(names)
    entries = sel["budgets"]
    parts = selection_panels(sel)
    cols = len(parts)
    heights = [max(len((e.get(part) or {}).get("groups", [])) for part in parts) + 1.6 for e in entries]
    fig = _figure(min(4.8 + 0.55 * n, 16) * cols / (1.3 if cols >= 2 else 1), 0.42 * sum(heights) + 1.2)
    axes = fig.subplots(len(entries), cols, squeeze=False, gridspec_kw={"height_ratios": heights})
    values = [v for e in entries for part in parts if e.get(part)
              for g in e[part]["member_gains"] for v in g.values() if v is not None]
    # a robust colour range: one very negative task must not wash out every other cell
    limit = float(np.percentile(np.abs(values), 90)) if values else 0.0
    limit = max(limit, 1e-6)
    norm = TwoSlopeNorm(vmin=-limit * 100, vcenter=0.0, vmax=limit * 100)
    image = None
    for row, entry in enumerate(entries):
        for col, part in enumerate(parts):
            ax = axes[row][col]
            rec = entry.get(part)
            if rec is None:
                ax.set_axis_off()
                continue
            k = len(rec["groups"])
            grid = np.full((k, n), np.nan)
            for g, (group, gains) in enumerate(zip(rec["groups"], rec["member_gains"])):
                for t in group:
                    value = gains.get(t)
                    grid[g, names.index(t)] = 100 * value if value is not None else 0.0
            image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", norm=norm, aspect="auto",
                              interpolation="nearest")
            for t, task in enumerate(names):
                serving = rec["served_by"].get(task)
                if serving in rec["groups"]:
                    ax.plot(t, rec["groups"].index(serving), "o", color="black", ms=3.5)
            if n <= 12:
                for g in range(k):
                    for t in range(n):
                        if np.isfinite(grid[g, t]) and len(rec["groups"][g]) > 1:
                            dark = abs(grid[g, t]) > 0.6 * limit * 100
                            ax.text(t + 0.28, g - 0.22, f"{grid[g, t]:+.0f}", ha="center", va="center",
                                    fontsize=6.5, color="white" if dark else "0.15")
            ax.set_xticks(range(n), labels=names, rotation=45 if max(map(len, names)) > 3 else 0, fontsize=8,
                          ha="right" if max(map(len, names)) > 3 else "center")
            ax.set_yticks(range(k), labels=[f"group {g + 1}" for g in range(k)], fontsize=8)
            ax.set_xticks(np.arange(-0.5, n), minor=True)
            ax.set_yticks(np.arange(-0.5, k), minor=True)
            ax.grid(which="minor", color="white", lw=1.5)
            ax.tick_params(which="minor", length=0)
            measured = rec["measured"]["mean_gain"]
            if part == "etap":
                title = f"budget {entry['budget']}: ETAP's choice\npredicted {_pct(rec['mean_gain'])}/task"
                title += f", measured {_pct(measured)}/task" if measured is not None else ", not all measured"
            else:
                what = "active ETAP's choice" if part == "active" else "true optimum"
                title = f"budget {entry['budget']}: {what} (measured)\nmeasured {_pct(rec['mean_gain'])}/task"
            ax.set_title(title, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, label="task's gain in the group, %\n(ETAP: predicted; "
                     + ("active ETAP, " if "active" in parts else "") + "optimum: measured)",
                     shrink=0.8, extend="both")
    return _save(fig, path)


def _plot_timings(data: dict[str, Any], path: Path) -> Path:
    rows = _timing_rows(data["timings"])
    fig = _figure(8, 0.45 * len(rows) + 1.2)
    ax = fig.subplots()
    labels = [r[0] for r in rows]
    secs = [r[1] for r in rows]
    colors = [{"stage": "#4c72b0", "part": "#9ecae1", "interrupted": "#dd8452"}[r[2]] for r in rows]
    ax.barh(range(len(rows)), secs, color=colors, hatch=["//" if r[2] == "interrupted" else "" for r in rows])
    ax.set_yticks(range(len(rows)), labels=labels)
    ax.invert_yaxis()
    for i, s in enumerate(secs):
        ax.text(s, i, f" {s:.1f}s", va="center", fontsize=8)
    ax.set_xlabel("seconds (wall time of the run that finished each stage)")
    ax.set_xlim(0, max(secs + [1.0]) * 1.18)
    return _save(fig, path)


def _colors(k: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


class _quiet:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------- text
def _pct(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:+.{digits}f}%"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _timing_rows(timings: dict[str, Any]) -> list[tuple[str, float, str]]:
    """``(label, seconds, kind)`` per bar: kind ``"stage"``, ``"part"`` (of the stage's time) or ``"interrupted"``
    (earlier runs of the stage, not in its time)."""
    rows = []
    for stage, t in timings.items():
        rows.append((stage, float(t["seconds"]), "stage"))
        for part, s in (t.get("parts") or {}).items():
            rows.append((f"  {part}", float(s), "part"))
        runs = int(t.get("interrupted_runs") or 0)
        if runs:
            rows.append((f"  + {runs} interrupted run{'s' if runs > 1 else ''} (not in the stage's time)",
                         float(t["interrupted_seconds"]), "interrupted"))
    return rows


def _interrupted_text(timing: dict[str, Any]) -> str:
    """``" (+ 41.0s in 2 interrupted runs)"`` for a stage finished after interruptions, else ``""``."""
    runs = int(timing.get("interrupted_runs") or 0)
    if not runs:
        return ""
    return f" (+ {float(timing['interrupted_seconds']):.1f}s in {runs} interrupted run{'s' if runs > 1 else ''})"


def time_limited(entry: dict[str, Any], n_tasks: int) -> list[tuple[str, float]]:
    """``(what, shortfall)`` for each selection of a budget's ``selection.json`` entry that stopped at the time
    limit: at most ``shortfall`` of mean gain per task below the best possible (its proven bound)."""
    out = []
    for key, what in (("active", "active ETAP's choice"), ("etap", "ETAP's selection"), ("optimum", "the true optimum")):
        record = entry.get(key)
        if record and record.get("optimal") is False and record.get("bound") is not None:
            out.append((what, (record["bound"] - record["objective"]) / n_tasks))
    return out


def _groups_text(groups: Sequence[Sequence[str]]) -> str:
    return "; ".join("{" + ", ".join(g) + "}" for g in groups)


def terminal_summary(run: RunDirectory) -> str:
    """The end-of-run summary: the chosen groups per budget with predicted and measured gains, time per stage."""
    data = _load(run)
    sel = data["selection"]
    n = len(sel["task_names"])
    chosen = " chosen by active ETAP" if data.get("search") else ""
    lines = [f"Summary of {run.path} ({data['config'].dataset}, {n} tasks, "
             f"{len(data['groups']['train'])} training groups{chosen}, {sel['n_candidates']} candidate groups)"]
    quality = prediction_quality(data)
    for key, label in (("train_cv", "training groups, leave-one-out"), ("heldout", "held-out groups")):
        if key in quality:
            q = quality[key]
            lines.append(f"  prediction vs measurement ({label}): Pearson r {q['task_pearson']:.2f} per task, "
                         f"{q['group_pearson']:.2f} per group ({int(q['n_groups'])} groups)")
            if key == "train_cv" and not (q["task_pearson"] > 0.3 and q["group_pearson"] > 0.3):  # NaN too
                which = "per task" if not q["task_pearson"] > 0.3 else "per group (the groups' totals)"
                lines.append(f"    caution: ETAP's predictions barely follow the measured gains of the training "
                             f"groups it was fitted on ({which}), so its choices below are a weak guess; more "
                             "training groups (--train-groups) or --sampling active (choices measured) help")
    lines.append("")
    lines.append("Gains are relative to single-task training (eq. 1), averaged over the tasks.")
    for entry in sel["budgets"]:
        etap = entry["etap"]
        active = entry.get("active")
        if active:
            m = active["measured"]
            gap = "" if entry.get("active_gap") is None else f"; gap to the optimum {_pct(entry['active_gap'] / n)}/task"
            lines.append(f"budget {entry['budget']}: active ETAP chooses {_groups_text(active['groups'])} (every "
                         f"group trained): measured {_pct(m['mean_gain'])}/task, total test loss "
                         f"{_num(m['total_test_loss'])}{gap}")
        lines.append(f"{'    ETAP predicting every group' if active else 'budget ' + str(entry['budget']) + ': ETAP'} "
                     f"chooses {_groups_text(etap['groups'])}")
        for what, short in time_limited(entry, n):
            lines.append(f"    note: {what} stopped at the selection time limit: not proven optimal, at most "
                         f"{_pct(short)}/task below the best possible")
        m = etap["measured"]
        if m["mean_gain"] is None:
            lines.append(f"    predicted {_pct(etap['mean_gain'])}/task (not every chosen group was trained, so no "
                         "measured total)")
        else:
            lines.append(f"    predicted {_pct(etap['mean_gain'])}/task, measured {_pct(m['mean_gain'])}/task, "
                         f"total test loss {_num(m['total_test_loss'])}")
        alone = [g[0] for g in etap["groups"] if len(g) == 1]
        for group, gains in zip(etap["groups"], etap["member_gains"]):
            if len(group) == 1:
                continue
            measured_row = _measured_member_gains(data["measured"], group)
            cells = ", ".join(f"{t} {_pct(gains.get(t), 1)}"
                              + (f" ({_pct(measured_row[t], 1)})" if measured_row else "") for t in group)
            lines.append(f"      {{{', '.join(group)}}}: {cells}")
        if alone:
            lines.append(f"      alone: {', '.join(alone)}")
        if entry.get("optimum"):
            opt = entry["optimum"]
            lines.append(f"    true optimum {_groups_text(opt['groups'])}: {_pct(opt['mean_gain'])}/task, "
                         f"total test loss {_num(opt['measured']['total_test_loss'])}; "
                         f"ETAP's gap {_pct(None if entry['gap'] is None else entry['gap'] / n)}/task")
    lines.append("    (member gains: predicted, measured in brackets where the group was trained)")
    if any(e.get("active") for e in sel["budgets"]):
        lines.append("    (actively chosen training groups are not a random sample: ETAP fitted on them predicts the "
                     "other groups with a bias; active ETAP's choice is measured)")
    everyone = sel["all_tasks"]
    lines.append(f"reference: all tasks in one network {_pct(everyone['mean_gain'])}/task, total test loss "
                 f"{_num(everyone['total_test_loss'])}; single-task total test loss {_num(sel['stl_total_test_loss'])}")
    lines.append("")
    total = sum(float(t["seconds"]) for t in data["timings"].values())
    lines.append("time per stage: " + ", ".join(f"{s} {float(t['seconds']):.1f}s" + _interrupted_text(t)
                                                for s, t in data["timings"].items())
                 + f" (total {total:.1f}s)")
    page = run.report_dir / "index.html"
    if not page.is_file():
        lines.append(f"report: not written yet (lightning-etap report --output {run.path})")
    elif run.stage_status("report", data["config"]) != "done":  # e.g. select redone alone: the page shows the old
        lines.append(f"report: {page} is out of date; `lightning-etap report --output {run.path}` rewrites it")
    else:
        lines.append(f"report: {page}")
    return "\n".join(lines)


def _measured_member_gains(measured, group: Sequence[str]) -> dict[str, float] | None:
    if len(group) < 2:
        return None
    names = list(measured.task_names)
    mask = np.zeros(len(names), dtype=bool)
    mask[[names.index(t) for t in group]] = True
    for r in range(len(measured)):
        if np.array_equal(measured.masks[r], mask):
            return {t: float(measured.gains[r, names.index(t)]) for t in group}
    return None


# ---------------------------------------------------------------------- html
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1150px;
       color: #1d2125; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.sub { color: #5f6b76; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d8dde2; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.good { color: #1a7f37; } .bad { color: #b42318; }
figure { margin: 1rem 0 1.6rem 0; } figure img { max-width: 100%; border: 1px solid #e5e8eb; }
figcaption { color: #5f6b76; font-size: 0.9rem; }
pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; }
.card { border: 1px solid #d8dde2; border-radius: 6px; padding: 0.6rem 1rem; min-width: 12rem; }
.card b { display: block; font-size: 1.3rem; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _signed_class(value: float | None) -> str:
    if value is None:
        return "num"
    return "num good" if value > 0 else "num bad" if value < 0 else "num"


def _img(path: Path, caption: str, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{_e(path.stem)}"><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{_e(caption)} <span class="file">({_e(path.name)})</span></figcaption></figure>')


def _trained_with(env: dict[str, Any] | None) -> str:
    """`` Trained with torch 2.13.0 (CPU kernels AVX512), lightning 2.6.0.`` from a stage's environment record."""
    if not env:
        return ""
    return (f" Trained with torch {env.get('torch', '?')} (CPU kernels {env.get('cpu_capability', '?')}), "
            f"lightning {env.get('lightning', '?')}.")


def _html(data: dict[str, Any], quality: dict[str, Any], pngs: dict[str, Path]) -> str:
    from lightning_etap import __version__

    cfg: PipelineConfig = data["config"]
    sel = data["selection"]
    names = list(sel["task_names"])
    n = len(names)
    measured = data["measured"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>lightning-etap report: {_e(cfg.dataset)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>Which tasks should train together? &mdash; {_e(cfg.dataset)}</h1>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class='sub'>{n} tasks ({_e(', '.join(names))}); ETAP fitted on "
                 f"{len(data['groups']['train'])} training groups (the all-task group included"
                 f"{'; the others chosen one at a time by active ETAP' if data.get('search') else ''}), seeds "
                 f"{_e(cfg.seeds)}; {sel['n_candidates']} candidate groups. lightning-etap {_e(__version__)}, {stamp}."
                 f"{_e(_trained_with(data.get('environment')))}</p>")

    if data.get("no_figures"):
        parts.append("<p class='sub'><b>This page has no figures</b>: they need matplotlib. Install it with "
                     "<code>pip install 'lightning-etap[plot]'</code> and rerun the same command (or "
                     f"<code>lightning-etap report --output {_e(data.get('run_path', ''))}</code>): the report "
                     "is then redone with its figures.</p>")

    # headline cards
    cards = []
    for key, label in (("train_cv", "training groups (leave-one-out)"), ("heldout", "held-out measured groups")):
        if key in quality:
            q = quality[key]
            cards.append(f"<div class='card'>Pearson r, {label}<b>{q['task_pearson']:.2f}</b>"
                         f"per task in group; {q['group_pearson']:.2f} per group ({int(q['n_groups'])} groups)</div>")
    total = sum(float(t["seconds"]) for t in data["timings"].values())
    earlier = sum(float(t.get("interrupted_seconds") or 0.0) for t in data["timings"].values())
    cards.append(f"<div class='card'>wall time<b>{total:.0f} s</b>the stages before this report, the runs that "
                 "finished them" + (f"; + {earlier:.0f} s in interrupted runs" if earlier else "") + "</div>")
    parts.append("<div class='cards'>" + "".join(cards) + "</div>")

    # the choice per budget
    parts.append("<h2>The chosen groups</h2>")
    parts.append("<p>Gains are relative to single-task training (eq. 1 of the paper), averaged over the "
                 f"{n} tasks; each task is taken from the chosen group that serves it best. "
                 + ("Every candidate group was trained once, so ETAP's choice is scored with measured gains and "
                    "compared with the true optimum." if sel["complete"] else
                    "Measured gains are shown where a chosen group happens to be a training group.") + "</p>")
    if any(e.get("active") for e in sel["budgets"]):
        parts.append("<p>Active ETAP chose the training groups (<code>sampling: active</code>): after the all-task "
                     "group, one at a time, the group whose measurement was expected to improve the best grouping "
                     "of trained groups most. Its choice per budget is that best grouping, every group of which is "
                     "trained, so its gains are measured. ETAP's choice below predicts every group from the training "
                     "groups, which are not a random sample here: its predictions of the other groups can be far off "
                     "(compare predicted and measured).</p>")
        head = ["budget", "active ETAP's groups", "measured gain/task", "total test loss"]
        if sel["complete"]:
            head.append("gap/task to the optimum")
        rows = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
        for entry in sel["budgets"]:
            m = entry["active"]["measured"]
            cells = [f"<td class='num'>{entry['budget']}</td>", f"<td>{_e(_groups_text(entry['active']['groups']))}</td>",
                     f"<td class='{_signed_class(m['mean_gain'])}'>{_pct(m['mean_gain'])}</td>",
                     f"<td class='num'>{_num(m['total_test_loss'])}</td>"]
            if sel["complete"]:
                cells.append(f"<td class='num'>{_pct(entry['active_gap'] / n)}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        parts.extend([*rows, "</table>"])
    head = ["budget", "ETAP's groups", "predicted gain/task", "measured gain/task", "total test loss"]
    if sel["complete"]:
        head += ["true optimum", "optimal gain/task", "optimal test loss", "gap/task"]
    rows = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for entry in sel["budgets"]:
        etap, m = entry["etap"], entry["etap"]["measured"]
        cells = [f"<td class='num'>{entry['budget']}</td>", f"<td>{_e(_groups_text(etap['groups']))}</td>",
                 f"<td class='{_signed_class(etap['mean_gain'])}'>{_pct(etap['mean_gain'])}</td>",
                 f"<td class='{_signed_class(m['mean_gain'])}'>{_pct(m['mean_gain'])}</td>",
                 f"<td class='num'>{_num(m['total_test_loss'])}</td>"]
        if sel["complete"]:
            opt = entry["optimum"]
            gap = None if entry["gap"] is None else entry["gap"] / n
            cells += [f"<td>{_e(_groups_text(opt['groups']))}</td>",
                      f"<td class='{_signed_class(opt['mean_gain'])}'>{_pct(opt['mean_gain'])}</td>",
                      f"<td class='num'>{_num(opt['measured']['total_test_loss'])}</td>",
                      f"<td class='num'>{_pct(gap)}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    parts.extend(rows)
    everyone = sel["all_tasks"]
    parts.append(f"<p>For reference: all tasks in one network {_pct(everyone['mean_gain'])}/task (total test loss "
                 f"{_num(everyone['total_test_loss'])}); every task alone: total test loss "
                 f"{_num(sel['stl_total_test_loss'])}.</p>")

    # per-group detail
    parts.append("<h3>Member gains of ETAP's groups</h3><table><tr><th>budget</th><th>group</th>"
                 "<th>task: predicted (measured)</th></tr>")
    for entry in sel["budgets"]:
        alone = [g[0] for g in entry["etap"]["groups"] if len(g) == 1]
        for group, gains in zip(entry["etap"]["groups"], entry["etap"]["member_gains"]):
            if len(group) == 1:
                continue
            meas = _measured_member_gains(measured, group)
            cells = ", ".join(f"{t}: {_pct(gains.get(t), 1)}" + (f" ({_pct(meas[t], 1)})" if meas else "")
                              for t in group)
            parts.append(f"<tr><td class='num'>{entry['budget']}</td><td>{_e(', '.join(group))}</td>"
                         f"<td>{_e(cells)}</td></tr>")
        if alone:
            parts.append(f"<tr><td class='num'>{entry['budget']}</td><td>{_e(', '.join(alone))}</td>"
                         "<td>each alone (single-task model, gain 0 by definition)</td></tr>")
    parts.append("</table>")
    if "selection" in pngs:
        parts.append(_img(pngs["selection"], FIGURES["selection"], "chosen groups per budget"))

    # affinity
    parts.append("<h2>Task affinity</h2>")
    aff = data["affinity"]
    if data.get("affinity_source"):
        parts.append(f"<p>Imported from <code>{_e(data['affinity_source'])}</code> (<code>affinity_from</code>): "
                     "measured in a training run of its own, not by this run's all-task fit.</p>")
    parts.append(f"<p>{aff.measured_steps} training steps measured ({aff.skipped_steps} skipped), method "
                 f"<code>{_e(aff.settings.get('method'))}</code>, reduction "
                 f"<code>{_e(aff.settings.get('reduction'))}</code>. Positive: the source task's update lowers "
                 "the target task's loss."
                 + ("" if aff.split_half is None else
                    f" Reproducibility: two halves of the measured steps rank the matrix's entries with Spearman "
                    f"{aff.split_half:.2f} (1: settled; near 0: noise)"
                    + ("" if aff.split_half_pairs is None else
                       f", and what is specific to each pair, beyond each task's own row and column effects, "
                       f"with {aff.split_half_pairs:.2f}")
                    + ".")
                 + "</p>")
    for key in ("affinity_heatmap", "affinity_curves"):
        if key in pngs:
            parts.append(_img(pngs[key], FIGURES[key], key.replace("_", " ")))

    # prediction
    parts.append("<h2>Predicted against measured gains</h2>")
    if quality:
        head = ["groups", "n", "Pearson (task)", "Spearman (task)", "R² (task)", "sign F1 (task)", "Pearson (group)"]
        parts.append("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
        for key, label in (("train_cv", "training, leave-one-out"), ("heldout", "held-out measured")):
            if key in quality:
                q = quality[key]
                parts.append(f"<tr><td>{label}</td><td class='num'>{int(q['n_groups'])}</td>"
                             + "".join(f"<td class='num'>{_num(q[k], 2)}</td>" for k in
                                       ("task_pearson", "task_spearman", "task_r2", "task_sign_f1", "group_pearson"))
                             + "</tr>")
        parts.append("</table>")
    if "predicted_vs_measured" in pngs:
        parts.append(_img(pngs["predicted_vs_measured"], FIGURES["predicted_vs_measured"], "predicted vs measured"))

    # single task vs all tasks
    stl = measured.stl_losses.get(-1)
    everyone_row = _measured_member_gains(measured, names)
    if stl is not None and everyone_row is not None:
        names_idx = {t: i for i, t in enumerate(measured.task_names)}
        all_row = [r for r in range(len(measured)) if measured.masks[r].all()]
        parts.append("<h3>Single-task against all-task training</h3><table><tr><th>task</th><th>single-task test "
                     "loss</th><th>all-task test loss</th><th>gain</th></tr>")
        for t in names:
            i = names_idx[t]
            loss = measured.test_losses[all_row[0], i] if all_row else math.nan
            parts.append(f"<tr><td>{_e(t)}</td><td class='num'>{_num(float(stl[i]))}</td><td class='num'>"
                         f"{_num(float(loss))}</td><td class='{_signed_class(everyone_row[t])}'>"
                         f"{_pct(everyone_row[t], 1)}</td></tr>")
        parts.append("</table>")
        if len(cfg.seeds) > 1:
            parts.append(f"<p class='sub'>Losses are means over the {len(cfg.seeds)} seeds; each gain is the mean "
                         "of the seeds' own gains (eq. 1 per seed), so it differs a little from the gain of the mean "
                         "losses.</p>")

    # timings
    parts.append("<h2>Time per stage</h2><table><tr><th>stage</th><th>seconds</th></tr>")
    for label, secs, kind in _timing_rows(data["timings"]):
        parts.append(f"<tr><td>{'&nbsp;&nbsp;&nbsp;' if kind != 'stage' else ''}{_e(label.strip())}</td>"
                     f"<td class='num'>{secs:.1f}</td></tr>")
    parts.append("</table>")
    if "timings" in pngs:
        parts.append(_img(pngs["timings"], FIGURES["timings"], "time per stage"))

    parts.append("<h2>Configuration</h2><pre>" + _e(cfg.to_yaml()) + "</pre>")
    parts.append("<p class='sub'>Files: <code>config.yaml</code>, <code>affinity/</code>, <code>gains.sqlite</code>, "
                 "<code>predictor.json</code>, <code>predictions.npz</code>, <code>selection.json</code>, "
                 "<code>timings.json</code>, and the PNG files beside this page.</p></body></html>")
    return "\n".join(parts)


def write_report(run: RunDirectory, config: PipelineConfig | None = None) -> dict[str, Path]:
    """Write ``report/index.html`` and the PNG figures of a run whose select stage is done.

    Returns:
        figure name -> PNG path.

    Without matplotlib (the ``plot`` extra) the page has every table and no figure, and says how to add them
    (:func:`has_figures`).
    """
    data = _load(run)
    if config is not None:
        data["config"] = config
    folder = run.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    quality = prediction_quality(data)
    if not has_figures():
        for old in folder.glob("*.png"):  # figures of an earlier report would not match this one
            old.unlink()
        data["no_figures"] = True
        atomic_write_text(folder / "index.html", _html(data, quality, {}))
        _write_quality(folder, quality)
        return {}
    from lightning_etap.affinity.dashboard import plot_affinity_heatmap

    pngs = {
        "affinity_heatmap": plot_affinity_heatmap(data["affinity"], None, folder / "affinity_heatmap.png",
                                                  title=f"{data['config'].dataset}: task affinity"),
        "affinity_curves": _plot_curves(data, folder / "affinity_curves.png"),
        "predicted_vs_measured": _plot_predictions(data, quality, folder / "predicted_vs_measured.png"),
        "selection": _plot_selection(data, folder / "selection.png"),
    }
    # the report's own time is not known yet: the timings figure shows the stages before it
    pngs["timings"] = _plot_timings(data, folder / "timings.png")
    atomic_write_text(folder / "index.html", _html(data, quality, pngs))
    _write_quality(folder, quality)
    return pngs


def has_figures() -> bool:
    """Whether the report can draw its figures (matplotlib, the ``plot`` extra, is installed)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _write_quality(folder: Path, quality: dict[str, Any]) -> None:
    atomic_write_text(folder / "quality.json", json.dumps(
        {k: {m: (None if not math.isfinite(v) else v) for m, v in q.items()} for k, q in quality.items()}, indent=1))
