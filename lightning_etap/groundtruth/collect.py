"""Train the STL models and the sampled groups, and write every result to the store.

:func:`collect_gains` is resumable (a re-run trains only what the store does
not have yet), survives failing jobs (recorded with their error text, retried,
while the others go on) and runs on any executor. It is the only writer in
its process: executors only train and hand results back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_etap.groundtruth.base import GroupOutcome, GroupTrainer
from lightning_etap.groundtruth.executors import ChunkResult, Executor, InProcessExecutor
from lightning_etap.groundtruth.gains import GroupGains
from lightning_etap.groundtruth.sampling import canonical_group, check_seeds, group_key
from lightning_etap.groundtruth.store import FingerprintMismatchError, GainStore

__all__ = ["CollectionError", "collect_gains", "plan_jobs"]

logger = logging.getLogger("lightning_etap.groundtruth")

Job = tuple[tuple[str, ...], int]


class CollectionError(RuntimeError):
    """Some jobs still failed after their retries; everything else is in the store.

    Attributes:
        failed: ``(group, seed) -> error text`` of the jobs that failed.
    """

    def __init__(self, message: str, failed: dict[Job, str]) -> None:
        super().__init__(message)
        self.failed = failed


def plan_jobs(groups: Iterable[Sequence[str]], seeds: Iterable[int], task_names: Sequence[str]) -> list[Job]:
    """Every job a collection needs, in training order.

    First the single-task (STL) run of every task that appears in a group,
    for every seed, then the groups, for every seed. Groups are put in
    canonical form and deduplicated; a one-task group is its STL job.
    """
    names = [str(t) for t in task_names]
    seed_list = check_seeds(seeds)
    canon = list(dict.fromkeys(canonical_group(g, names) for g in groups))
    if not canon:
        raise ValueError("groups is empty: nothing to train")
    members = {t for g in canon for t in g}
    singles = [(t,) for t in names if t in members]
    multi = [g for g in canon if len(g) > 1]
    return [(g, s) for s in seed_list for g in singles] + [(g, s) for s in seed_list for g in multi]


def _resolve_task_names(trainer: Any, task_names: Sequence[str] | None, store: GainStore | None) -> list[str]:
    if task_names is not None:
        return [str(t) for t in task_names]
    names = getattr(trainer, "task_names", None)
    if names is None and store is not None:
        names = store.task_names
    if names is None:
        raise ValueError(
            "the task order is unknown: pass task_names=[...] (the dataset's task names) or use a trainer "
            "with a task_names attribute"
        )
    return [str(t) for t in names]


def _chunks(jobs: list[Job], size: int) -> list[list[Job]]:
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="job", desc="ground truth", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


@contextlib.contextmanager
def _closing(results: Iterable[ChunkResult]):
    """Close a generator of results when the loop over it ends, however it ends."""
    try:
        yield results
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _check_outcome(outcome: GroupOutcome, names: Sequence[str]) -> str | None:
    missing = [t for t in outcome.group if t not in outcome.test_losses]
    if missing:
        return f"the trainer returned no test loss for {missing}"
    for t in outcome.group:
        value = outcome.test_losses[t]
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            float(value)
        except (TypeError, ValueError):
            return (f"the trainer returned test loss {value!r} ({type(value).__name__}) for {t!r}: test losses "
                    "must be numbers (a float, or a scalar numpy value or tensor)")
    bad = {t: outcome.test_losses[t] for t in outcome.group if not math.isfinite(float(outcome.test_losses[t]))}
    if bad:
        return f"the trainer returned non-finite test losses {bad} (diverged training?)"
    return None


def collect_gains(
    trainer: GroupTrainer,
    groups: Iterable[Sequence[str]],
    seeds: Iterable[int] = (0,),
    store: GainStore | str | os.PathLike = "gains.sqlite",
    executor: Executor | None = None,
    *,
    retries: int = 1,
    chunk_size: int = 1,
    progress: bool = True,
    task_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> GroupGains:
    """Train every needed job not yet in the store, then return the groups' gains.

    The jobs are the single-task run of every member task and every group,
    each for every seed (:func:`plan_jobs`). Jobs the store already has as
    done are skipped, so an interrupted collection continues where it
    stopped. Each finished job is committed on its own as soon as it comes
    back. Several collectors on one machine may work on the same store at
    once (a job that two of them finish is kept once), but they do not divide
    the work: give each a share of ``groups`` (e.g. ``groups[k::n]``) or its
    own seeds. On Ctrl-C, results that have come back are stored and running
    jobs are stopped, not waited for.

    Args:
        trainer: a :class:`~lightning_etap.groundtruth.GroupTrainer`, e.g.
            :class:`~lightning_etap.groundtruth.LightningGroupTrainer`.
        groups: the groups to train (sequences of task names; see
            :func:`~lightning_etap.groundtruth.sample_groups`).
        seeds: training seeds; gains compare a group with the STL run of the same seed.
        store: a :class:`GainStore` or the path of its SQLite file. A store
            opened from a path is closed when this returns or raises, so the
            file alone then holds every row; a ``GainStore`` you pass stays
            open (call its ``close()``).
        executor: where to train (default :class:`InProcessExecutor`).
        retries: how many times this run retries a job that raised.
        chunk_size: jobs per ``trainer.train`` call (large for a batched trainer
            that trains many groups at once). A chunk that raises is split and
            its jobs retried one at a time, so one bad group fails alone.
        progress: show a progress bar (jobs done / total, rate, ETA) on stderr.
            Every finished job is also logged (logger ``"lightning_etap.groundtruth"``, INFO).
        task_names: the dataset's task order (default: ``trainer.task_names``).
        overwrite: with a store path, replace a store of a different fingerprint.

    Returns:
        :class:`~lightning_etap.groundtruth.GroupGains` of the multi-task
        groups in ``groups``, every seed.

    Raises:
        CollectionError: some jobs still failed after ``retries`` retries; the
            others are stored, and a re-run retries only the failed ones.
        FingerprintMismatchError: the store belongs to another experiment.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    existing = store if isinstance(store, GainStore) else None
    names = _resolve_task_names(trainer, task_names, existing)
    if isinstance(groups, str):
        raise ValueError(f"groups must be a list of groups (each a sequence of task names), not the string {groups!r}")
    groups = list(groups)
    seeds = check_seeds(seeds)
    jobs = plan_jobs(groups, seeds, names)
    fingerprint = trainer.fingerprint()
    if existing is None:
        store = GainStore(store, fingerprint, task_names=names, overwrite=overwrite)
        try:
            return _collect(trainer, store, jobs, seeds, names, executor, retries, chunk_size, progress)
        finally:
            store.close()  # folds the write-ahead log into the file: the one file then holds every row
    store.claim(fingerprint, task_names=names, overwrite=overwrite)
    return _collect(trainer, store, jobs, seeds, names, executor, retries, chunk_size, progress)


