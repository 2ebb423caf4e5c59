"""One folder per pipeline run: every stage reads its inputs from it and writes its results to it.

Layout::

    <run>/config.yaml          the resolved config (written by the first command)
    <run>/stages.json          which stages are done, with what inputs, and when
    <run>/timings.json         wall seconds of the run that finished every stage (and its parts), and
                               of its earlier interrupted runs
    <run>/affinity/            AffinityResult.save: affinity.json + affinity.npz (measured, or the
                               tasks of the result named by ``affinity_from``)
    <run>/affinity_checkpoint/ the affinity fit's checkpoint while it runs (resumed after an interruption)
    <run>/groups.json          the training groups and the held-out measured groups
    <run>/gains.sqlite         GainStore: one row per trained (group, seed), resumable
    <run>/predictor.json       ETAPPredictor.save
    <run>/predictions.npz      candidate groups, predicted gains, cross-validated training predictions
    <run>/selection.json       the chosen groups per budget, predicted and measured
    <run>/report/index.html    the report (figures embedded) and its PNG files
    <run>/logs/                the logger's files (CSV, TensorBoard, W&B)

A stage is *up to date* when ``stages.json`` records it as finished with the
same inputs it would use now: the config keys it reads and the tokens of the
stages it reads from. Each finished stage gets a fresh token, so redoing a
stage makes every stage after it out of date.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lightning_etap._atomic import atomic_write_text as _atomic_write_text
from lightning_etap.pipeline.config import IDENTITY_KEYS, PipelineConfig, read_yaml
from lightning_etap.pipeline.errors import UserError

__all__ = ["STAGES", "RunDirectory", "upstream"]

#: The stages, in order, with the stages each reads from.
STAGES: dict[str, tuple[str, ...]] = {
    "affinity": (),
    "gains": (),
    "predict": ("affinity", "gains"),
    "select": ("predict", "gains"),
    "report": ("affinity", "gains", "predict", "select"),
}

#: The config keys each stage's result depends on (besides its upstream stages).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "affinity": (*IDENTITY_KEYS, "seeds", "affinity_from"),  # the first seed only (comparable_inputs)
    "gains": (*IDENTITY_KEYS, "seeds", "n_train_groups", "sampling", "measure_all", "max_candidates"),
    "predict": ("predictor", "max_candidates"),
    "select": ("budgets", "singleton_gain", "selection_time_limit"),
    "report": (),
}


#: config keys added after the first release, with the value that means what the release did: a stage's
#: inputs name them only when they differ from it (stages finished before they existed stay up to date)
_LATER_KEYS = {"code_version": None, "affinity_from": None, "sampling": "random"}
#: The key of ``timings.json`` that holds the interrupted runs (wall seconds and inputs) of stages not finished since.
_INTERRUPTED = "unfinished"


def upstream(stage: str, config: PipelineConfig) -> tuple[str, ...]:
    """The stages ``stage`` reads from under ``config``: :data:`STAGES`, and the affinity for the gains
    stage when it chooses its training groups actively (``sampling: active``)."""
    if stage == "gains" and config.sampling == "active":
        return ("affinity",)
    return STAGES[stage]


def affinity_fingerprint(folder: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a saved affinity result's ``affinity.json`` (which records its arrays' SHA-256), or ``None``
    when it cannot be read: a result saved again makes the stage that imported it out of date."""
    try:
        return hashlib.sha256((Path(folder) / "affinity.json").read_bytes()).hexdigest()
    except OSError:
        return None


