"""Where group trainers run: this process, a local process pool, or a Ray cluster.

Every executor has one method, ``run(trainer, chunks)``: it calls
``trainer.train(chunk)`` for every chunk of jobs and yields a
:class:`ChunkResult` as each chunk finishes (in completion order). A chunk
that raises comes back with its error text instead of outcomes; a worker
that dies does too. Nothing here touches the store: the collector, in the
calling process, writes every result.

The trainer is shipped to each worker once (a pool initializer, or one Ray
object), and a dataset is loaded once per worker process, not per job.

Interrupting (Ctrl-C, i.e. ``KeyboardInterrupt`` while an executor waits):
chunks not started are cancelled, the results that have already come back
are still yielded (so the collector stores them), running chunks are stopped
instead of waited for, and then the ``KeyboardInterrupt`` is raised again.
A consumer that stops early (closes the generator) stops the running chunks
the same way.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from lightning_etap.groundtruth.base import GroupOutcome, GroupTrainer

logger = logging.getLogger("lightning_etap.groundtruth")

__all__ = ["ChunkResult", "Executor", "InProcessExecutor", "ProcessPoolExecutor", "RayClusterError", "RayExecutor"]

Job = tuple[tuple[str, ...], int]


@dataclass(frozen=True)
class ChunkResult:
    """One finished chunk: its jobs, and either their outcomes or the error text."""

    jobs: tuple[Job, ...]
    outcomes: tuple[GroupOutcome, ...] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Executor(Protocol):
    """Runs a group trainer over chunks of jobs and yields results as chunks finish."""

    def run(self, trainer: GroupTrainer, chunks: Iterable[Sequence[Job]]) -> Iterator[ChunkResult]: ...


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


def is_lightning_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is Lightning's answer to Ctrl-C inside a fit: ``SystemExit(1)`` raised while it handled
    the ``KeyboardInterrupt`` (which stays on it as its context)."""
    return isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)


def _train_chunk(trainer: GroupTrainer, jobs: tuple[Job, ...]) -> ChunkResult:
    try:
        outcomes = trainer.train(list(jobs))
        return ChunkResult(jobs, tuple(outcomes), None)
    except Exception as e:  # reported, recorded and retried by the collector
        return ChunkResult(jobs, None, _error_text(e))
    except SystemExit as e:  # Ctrl-C in a Lightning fit: an interrupt like any other, not an exit
        if is_lightning_interrupt(e):
            raise KeyboardInterrupt from None
        raise


def _as_chunks(chunks: Iterable[Sequence[Job]]) -> Iterator[tuple[Job, ...]]:
    """The chunks as tuples of ``(group, seed)``, read lazily (the collector may skip jobs meanwhile done)."""
    for chunk in chunks:
        chunk = tuple((tuple(g), int(s)) for g, s in chunk)
        if chunk:
            yield chunk


def _limit_threads(threads: int | None) -> None:
    """Make this worker process use ``threads`` torch / BLAS threads (before and after torch loads)."""
    if threads is None:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


class InProcessExecutor:
    """Train in the calling process, one chunk after the other (the default; easiest to debug)."""

    def run(self, trainer: GroupTrainer, chunks: Iterable[Sequence[Job]]) -> Iterator[ChunkResult]:
        for chunk in _as_chunks(chunks):
            yield _train_chunk(trainer, chunk)

    def __repr__(self) -> str:
        return "InProcessExecutor()"


# ---------------------------------------------------------------- process pool
_WORKER_TRAINER: Any = None


