"""Crash safety of ground-truth collection: interrupts, killed collectors, replaced, copied and read-only stores.

Worker processes run a tiny trainer (written to a temporary folder, so that
spawned workers import it without this file) that leaves a marker file when
a job starts and another when it ends: a job that was stopped has a start
marker and no end marker. Nothing here asserts on durations.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightning_etap.groundtruth import (
    FactoryGroupTrainer,
    FingerprintMismatchError,
    GainStore,
    GroupOutcome,
    ProcessPoolExecutor,
    collect_gains,
)
from lightning_etap.groundtruth.executors import ChunkResult
from lightning_etap.groundtruth.store import fingerprint_diff

MARKERS = '''
import os, time
from lightning_etap.groundtruth.base import GroupOutcome


class MarkerTrainer:
    """Loss 0.5 for every member; marks start-<group> (holding its pid) and end-<group> in `folder`."""

    task_names = ("a", "b", "c", "d")

    def __init__(self, folder, slow=(), sleep=30.0):
        self.folder, self.slow, self.sleep = folder, {tuple(g) for g in slow}, sleep

    def fingerprint(self):
        return {"trainer": "marker"}

    def train(self, jobs):
        out = []
        for group, seed in jobs:
            group = tuple(group)
            name = "_".join(group)
            with open(os.path.join(self.folder, f"start-{name}"), "w") as f:
                f.write(str(os.getpid()))
            if group in self.slow:
                time.sleep(self.sleep)
            open(os.path.join(self.folder, f"end-{name}"), "w").close()
            out.append(GroupOutcome(group, int(seed), {t: 0.5 for t in group}))
        return out
'''

FP = {"trainer": "fake", "version": 1}
TASKS = ["a", "b", "c", "d"]


@pytest.fixture(scope="session")
def markers_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("markers")
    (folder / "gt_markers.py").write_text(MARKERS)
    sys.path.insert(0, str(folder))  # spawned workers inherit the parent's sys.path
    return folder


@pytest.fixture()
def markers(markers_dir):
    import gt_markers

    return gt_markers


def wait_for(condition, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def done_rows_in_main_file(path: Path, tmp_path: Path) -> int:
    """Rows found in a copy of the store's main file alone (what `cp gains.sqlite elsewhere` gives)."""
    copy = tmp_path / f"copy-{time.monotonic_ns()}.sqlite"
    shutil.copyfile(path, copy)
    with sqlite3.connect(copy) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM results WHERE status = 'done'").fetchone()[0]
        except sqlite3.OperationalError:  # no table: the schema itself is still in the -wal
            return 0


def outcome(group, seed=0, loss=0.5):
    return GroupOutcome(tuple(group), seed, {t: loss for t in group})


# ================================================================== A: interrupts
CHUNKS = [[(("a", "b"), 0)], [(("c", "d"), 0)]]  # a|b finishes at once, c|d runs for 30 s


def test_ctrl_c_hands_back_finished_results_and_stops_running_jobs(tmp_path, markers, monkeypatch):
    trainer = markers.MarkerTrainer(str(tmp_path), slow=[("c", "d")])

    def interrupted_wait(futures, *args, **kwargs):
        # Ctrl-C arrives while waiting, once a|b has finished (not handed back yet) and c|d runs.
        wait_for(lambda: (tmp_path / "start-c_d").exists() and any(f.done() for f in futures), "both jobs")
        raise KeyboardInterrupt

    monkeypatch.setattr(cf, "wait", interrupted_wait)
    results: list[ChunkResult] = []
    with pytest.raises(KeyboardInterrupt):
        for result in ProcessPoolExecutor(workers=2, preload=()).run(trainer, CHUNKS):
            results.append(result)
    assert [(r.jobs, r.ok) for r in results] == [(((("a", "b"), 0),), True)]
    assert results[0].outcomes[0].test_losses == {"a": 0.5, "b": 0.5}
    assert not (tmp_path / "end-c_d").exists()  # stopped, not waited for
    wait_for(lambda: gone(int((tmp_path / "start-c_d").read_text())), "the worker to exit", 10)


