"""Where ground-truth results live: one SQLite file per experiment.

:class:`GainStore` keeps one row per ``(group, seed)`` job. It is an embedded
SQLite database (the standard library's ``sqlite3``), so there is no server to
run and the file can be inspected with any SQLite tool, or exported with
:meth:`GainStore.to_csv`.

Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)      -- 'fingerprint' (JSON), 'task_names' (JSON),
                                                -- 'schema_version', 'created_at', 'environment'
    results(group_key TEXT, seed INTEGER,       -- PRIMARY KEY (group_key, seed)
            size INTEGER, status TEXT,          -- 'done' or 'failed'
            test_losses TEXT,                   -- JSON {task: loss}, NULL unless done
            epochs INTEGER, best_epoch INTEGER, seconds REAL,
            error TEXT, attempts INTEGER,       -- last error; attempts summed over all runs
            extra TEXT,                         -- JSON
            collector TEXT,                     -- host:pid of the process that wrote the row
            created_at TEXT, updated_at TEXT)   -- ISO 8601, UTC

Concurrency: the database runs in WAL mode with a busy timeout, and every
finished job is one ``BEGIN IMMEDIATE ... COMMIT`` transaction, so any number
of processes on one machine may write to the same file at once (two users'
runs, a crashed run and its restart). A ``done`` row is never overwritten: the
first process to finish a job wins and later finishers of the same job are
ignored, so no job is ever counted twice. A process killed at any moment
loses at most the jobs it had not committed yet.

When the one file is complete: in WAL mode committed rows first go to a
``<file>-wal`` file next to the store and reach the main file at a
checkpoint. :meth:`GainStore.close` (which :func:`collect_gains` calls when it
returns or raises) checkpoints, and so does opening a store (which folds in the
``-wal`` a killed run left behind). So the main file alone holds every row
once no process has the store open, or once it has been opened after a crash;
while a collector runs, or after one was killed (``kill -9``, out of memory,
power cut) and before the store was opened again, the rows may still be in
``-wal``, so copy the ``-wal`` with it, or, simplest and always safe, make a
consistent single-file copy with :meth:`GainStore.backup` (works while
collectors are writing).

Several collectors on one store: safe on one machine's local disk, but they do
not divide the work: each trains every job it does not see as done when it
reaches it, so collectors started together train nearly the same jobs, and
only the first finisher of each is kept. To split work, give each collector a
share of the groups (``collect_gains(trainer, groups[k::n], ...)``; the few
single-task jobs are shared) or its own seeds.

WAL mode needs the processes to share memory-mapped files, so it does not
work on network file systems (NFS, SMB, Lustre, ...): never point collectors
on several hosts at one WAL store. On a cluster keep a single collector next
to the file (the :class:`~lightning_etap.groundtruth.RayExecutor` does
exactly that: workers on other nodes only train, the driver writes), or give
every node its own store on a local disk and merge them afterwards
(``for o in GainStore(part).outcomes().values(): merged.record(o)``).
``journal_mode="delete"`` relies on the network file system's locks, which
are often unreliable (SQLite's own advice is not to share a database over
NFS); use it only where those locks are known to work.

Read-only stores (a shared results folder, a read-only mount): open them with
``GainStore(path, read_only=True)``, which never writes (no schema set-up, no
journal switch); :func:`~lightning_etap.search.load_table` and
:class:`~lightning_etap.search.OracleTrainer` do.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import socket
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_etap._atomic import atomic_file
from lightning_etap.groundtruth.base import GroupOutcome
from lightning_etap.groundtruth.sampling import group_key, parse_group_key

__all__ = ["SCHEMA_VERSION", "FingerprintMismatchError", "GainStore", "fingerprint_diff", "normalize_json"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    group_key TEXT NOT NULL,
    seed INTEGER NOT NULL,
    size INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    test_losses TEXT,
    epochs INTEGER,
    best_epoch INTEGER,
    seconds REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    extra TEXT,
    collector TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (group_key, seed)
);
"""