class RunDirectory:
    """The folder of one run (see the module documentation for its layout).

    Args:
        path: the folder; created by :meth:`prepare`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ paths
    config_path = property(lambda self: self.path / "config.yaml")
    state_path = property(lambda self: self.path / "stages.json")
    timings_path = property(lambda self: self.path / "timings.json")
    affinity_dir = property(lambda self: self.path / "affinity")
    affinity_checkpoint_dir = property(lambda self: self.path / "affinity_checkpoint")
    groups_path = property(lambda self: self.path / "groups.json")
    store_path = property(lambda self: self.path / "gains.sqlite")
    predictor_path = property(lambda self: self.path / "predictor.json")
    predictions_path = property(lambda self: self.path / "predictions.npz")
    selection_path = property(lambda self: self.path / "selection.json")
    report_dir = property(lambda self: self.path / "report")
    logs_dir = property(lambda self: self.path / "logs")

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    #: the stage that writes each file a stage reads (for the message when one is damaged)
    _WRITERS = {"affinity": "affinity", "groups.json": "gains", "gains.sqlite": "gains",
                "predictions.npz": "predict", "selection.json": "select"}

    def gains_seeds(self, config: PipelineConfig) -> list[int]:
        """The seeds the finished gains stage ran with (``config``'s while it has not finished): what
        ``selection.json`` was computed from, even when the config has other seeds since."""
        seeds = ((self.stage_record("gains").get("inputs") or {}).get("config") or {}).get("seeds")
        return [int(s) for s in seeds] if isinstance(seeds, list) and seeds else list(config.seeds)

    def measured(self, seeds: Sequence[int], groups: Sequence[Sequence[str]] | None = None):
        """Measured gains in the store, averaged over ``seeds``: of ``groups`` (each needs every seed), or of
        every group finished for every one of ``seeds`` (a group trained for some of them only, e.g. chosen by a
        search with other seeds, is left out rather than averaged over fewer seeds).

        Raises:
            UserError: the store cannot be read, or lacks a job of ``groups``.
        """
        from lightning_etap.groundtruth import GainStore, GroupGains

        # read-only: select and report never write the store; reading() names a damaged or unreadable file
        with self.reading(self.store_path), GainStore(self.store_path, read_only=True) as store:
            try:
                gains = GroupGains.from_store(store, groups=groups, seeds=seeds)
            except ValueError as err:  # the store is fine but lacks what this stage needs
                raise UserError(f"{err}: rerun the gains stage") from None
        if groups is None:
            wanted = {int(s) for s in seeds}
            found: dict[bytes, set[int]] = {}
            for row, seed in zip(gains.masks, gains.seeds):
                found.setdefault(row.tobytes(), set()).add(int(seed))
            keep = np.array([found[row.tobytes()] >= wanted for row in gains.masks], dtype=bool)
            if not keep.all():
                gains = GroupGains(gains.task_names, gains.masks[keep], gains.test_losses[keep], gains.gains[keep],
                                   gains.seeds[keep], gains.stl_losses)
        return gains.mean_over_seeds()

    @contextlib.contextmanager
    def reading(self, path: Path) -> Iterator[None]:
        """Turn a failure to load one of the run's files into a :class:`UserError` that names it and the fix.

        Wrap the loading call only. A missing file, or a damaged one (truncated
        JSON, a broken archive, a database SQLite calls malformed): the message
        names the file and the command that writes it again. A file that cannot
        be opened (permissions, a lock) is reported as such, with no advice to
        redo anything; other errors pass through.
        """
        stage = self._WRITERS.get(Path(path).name)
        redo = f"`lightning-etap {stage} --force --output {self.path}`" if stage else "the stage that writes it"
        try:
            yield
        except UserError:
            raise
        except FileNotFoundError as err:
            raise UserError(f"cannot read {path}: it is missing ({err.strerror}); write it again with {redo}") \
                from None
        except sqlite3.OperationalError as err:  # read-only, locked, I/O: the store itself may be fine
            raise UserError(f"cannot open {path}: {err}") from None
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror or err}; check its permissions") from None
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile, sqlite3.DatabaseError) as err:
            fix = f"write it again with {redo}"
            if stage == "gains":  # hours of training: recover before retraining
                fix = (f"restore a copy (GainStore.backup makes one) or try `sqlite3 {path} .recover`; {redo} "
                       "retrains every group")
            raise UserError(f"cannot read {path}: it is damaged ({type(err).__name__}: {err}); {fix}") from None

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Create the folder and check that it is writable.

        Raises:
            UserError: the folder cannot be created or written.
        """
        try:
            if self.path.exists() and not self.path.is_dir():
                raise UserError(f"output directory {self.path} is not writable: it is a file")
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-check-"):
                pass
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise UserError(f"output directory {self.path} is not writable: {reason}") from None

    def saved_config(self) -> dict[str, Any] | None:
        """The mapping in ``config.yaml``, or ``None`` when the run has none yet."""
        if not self.config_path.is_file():
            return None
        return read_yaml(self.config_path)

    def check_config(self, config: PipelineConfig) -> None:
        """Refuse to resume a run directory that was created for another experiment.

        Raises:
            UserError: a setting in :data:`IDENTITY_KEYS` differs from the saved one.
        """
        saved = self.saved_config()
        if saved is None:
            return
        if not isinstance(saved, dict) or "dataset" not in saved:
            raise UserError(f"{self.config_path} is empty or damaged (no dataset in it); delete it and rerun: it "
                            "is written again from this command's settings, and every stage whose inputs differ "
                            "is redone")
        old = PipelineConfig.from_dict(saved, f"{self.config_path}").identity()
        new = config.identity()
        diff = [k for k in IDENTITY_KEYS if old[k] != new[k]]
        computed = (self._state() or self.store_path.exists() or self.affinity_dir.exists()
                    or self.affinity_checkpoint_dir.exists())
        if diff and not computed:
            return  # nothing was computed with the saved settings (e.g. a first run that failed): they give way
        if diff:
            shown = "; ".join(_difference(k, old[k], new[k]) for k in diff[:4])
            raise UserError(f"run directory {self.path} was created with other settings ({shown}); give the "
                            "same settings (or none: the saved config.yaml is the base of every later command), "
                            "use another --output, or delete the directory to start over")

    def save_config(self, config: PipelineConfig) -> None:
        """Write ``config.yaml`` (atomically)."""
        header = "# lightning-etap run configuration (resolved); rerun with: lightning-etap run --output <this folder>\n"
        _atomic_write_text(self.config_path, header + config.to_yaml())

    # ------------------------------------------------------------------ stage records
    def _state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.state_path} ({err}); delete it to redo every stage") from None

    def stage_inputs(self, stage: str, config: PipelineConfig) -> dict[str, Any]:
        """What ``stage`` would read now: its config keys and the tokens of its upstream stages."""
        full = config.to_dict()
        state = self._state()
        inputs: dict[str, Any] = comparable_inputs(stage, {
            "config": {k: full[k] for k in STAGE_KEYS[stage] if not (k in _LATER_KEYS and full[k] == _LATER_KEYS[k])},
            "upstream": {s: state.get(s, {}).get("token") for s in upstream(stage, config)},
        })
        if stage == "gains" and config.sampling == "active":  # the search's choices follow these too
            inputs["active"] = {"budget": max(config.budgets), "singleton_gain": config.singleton_gain}
        if stage == "report":
            from lightning_etap.pipeline.report import has_figures

            done = (state.get("report") or {}).get("inputs")
            # a report without figures is redone once matplotlib is installed; one with figures stays up to date
            # without it (redoing it would only drop them): it is redone, without, when its other inputs change
            if not has_figures() and (done is None or done.get("figures") is False):
                inputs["figures"] = False
        if stage == "affinity" and config.affinity_from is not None:
            source = affinity_fingerprint(config.affinity_from)
            done = (state.get("affinity") or {}).get("inputs") or {}
            if source is None and (done.get("config") or {}).get("affinity_from") == config.affinity_from:
                # the folder is gone or unreadable (deleted, moved, the run copied to another machine): the copy
                # this run imported from it stands
                source = done.get("source")
            inputs["source"] = source
        return inputs

    def stage_status(self, stage: str, config: PipelineConfig) -> str:
        """``"done"`` (up to date), ``"stale"`` (finished with other inputs) or ``"missing"``."""
        record = self._state().get(stage)
        if not record or not record.get("token"):
            return "missing"
        return "done" if comparable_inputs(stage, record.get("inputs")) == self.stage_inputs(stage, config) else "stale"

    def stale_reason(self, stage: str, config: PipelineConfig) -> str:
        """Which inputs of ``stage`` changed since it finished (for messages)."""
        record = self._state().get(stage) or {}
        old = comparable_inputs(stage, record.get("inputs")) or {"config": {}, "upstream": {}}
        new = self.stage_inputs(stage, config)
        keys = changed_settings(old, new)
        if stage == "affinity" and "affinity_from" in keys:  # an import names no seed: the switch says it all
            keys = [k for k in keys if k != "seeds"]
        # an upstream stage newly read (sampling switched to active) was not redone: the config change says it
        ups = [s for s in new["upstream"] if s in old["upstream"] and old["upstream"][s] != new["upstream"][s]]
        parts = ([f"config {', '.join(keys)}"] if keys else []) + ([f"stage {', '.join(ups)} redone"] if ups else [])
        if "affinity_from" not in keys and old.get("source") != new.get("source"):
            parts.append(f"the result in affinity_from {config.affinity_from} was saved again")
        if old.get("active") and new.get("active") and old["active"] != new["active"]:
            changed = [k for k in new["active"] if old["active"].get(k) != new["active"][k]]
            parts.append("active sampling's " + ", ".join("largest budget" if k == "budget" else k for k in changed))
        if old.get("figures") is False and "figures" not in new:
            parts.append("matplotlib is installed now: the figures")
        return "; ".join(parts) or "inputs changed"

    def record_stage(self, stage: str, config: PipelineConfig, seconds: float,
                     parts: dict[str, float] | None = None, **extra: Any) -> None:
        """Mark ``stage`` finished (new token) and store its wall time."""
        state = self._state()
        inputs = self.stage_inputs(stage, config)
        state[stage] = {
            "token": uuid.uuid4().hex,
            "inputs": inputs,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": float(seconds),
            **extra,
        }
        _atomic_write_text(self.state_path, json.dumps(state, indent=2, sort_keys=True))
        data = self._timings_file()
        # earlier runs count when they worked for the same inputs (their work was resumed): not those of other
        # settings, e.g. a fit interrupted with another first seed whose checkpoint was then deleted
        same = json.loads(json.dumps(inputs))
        earlier = [r["seconds"] for r in data.get(_INTERRUPTED, {}).pop(stage, [])
                   if comparable_inputs(stage, r.get("inputs")) == same]
        entry = {"seconds": float(seconds), "parts": dict(parts or {})}
        if earlier:
            entry["interrupted_runs"] = len(earlier)
            entry["interrupted_seconds"] = float(sum(earlier))
        timings = {s: entry if s == stage else data[s] for s in STAGES if s == stage or s in data}
        if data.get(_INTERRUPTED):
            timings[_INTERRUPTED] = data[_INTERRUPTED]
        _atomic_write_text(self.timings_path, json.dumps(timings, indent=2))

    def record_interrupted(self, stage: str, config: PipelineConfig, seconds: float) -> None:
        """Keep the wall time of a run of ``stage`` that stopped before finishing, with its inputs (what it did
        is kept, e.g. in the gain store, so the run that finishes it with the same inputs counts it too). Runs
        under a second are not kept."""
        if seconds < 1.0:
            return
        try:
            data = self._timings_file()
            inputs = json.loads(json.dumps(self.stage_inputs(stage, config)))
            data.setdefault(_INTERRUPTED, {}).setdefault(stage, []).append({"seconds": float(seconds),
                                                                            "inputs": inputs})
            _atomic_write_text(self.timings_path, json.dumps(data, indent=2))
        except Exception:  # noqa: BLE001  (a note only: never hide the error that stopped the stage)
            pass

    def drop_interrupted(self, stage: str) -> None:
        """Forget the interrupted runs of ``stage`` (it is redone from scratch)."""
        data = self._timings_file()
        if stage in data.get(_INTERRUPTED, {}):
            del data[_INTERRUPTED][stage]
            if not data[_INTERRUPTED]:
                del data[_INTERRUPTED]
            _atomic_write_text(self.timings_path, json.dumps(data, indent=2))

    def _timings_file(self) -> dict[str, Any]:
        """``timings.json`` as stored; an ``unfinished`` part that is not as this version writes it is dropped."""
        if not self.timings_path.is_file():
            return {}
        try:
            data = json.loads(self.timings_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        runs = data.get(_INTERRUPTED)
        if runs is not None:
            ok = isinstance(runs, dict) and all(
                isinstance(v, list) and all(isinstance(r, dict) and isinstance(r.get("seconds"), (int, float))
                                            for r in v) for v in runs.values())
            if not ok:
                del data[_INTERRUPTED]
        return data

    def stage_record(self, stage: str) -> dict[str, Any]:
        """The stored record of ``stage`` (empty when it never finished)."""
        return dict(self._state().get(stage) or {})

    def forget_stage(self, stage: str) -> None:
        """Drop the record of ``stage`` (it and every stage after it become out of date)."""
        state = self._state()
        if stage in state:
            del state[stage]
            _atomic_write_text(self.state_path, json.dumps(state, indent=2, sort_keys=True))

    def timings(self) -> dict[str, Any]:
        """``timings.json``: stage -> ``{"seconds": s, "parts": {part: s}}``, in stage order.

        ``seconds`` is the run that finished the stage; when earlier runs of it were interrupted (Ctrl-C, a
        crash, SIGTERM) and it resumed from what they kept, ``interrupted_runs`` and ``interrupted_seconds``
        count them too.
        """
        data = self._timings_file()
        return {s: data[s] for s in STAGES if s in data}

    def require(self, stages: Sequence[str], config: PipelineConfig, for_stage: str) -> None:
        """Raise unless every stage in ``stages`` is up to date.

        Raises:
            UserError: naming the first stage to (re)run, and the command that does it.
        """
        for stage in stages:
            status = self.stage_status(stage, config)
            if status == "done":
                continue
            what = "has not run" if status == "missing" else f"is out of date ({self.stale_reason(stage, config)})"
            raise UserError(f"the {stage} stage {what}; {for_stage} needs it: run "
                            f"`lightning-etap {stage} --output {self.path}` (or `lightning-etap run`) first")


def _difference(key: str, old: Any, new: Any) -> str:
    """``key: old there, new now``; for mappings only the entries that differ (``recipe.max_epochs: ...``)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{key}: {old!r} there, {new!r} now"

    def shown(values: dict, k: str) -> str:
        return repr(values[k]) if k in values else "unset"

    changed = [k for k in sorted(set(old) | set(new), key=str) if shown(old, k) != shown(new, k)]
    return "; ".join(f"{key}.{k}: {shown(old, k)} there, {shown(new, k)} now" for k in changed)


def comparable_inputs(stage: str, inputs: Any) -> Any:
    """A stage's inputs (:meth:`RunDirectory.stage_inputs`, or as stored) in the form they are compared in.

    The all-task fit reads only the first of the seeds: seeds added to (or removed from) a run after it do not
    redo it, whether its inputs were stored with every seed (earlier versions) or with the first only; an
    imported affinity (``affinity_from``) reads none.
    """
    if stage == "affinity" and isinstance(inputs, dict):
        config = inputs.get("config")
        if isinstance(config, dict) and "seeds" in config:
            if config.get("affinity_from") is not None:  # an imported result: no fit, no seed
                return {**inputs, "config": {k: v for k, v in config.items() if k != "seeds"}}
            if isinstance(config["seeds"], (list, tuple)):
                return {**inputs, "config": {**config, "seeds": list(config["seeds"])[:1]}}
    return inputs


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The config keys whose values differ between two :meth:`RunDirectory.stage_inputs` (``old`` as stored)."""
    stored = (old.get("config") if isinstance(old, dict) else None) or {}
    # a key only the stored inputs name: a later key set back to its default (e.g. affinity_from removed)
    keys = [*new["config"], *(k for k in stored if k not in new["config"])]
    return [k for k in keys if stored.get(k) != new["config"].get(k)]
