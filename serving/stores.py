"""One way to open the gateway's SQL stores (ledger, audit, idempotency): SQLite or PostgreSQL.

SQLite gets WAL and an explicit BEGIN. pysqlite's own transaction handling emits a deferred BEGIN
only before DML, so a read-then-write (a reservation's cap check) would run outside the transaction
and two gateways could both see room under a cap. Following SQLAlchemy's pysqlite documentation,
pysqlite's BEGIN is disabled and the ``begin`` event emits one: ``BEGIN IMMEDIATE`` on the engine
returned by ``writer()`` takes the write lock up front, so a second writer waits in the busy
handler instead of failing on a lock upgrade; readers keep a deferred BEGIN and, under WAL, never
block writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from .prepared import Prepared

_BEGIN_OPTION = "pilothouse_sqlite_begin"
log = logging.getLogger(__name__)
_T = TypeVar("_T")

UNREACHABLE: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.TimeoutError)
"""The store cannot take a read or write now (server down or restarting, connections refused, the pool exhausted,
a SQLite file still locked after the retries): a reason to answer 503 and retry later, not a bug (500)."""

_BEGIN = {mode: Prepared(f"BEGIN {mode}") for mode in ("DEFERRED", "IMMEDIATE")}  # every write transaction's first


def open_engine(url: str, *, purpose: str, busy_timeout_s: float, synchronous: Literal["NORMAL", "FULL"],
                create_dir: bool = True, **engine_options: Any) -> tuple[sa.Engine, str]:
    """(engine, backend name). ``synchronous``: NORMAL survives process crashes in WAL mode, FULL also
    power loss (one fsync per commit). Extra keyword arguments go to ``sqlalchemy.create_engine``."""
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # A server restart, an idle timeout or a pooler's reset leaves pooled connections dead: test each one as it
        # is checked out (one round trip), or every dead one fails the read or write that draws it, once.
        return sa.create_engine(parsed, **{"pool_pre_ping": True, **engine_options}), backend
    if backend != "sqlite":
        raise ValueError(f"{purpose} supports sqlite and postgresql URLs, not {backend!r}")
    if create_dir and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"timeout": busy_timeout_s, **engine_options.pop("connect_args", {})}
    engine = sa.create_engine(parsed, connect_args=connect_args, **engine_options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        _BEGIN[conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")].execute(conn, [{}])

    return engine, backend


def writer(engine: sa.Engine) -> sa.Engine:
    """The same engine, whose SQLite transactions begin IMMEDIATE (take the write lock at BEGIN).

    Also for creating tables: ``create_all`` reads the schema and then writes, and a deferred
    transaction that must upgrade to a write lock after another connection wrote gets SQLITE_BUSY at
    once, without the busy handler's wait (seen as a gateway 500 on its first request while a
    workflow runtime wrote to the same file).
    """
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


@contextlib.contextmanager
def begin_write(engine: sa.Engine) -> Iterator[sa.Connection]:
    """``engine.begin()`` for a write transaction, queued behind every other writer of the same SQLite file.

    SQLite lets one writer in at a time, and one that finds the file locked waits in SQLite's busy
    handler, which polls with sleeps of 1, 2, 5, 10, 15... ms. The gateway's ledger and audit
    threads write the same file continuously: at c=32 those sleeps were ~13 ms of a request's
    median latency (measured). Writers queue instead (``WriterQueue``), in this process and across
    processes, and each is handed the file the moment it is free. PostgreSQL locks rows, not the
    database: no queue.
    """
    with _queue(engine), engine.begin() as conn:
        yield conn


class HeldConnection:
    """A write connection that one thread keeps across its transactions: a group-commit writer's.

    ``begin_write`` checks a connection out of the pool and returns it for every transaction (the pool's
    events, the reset on return): a one-record audit commit cost 111 us of CPU that way and 85 us on a kept
    connection, against sqlite3's own 68 (``bench/audit_writer.py``, synchronous FULL). Under steady load the
    audit writer commits one or two records at a time, so it paid the difference nearly once per request.
    Not thread-safe: one thread owns it.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._conn: sa.Connection | None = None

    def run(self, work: Callable[[sa.Connection], _T], landed: Callable[[sa.Connection], bool | None] | None = None
            ) -> _T:
        """``work(conn)`` in one write transaction (queued like ``begin_write``'s) on the kept connection.

        A PostgreSQL restart, an idle timeout or a pooler's reset closes the connection between batches, and
        the next batch finds out at its first statement. Its rollback then invalidates the connection, and the
        batch is run once more on a new one: it never reached the server, so its callers are not failed for a
        connection they never used.

        A connection lost at the commit itself leaves its outcome unknown: the commit may have landed, and a
        replay would count its budget charges twice. ``landed`` looks on a new connection: True, the commit
        landed and ``work``'s result stands; False, nothing of it is there and the batch runs once more; None
        (or no ``landed``), it cannot tell and the error is raised.
        """
        replayed = False
        while True:
            conn = self._connection()
            committing = False
            try:
                with _queue(self.engine), conn.begin():
                    result = work(conn)
                    committing = True
                return result
            except sa.exc.DBAPIError:
                if replayed or not conn.invalidated:
                    raise
                if committing:
                    outcome = self._landed(landed)
                    if outcome is None:
                        raise
                    if outcome:
                        log.warning("the kept %s connection was lost at a commit that landed",
                                    self.engine.url.get_backend_name())
                        return result
                replayed = True
                log.warning("the kept %s connection was closed under it; writing the batch on a new one",
                            self.engine.url.get_backend_name())

    def _landed(self, landed: Callable[[sa.Connection], bool | None] | None) -> bool | None:
        """Whether a commit whose connection was lost landed (see ``run``); None when that cannot be told."""
        if landed is None:
            return None
        conn = self._connection()  # the lost one was invalidated: this is a new one
        try:
            with conn.begin():
                return landed(conn)
        except sa.exc.DBAPIError:
            log.warning("could not look up whether a commit landed", exc_info=True)
            return None

    def _connection(self) -> sa.Connection:
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                conn.close()
            conn = self._conn = self.engine.connect()
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