#: Columns of :meth:`GainStore.rows` / the exports, before the per-task loss columns.
COLUMNS: tuple[str, ...] = (
    "group", "seed", "size", "status", "epochs", "best_epoch", "seconds", "attempts", "error",
    "collector", "created_at", "updated_at",
)


class FingerprintMismatchError(ValueError):
    """The store holds results of a different experiment than the one being run."""


def normalize_json(value: Any, where: str = "fingerprint") -> Any:
    """``value`` as plain JSON data (dicts with str keys, lists, str, int, float, bool, None).

    Tuples become lists, numpy scalars / arrays plain numbers / lists, paths
    strings. Anything else raises ``TypeError`` naming where it was found.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)):
                raise TypeError(f"{where}: dict keys must be strings, got {k!r}")
            out[str(k)] = normalize_json(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [normalize_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return normalize_json(tolist(), where)
    raise TypeError(
        f"{where}: {type(value).__name__} {value!r} is not JSON data; a fingerprint may only hold "
        "dicts, lists, strings, numbers, booleans and None"
    )


def fingerprint_diff(stored: Any, given: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two normalised fingerprints differ, with both values."""
    if isinstance(stored, dict) and isinstance(given, dict):
        out = []
        for k in sorted(set(stored) | set(given)):
            path = f"{prefix}.{k}" if prefix else k
            if k not in given:
                out.append(f"{path}: only in the store ({_short(stored[k])})")
            elif k not in stored:
                out.append(f"{path}: only in this run ({_short(given[k])})")
            else:
                out.extend(fingerprint_diff(stored[k], given[k], path))
        return out
    if stored != given and _dumps(stored) != _dumps(given):  # equal JSON is equal, NaN included
        return [f"{prefix or '<root>'}: store has {_short(stored)}, this run has {_short(given)}"]
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=True)