def _exit_with_parent() -> None:
    """End this worker process when the process that started the pool dies (even by SIGKILL).

    ``multiprocessing`` gives every spawn / forkserver child a sentinel that
    becomes ready when its parent is gone; without this watch an idle worker
    would wait for work forever.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the sentinel pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="lightning-etap-parent-watch", daemon=True).start()


def _pool_init(trainer_bytes: bytes, threads: int | None) -> None:
    global _WORKER_TRAINER
    _exit_with_parent()
    _limit_threads(threads)  # before unpickling, which may import torch
    _WORKER_TRAINER = pickle.loads(trainer_bytes)
    _limit_threads(threads)


def _pool_run(jobs: tuple[Job, ...]) -> ChunkResult:
    return _train_chunk(_WORKER_TRAINER, jobs)


class ProcessPoolExecutor:
    """Train in ``workers`` fresh local processes (``concurrent.futures`` with spawn / forkserver).

    Args:
        workers: number of worker processes (default: CPU count).
        context: ``"forkserver"`` (default where available: Linux, macOS) or
            ``"spawn"`` (everywhere else). ``"fork"`` is refused: forking a
            process that has started torch threads can deadlock.
        preload: modules the fork server imports once (forkserver only), so
            that every worker starts with them already loaded instead of
            importing torch and Lightning itself. The fork server starts with
            the first pool of this process and lives as long as it does, so
            later pools start in a fraction of a second (and only the first
            pool's ``preload`` counts).
        threads: torch threads per worker (default 1: workers x threads
            should not exceed the cores).

    The trainer is pickled once and sent to every worker when it starts, so
    it must be picklable (a :class:`LightningGroupTrainer` is; factories of a
    :class:`FactoryGroupTrainer` must be module-level functions). If a worker
    process dies (killed, out of memory), its chunks come back as errors and
    the pool is restarted for the rest. On Ctrl-C the finished results are
    handed back and the worker processes are terminated (running jobs are
    lost, not waited for); workers also exit when the process that started
    them dies.

    As with any spawn / forkserver pool, a script that uses it must start
    its work under ``if __name__ == "__main__":``.

    Example:
        >>> executor = ProcessPoolExecutor(workers=2)
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        context: str | None = None,
        threads: int | None = 1,
        preload: Sequence[str] = ("lightning_etap.training",),
    ) -> None:
        if context is None:
            context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if context not in ("spawn", "forkserver"):
            raise ValueError(f"context must be 'spawn' or 'forkserver', got {context!r}")
        self.preload = list(preload)
        workers = (os.cpu_count() or 1) if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.context = context
        self.threads = threads

    def run(self, trainer: GroupTrainer, chunks: Iterable[Sequence[Job]]) -> Iterator[ChunkResult]:
        try:
            payload = pickle.dumps(trainer)
        except Exception as e:
            raise TypeError(
                f"the group trainer {trainer!r} cannot be pickled to send it to worker processes ({e}); "
                "use module-level functions (not lambdas or local functions) for factories, "
                "or run with InProcessExecutor"
            ) from e
        ctx = multiprocessing.get_context(self.context)
        if self.context == "forkserver":
            # the last preload module puts the default Ctrl-C handler back (see _start_forkserver_without_sigint)
            ctx.set_forkserver_preload([*self.preload, "lightning_etap.groundtruth._forkserver_sigint"])
            _start_forkserver_without_sigint()
        stream = _as_chunks(chunks)
        while True:
            broken = yield from self._parallel(payload, ctx, stream)
            if not broken:
                return
            # A worker died and took the pool with it; which chunk killed it is unknown. Run the
            # unfinished chunks again one at a time, so that a second death names its chunk, then go on.
            logger.warning(
                "a worker process died (killed, out of memory or crashed) and took the pool with it; running "
                "the pool's %d unfinished chunk(s) (%d jobs) again one at a time, then going on in parallel",
                len(broken), sum(len(chunk) for chunk in broken))
            yield from self._isolated(payload, ctx, broken)

    def _pool(self, payload: bytes, ctx, workers: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pool_init,
                                      initargs=(payload, self.threads))

    def _parallel(self, payload: bytes, ctx, stream: Iterator[tuple[Job, ...]]):
        """Run chunks from ``stream`` (at most 2 per worker in flight); return the chunks a dead pool lost."""
        first = next(stream, None)
        if first is None:
            return []
        broken: list[tuple[Job, ...]] = []
        pool = self._pool(payload, ctx, self.workers)
        futures: dict[cf.Future, tuple[Job, ...]] = {}
        finished_normally = False
        try:
            upcoming: tuple[Job, ...] | None = first
            while True:
                while upcoming is not None and not broken and len(futures) < 2 * self.workers:
                    try:
                        futures[pool.submit(_pool_run, upcoming)] = upcoming
                    except cf.process.BrokenProcessPool:
                        broken.append(upcoming)
                    upcoming = next(stream, None)
                if not futures:
                    break
                finished, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    chunk = futures.pop(future)
                    try:
                        result = future.result()
                    except cf.process.BrokenProcessPool:
                        broken.append(chunk)
                        continue
                    except Exception as e:  # e.g. an outcome that cannot be unpickled
                        result = ChunkResult(chunk, None, _error_text(e))
                    yield result
            if upcoming is not None:  # read from the stream but never submitted
                broken.append(upcoming)
            finished_normally = True
        except (KeyboardInterrupt, SystemExit):
            # Interrupted while waiting: hand back what has finished, stop the rest, then re-raise.
            for future in futures:
                future.cancel()
            done = [(f, chunk) for f, chunk in futures.items() if f.done() and not f.cancelled()]
            _stop(pool)
            for future, _ in done:
                if future.exception() is None:  # else the worker died or was interrupted: nothing to store
                    yield future.result()
            raise
        finally:
            if finished_normally:
                pool.shutdown(wait=True, cancel_futures=True)
            else:  # interrupted, closed by the consumer, or an error: do not wait for running jobs
                _stop(pool)
        return broken

    def _isolated(self, payload: bytes, ctx, todo: list[tuple[Job, ...]]):
        pool = None
        finished_normally = False
        try:
            for chunk in todo:
                pool = pool or self._pool(payload, ctx, 1)
                try:
                    result = pool.submit(_pool_run, chunk).result()
                except cf.process.BrokenProcessPool as e:
                    pool.shutdown(wait=True)
                    pool = None
                    result = ChunkResult(chunk, None, f"the worker process died while training this chunk "
                                                      f"({e}); out of memory, killed, or it could not "
                                                      "start (is the trainer's module importable?)")
                except Exception as e:
                    result = ChunkResult(chunk, None, _error_text(e))
                yield result
            finished_normally = True
        finally:
            if pool is not None:
                if finished_normally:
                    pool.shutdown(wait=True, cancel_futures=True)
                else:
                    _stop(pool)

    def __repr__(self) -> str:
        return f"ProcessPoolExecutor(workers={self.workers}, context={self.context!r})"


