"""The five stages of ``lightning-etap run``, each reading and writing one run directory.

1. ``affinity``: one all-task fit with the :class:`~lightning_etap.affinity.AffinityCallback`.
2. ``gains``: the all-task group and ``n_train_groups`` sampled groups (and, with
   ``measure_all``, every other candidate group) trained for ground truth into a
   resumable :class:`~lightning_etap.groundtruth.GainStore`.
3. ``predict``: :class:`~lightning_etap.predictors.ETAPPredictor` fitted on the
   training groups only; every candidate group predicted; the training groups'
   gains also predicted by leave-one-group-out refits (for the report).
4. ``select``: :func:`~lightning_etap.selection.select_groups` on the predicted
   gains for every budget; with every group measured, also on the measured
   gains (the true optimum), and ETAP's choice scored with the measured gains.
5. ``report``: ``report/index.html`` and its figures.

:class:`Pipeline` runs them; a stage that is up to date is skipped unless forced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback, Checkpoint
from typing_extensions import override

from lightning_etap._atomic import atomic_file, atomic_write_text
from lightning_etap.pipeline.components import Workspace, logger_record
from lightning_etap.pipeline.config import PipelineConfig
from lightning_etap.pipeline.errors import UserError
from lightning_etap.pipeline.report import _pct, time_limited
from lightning_etap.pipeline.rundir import STAGES, RunDirectory, changed_settings, comparable_inputs, upstream

__all__ = ["EpochProgress", "Pipeline", "cross_validated", "evaluate_selection"]


class Pipeline:
    """The stages of one run directory.

    Args:
        config: the config (resolved here: dataset, preset and output defaults filled in).
        progress: show progress bars (on stderr).
        out: where stage headers and the summary are printed.

    Example:
        >>> from lightning_etap.pipeline import Pipeline, PipelineConfig
        >>> cfg = PipelineConfig(dataset="digits", tasks=["digit_1", "digit_7", "digit_9"],
        ...                      recipe={"max_epochs": 2}, n_train_groups=2, executor="local")
        >>> pipeline = Pipeline(cfg)      # doctest: +SKIP
        >>> pipeline.run()                # doctest: +SKIP
    """

    def __init__(self, config: PipelineConfig, *, progress: bool = True, out: TextIO | None = None) -> None:
        self.config = config.resolved()
        self.dir = RunDirectory(self.config.output)
        self.workspace = Workspace(self.config, progress=progress)
        self.out = out if out is not None else sys.stdout
        self._opened = False
        self._imported = None  # the affinity_from result, read and checked before the stage's record is dropped

    # ------------------------------------------------------------------ driving
    def open(self) -> None:
        """Create (or check) the run directory and write the resolved ``config.yaml``.

        Raises:
            UserError: the directory is not writable, or it holds a run of another experiment.
        """
        if self._opened:
            return
        self.dir.prepare()
        self.dir.check_config(self.config)
        self.dir.save_config(self.config)
        self._opened = True

    def run(self, stages: Sequence[str] | None = None, *, force: bool = False) -> dict[str, str]:
        """Run ``stages`` (default: all, in order), skipping those up to date unless ``force``.

        Returns:
            stage -> ``"ran"`` or ``"skipped"``.
        """
        self.open()
        todo = list(STAGES) if stages is None else list(stages)
        # a missing package fails now, not after the stages before the one that needs it
        if "gains" in todo and (force or self.dir.stage_status("gains", self.config) != "done"):
            self.workspace.check_executor()
        if self._logs() and any(
                force or self.dir.stage_status(s, self.config) != "done" for s in todo if s in ("affinity", "report")):
            self.workspace.check_logger()
        status = {}
        for i, stage in enumerate(todo, 1):
            status[stage] = self.run_stage(stage, force=force, index=(i, len(todo)))
        return status

    def run_stage(self, stage: str, *, force: bool = False, index: tuple[int, int] | None = None) -> str:
        """Run one stage (its upstream stages must be up to date); ``"ran"`` or ``"skipped"``."""
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
        self.open()
        label = f"[{index[0]}/{index[1]}] {stage}" if index else stage
        status = self.dir.stage_status(stage, self.config)
        if status == "done" and not force:
            seconds = self.dir.stage_record(stage).get("seconds", math.nan)
            redo = f"`lightning-etap {stage} --force --output {self.dir.path}` redoes it"
            if stage == "gains":
                redo += ", training every group again"
            self._print(f"{label}: up to date ({seconds:.1f}s when it ran; {redo})")
            note = self._logger_note(label) if stage in ("affinity", "report") else None
            if note:  # a logger given after the fit: say so, not nothing
                self._print(note)
            return "skipped"
        self.dir.require(upstream(stage, self.config), self.config, stage)
        # a missing package is refused before the stage's record goes (and, for gains --force, its store): also for
        # a one-stage command and a stage that only became out of date during this run, which run() cannot foresee
        if stage == "gains":
            self.workspace.check_executor()
        if stage in ("affinity", "report") and self._logs():
            self.workspace.check_logger()
        if status == "stale" and not force:
            self._print(f"{label}: redoing ({self.dir.stale_reason(stage, self.config)})")
        self._imported = None
        if stage == "affinity" and self.config.affinity_from is not None:
            self._imported = self._read_import()  # a bad source fails here and changes nothing in the run directory
        # the old record goes before the stage touches its outputs: a redo that is interrupted must leave the
        # stage to do (it resumes from what it kept, e.g. the gain store), never "done" over half-replaced files
        self.dir.forget_stage(stage)
        if force:
            self.dir.drop_interrupted(stage)  # redone from scratch: earlier attempts are not part of this result
        start = time.perf_counter()
        try:
            parts, extra = getattr(self, f"_{stage}")(label, force)
        except BaseException:
            self.dir.record_interrupted(stage, self.config, time.perf_counter() - start)
            raise
        seconds = time.perf_counter() - start
        self.dir.record_stage(stage, self.config, seconds, parts, **extra)
        self._print(f"{label}: done in {seconds:.1f}s")
        return "ran"

    def _logs(self) -> bool:
        """Whether the config's logger is used: by the all-task fit and the report's figures sent to its run (an
        imported affinity, ``affinity_from``, has no fit and so no run to send them to)."""
        return self.config.logger != "none" and self.config.affinity_from is None

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ------------------------------------------------------------------ 1. affinity
    def _affinity(self, label: str, force: bool):
        from lightning_etap.affinity import AffinityCallback

        cfg, ws = self.config, self.workspace
        if cfg.affinity_from is not None:
            return self._import_affinity(label)
        names = list(ws.task_names)
        # the fit writes a checkpoint at the end of every epoch; one from an interrupted fit with the same inputs
        # is resumed (--force or other inputs delete it first)
        folder = self.dir.affinity_checkpoint_dir
        inputs = self.dir.stage_inputs("affinity", self.config)
        ckpt_path, done, dropped = _affinity_resume_point(folder, inputs, force)
        if dropped:
            self._print(f"{label}: {dropped}")
        self._print(f"{label}: all-task fit of {len(names)} tasks ({cfg.dataset}) with the AffinityCallback")
        if ckpt_path is not None:
            self._print(f"{label}: resuming the all-task fit from the end of epoch {done} ({folder})")
        # every step by default: the report repeats to the bit (the callback's own default, "auto", picks the
        # measured steps from timings); the reference models are small enough for it
        options = {"every_n_steps": 1, **cfg.affinity}
        try:
            callback = AffinityCallback(shared=cfg.shared, tasks=names, **options)
        except (TypeError, ValueError) as err:
            raise UserError(f"affinity: {err}") from None
        # a resumed fit goes on logging into the interrupted fit's W&B run / TensorBoard version (a CSV logger
        # would delete the earlier rows there: it starts a new version)
        logger = ws.logger(self.dir.path, resume=_resumed_logger(folder, cfg.logger) if ckpt_path else None)
        seed = cfg.seeds[0]
        # the random states first (restored before any other callback's epoch start); the checkpoint writer is a
        # Checkpoint callback, which Lightning calls last at the end of an epoch
        callbacks: list[Any] = [_RandomStates(), callback, _EpochCheckpoint(folder, inputs, logger_record(logger))]
        try:
            epochs = self._affinity_fit(callbacks, logger, seed, ckpt_path)
        except BaseException:  # an interrupted W&B run is closed as failed (the resumed fit reopens it)
            _close_logger(logger, failed=True)
            raise
        affinity = callback.result
        if _says_nothing(affinity.matrix):  # ETAP would fit on zeros: the run would end with a baseless grouping
            shutil.rmtree(folder, ignore_errors=True)  # a fixed module must start the fit again, not resume this one
            raise UserError(
                "affinity: the all-task fit measured no interaction between the tasks (every affinity is 0: each "
                "product of two tasks' gradients of the shared parameters was 0). Either the module's task_losses "
                f"are detached from the graph (.detach() / .item()), or shared={cfg.shared!r} names per-task "
                "parameters rather than the part every task's loss goes through; fix it and rerun")
        if self.dir.affinity_dir.exists():
            shutil.rmtree(self.dir.affinity_dir)
        affinity.save(self.dir.affinity_dir)
        shutil.rmtree(folder, ignore_errors=True)  # the result is saved: the checkpoint has served
        record = logger_record(logger)
        _close_logger(logger)
        r, pairs = affinity.split_half, affinity.split_half_pairs
        half = "" if r is None else f" (split-half Spearman {r:.2f}" + (
            "" if pairs is None else f", {pairs:.2f} beyond each task's own effects") + ")"
        self._print(f"    {affinity.measured_steps} steps measured over {epochs} epochs{half}; "
                    f"saved to {self.dir.affinity_dir}")
        return {}, {"logger": record, "epochs": epochs, "measured_steps": affinity.measured_steps,
                    "environment": environment()}

    def _read_import(self):
        """``affinity_from``'s result, checked, restricted to the run's tasks: ``(result, left_out, fingerprint)``."""
        from lightning_etap.affinity import AffinityResult
        from lightning_etap.pipeline.rundir import affinity_fingerprint

        source = Path(self.config.affinity_from)
        names = list(self.workspace.task_names)
        save = f"`affinity.result.save({str(source)!r})` after your fit"
        if not (source / "affinity.json").is_file():
            if not source.exists():
                what = "does not exist"
            elif source.is_file():
                what = "is a file; give the folder that holds affinity.json and affinity.npz"
            elif (source / "affinity" / "affinity.json").is_file():
                what = f"is a run directory; its affinity is {source / 'affinity'}"
            else:
                what = "holds no saved affinity result (no affinity.json)"
            raise UserError(f"affinity_from: {source} {what}; write one with {save}, or leave affinity_from out "
                            "to measure the affinity in an all-task fit here")
        read = affinity_fingerprint(source)  # what the stage records must be what was read (a save may be under way)
        try:
            result = AffinityResult.load(source)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"affinity_from: cannot read the affinity result in {source} ({err}); save it again "
                            f"with {save}") from None
        missing = [t for t in names if t not in result.task_names]
        if missing:
            raise UserError(f"affinity_from: the result in {source} has no affinity for task(s) {missing} (it "
                            f"measured {list(result.task_names)}); measure every task of this run, or list only "
                            "measured tasks under 'tasks'")
        left_out = [t for t in result.task_names if t not in names]
        result = result.subset(names)
        if _says_nothing(result.matrix):
            raise UserError(f"affinity_from: every affinity in {source} is 0 for this run's tasks, so ETAP has "
                            "nothing to fit (were the task losses detached, or `shared` the per-task heads?); "
                            "measure it again")
        unknown = [f"{names[i]}->{names[j]}" for i, j in zip(*np.nonzero(~np.isfinite(result.matrix)), strict=True)
                   if i != j]
        if unknown:
            raise UserError(f"affinity_from: the result in {source} has no finite affinity for "
                            f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''} (never measured: the two "
                            "tasks were never present in one measured step); ETAP needs every pair of the run's "
                            "tasks: measure them together, or leave one of each such pair out of 'tasks'")
        return result, left_out, read

    def _import_affinity(self, label: str):
        """The affinity stage with ``affinity_from``: the saved result's matrices of the run's tasks, no fit."""
        from lightning_etap.pipeline.rundir import affinity_fingerprint

        source = Path(self.config.affinity_from)
        names = list(self.workspace.task_names)
        result, left_out, read = self._imported or self._read_import()
        if self.dir.affinity_dir.exists():
            shutil.rmtree(self.dir.affinity_dir)
        result.save(self.dir.affinity_dir)
        if affinity_fingerprint(source) != read:  # the stage is recorded with the source's fingerprint from now
            raise UserError(f"affinity_from: the result in {source} was saved again while it was read; run the "
                            "command again once the save has finished")
        shutil.rmtree(self.dir.affinity_checkpoint_dir, ignore_errors=True)  # of an earlier fit: not needed now
        r = result.split_half
        half = "" if r is None else f", split-half Spearman {r:.2f}"
        dropped = f"; left out: {', '.join(left_out)}" if left_out else ""
        self._print(f"{label}: no all-task fit: the affinity of {len(names)} tasks imported from {source} "
                    f"({result.measured_steps} steps measured{half}{dropped}); saved to {self.dir.affinity_dir}")
        from lightning_etap.affinity.callback import SPLIT_HALF_WARN, WARN_MIN_TASKS

        if r is not None and r < SPLIT_HALF_WARN and len(names) >= WARN_MIN_TASKS:
            self._print(f"    warning: two halves of its measured steps rank these tasks' pairs with Spearman {r:.2f}, "
                        "so the ranking is mostly noise; measure it over a longer fit or larger batches")
        return {}, {"imported_from": str(source), "measured_steps": result.measured_steps, "left_out": left_out}

    def _affinity_fit(self, callbacks: list[Any], logger, seed: int, ckpt_path: Path | None) -> int:
        """The affinity stage's all-task fit (own module or reference model); the number of epochs it ran."""
        cfg, ws = self.config, self.workspace
        names = list(ws.task_names)
        if cfg.custom:
            from lightning_etap.groundtruth.trainers import _QUIET_TRAINER
            from lightning_etap.training import quiet_lightning, torch_threads

            model_factory, datamodule_factory = ws.factories()
            kwargs = {**_QUIET_TRAINER, **cfg.trainer, "logger": logger if logger is not None else False,
                      "enable_checkpointing": True}
            user_callbacks = list(kwargs.pop("callbacks", []))
            if ws.progress:
                callbacks.append(EpochProgress("affinity: all-task fit", kwargs.get("max_epochs")))
            # one torch thread, as in every ground-truth job (FactoryGroupTrainer's default): the matrix does not
            # depend on the machine's core count, and a loaded machine does not slow the fit down by oversubscription
            with torch_threads(1), quiet_lightning():
                L.seed_everything(seed, workers=True, verbose=False)
                model = model_factory(tuple(names))
                _check_shared(model, cfg.shared)
                datamodule = datamodule_factory(tuple(names), seed)
                trainer = L.Trainer(callbacks=[callbacks[0], *user_callbacks, *callbacks[1:]], **kwargs)
                if ckpt_path is None:
                    trainer.fit(model, datamodule=datamodule)
                else:  # our own file (it holds the numpy random state, which weights_only refuses)
                    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
            return int(trainer.current_epoch)
        from lightning_etap.training import train_group

        recipe = ws.train_config()
        if ws.progress:
            callbacks.append(EpochProgress("affinity: all-task fit", recipe.max_epochs))
        result = train_group(ws.dataset, names, recipe, seed, callbacks=callbacks,
                             logger=logger if logger is not None else False, ckpt_path=ckpt_path,
                             enable_checkpointing=True)
        return result.epochs

    # ------------------------------------------------------------------ 2. gains
    def _gains(self, label: str, force: bool):
        from lightning_etap.groundtruth import collect_gains
        from lightning_etap.groups import masks_to_groups

        cfg, ws = self.config, self.workspace
        names = ws.task_names
        train = ws.train_groups(names)
        measure = cfg.measures_all(len(names))
        if force and self.dir.store_path.is_file():
            self._print(f"{label}: --force: deleting the {_stored_trainings(self.dir.store_path)} in "
                        f"{self.dir.store_path} and training them again")
        if force:  # the write-ahead log and its index go first: a main file never outlives its log's removal
            for suffix in ("-wal", "-shm", ""):
                (self.dir.store_path.parent / (self.dir.store_path.name + suffix)).unlink(missing_ok=True)
        trainer = ws.group_trainer()
        executor = ws.executor()
        parts = {}
        extra: dict[str, Any] = {}

        def write_groups() -> list[tuple[str, ...]]:
            heldout: list[tuple[str, ...]] = []
            if measure:
                seen = set(train)
                heldout = [g for g in masks_to_groups(ws.candidates(names), names) if g not in seen]
            groups = {"task_names": list(names), "train": [list(g) for g in train],
                      "heldout": [list(g) for g in heldout], "measure_all": measure, "sampling": cfg.sampling}
            atomic_write_text(self.dir.groups_path, json.dumps(groups, indent=1))
            return heldout

        start = time.perf_counter()
        if cfg.sampling == "active":  # the groups are known once the search has chosen them
            self.dir.groups_path.unlink(missing_ok=True)
            train, extra["search"] = self._active_groups(label, names, len(train), trainer, executor)
            heldout = write_groups()
        else:
            heldout = write_groups()
            self._print(f"{label}: training groups: the all-task group + {len(train) - 1} sampled, "
                        f"{len(cfg.seeds)} seed(s), plus the single-task models ({executor!r})"
                        + self._already(train, names))
            collect_gains(trainer, train, cfg.seeds, store=self.dir.store_path, executor=executor,
                          progress=ws.progress, task_names=names)
        parts["training groups"] = time.perf_counter() - start
        if heldout:
            self._print(f"{label}: held-out groups: every other group ({len(heldout)}), to find the true optimum"
                        + self._already(heldout, names))
            start = time.perf_counter()
            collect_gains(trainer, heldout, cfg.seeds, store=self.dir.store_path, executor=executor,
                          progress=ws.progress, task_names=names)
            parts["held-out groups"] = time.perf_counter() - start
        return parts, {"n_train_groups": len(train), "n_heldout_groups": len(heldout), "environment": environment(),
                       **extra}

    def _already(self, groups: Sequence[Sequence[str]] | None, names: Sequence[str]) -> str:
        """``"; 12 of 18 group trainings already in the store ..."`` when a rerun finds some of these groups'
        trainings done (``groups`` ``None``: any group), else ``""``.

        Multi-task trainings only: the single-task models the training groups needed moments before in the
        same run are no news when the held-out groups start.
        """
        from lightning_etap.groundtruth import GainStore
        from lightning_etap.groundtruth.collect import plan_jobs

        if not self.dir.store_path.is_file():
            return ""
        jobs = None if groups is None else [j for j in plan_jobs(groups, self.config.seeds, names) if len(j[0]) > 1]
        try:
            with GainStore(self.dir.store_path, read_only=True) as store:
                found = store.done_jobs() if jobs is None else store.done_among(jobs)
        except Exception:  # noqa: BLE001  (a note only: collect_gains reports a damaged store itself)
            return ""
        seeds = {int(s) for s in self.config.seeds}
        done = sum(1 for group, seed in found if len(group) > 1 and int(seed) in seeds)
        if not done:
            return ""
        if jobs is None:
            return (f"; {done} group trainings of these seeds already in the store, not trained again (a resumed "
                    "search with the same seeds makes the same choices)")
        return f"; {done} of {len(jobs)} group trainings already in the store, not trained again"

    def _active_groups(self, label: str, names: Sequence[str], n_trainings: int, trainer, executor):
        """``sampling: active``: the training groups chosen one at a time by active ETAP (trained into the store)."""
        from lightning_etap.affinity import AffinityResult
        from lightning_etap.predictors import BayesianETAPPredictor
        from lightning_etap.search import active_etap_search

        cfg, ws = self.config, self.workspace
        with self.dir.reading(self.dir.affinity_dir):
            affinity = AffinityResult.load(self.dir.affinity_dir)
        if tuple(affinity.task_names) != tuple(names):
            raise UserError(f"the affinity was measured on tasks {list(affinity.task_names)} but the run's tasks are "
                            f"{list(names)}; redo the affinity stage with --force")
        budget = max(cfg.budgets)
        if budget == 1:
            self._print(f"{label}: note: with budget 1 the only grouping is the all-task group; no training "
                        "can change that answer (the groups are chosen for ETAP's predictions only)")
        self._print(f"{label}: training groups: the all-task group + {n_trainings - 1} chosen one at a time by "
                    f"active ETAP (expected improvement of the best measured grouping of <= {budget} groups), "
                    f"{len(cfg.seeds)} seed(s), plus the single-task models ({executor!r})"
                    + self._already(None, names))
        try:
            result = active_etap_search(
                trainer, n_trainings, predictor=BayesianETAPPredictor(affinity.matrix, task_names=list(names)),
                budget=budget, store=self.dir.store_path, seeds=cfg.seeds, executor=executor, objective="gain",
                candidates=ws.candidates(names), random_state=cfg.seeds[0], task_names=list(names),
                progress=ws.progress, singleton_gain=cfg.singleton_gain)
        except ValueError as err:
            raise UserError(f"active sampling: {err}") from None
        train = [tuple(g) for g in result.trained]
        record = {"strategy": result.strategy, "budget": budget, "groups": [list(g) for g in result.groups],
                  "rule": list(result.details.get("rule", [])),
                  "expected_improvement": [float(v) for v in result.details.get("expected_improvement", [])]}
        from lightning_etap.pipeline.report import _groups_text

        self._print(f"    best measured grouping of <= {budget} groups after {len(train)} trainings: "
                    f"{_groups_text(result.groups)}")
        return train, record

    # ------------------------------------------------------------------ 3. predict
    def _predict(self, label: str, force: bool):
        from lightning_etap.predictors import ETAPPredictor

        cfg = self.config
        affinity, names, groups, _ = self._load_inputs()
        train = self._measured(groups["train"])
        self._print(f"{label}: ETAP fitted on {len(train)} training groups, predicting every candidate group")
        try:
            predictor = ETAPPredictor(affinity.matrix, task_names=list(names), **cfg.predictor)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # fewer groups than CV folds: said in the docs
                predictor.fit(train.masks, train.gains)
        except (TypeError, ValueError) as err:
            raise UserError(f"predictor: {err}") from None
        try:
            predictor.save(self.dir.predictor_path)
        except NotImplementedError:
            self.dir.predictor_path.unlink(missing_ok=True)  # tree ensembles are refitted, never pickled
        candidates = self.workspace.candidates(names)
        predicted = predictor.predict(candidates)
        cv = cross_validated(predictor, train.masks, train.gains, progress=self.workspace.progress)
        # a relative gain (L_STL - L) / L_STL is at most 1 (a loss is >= 0): the predictors' linear stages can
        # extrapolate beyond it, and the selection would chase those impossible gains
        over = int(np.sum(predicted > 1.0))
        if over:
            self._print(f"{label}: {over} predicted member gains above +100% (impossible: a loss below 0) set to "
                        f"+100%; the largest was {_pct(float(np.nanmax(predicted)), 1)}")
        predicted, cv = np.minimum(predicted, 1.0), np.minimum(cv, 1.0)
        with atomic_file(self.dir.predictions_path) as f:
            np.savez(f, task_names=np.array(names), candidates=candidates, predicted=predicted,
                     train_masks=train.masks, train_measured=train.gains, train_cv=cv)
        return {}, {"n_candidates": int(candidates.shape[0])}

    # ------------------------------------------------------------------ 4. select
    def _select(self, label: str, force: bool):
        from lightning_etap.selection import select_groups

        cfg = self.config
        _, names, groups, predictions = self._load_inputs(predictions=True)
        candidates, predicted = predictions["candidates"], predictions["predicted"]
        measured = self._measured()
        complete = bool(groups["measure_all"])
        # actively chosen training groups are the search's answer: the best grouping of trained groups
        trained = self._measured(groups["train"]) if groups.get("sampling") == "active" else None
        self._print(f"{label}: budgets {cfg.budgets} over {len(candidates)} candidate groups"
                    + (" (predicted and measured)" if complete else " (predicted)"))
        results = []
        for budget in cfg.budgets:
            try:
                etap = select_groups(candidates, predicted, budget, singleton_gain=cfg.singleton_gain,
                                     task_names=names, time_limit=cfg.selection_time_limit)
            except ValueError as err:
                raise UserError(f"selection with budget {budget}: {err}") from None
            entry: dict[str, Any] = {
                "budget": budget,
                "etap": _selection_record(etap, candidates, predicted, names, cfg.singleton_gain),
            }
            entry["etap"]["measured"] = evaluate_selection(etap.masks, measured, cfg.singleton_gain)
            if trained is not None:
                chosen = select_groups(trained.masks, trained.gains, budget, singleton_gain=cfg.singleton_gain,
                                       task_names=names, time_limit=cfg.selection_time_limit)
                entry["active"] = _selection_record(chosen, trained.masks, trained.gains, names, cfg.singleton_gain)
                entry["active"]["measured"] = evaluate_selection(chosen.masks, measured, cfg.singleton_gain)
            if complete:
                best = select_groups(measured.masks, measured.gains, budget, singleton_gain=cfg.singleton_gain,
                                     task_names=names, time_limit=cfg.selection_time_limit)
                entry["optimum"] = _selection_record(best, measured.masks, measured.gains, names, cfg.singleton_gain)
                entry["optimum"]["measured"] = evaluate_selection(best.masks, measured, cfg.singleton_gain)
                got = entry["etap"]["measured"]["objective"]
                entry["gap"] = None if got is None else float(best.objective - got)
                if "active" in entry:
                    entry["active_gap"] = float(best.objective - entry["active"]["measured"]["objective"])
            for what, short in time_limited(entry, len(names)):
                self._print(f"{label}: budget {budget}: {what} stopped at the time limit "
                            f"({cfg.selection_time_limit:g}s, selection_time_limit): not proven optimal, at most "
                            f"{100 * short:.2f}%/task below the best possible")
            results.append(entry)
        stl = measured.stl_losses.get(-1)
        everyone = evaluate_selection(np.ones((1, len(names)), dtype=bool), measured, cfg.singleton_gain)
        payload = {
            "task_names": list(names),
            "singleton_gain": cfg.singleton_gain,
            "complete": complete,
            "n_candidates": int(len(candidates)),
            "stl_total_test_loss": None if stl is None or np.isnan(stl).any() else float(np.sum(stl)),
            "all_tasks": everyone,
            "budgets": results,
        }
        atomic_write_text(self.dir.selection_path, json.dumps(_json_ready(payload), indent=1))
        return {}, {}

    # ------------------------------------------------------------------ 5. report
    def _report(self, label: str, force: bool):
        from lightning_etap.pipeline.report import write_report

        self._print(f"{label}: writing {self.dir.report_dir / 'index.html'}")
        pngs = write_report(self.dir, self.config)
        if not pngs:
            self._print(f"{label}: no figures: they need matplotlib (pip install 'lightning-etap[plot]'); rerun "
                        "the command after installing it and the report is redone with them")
        note = self._logger_note(label)
        if note:
            self._print(note)
        self._log_figures(pngs)
        return {}, {}

    def _logger_note(self, label: str) -> str | None:
        """What the config's logger will not get (a logger given after the fit, or another one), else ``None``."""
        wanted = self.config.logger
        if wanted == "none":
            return None
        if not self._logs():
            return (f"{label}: logger {wanted!r}: nothing logged (with affinity_from there is no all-task fit whose "
                    "run the figures would join); the report is the record")
        record = self.dir.stage_record("affinity").get("logger") or {}
        if not record:
            return (f"{label}: logger {wanted!r}: nothing logged: the all-task fit ran without a logger, so there is "
                    "no run to add the figures to; `lightning-etap affinity --force` with this logger refits with it "
                    "(the report is the record meanwhile)")
        kinds = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger", "wandb": "wandb"}
        if record.get("kind") != kinds.get(wanted, wanted):
            where = ("the report's figures go to a new run without the fit's curves" if wanted in ("wandb", "tensorboard")
                     else "nothing more is logged")
            return (f"{label}: logger {wanted!r}: the all-task fit was logged with another logger "
                    f"({record.get('kind')}); {where}; `lightning-etap affinity --force` refits with this one")
        return None

    def _log_figures(self, pngs: dict[str, Any]) -> None:
        """Send the report's figures to the W&B run / TensorBoard version of the affinity fit."""
        record = self.dir.stage_record("affinity").get("logger") or {}
        if self.config.logger not in ("wandb", "tensorboard") or not record:
            return
        logger = self.workspace.logger(self.dir.path, resume=record)
        try:
            if self.config.logger == "wandb":
                import wandb

                with self.dir.reading(self.dir.selection_path):
                    selection = json.loads(self.dir.selection_path.read_text())
                logger.experiment.log({f"report/{name}": wandb.Image(str(path)) for name, path in pngs.items()})
                def text(groups) -> str | None:
                    return None if groups is None else "; ".join(" + ".join(g) for g in groups)

                rows = [[e["budget"], text(e["etap"]["groups"]), e["etap"]["objective"],
                         e["etap"]["measured"]["objective"], (e.get("optimum") or {}).get("objective"),
                         text((e.get("active") or {}).get("groups")),
                         ((e.get("active") or {}).get("measured") or {}).get("objective")]
                        for e in selection["budgets"]]
                table = wandb.Table(columns=["budget", "etap_groups", "predicted_gain", "measured_gain",
                                             "optimal_gain", "active_groups", "active_measured_gain"], data=rows)
                logger.experiment.log({"report/selection": table})
            else:
                from PIL import Image

                for step, (name, path) in enumerate(pngs.items()):
                    image = np.asarray(Image.open(path).convert("RGB"))
                    logger.experiment.add_image(f"report/{name}", image, step, dataformats="HWC")
        finally:
            _close_logger(logger)

    # ------------------------------------------------------------------ shared readers
    def _load_inputs(self, predictions: bool = False):
        from lightning_etap.affinity import AffinityResult

        with self.dir.reading(self.dir.affinity_dir):
            affinity = AffinityResult.load(self.dir.affinity_dir)
        with self.dir.reading(self.dir.groups_path):
            groups = json.loads(self.dir.groups_path.read_text())
        names = tuple(groups["task_names"])
        if tuple(affinity.task_names) != names:
            raise UserError(f"the affinity was measured on tasks {list(affinity.task_names)} but the groups "
                            f"are over {list(names)}; redo both stages with --force")
        loaded = None
        if predictions:
            with self.dir.reading(self.dir.predictions_path), \
                    np.load(self.dir.predictions_path, allow_pickle=False) as data:
                loaded = {k: data[k] for k in data.files}
        return affinity, names, groups, loaded

    def _measured(self, groups: Sequence[Sequence[str]] | None = None):
        """Measured gains (mean over the config's seeds) of ``groups``, or of every group finished for all of them."""
        return self.dir.measured(self.config.seeds, groups)

    # ------------------------------------------------------------------ summary
    def summary(self) -> str:
        """The terminal summary of a finished run: choices, gains, time per stage."""
        from lightning_etap.pipeline.report import terminal_summary

        return terminal_summary(self.dir)