def test_a_closed_executor_does_not_wait_for_running_jobs(tmp_path, markers):
    trainer = markers.MarkerTrainer(str(tmp_path), slow=[("c", "d")])
    results = ProcessPoolExecutor(workers=2, preload=()).run(trainer, CHUNKS)
    first = next(results)
    assert first.jobs == ((("a", "b"), 0),) and first.ok
    wait_for(lambda: (tmp_path / "start-c_d").exists(), "c|d to start")
    results.close()  # the consumer stops, e.g. interrupted in its own code
    assert not (tmp_path / "end-c_d").exists()
    wait_for(lambda: gone(int((tmp_path / "start-c_d").read_text())), "the worker to exit", 10)


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="needs the forkserver start method")
def test_the_fork_server_imports_its_preload_with_ctrl_c_ignored_and_forks_with_the_default(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group; the fork server imports its preload (torch, lightning:
    seconds) before it protects itself, and printed a long KeyboardInterrupt traceback when the Ctrl-C came then.
    It now imports its preload with SIGINT ignored, and the processes it forks afterwards (ours or another pool's
    of the same program) have Python's default handler again; the caller's handler is untouched."""
    (tmp_path / "sigint_probe.py").write_text(textwrap.dedent("""
        import signal
        from pathlib import Path

        def state():
            handler = signal.getsignal(signal.SIGINT)
            return "ignored" if handler is signal.SIG_IGN else "default" if handler is signal.default_int_handler \
                else repr(handler)

        class Probe:
            task_names = ("a", "b")

            def __init__(self, out):
                self.out = out

            def fingerprint(self):
                return {"probe": 1}

            def train(self, jobs):
                Path(self.out).write_text(state())
                return []
    """))
    (tmp_path / "preload_probe.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from sigint_probe import state

        Path({str(tmp_path / "preload")!r}).write_text(state())  # while the fork server imports its preload
    """))
    script = tmp_path / "collector.py"
    script.write_text(textwrap.dedent(f"""
        import concurrent.futures as cf, multiprocessing, signal, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from lightning_etap.groundtruth import ProcessPoolExecutor
        from sigint_probe import Probe, state

        if __name__ == "__main__":
            executor = ProcessPoolExecutor(workers=1, preload=["preload_probe"])
            for _ in executor.run(Probe({str(tmp_path / "worker")!r}), [[(("a", "b"), 0)]]):
                pass
            assert state() == "default"  # the caller's handler is restored
            other = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
            print(other.submit(state).result())  # another pool of the same program, from the same fork server
    """))
    # cwd: the fork server finds its preload modules on its own path ('' first, the working directory)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "preload").read_text() == "ignored"
    assert (tmp_path / "worker").read_text() == "default"
    assert res.stdout.strip() == "default"


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="needs the forkserver start method")
def test_a_worker_started_after_its_pool_closed_exits_without_a_traceback_other_errors_still_print(tmp_path):
    """Ctrl-C while a pool starts its workers: the pool's owner removes the pool's lock (a named semaphore), and a
    worker that the fork server forks just after fails to open it. Python printed that FileNotFoundError's
    traceback under our "interrupted" line. The fork server started by ProcessPoolExecutor now keeps that one
    quiet (the worker exits as before); any other error of a starting process still prints."""
    script = tmp_path / "closed_pool.py"
    script.write_text(textwrap.dedent("""
        import gc, multiprocessing, sys, time


        class Slow:  # unpickled before the lock: the owner has time to close its pool first
            def __reduce__(self):
                return (time.sleep, (1.5,))


        class Bad:  # fails to unpickle in the new process
            def __reduce__(self):
                return (int, ("not a number",))


        def noop(*args):
            pass


        if __name__ == "__main__":
            from lightning_etap.groundtruth.executors import _start_forkserver_without_sigint
            ctx = multiprocessing.get_context("forkserver")
            if sys.argv[1] == "ours":
                ctx.set_forkserver_preload(["lightning_etap.groundtruth._forkserver_sigint"])
                _start_forkserver_without_sigint()
            lock = ctx.Lock()
            process = ctx.Process(target=noop, args=(Bad(),) if sys.argv[2] == "bad" else (Slow(), lock))
            process.start()
            time.sleep(0.3)
            del lock  # its finalizer removes the semaphore, as when a pool is shut down
            gc.collect()
            process.join()
            print("exitcode", process.exitcode)
    """))

    def run(*mode):
        res = subprocess.run([sys.executable, str(script), *mode], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert res.returncode == 0 and res.stdout.strip() == "exitcode 1", (res.stdout, res.stderr[-3000:])
        return res.stderr

    assert "FileNotFoundError" in run("plain", "closed")  # the race, reproduced: Python prints it
    assert "Traceback" not in run("ours", "closed")
    assert "ValueError: invalid literal for int()" in run("ours", "bad")


class InstantTrainer:
    """Answers every job at once, in this process."""

    task_names = tuple(TASKS)

    def fingerprint(self):
        return FP

    def train(self, jobs):
        return [outcome(g, s) for g, s in jobs]


def test_collect_gains_stores_what_came_back_before_an_interrupt_and_closes_the_executor(tmp_path):
    closed = []

    class InterruptedExecutor:
        def run(self, trainer, chunks):
            try:
                for chunk in chunks:
                    yield ChunkResult(tuple(chunk), tuple(trainer.train(chunk)))
                    raise KeyboardInterrupt
            finally:
                closed.append(True)

    path = tmp_path / "g.sqlite"
    with pytest.raises(KeyboardInterrupt):
        collect_gains(InstantTrainer(), [("a", "b")], store=path, executor=InterruptedExecutor(), progress=False)
    assert closed == [True]
    assert GainStore(path, read_only=True).counts() == {"done": 1}


def test_ctrl_c_inside_a_lightning_fit_in_process_is_a_keyboard_interrupt(tmp_path):
    # Lightning answers Ctrl-C inside a fit with SystemExit(1), the KeyboardInterrupt as its context
    class LightningLike(InstantTrainer):
        calls = 0

        def train(self, jobs):
            self.calls += 1
            if self.calls == 2:
                try:
                    raise KeyboardInterrupt
                except KeyboardInterrupt:
                    sys.exit(1)
            return super().train(jobs)

    path = tmp_path / "g.sqlite"
    with pytest.raises(KeyboardInterrupt):
        collect_gains(LightningLike(), [("a", "b"), ("a", "c")], store=path, chunk_size=1, progress=False)
    with GainStore(path, read_only=True) as store:
        assert store.counts() == {"done": 1}  # the job before the interrupt is kept

    class Exits(LightningLike):
        def train(self, jobs):
            sys.exit(3)  # a real exit stays one

    with pytest.raises(SystemExit):
        collect_gains(Exits(), [("a", "d")], store=tmp_path / "h.sqlite", progress=False)


@pytest.mark.slow  # starts a local Ray instance
def test_ray_hands_back_finished_results_and_cancels_the_rest_on_ctrl_c(tmp_path, markers_dir, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra")
    import gt_markers

    from lightning_etap.groundtruth import RayExecutor

    path = os.pathsep.join([str(markers_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        trainer = gt_markers.MarkerTrainer(str(tmp_path), slow=[("c", "d")])
        real_wait = ray.wait
        calls = []

        def interrupted_wait(refs, *args, **kwargs):
            calls.append(refs)
            if len(calls) > 1:
                return real_wait(refs, *args, **kwargs)
            wait_for(lambda: (tmp_path / "start-c_d").exists() and (tmp_path / "end-a_b").exists(), "both jobs")
            wait_for(lambda: len(real_wait(refs, num_returns=len(refs), timeout=0)[0]) >= 1, "a|b's result")
            raise KeyboardInterrupt

        monkeypatch.setattr(ray, "wait", interrupted_wait)
        results = []
        with pytest.raises(KeyboardInterrupt):
            for result in RayExecutor(max_in_flight=2).run(trainer, CHUNKS):
                results.append(result)
        assert [(r.jobs, r.ok) for r in results] == [(((("a", "b"), 0),), True)]
        wait_for(lambda: gone(int((tmp_path / "start-c_d").read_text())) or not (tmp_path / "end-c_d").exists(),
                 "c|d to be cancelled", 10)
        time.sleep(0)  # the cancelled task must never finish
        assert not (tmp_path / "end-c_d").exists()
    finally:
        if started_here:
            ray.shutdown()


# ================================================================== G: workers of a killed collector
def test_pool_workers_exit_when_the_collector_is_killed(tmp_path, markers_dir):
    script = tmp_path / "collector.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(markers_dir)!r})
        from gt_markers import MarkerTrainer
        from lightning_etap.groundtruth import ProcessPoolExecutor

        if __name__ == "__main__":
            trainer = MarkerTrainer({str(tmp_path)!r}, slow=[("a", "b")], sleep=600)
            for _ in ProcessPoolExecutor(workers=1, preload=()).run(trainer, [[(("a", "b"), 0)]]):
                pass
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (tmp_path / "start-a_b").exists() or proc.poll() is not None, "the worker to start")
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        worker = int((tmp_path / "start-a_b").read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: gone(worker), "the orphaned worker to exit", 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if (tmp_path / "start-a_b").exists() and not gone(worker := int((tmp_path / "start-a_b").read_text())):
            os.kill(worker, signal.SIGKILL)


# ================================================================== B: a store replaced meanwhile
def test_a_store_overwritten_by_another_process_takes_no_more_rows(tmp_path):
    path = tmp_path / "g.sqlite"
    first = GainStore(path, FP, task_names=TASKS)
    assert first.record(outcome(("a", "b")))
    again = GainStore(path, FP, task_names=TASKS)  # the same experiment opened again: nothing changes
    assert again.record(outcome(("c", "d")))
    assert first.record(outcome(("a", "c")))

    other = GainStore(path, {**FP, "version": 2}, task_names=TASKS, overwrite=True)  # e.g. another process
    with pytest.raises(FingerprintMismatchError, match="overwritten by another process") as err:
        first.record(outcome(("b", "c")))
    assert str(path) in str(err.value)
    with pytest.raises(FingerprintMismatchError, match="overwritten"):
        first.record_failure(("b", "c"), 0, "boom")
    assert len(other) == 0 and other.fingerprint == {**FP, "version": 2}
    assert other.record(outcome(("a", "b"), loss=0.7))
    assert other.rows()[0]["test_loss/a"] == 0.7


def test_collect_gains_stops_when_its_store_is_overwritten(tmp_path):
    path = tmp_path / "g.sqlite"

    class Trainer(InstantTrainer):
        def train(self, jobs):
            if any(len(g) > 1 for g, _ in jobs):  # meanwhile, another user restarts the store for their run
                GainStore(path, {"trainer": "other"}, overwrite=True).close()
            return super().train(jobs)

    with pytest.raises(FingerprintMismatchError, match="overwritten"):
        collect_gains(Trainer(), [("a", "b")], store=path, progress=False)
    store = GainStore(path, read_only=True)
    assert store.fingerprint == {"trainer": "other"} and len(store) == 0


# ================================================================== C: fingerprints that match themselves
def test_a_nan_in_a_fingerprint_matches_itself(tmp_path):
    fp = {"data": "v1", "clip": math.nan, "grid": [1.0, math.nan]}
    GainStore(tmp_path / "g.sqlite", fp, task_names=TASKS).close()
    assert len(GainStore(tmp_path / "g.sqlite", fp, task_names=TASKS)) == 0  # reopens
    assert fingerprint_diff({"x": [math.nan]}, {"x": [math.nan]}) == []
    assert fingerprint_diff({"x": math.nan}, {"x": 1.0}) == ["x: store has NaN, this run has 1.0"]
    assert fingerprint_diff({"x": 1}, {"x": 1.0}) == []  # as before: equal numbers are equal


def _model(tasks):
    raise AssertionError("not trained here")


def _data(tasks, seed):
    raise AssertionError("not trained here")


def test_factory_fingerprint_of_objects_is_the_same_in_every_process(tmp_path):
    from lightning.pytorch.profilers import SimpleProfiler

    def make():
        return FactoryGroupTrainer(_model, _data, TASKS, {"data": "v1"},
                                   trainer_kwargs={"max_epochs": 3, "profiler": SimpleProfiler()})

    fp = make().fingerprint()
    assert make().fingerprint() == fp  # another object at another address: same fingerprint
    kwargs = fp["trainer_kwargs"]
    assert kwargs["max_epochs"] == 3  # JSON values stay as they are
    assert kwargs["profiler"]["class"] == "lightning.pytorch.profilers.simple.SimpleProfiler"
    assert "0x" not in json.dumps(fp)
    GainStore(tmp_path / "g.sqlite", fp, task_names=TASKS).close()
    assert len(GainStore(tmp_path / "g.sqlite", make().fingerprint(), task_names=TASKS)) == 0


# ================================================================== D: the one file is complete
def test_close_folds_the_log_into_the_one_file(tmp_path):
    path = tmp_path / "g.sqlite"
    store = GainStore(path, FP, task_names=TASKS)
    reader = sqlite3.connect(path)  # another process with the store open: SQLite's own last-close fold won't run
    reader.execute("SELECT COUNT(*) FROM meta").fetchall()
    store.record(outcome(("a", "b")))
    assert done_rows_in_main_file(path, tmp_path) == 0  # the row is in gains.sqlite-wal for now
    store.close()
    store.close()  # idempotent
    assert done_rows_in_main_file(path, tmp_path) == 1
    with GainStore(path) as again:  # reopens after close, and as a context manager
        again.record(outcome(("c", "d")))
    assert done_rows_in_main_file(path, tmp_path) == 2
    reader.close()


def test_collect_gains_closes_the_store_it_opened(tmp_path):
    path = tmp_path / "g.sqlite"
    GainStore(path, FP, task_names=TASKS).close()
    reader = sqlite3.connect(path)  # another process with the store open
    reader.execute("SELECT COUNT(*) FROM meta").fetchall()
    collect_gains(InstantTrainer(), [("a", "b")], store=path, progress=False)
    assert done_rows_in_main_file(path, tmp_path) == 3  # a, b and a|b
    reader.close()


def test_opening_a_store_folds_in_the_log_of_a_killed_run(tmp_path):
    path = tmp_path / "g.sqlite"
    body = f"""
        import os, signal
        from lightning_etap.groundtruth import GainStore, GroupOutcome
        store = GainStore({str(path)!r}, {FP!r}, task_names={TASKS!r})
        for g in (("a", "b"), ("a", "c"), ("b", "d")):
            store.record(GroupOutcome(g, 0, {{t: 0.5 for t in g}}))
        os.kill(os.getpid(), signal.SIGKILL)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert done_rows_in_main_file(path, tmp_path) == 0  # every committed row is in the -wal
    GainStore(path).counts()  # opening once (no close) ...
    assert done_rows_in_main_file(path, tmp_path) == 3  # ... makes the one file whole


def test_backup_is_one_complete_file_even_while_the_store_is_open(tmp_path):
    path = tmp_path / "g.sqlite"
    store = GainStore(path, FP, task_names=TASKS)
    store.record(outcome(("a", "b")))
    copy = store.backup(tmp_path / "out" / "copy.sqlite")
    store.record(outcome(("c", "d")))
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.sqlite"]  # no -wal, no temporary file
    assert done_rows_in_main_file(copy, tmp_path) == 1
    with GainStore(copy, read_only=True) as read:
        assert read.fingerprint == FP and read.task_names == tuple(TASKS)
    with pytest.raises(ValueError, match="overwrite the store itself"):
        store.backup(path)


# ================================================================== E: read-only and damaged stores
def _run_without_write_permission(body: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``body`` with ``folder`` and its files read-only to it (as root: without CAP_DAC_OVERRIDE)."""
    os.chmod(folder, 0o555)
    for f in folder.iterdir():
        os.chmod(f, 0o444)
    cmd = [sys.executable, "-c", textwrap.dedent(body)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(folder, 0o755)


def test_a_store_in_a_read_only_folder_can_be_read(tmp_path):
    folder = tmp_path / "shared"
    path = folder / "g.sqlite"
    with GainStore(path, FP, task_names=["a", "b"]) as store:
        for g in (("a",), ("b",), ("a", "b")):
            store.record(outcome(g, loss=0.5 if len(g) == 1 else 0.4))
    body = f"""
        import sqlite3
        from lightning_etap.groundtruth import GainStore, GroupOutcome
        from lightning_etap.search import OracleTrainer, load_table
        path = {str(path)!r}
        with GainStore(path, read_only=True) as store:
            assert store.counts() == {{"done": 3}}, store.counts()
            try:
                store.record(GroupOutcome(("a", "b"), 1, {{"a": 0.5, "b": 0.5}}))
            except PermissionError as e:
                assert "read_only" in str(e)
            else:
                raise AssertionError("a read-only store took a row")
        assert len(load_table(path)) == 3
        assert OracleTrainer(path).task_names == ("a", "b")
        try:
            GainStore(path)
        except sqlite3.OperationalError as e:
            print(e)
        else:
            raise AssertionError("a writable open of a read-only store succeeded")
    """
    res = _run_without_write_permission(body, folder)
    assert res.returncode == 0, res.stderr[-3000:]
    message = res.stdout
    assert str(path) in message and "read-only" in message and "read_only=True" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_is_named_and_explained(tmp_path, damage):
    path = tmp_path / "g.sqlite"
    with GainStore(path, FP, task_names=TASKS) as store:
        for s in range(300):
            store.record(GroupOutcome(("a", "b"), s, {"a": 0.5, "b": 0.5}, extra={"note": "x" * 200}))
    data = path.read_bytes()
    path.write_bytes(b"this is not a database " * 100 if damage == "garbage" else data[: len(data) // 2])
    for kwargs in ({}, {"read_only": True}, {"fingerprint": FP}):
        with pytest.raises(sqlite3.DatabaseError) as err:
            GainStore(path, **kwargs).counts()
        assert str(path) in str(err.value) and "damaged" in str(err.value), str(err.value)