def _collect(trainer: GroupTrainer, store: GainStore, jobs: list[Job], seeds: list[int], names: list[str],
             executor: Executor | None, retries: int, chunk_size: int, progress: bool) -> GroupGains:
    executor = executor or InProcessExecutor()

    done = store.done_jobs()
    todo = [j for j in jobs if j not in done]
    logger.info("%d of %d jobs already in %s; training %d with %r", len(jobs) - len(todo), len(jobs),
                store.path, len(todo), executor)
    bar = _progress(len(jobs), len(jobs) - len(todo), progress and bool(todo))
    attempts: dict[Job, int] = {}
    failed: dict[Job, str] = {}
    start = time.perf_counter()
    trained = 0

    def fail(job: Job, error: str, retry: list[Job]) -> None:
        total = store.record_failure(job[0], job[1], error)
        if total == 0:  # finished meanwhile by another collector
            if bar is not None:
                bar.update(1)
            return
        attempts[job] = attempts.get(job, 0) + 1
        last = error.strip().splitlines()[-1] if error.strip() else "?"
        if attempts[job] <= retries:
            logger.warning("failed %s seed %d (attempt %d, will retry): %s", group_key(job[0]), job[1],
                           attempts[job], last)
            retry.append(job)
        else:
            logger.error("failed %s seed %d (attempt %d, giving up): %s", group_key(job[0]), job[1],
                         attempts[job], last)
            failed[job] = error

    def stream(chunks: list[list[Job]]):
        # Read lazily by the executor: jobs another collector finished meanwhile are skipped.
        for chunk in chunks:
            finished = store.done_among(chunk)
            if finished:
                logger.info("skipping %d job(s) finished meanwhile by another collector", len(finished))
                if bar is not None:
                    bar.update(len(finished))
            chunk = [j for j in chunk if j not in finished]
            if chunk:
                yield chunk

    first_round = True
    try:
        while todo:
            chunks = _chunks(todo, chunk_size) if first_round else [[j] for j in todo]
            first_round = False
            retry: list[Job] = []
            result: ChunkResult
            # Closed explicitly (not left to garbage collection): an executor stops its running jobs then.
            with _closing(executor.run(trainer, stream(chunks))) as results:
                for result in results:
                    if not result.ok:
                        if len(result.jobs) > 1:
                            logger.warning("a chunk of %d jobs raised; retrying its jobs one at a time: %s",
                                           len(result.jobs), result.error.strip().splitlines()[-1])
                            retry.extend(result.jobs)
                        else:
                            fail(result.jobs[0], result.error, retry)
                        continue
                    wanted = set(result.jobs)
                    for outcome in result.outcomes:
                        try:
                            job = (canonical_group(outcome.group, names), int(outcome.seed))
                        except ValueError as e:
                            logger.warning("ignoring an outcome for an unknown group: %s", e)
                            continue
                        if job not in wanted:
                            logger.warning("ignoring an outcome for %s seed %d, which was not asked for",
                                           group_key(job[0]), job[1])
                            continue
                        wanted.discard(job)
                        if job[0] != tuple(outcome.group):
                            outcome = GroupOutcome(job[0], job[1], outcome.test_losses, outcome.epochs,
                                                   outcome.best_epoch, outcome.seconds, outcome.extra)
                        problem = _check_outcome(outcome, names)
                        if problem is not None:
                            fail(job, problem, retry)
                            continue
                        try:
                            written = store.record(outcome)
                        except FingerprintMismatchError:  # the store was replaced meanwhile: stop, write nothing
                            raise
                        except (TypeError, ValueError) as e:  # e.g. `extra` that is not JSON data
                            fail(job, f"the outcome could not be stored: {e}", retry)
                            continue
                        trained += 1
                        if bar is not None:
                            bar.update(1)
                        losses = " ".join(f"{t}={float(outcome.test_losses[t]):.4g}" for t in job[0])
                        took = f" in {outcome.seconds:.1f}s" if math.isfinite(outcome.seconds) else ""
                        if outcome.epochs >= 0:  # -1: the trainer does not say
                            took += f"{',' if took else ''} {outcome.epochs} epochs"
                        logger.info("%s %s seed %d%s: %s", "done" if written else "already done",
                                    group_key(job[0]), job[1], took, losses)
                    for job in sorted(wanted, key=jobs.index):
                        fail(job, "the trainer returned no outcome for this job", retry)
            done = store.done_jobs()
            todo = [j for j in dict.fromkeys(retry) if j not in done]
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    logger.info("trained %d jobs in %.1fs; %d failed; store %s holds %s", trained, seconds, len(failed),
                store.path, store.counts())
    if failed:
        shown = "\n".join(
            f"  {group_key(g)} seed {s}: {err.strip().splitlines()[-1] if err.strip() else '?'}"
            for (g, s), err in list(failed.items())[:10]
        )
        raise CollectionError(
            f"{len(failed)} of {len(jobs)} jobs failed after {retries} retries (full errors are in the "
            f"store's error column; a re-run retries only these):\n{shown}",
            failed,
        )
    multi = list(dict.fromkeys(g for g, _ in jobs if len(g) > 1))
    return GroupGains.from_store(store, groups=multi, seeds=seeds)