# ---------------------------------------------------------------------- helpers
class EpochProgress(Callback):
    """One tqdm bar over the epochs of a fit (validation loss as postfix), on global rank zero.

    Args:
        desc: the bar's label.
        total: the epoch cap (``None`` or ``-1``: unknown).
    """

    def __init__(self, desc: str, total: int | None) -> None:
        self.desc = desc
        self.total = total if isinstance(total, int) and total > 0 else None
        self.bar = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from tqdm.auto import tqdm

        if trainer.is_global_zero:
            self.bar = tqdm(total=self.total, desc=self.desc, unit="epoch", file=sys.stderr, dynamic_ncols=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            value = trainer.callback_metrics.get("val_loss")
            if value is not None:
                self.bar.set_postfix(val_loss=f"{float(value):.4g}", refresh=False)
            self.bar.update(1)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


def environment() -> dict[str, str]:
    """What the numbers of a fit depend on besides the inputs: library versions and the CPU kernels torch uses
    (another kind of CPU rounds differently, and the training drifts apart; recorded with the stage). The
    ground-truth jobs of an executor on other machines may differ from this process's."""
    import platform

    import torch

    from lightning_etap import __version__

    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # pragma: no cover - older torch
        capability = "unknown"
    return {"lightning_etap": __version__, "torch": torch.__version__, "lightning": L.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_capability": capability}


def _close_logger(logger, failed: bool = False) -> None:
    if logger is None:
        return
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else None)
    else:
        logger.finalize("failed" if failed else "success")


def cross_validated(predictor, masks: np.ndarray, gains: np.ndarray, progress: bool = False) -> np.ndarray:
    """Leave-one-group-out predictions of the training groups (NaN where a refit is impossible).

    Each group's gains are predicted by a clone of ``predictor`` fitted on the
    other training groups, so the report can plot predicted against measured
    without the optimism of in-sample predictions.
    """
    from sklearn.base import clone
    from tqdm.auto import tqdm

    m = masks.shape[0]
    out = np.full(masks.shape, np.nan)
    if m < 3:
        return out
    rows = range(m)
    if progress:
        rows = tqdm(rows, desc="cross-validation", unit="fit", file=sys.stderr, dynamic_ncols=True, leave=False)
    for i in rows:
        keep = np.arange(m) != i
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = clone(predictor).fit(masks[keep], gains[keep])
            except ValueError:
                continue
        out[i] = model.predict(masks[i : i + 1])[0]
    return out


def _selection_record(selection, masks: np.ndarray, gains: np.ndarray, names: Sequence[str],
                      singleton_gain: float) -> dict[str, Any]:
    """The chosen groups of ``selection`` with the gains (from ``gains``) of their members."""
    rows = {masks[r].tobytes(): r for r in range(len(masks))}
    groups = []
    member_gains = []
    for mask, group in zip(selection.masks, selection.groups):
        r = rows.get(np.asarray(mask, dtype=bool).tobytes())
        if mask.sum() == 1:
            member_gains.append({t: float(singleton_gain) for t in group})
        elif r is None:
            member_gains.append({t: None for t in group})
        else:
            member_gains.append({t: float(gains[r, names.index(t)]) for t in group})
        groups.append(list(group))
    served = {names[t]: list(selection.groups[list(selection.chosen).index(int(c))])
              for t, c in enumerate(selection.served_by)}
    return {
        "groups": groups,
        "member_gains": member_gains,
        "objective": float(selection.objective),
        "mean_gain": float(selection.objective) / len(names),
        "task_gain": {names[t]: float(v) for t, v in enumerate(selection.task_gain)},
        "served_by": served,
        "optimal": bool(selection.optimal),
        "bound": float(selection.bound),  # proven upper bound of the objective (= objective when optimal)
        "method": selection.method,
        "seconds": float(selection.seconds),
    }


def evaluate_selection(chosen: np.ndarray, measured, singleton_gain: float = 0.0) -> dict[str, Any]:
    """Score chosen groups with *measured* gains: what training them would really give.

    Each task takes the chosen group that did best on it (as after training the
    networks and keeping the best head per task); a task alone gets
    ``singleton_gain`` and its single-task test loss.

    Args:
        chosen: ``(k, n)`` bool masks of the chosen groups.
        measured: :class:`~lightning_etap.groundtruth.GroupGains` averaged over seeds
            (``mean_over_seeds``).
        singleton_gain: the gain of a task trained alone.

    Returns:
        ``objective`` (sum over tasks of the best measured gain), ``mean_gain``,
        ``total_test_loss`` (sum over tasks of the best test loss), ``task_gain``,
        ``task_loss``, and ``measured`` (per chosen group: whether it was trained).
        ``objective`` and ``total_test_loss`` are ``None`` unless every chosen
        group with two or more tasks was measured.
    """
    names = list(measured.task_names)
    n = len(names)
    rows = {measured.masks[r].tobytes(): r for r in range(len(measured))}
    stl = measured.stl_losses.get(-1, np.full(n, np.nan))
    best_gain = np.full(n, -np.inf)
    best_loss = np.full(n, np.inf)
    known = []
    for mask in np.asarray(chosen, dtype=bool):
        cols = np.flatnonzero(mask)
        if len(cols) == 1:
            gain, loss = np.array([singleton_gain]), stl[cols]
            ok = True
        else:
            r = rows.get(mask.tobytes())
            ok = r is not None
            if not ok:
                known.append(False)
                continue
            gain, loss = measured.gains[r, cols], measured.test_losses[r, cols]
        known.append(ok)
        best_gain[cols] = np.maximum(best_gain[cols], gain)
        best_loss[cols] = np.minimum(best_loss[cols], loss)
    complete = all(known) and np.isfinite(best_gain).all()
    objective = float(best_gain.sum()) if complete else None
    loss_known = complete and np.isfinite(best_loss).all()
    return {
        "objective": objective,
        "mean_gain": None if objective is None else objective / n,
        "total_test_loss": float(best_loss.sum()) if loss_known else None,
        "task_gain": {names[t]: (float(v) if np.isfinite(v) else None) for t, v in enumerate(best_gain)},
        "task_loss": {names[t]: (float(v) if np.isfinite(v) else None) for t, v in enumerate(best_loss)},
        "measured": known,
    }


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _stored_trainings(path) -> str:
    """``"N stored trainings"`` of the gain store at ``path`` (for the message before --force deletes them)."""
    from lightning_etap.groundtruth import GainStore

    try:
        with GainStore(path, read_only=True) as store:
            done = store.counts().get("done", 0)
    except Exception:  # a damaged or locked store is deleted all the same; the count is only for the message
        return "stored trainings"
    return f"{done} stored training{'s' if done != 1 else ''}"


def _check_shared(model, shared: str) -> None:
    """Refuse a ``shared`` that names nothing trainable in ``model`` before the fit starts (one line, not a traceback)."""
    from lightning_etap.affinity.callback import _resolve_shared

    try:
        _resolve_shared(model, shared)
    except ValueError as err:
        raise UserError(f"config key 'shared': {err}") from None


# ---------------------------------------------------------------------- resuming the affinity fit
#: the file in the checkpoint folder that names the current checkpoint, with the stage inputs it was written for
_PROGRESS = "progress.json"


def _same_inputs(saved: Any, inputs: dict[str, Any]) -> bool:
    """Whether an affinity checkpoint's stored inputs are ``inputs`` (as stored: tuples are lists)."""
    return comparable_inputs("affinity", saved) == json.loads(json.dumps(inputs))


def _says_nothing(matrix: np.ndarray) -> bool:
    """Whether an affinity matrix is 0 (or unmeasured) at every off-diagonal entry."""
    off = matrix[~np.eye(len(matrix), dtype=bool)]
    return bool(off.size) and not np.any(np.isfinite(off) & (off != 0))


def _affinity_resume_point(folder: Path, inputs: dict[str, Any], force: bool) -> tuple[Path | None, int, str]:
    """The checkpoint of an interrupted affinity fit to resume from: ``(path, epochs it holds, message)``.

    ``path`` is ``None`` when there is none to resume: no folder, ``force``, a folder written for other inputs
    (other settings, another dataset, ...) or without a complete checkpoint. The folder is then deleted, and
    ``message`` says why when a checkpoint was dropped (else it is empty).
    """
    if not folder.exists():
        return None, 0, ""
    progress = _read_progress(folder)
    name, done = progress.get("checkpoint"), progress.get("epochs")
    complete = (isinstance(name, str) and Path(name).name == name and isinstance(done, int)
                and (folder / name).is_file())
    message = ""
    if complete and force:
        message = f"--force: deleting the checkpoint of an interrupted all-task fit (end of epoch {done})"
    elif complete and not _same_inputs(progress.get("inputs"), inputs):
        keys = changed_settings(comparable_inputs("affinity", progress.get("inputs")) or {},
                                json.loads(json.dumps(inputs)))
        what = f"other settings ({', '.join(keys)})" if keys else "other inputs"
        message = f"not resuming the checkpoint in {folder}: it was written with {what}; deleting it"
    elif complete:
        return folder / name, done, ""
    shutil.rmtree(folder, ignore_errors=True)
    return None, 0, message


def _read_progress(folder: Path) -> dict[str, Any]:
    """The progress file of an affinity checkpoint folder (empty when missing or unreadable)."""
    try:
        progress = json.loads((folder / _PROGRESS).read_text())
    except (OSError, ValueError):
        return {}
    return progress if isinstance(progress, dict) else {}


def _resumed_logger(folder: Path, kind: str) -> dict[str, Any] | None:
    """The logger record an interrupted fit left in ``folder``'s progress file, if a ``kind`` logger can reopen it."""
    record = _read_progress(folder).get("logger")
    reopens = {"wandb": "wandb", "tensorboard": "TensorBoardLogger"}.get(kind)
    return record if isinstance(record, dict) and reopens is not None and record.get("kind") == reopens else None


class _EpochCheckpoint(Checkpoint):
    """Write a checkpoint of the fit into ``folder`` at the end of every epoch, for an interrupted fit to resume.

    Epoch ``n`` (counted from 1) goes to ``epoch-n.ckpt`` through a temporary file renamed into place; then
    ``progress.json`` (also replaced atomically) names it, with the stage inputs ``inputs`` and the record of
    the fit's logger ``logger`` (for the resumed fit to log into the same run); then the previous
    checkpoint is deleted. A kill at any moment leaves ``progress.json`` naming a complete checkpoint.

    Being a :class:`~lightning.pytorch.callbacks.Checkpoint`, Lightning calls it after the module's and every
    other callback's ``on_train_epoch_end`` (as it does for ``ModelCheckpoint``), so the states it saves
    (early stopping, best weights, the affinity measurement) hold the whole epoch. Nothing is written when
    the fit is about to end (early stopping stopped it, or the epoch or step cap is reached): resuming such
    a checkpoint would end the fit without its end-of-training hooks, while replaying the last epoch from
    the checkpoint before gives the same numbers.
    """

    def __init__(self, folder: Path, inputs: dict[str, Any], logger: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.inputs = inputs
        self.logger = logger or {}

    @staticmethod
    def _last_epoch(trainer: L.Trainer) -> bool:
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        return bool(trainer.should_stop
                    or (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs)
                    or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._last_epoch(trainer):
            return
        done = trainer.current_epoch + 1
        name = f"epoch-{done}.ckpt"
        tmp = self.folder / f".{name}.tmp"
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # on every rank (it synchronises them); rank zero writes
        if trainer.is_global_zero:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.folder / name)
            atomic_write_text(self.folder / _PROGRESS, json.dumps(
                {"inputs": self.inputs, "epochs": done, "checkpoint": name, "logger": self.logger},
                indent=2, sort_keys=True))
            for old in self.folder.glob("*.ckpt"):
                if old.name != name:
                    old.unlink(missing_ok=True)
        trainer.strategy.barrier("affinity checkpoint")


class _RandomStates(Callback):
    """Keep the random states in the fit's checkpoint, so a resumed fit draws what the uninterrupted one drew.

    Lightning's checkpoints hold the model, optimizer, schedulers, loops and callback states, but not the
    global random generators (torch, CUDA, numpy, ``random``) that dropout, a shuffling ``DataLoader``
    without a generator and augmentations draw from, nor the generators a ``DataLoader`` was given. This
    callback saves them with the checkpoint and, in the resumed fit, puts them back at the start of its
    first epoch, then starts that epoch's training iterator again: in the uninterrupted fit the iterator of
    that epoch is created after the checkpoint (drawing its base seed), while a resumed fit creates it when
    it sets up the data, from generators not yet restored.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @staticmethod
    def _generators(trainer: L.Trainer | None) -> list[Any]:
        """The ``torch.Generator`` objects of the training dataloaders (loader, sampler, batch sampler's)."""
        import torch

        combined = getattr(getattr(trainer, "fit_loop", None), "_combined_loader", None)
        out: list[Any] = []
        for loader in getattr(combined, "flattened", None) or []:
            sampler = getattr(loader, "sampler", None)
            inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
            for owner in (loader, sampler, inner):
                gen = getattr(owner, "generator", None)
                if isinstance(gen, torch.Generator) and all(gen is not g for g in out):
                    out.append(gen)
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        import random

        import torch

        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global state itself)
        return {  # tensors and plain numbers only: loadable with weights_only
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": random.getstate(),
            "loaders": [g.get_state() for g in self._generators(self._trainer)],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        import random

        import torch

        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
        random.setstate(_as_tuples(state["python"]))
        generators = self._generators(trainer)
        if len(generators) == len(state["loaders"]):
            for gen, saved in zip(generators, state["loaders"], strict=True):
                gen.set_state(saved)
        else:
            warnings.warn(f"the resumed fit has {len(generators)} training-data generators, its checkpoint "
                          f"{len(state['loaders'])}: their states are not restored, so the batches may differ from "
                          "the uninterrupted fit's", RuntimeWarning, stacklevel=2)
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        if any(getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0
               for loader in getattr(combined, "flattened", None) or []):
            warnings.warn("the training DataLoader keeps persistent worker processes: in the resumed fit they start "
                          "from new seeds, so random draws made inside them (augmentations) differ from the "
                          "uninterrupted fit's, and so may its matrix; persistent_workers=False resumes exactly",
                          RuntimeWarning, stacklevel=2)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:  # this epoch's iterator, created again from the restored generators
            iter(fetcher)


def _as_tuples(value: Any) -> Any:
    """``random.getstate()`` as ``random.setstate`` wants it (a checkpoint may turn its tuples into lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