def _start_forkserver_without_sigint() -> None:
    """Start the fork server (if not running) with Ctrl-C ignored while it imports its preload.

    The server imports its preload modules before it protects itself from
    SIGINT, so a Ctrl-C in the first seconds (sent to the whole process
    group by a terminal) printed a long ``KeyboardInterrupt`` traceback from
    the import. Started with SIGINT ignored, it imports undisturbed; its last
    preload module (``_forkserver_sigint``) puts the default handler back, so
    the processes it forks afterwards (this pool's workers, or another
    library's) handle Ctrl-C as they would have.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    from multiprocessing import forkserver

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """Shut ``pool`` down now: cancel what has not started and terminate the worker processes."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


# ---------------------------------------------------------------- ray
def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "RayExecutor needs Ray, which is an optional extra: pip install lightning-etap[ray]"
        ) from e
    return ray


def _ray_run(trainer: GroupTrainer, jobs: tuple[Job, ...], threads: int | None) -> ChunkResult:
    _limit_threads(threads)
    return _train_chunk(trainer, jobs)


class RayClusterError(ConnectionError):
    """The Ray cluster cannot be reached, or was lost during a collection (finished work is in the store)."""


def _check_ray_address(address: str | None) -> None:
    """Refuse, in seconds, a host:port (or ``ray://`` address) where nothing answers: ``ray.init`` retries a
    GCS address for minutes. Other schemes (client builders such as ``anyscale://``) and ``ray://`` behind a
    proxy are left to Ray."""
    if address is None or address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    proxied = any(os.environ.get(k) for k in ("grpc_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy"))
    if scheme and (scheme != "ray" or proxied):
        return
    text = rest if scheme else address
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(f"{address!r} is not a Ray address: use 'auto' (the cluster this machine runs, from "
                              "`ray start --head`), host:port (the head's GCS port, 6379 by default) or "
                              "ray://host:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise RayClusterError(f"no Ray cluster answers at {address!r} ({e.strerror or e}): start one with "
                              "`ray start --head` and pass its address (or 'auto'), or leave the address unset "
                              "to start a local Ray") from None