WRITER_LOCK_SUFFIX = "-writer-lock"
"""The file beside a SQLite store (``<store>-writer-lock``, empty) whose lock its writers queue on."""


class WriterQueue:
    """The turn to write one SQLite file: this process's threads take turns on a lock, processes on an ``flock``.

    Why: two gateway replicas (or a replica and a workflow runtime) writing one file met SQLite's busy handler on
    nearly every transaction: 621 of its sleeps in 754 commits, two replicas at c=16 each (strace), and their
    p50 ~2 ms above one replica's at c=32. A blocking ``flock`` wakes the next writer when the lock is released,
    and the kernel releases it when its holder dies, ``kill -9`` included. No library fits: ``filelock`` and
    ``fasteners`` acquire by polling (``LOCK_NB`` and a sleep, 50 ms by default), which is the wait this replaces.

    The price: SQLite's busy timeout no longer bounds a wait behind a writer of another process that hangs while
    holding the file (its disk stalled, the process stopped); the wait ends when that writer moves or dies.
    Without the lock file (a read-only directory) writers fall back to SQLite's busy handler, with a warning.
    """

    def __init__(self, path: Path) -> None:
        self.lock_path = path.with_name(path.name + WRITER_LOCK_SUFFIX)
        self._threads = threading.Lock()
        self._fd: int | None = None
        self._opened = False

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            fd = self._descriptor()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *_: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _descriptor(self) -> int | None:
        """This process's open lock file, opened on first use; None where it cannot be (said once)."""
        if not self._opened:
            self._opened = True
            try:
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                log.warning("cannot open %s (%s): writers of this store in other processes will meet SQLite's "
                            "busy handler instead of queueing", self.lock_path, exc)
        return self._fd

    def forget(self) -> None:
        """Start afresh in a forked child. The child shares its parent's open lock file, and with it the parent's
        lock: kept, the two would not exclude each other, and a parent dying with the lock held would leave it held
        while the child lives. A thread lock some parent thread held at the fork would never be released."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._threads = threading.Lock()
        self._fd = None
        self._opened = False


_writer_queues: dict[Path, WriterQueue] = {}
_writer_queues_guard = threading.Lock()


def _forget_writer_queues() -> None:
    """In a forked child: every queue starts afresh (``WriterQueue.forget``), and so does the registry's guard, which
    a parent thread may have held at the fork."""
    global _writer_queues_guard
    _writer_queues_guard = threading.Lock()
    for queue in _writer_queues.values():
        queue.forget()


os.register_at_fork(after_in_child=_forget_writer_queues)


def _queue(engine: sa.Engine) -> contextlib.AbstractContextManager[Any]:
    """The queue for writing the engine's SQLite file (see ``begin_write``); none for PostgreSQL."""
    path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    return writer_queue(path) if path and path != ":memory:" else contextlib.nullcontext()


@functools.cache
def writer_queue(path: str) -> WriterQueue:
    """One queue per file, however its path is spelled; resolved once per spelling, not per transaction."""
    key = Path(path).resolve()
    with _writer_queues_guard:
        return _writer_queues.setdefault(key, WriterQueue(key))


def _is_locked(exc: BaseException) -> bool:
    """SQLite's busy error: the busy timeout ran out while another writer held the lock."""
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    text = str(exc.orig).lower()
    return "locked" in text or "busy" in text


_P = ParamSpec("_P")
LOCKED_ATTEMPTS = 8
_retry_locked = retry(retry=retry_if_exception(_is_locked), stop=stop_after_attempt(LOCKED_ATTEMPTS - 1),
                      wait=wait_random_exponential(multiplier=0.02, max=1.0), reraise=True)


def retry_when_locked(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Run ``fn`` again after SQLite's busy error, up to ``LOCKED_ATTEMPTS`` in all, with random backoff.

    Only for idempotent transactions (conditional on a row's state, or ON CONFLICT DO NOTHING):
    replaying one after a busy error must not double-count. The first attempt runs outside tenacity:
    tenacity's per-call set-up (a copy of its ``Retrying``, the state machine) cost 10-17 us, paid by
    every group commit of the audit writer, which almost never meets a busy error. The second attempt
    follows at once: the busy handler already waited ``busy_timeout`` before the error came.
    """
    again = _retry_locked(fn)

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except sa.exc.OperationalError as exc:
            if not _is_locked(exc):
                raise
        return again(*args, **kwargs)

    return call