class GainStore:
    """A SQLite file of ground-truth training results, one row per ``(group, seed)``.

    Args:
        path: the database file (created with its folder when missing).
        fingerprint: the experiment's identity, usually ``trainer.fingerprint()``.
            A new store records it; an existing store must hold the same one.
            ``None`` opens an existing store without checking (to read it).
        task_names: the dataset's task order (recorded like the fingerprint;
            needed to export per-task columns and to build
            :class:`~lightning_etap.groundtruth.GroupGains`).
        overwrite: when the file holds results of a *different* fingerprint
            (or task list), delete them and start over instead of raising.
            Results of the same fingerprint are always kept.
        timeout: seconds to wait for another process's write to finish.
        journal_mode: ``"wal"`` (default; concurrent readers and writers on one
            machine) or ``"delete"`` (see the module documentation).
        read_only: open an existing store without ever writing to it (SQLite's
            ``mode=ro``): for stores in read-only folders or mounts. A
            ``fingerprint`` is then only checked, and :meth:`record` refuses.

    Every write checks, in its own transaction, that the store still holds the
    experiment this object opened: if another process replaced it meanwhile
    (``overwrite=True``), :meth:`record` raises
    :class:`FingerprintMismatchError` and writes nothing.

    Call :meth:`close` (or use ``with GainStore(...) as store:``) when done:
    it folds the write-ahead log into the main file, so that the one file
    holds every row (see the module documentation on copying a store).

    Raises:
        FingerprintMismatchError: the file holds another experiment's results;
            the message lists the differing keys.
        FileNotFoundError: ``fingerprint=None`` (or ``read_only``) and no store at ``path``.
        sqlite3.OperationalError, sqlite3.DatabaseError: the file cannot be
            opened; the message names the file and the likely cause (a
            read-only location, a damaged file) and what to do.

    Example:
        >>> import tempfile, os
        >>> from lightning_etap.groundtruth import GainStore, GroupOutcome
        >>> path = os.path.join(tempfile.mkdtemp(), "gains.sqlite")
        >>> store = GainStore(path, {"dataset": "toy"}, task_names=["a", "b"])
        >>> store.record(GroupOutcome(("a", "b"), 0, {"a": 0.5, "b": 0.25}))
        True
        >>> store.done_jobs()
        {(('a', 'b'), 0)}
        >>> store.close()
        >>> GainStore(path, {"dataset": "other"})
        Traceback (most recent call last):
        ...
        lightning_etap.groundtruth.store.FingerprintMismatchError: ...
        >>> with GainStore(path, read_only=True) as reader:
        ...     reader.counts()
        {'done': 1}
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict[str, Any] | None = None,
        *,
        task_names: Sequence[str] | None = None,
        overwrite: bool = False,
        timeout: float = 60.0,
        journal_mode: str = "wal",
        read_only: bool = False,
    ) -> None:
        if journal_mode.lower() not in ("wal", "delete"):
            raise ValueError(f"journal_mode must be 'wal' or 'delete', got {journal_mode!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.path = Path(path)
        self.timeout = float(timeout)
        self.journal_mode = journal_mode.lower()
        self.read_only = bool(read_only)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._identity: tuple[str | None, str | None] | None = None  # (fingerprint, created_at) as stored
        if read_only and overwrite:
            raise ValueError("overwrite=True needs a writable store, not read_only=True")
        if (fingerprint is None or read_only) and not self.path.is_file():
            raise FileNotFoundError(f"no gain store at {self.path}; pass the trainer's fingerprint to create one")
        try:
            if fingerprint is None or read_only:
                try:
                    identity = self._read_identity(self.connection)
                except sqlite3.OperationalError as e:
                    if "no such table" not in str(e):
                        raise
                    identity = (None, None)
                if identity[0] is None:
                    raise ValueError(
                        f"{self.path} is not a lightning-etap gain store (no fingerprint recorded); a copy of a "
                        "store in use made without its -wal file looks like this: copy with GainStore.backup"
                    )
                self._identity = identity
                if fingerprint is not None:
                    self._check(json.loads(identity[0]), self._read_meta("task_names"), normalize_json(fingerprint),
                                None if task_names is None else [str(t) for t in task_names])
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.claim(fingerprint, task_names=task_names, overwrite=overwrite)
        except sqlite3.DatabaseError as e:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            raise _explained(e, self.path, self.read_only) from e

    # ---------------------------------------------------------------- connection
    @property
    def connection(self) -> sqlite3.Connection:
        """This process's connection (reopened after a fork; never shared between processes)."""
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = self._connect_read_only() if self.read_only else self._connect()
            except sqlite3.DatabaseError as e:
                raise _explained(e, self.path, self.read_only) from e
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            mode = self._retry(lambda: conn.execute(f"PRAGMA journal_mode = {self.journal_mode}").fetchone()[0])
            if str(mode).lower() != self.journal_mode:
                raise sqlite3.OperationalError(
                    f"could not switch {self.path} to journal_mode={self.journal_mode} (got {mode}); "
                    "is it on a network file system? see GainStore's documentation"
                )
            conn.execute("PRAGMA synchronous = FULL")  # a committed job survives a power cut, too
            self._retry(lambda: conn.executescript(_SCHEMA))
            self._checkpoint(conn)  # fold in the -wal a killed run may have left, so the main file is whole
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            wal = Path(f"{self.path}-wal")
            # SQLite cannot read a WAL-mode file whose folder it may not write (the -shm index cannot be
            # created). With no -wal left, the main file is the whole database and can be read as immutable.
            if "readonly" not in str(e) and "unable to open" not in str(e):
                raise
            if Path(f"{self.path}-shm").exists() and not (wal.exists() and wal.stat().st_size > 0):
                raise sqlite3.OperationalError(
                    f"{e}: {self.path} may be open for writing in another process (its -shm index exists) and "
                    "its folder is read-only, so it cannot be read safely; read it when that process has closed "
                    "it, or from a copy (GainStore.backup)"
                ) from e
            if wal.exists() and wal.stat().st_size > 0:
                raise sqlite3.OperationalError(
                    f"{e}: {self.path} has unmerged rows in {wal.name} and its folder is read-only, so SQLite "
                    "cannot read them; open the store once with write access (or copy the file and its -wal "
                    "to a writable folder) first"
                ) from e
        conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the write-ahead log into the main file and empty it (best effort: skipped when busy)."""
        if self.journal_mode != "wal":
            return
        try:
            conn.execute("PRAGMA busy_timeout = 1000")  # another process's long read must not stall us
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.DatabaseError:  # busy or locked: the rows stay in -wal, where they are safe
            pass
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")

    def _retry(self, fn, tries: int = 50):
        # Schema set-up and the journal-mode switch can report "locked" without using the busy handler.
        for i in range(tries):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or i == tries - 1:
                    raise
                time.sleep(0.05 * (1 + i % 5))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _write(self, *, verify: bool = True) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE ... COMMIT`` transaction (rolled back on error).

        With ``verify``, first check (inside the transaction) that the store still holds the
        experiment this object opened, so that nothing is written into a store another process
        replaced meanwhile.
        """
        if self.read_only:
            raise PermissionError(f"{self.path} was opened with read_only=True; open it without to write")
        conn = self.connection
        try:
            self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        except sqlite3.DatabaseError as e:
            raise _explained(e, self.path, self.read_only, "write to") from e
        try:
            if verify and self._read_identity(conn) != self._identity:
                raise FingerprintMismatchError(
                    f"{self.path} was overwritten by another process (overwrite=True) since this process "
                    "opened it: it now holds another experiment, or a fresh start of one; nothing was "
                    "written. Stop this collector, or point it at another store path."
                )
            yield conn
        except BaseException as e:
            conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.DatabaseError):
                raise _explained(e, self.path, self.read_only, "write to") from e
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise _explained(e, self.path, self.read_only, "write to") from e

    @staticmethod
    def _read_identity(conn: sqlite3.Connection) -> tuple[str | None, str | None]:
        rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('fingerprint', 'created_at')"))
        return rows.get("fingerprint"), rows.get("created_at")

    def close(self) -> None:
        """Fold the write-ahead log into the main file and close this process's connection.

        Safe to call more than once; the store reopens on next use. Afterwards the
        main file alone holds every row, unless another process still has the store
        open (its own close does the same).
        """
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                if not self.read_only:
                    self._checkpoint(conn)
            finally:
                conn.close()

    def backup(self, path: str | os.PathLike) -> Path:
        """Write a consistent copy of the store to ``path``: one self-contained file (no ``-wal``).

        Safe while collectors are writing (SQLite's backup API copies one
        snapshot). The copy is written next to ``path`` and renamed into
        place, so ``path`` is never half-written; it uses the rollback journal
        (a single file that any SQLite tool, or a read-only folder, can read).
        """
        target = Path(path)
        if target.exists() and target.resolve() == self.path.resolve():
            raise ValueError(f"backup({target}) would overwrite the store itself")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            dest = sqlite3.connect(tmp)
            try:
                self.connection.backup(dest)
                dest.execute("PRAGMA journal_mode = DELETE").fetchone()
            finally:
                dest.close()
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def __enter__(self) -> GainStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # a connection cannot travel to another process
        state = dict(self.__dict__)
        state["_conn"], state["_pid"] = None, -1
        return state

    def __repr__(self) -> str:
        return f"GainStore({str(self.path)!r}, {self.counts()})"

    # ---------------------------------------------------------------- identity
    def _read_meta(self, key: str) -> Any:
        row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _check(self, stored: Any, stored_names: list[str] | None, fingerprint: Any,
               names: list[str] | None, overwrite: bool = False) -> list[str]:
        """The differences between the stored identity and the given one (raises unless ``overwrite``)."""
        diff = fingerprint_diff(stored, fingerprint)
        if names is not None and stored_names is not None and stored_names != names:
            diff.append(f"task_names: store has {stored_names}, this run has {names}")
        if diff and not overwrite:
            listing = "\n  ".join(diff[:12]) + ("\n  ..." if len(diff) > 12 else "")
            raise FingerprintMismatchError(
                f"{self.path} holds results of a different experiment; differing keys:\n  {listing}\n"
                "Use a new store path for this experiment, or pass overwrite=True to delete the "
                "stored results and start over."
            )
        return diff

    def claim(
        self, fingerprint: dict[str, Any], *, task_names: Sequence[str] | None = None, overwrite: bool = False
    ) -> None:
        """Check that this store belongs to ``fingerprint`` (recording it, and the task order, if new).

        Raises:
            FingerprintMismatchError: the store holds another experiment's results
                and ``overwrite`` is false (see the class documentation).
        """
        fingerprint = normalize_json(fingerprint)
        names = None if task_names is None else [str(t) for t in task_names]
        with self._write(verify=False) as conn:
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if "fingerprint" in rows:
                version = json.loads(rows.get("schema_version", "null"))
                if version != SCHEMA_VERSION:
                    raise ValueError(
                        f"{self.path} has gain-store schema version {version}, this library writes "
                        f"{SCHEMA_VERSION}; use a new path"
                    )
                stored_names = json.loads(rows["task_names"]) if "task_names" in rows else None
                diff = self._check(json.loads(rows["fingerprint"]), stored_names, fingerprint, names, overwrite)
                if not diff:
                    if stored_names is None and names is not None:
                        conn.execute("INSERT INTO meta VALUES ('task_names', ?)", (_dumps(names),))
                    self._identity = (rows["fingerprint"], rows.get("created_at"))
                    return
                conn.execute("DELETE FROM results")
                conn.execute("DELETE FROM meta")
            env = {"python": sys.version.split()[0], "host": socket.gethostname()}
            for mod in ("torch", "lightning", "numpy"):
                if mod in sys.modules:
                    env[mod] = getattr(sys.modules[mod], "__version__", "?")
            meta = {"fingerprint": fingerprint, "schema_version": SCHEMA_VERSION, "created_at": _now(),
                    "environment": env}
            if names is not None:
                meta["task_names"] = names
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, _dumps(v)) for k, v in meta.items()])
            self._identity = (_dumps(fingerprint), _dumps(meta["created_at"]))

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint recorded in the store."""
        return self._read_meta("fingerprint")

    @property
    def task_names(self) -> tuple[str, ...] | None:
        """The task order recorded in the store (``None`` if none was given)."""
        names = self._read_meta("task_names")
        return None if names is None else tuple(names)

    @property
    def meta(self) -> dict[str, Any]:
        """Everything in the ``meta`` table (fingerprint, schema version, creation time, environment)."""
        return {k: json.loads(v) for k, v in self.connection.execute("SELECT key, value FROM meta")}

    # ---------------------------------------------------------------- writing
    def record(self, outcome: GroupOutcome) -> bool:
        """Record a finished job in one transaction.

        Returns ``False`` (and changes nothing) when the job is already done,
        e.g. finished meanwhile by another process; a failed row is replaced.
        ``outcome.group`` must be canonical (see
        :func:`~lightning_etap.groundtruth.canonical_group`).
        """
        losses = {str(t): float(v) for t, v in outcome.test_losses.items()}
        missing = [t for t in outcome.group if t not in losses]
        if missing:
            raise ValueError(f"outcome of group {list(outcome.group)} has no test loss for {missing}")
        now = _now()
        with self._write() as conn:
            cur = conn.execute(
                """
                INSERT INTO results (group_key, seed, size, status, test_losses, epochs, best_epoch, seconds,
                                     error, attempts, extra, collector, created_at, updated_at)
                VALUES (?, ?, ?, 'done', ?, ?, ?, ?, NULL, 1, ?, ?, ?, ?)
                ON CONFLICT (group_key, seed) DO UPDATE SET
                    status = 'done', test_losses = excluded.test_losses, epochs = excluded.epochs,
                    best_epoch = excluded.best_epoch, seconds = excluded.seconds, error = NULL,
                    attempts = results.attempts + 1, extra = excluded.extra,
                    collector = excluded.collector, updated_at = excluded.updated_at
                WHERE results.status != 'done'
                """,
                (group_key(outcome.group), int(outcome.seed), len(outcome.group), _dumps(losses),
                 int(outcome.epochs), int(outcome.best_epoch), _nan_to_none(outcome.seconds),
                 _dumps(normalize_json(outcome.extra, "extra")), _collector(), now, now),
            )
            return cur.rowcount > 0

    def record_failure(self, group: Sequence[str], seed: int, error: str) -> int:
        """Record a failed attempt (one transaction); returns the job's total attempts so far.

        A job already done stays done (its attempts are not changed) and ``0`` is returned.
        """
        now = _now()
        key = group_key(group)
        with self._write() as conn:
            conn.execute(
                """
                INSERT INTO results (group_key, seed, size, status, error, attempts, collector,
                                     created_at, updated_at)
                VALUES (?, ?, ?, 'failed', ?, 1, ?, ?, ?)
                ON CONFLICT (group_key, seed) DO UPDATE SET
                    error = excluded.error, attempts = results.attempts + 1,
                    collector = excluded.collector, updated_at = excluded.updated_at
                WHERE results.status != 'done'
                """,
                (key, int(seed), len(group), str(error), _collector(), now, now),
            )
            row = conn.execute(
                "SELECT status, attempts FROM results WHERE group_key = ? AND seed = ?", (key, int(seed))
            ).fetchone()
        return 0 if row[0] == "done" else int(row[1])

    # ---------------------------------------------------------------- reading
    def done_jobs(self) -> set[tuple[tuple[str, ...], int]]:
        """The finished ``(group, seed)`` jobs."""
        rows = self.connection.execute("SELECT group_key, seed FROM results WHERE status = 'done'")
        return {(parse_group_key(k), int(s)) for k, s in rows}

    def done_among(self, jobs: Iterable[tuple[Sequence[str], int]]) -> set[tuple[tuple[str, ...], int]]:
        """Which of ``jobs`` (canonical ``(group, seed)`` pairs) are done (one key lookup each)."""
        conn = self.connection
        out = set()
        for group, seed in jobs:
            row = conn.execute("SELECT 1 FROM results WHERE group_key = ? AND seed = ? AND status = 'done'",
                               (group_key(group), int(seed))).fetchone()
            if row is not None:
                out.add((tuple(group), int(seed)))
        return out

    def counts(self) -> dict[str, int]:
        """Number of jobs per status, e.g. ``{"done": 40, "failed": 1}``."""
        rows = self.connection.execute("SELECT status, COUNT(*) FROM results GROUP BY status")
        return {s: int(c) for s, c in rows}

    def __len__(self) -> int:
        return int(self.connection.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def outcomes(self, jobs: Iterable[tuple[Sequence[str], int]] | None = None) -> dict[tuple[tuple[str, ...], int], GroupOutcome]:
        """Finished jobs as :class:`GroupOutcome` objects, keyed by ``(group, seed)``.

        With ``jobs``, only those (missing or unfinished ones are left out).
        """
        rows = self.connection.execute(
            "SELECT group_key, seed, test_losses, epochs, best_epoch, seconds, extra "
            "FROM results WHERE status = 'done'"
        ).fetchall()
        wanted = None if jobs is None else {(tuple(g), int(s)) for g, s in jobs}
        out = {}
        for key, seed, losses, epochs, best, seconds, extra in rows:
            job = (parse_group_key(key), int(seed))
            if wanted is not None and job not in wanted:
                continue
            out[job] = GroupOutcome(
                group=job[0], seed=job[1], test_losses=json.loads(losses),
                epochs=int(epochs), best_epoch=int(best),
                seconds=float("nan") if seconds is None else float(seconds),
                extra=json.loads(extra) if extra else {},
            )
        return out

    def rows(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every job as a flat dict: :data:`COLUMNS`, then ``test_loss/<task>`` per task.

        Ordered by group size, group key and seed. ``status`` filters
        (``"done"`` or ``"failed"``).
        """
        query = (
            "SELECT group_key, seed, size, status, epochs, best_epoch, seconds, attempts, error, collector, "
            "created_at, updated_at, test_losses FROM results"
        )
        args: tuple = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status,)
        query += " ORDER BY size, group_key, seed"
        tasks = self.task_names
        out = []
        for row in self.connection.execute(query, args):
            record = dict(zip(COLUMNS, row[:-1]))
            losses = json.loads(row[-1]) if row[-1] else {}
            names = tasks if tasks is not None else sorted(losses)
            for t in names:
                record[f"test_loss/{t}"] = losses.get(t, math.nan)
            out.append(record)
        return out

    def to_pandas(self, status: str | None = None):
        """The jobs as a ``pandas.DataFrame`` (columns as in :meth:`rows`; needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - pandas is in the dev extra
            raise ImportError("GainStore.to_pandas needs pandas: pip install pandas (or use to_csv)") from e
        rows = self.rows(status)
        columns = list(COLUMNS) + [c for c in (rows[0] if rows else {}) if c not in COLUMNS]
        return pd.DataFrame(rows, columns=columns)

    def to_csv(self, path: str | os.PathLike, status: str | None = None) -> Path:
        """Write the jobs to a CSV file (standard library only; columns as in :meth:`rows`)."""
        rows = self.rows(status)
        path = Path(path)
        columns = list(COLUMNS) + [c for c in (rows[0] if rows else {}) if c not in COLUMNS]
        with atomic_file(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return path

    def gains(self, groups: Iterable[Sequence[str]] | None = None, seeds: Iterable[int] | None = None, **kwargs):
        """The stored results as :class:`~lightning_etap.groundtruth.GroupGains` (see :meth:`GroupGains.from_store`)."""
        from lightning_etap.groundtruth.gains import GroupGains

        return GroupGains.from_store(self, groups=groups, seeds=seeds, **kwargs)


def _explained(error: sqlite3.DatabaseError, path: Path, read_only: bool, action: str = "open") -> sqlite3.DatabaseError:
    """``error`` (raised using the store at ``path``) with the file, the likely cause and a remedy."""
    if getattr(error, "explained", False):
        return error
    text = str(error)
    low = text.lower()
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        hint = ("the file is damaged (truncated, overwritten, a disk fault), or is "
                "not a SQLite file. If a copy exists, use it; `sqlite3 <file> .recover` may save the rows; "
                "otherwise move the file aside and collect again into a new store")
    elif "readonly" in low or "read-only" in low or "unable to open" in low:
        if read_only:
            hint = "the file, its folder or its -wal/-shm files cannot be read"
        else:
            hint = ("the file or its folder is read-only (or on a read-only mount), or the folder does not "
                    "exist and cannot be created. SQLite needs to write next to the file even to read a "
                    "store in WAL mode: to only read it, open it with GainStore(path, read_only=True); "
                    "to collect into it, copy it to a writable folder")
    elif "locked" in low or "busy" in low:
        hint = "another process holds a lock on it for too long (raise timeout=, or stop that process)"
    elif "disk i/o" in low or "full" in low:
        hint = "the disk is full or failing, or the file is on a network file system (see GainStore's documentation)"
    else:
        hint = "see GainStore's documentation"
    out = type(error)(f"cannot {action} the gain store {path}: {text}: {hint}")
    out.explained = True
    return out


def _nan_to_none(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _collector() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