class RayExecutor:
    """Train on a Ray cluster (or a local Ray instance); results come back to the calling process.

    Every chunk is one Ray task asking for ``num_cpus`` CPUs. Workers on other
    nodes only train; the collector in the driver process writes the store,
    so the store file never has to be shared between nodes. Each Ray worker
    process keeps its loaded dataset between tasks. On Ctrl-C the finished
    results are handed back and the other tasks are cancelled.

    Args:
        address: the cluster to connect to (``"auto"``, ``"ray://host:10001"``)
            when Ray is not initialised yet; ``None`` starts a local instance.
            If ``ray.init`` was already called, that session is used as is.
        num_cpus: CPUs reserved per task (and torch threads in it).
        max_in_flight: tasks submitted at once (default: twice the cluster's
            CPUs divided by ``num_cpus``). Chunks are read lazily, so jobs
            another collector finishes meanwhile are skipped.
        init_kwargs: further ``ray.init`` arguments (e.g. ``num_cpus``,
            ``runtime_env``).

    Raises:
        ImportError: Ray is not installed (``pip install lightning-etap[ray]``).

    Example:
        >>> executor = RayExecutor(address="auto")  # doctest: +SKIP
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        max_in_flight: int | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _import_ray()
        if num_cpus <= 0:
            raise ValueError(f"num_cpus must be positive, got {num_cpus}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.address = address
        self.num_cpus = num_cpus
        self.max_in_flight = max_in_flight
        self.init_kwargs = dict(init_kwargs or {})

    def run(self, trainer: GroupTrainer, chunks: Iterable[Sequence[Job]]) -> Iterator[ChunkResult]:
        ray = _import_ray()
        stream = _as_chunks(chunks)
        first = next(stream, None)
        if first is None:
            return
        if not ray.is_initialized():
            self._connect(ray)
        cpus = float(ray.cluster_resources().get("CPU", 0))
        largest = max((float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                      default=0.0)
        if largest < self.num_cpus:
            warnings.warn(f"no node of the Ray cluster has num_cpus={self.num_cpus:g} CPU(s) for a job now (the "
                          f"largest has {largest:g}): the jobs wait until such a node joins (an autoscaling "
                          "cluster); if none will, stop with Ctrl-C and lower num_cpus or add nodes",
                          RuntimeWarning, stacklevel=2)
        limit = self.max_in_flight
        if limit is None:
            limit = max(1, int(2 * max(cpus, self.num_cpus) / self.num_cpus))
        threads = max(1, int(self.num_cpus))
        remote = ray.remote(num_cpus=self.num_cpus, max_retries=0)(_ray_run)
        trainer_ref = ray.put(trainer)
        pending: dict[Any, tuple[Job, ...]] = {remote.remote(trainer_ref, first, threads): first}

        def cancel(refs) -> None:
            for ref in refs:
                pending.pop(ref, None)
                try:
                    ray.cancel(ref)  # a running task gets a KeyboardInterrupt; a queued one never starts
                except Exception:  # already finished, or the cluster is gone
                    pass

        try:
            while pending:
                while len(pending) < limit:
                    chunk = next(stream, None)
                    if chunk is None:
                        break
                    pending[remote.remote(trainer_ref, chunk, threads)] = chunk
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    chunk = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.LocalRayletDiedError as e:  # this machine's part of the cluster is gone
                        raise RayClusterError(f"lost the Ray cluster ({type(e).__name__}): finished work is in the "
                                              "store; rerun the same command once the cluster is back") from None
                    except Exception as e:  # a dead worker or node: RayTaskError, WorkerCrashedError, ...
                        result = ChunkResult(chunk, None, _error_text(e))
                    yield result
        except (KeyboardInterrupt, SystemExit):
            # Interrupted while waiting: hand back what has finished, cancel the rest, then re-raise.
            ready, rest = ray.wait(list(pending), num_returns=len(pending), timeout=0) if pending else ([], [])
            cancel(rest)
            for ref in ready:
                pending.pop(ref)
                try:
                    result = ray.get(ref, timeout=0)
                except Exception:  # the task failed: nothing to store
                    continue
                yield result
            raise
        finally:
            cancel(list(pending))  # closed by the consumer, or an error: nothing is waited for

    def _connect(self, ray) -> None:
        """``ray.init`` with a clear error, no dashboard for a local Ray, and this process's SIGTERM handler kept."""
        kwargs = dict(self.init_kwargs)
        if self.address in (None, "local"):  # no dashboard for a local Ray (a server, agents, temp files)
            kwargs.setdefault("include_dashboard", False)
        _check_ray_address(self.address)
        main_thread = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        try:
            ray.init(address=self.address, **kwargs)
        except ConnectionError as e:
            cause = e
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            where = self.address or os.environ.get("RAY_ADDRESS") or "the cluster this machine runs"
            advice = ("start one with `ray start --head`, fix the address, or leave it unset to start a local Ray"
                      if self.address or os.environ.get("RAY_ADDRESS") else "start one with `ray start --head`")
            raise RayClusterError(f"could not connect to a Ray cluster at {where!r}: {why} ({advice})") from None
        if callable(sigterm):  # ray.init replaces it with sys.exit: keep the caller's (the CLI stops cleanly)
            signal.signal(signal.SIGTERM, sigterm)

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, num_cpus={self.num_cpus})"
