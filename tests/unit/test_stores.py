"""Opening a store on a SQLite file another process is writing to waits for it instead of failing.

The gateway opens its stores on its first request, while a workflow runtime may be writing to the same
file: a deferred ``create_all`` that read the schema before that writer committed got SQLITE_BUSY at once
(no busy-handler wait) and the gateway answered 500 (found by the Milvus outage drill).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pilothouse.serving import stores
from pilothouse.serving.audit import AuditLog, as_row
from pilothouse.serving.idempotency import IdempotencyStore
from pilothouse.serving.ledger import Ledger
from pilothouse.serving.prepared import Prepared
from pilothouse.serving.runs import RunStore
from tests.unit.test_audit import record

OPENERS: dict[str, Callable[[str], Any]] = {"ledger": Ledger, "idempotency": IdempotencyStore, "audit": AuditLog,
                                            "runs": RunStore}


@pytest.mark.parametrize("store", sorted(OPENERS))
def test_a_store_opens_while_another_connection_writes(tmp_path: Path, store: str) -> None:
    path = tmp_path / "shared.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode = WAL")
    other.execute("CREATE TABLE elsewhere (n INTEGER)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO elsewhere VALUES (1)")

    def commit_soon() -> None:
        time.sleep(0.5)  # the store has begun reading the schema by now
        other.execute("COMMIT")

    committer = threading.Thread(target=commit_soon)
    committer.start()
    opened = OPENERS[store](f"sqlite:///{path}")
    committer.join()
    opened.close()
    other.close()


def _shared_table(tmp_path: Path) -> tuple[str, sa.Engine]:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = stores.writer(stores.open_engine(url, purpose="test", busy_timeout_s=0, synchronous="NORMAL")[0])
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (writer INTEGER, n INTEGER)")
    return url, engine


def test_writers_in_one_process_take_turns_without_the_busy_handler(tmp_path: Path) -> None:
    """Two threads writing one SQLite file through ``begin_write`` queue on the process's lock: with no busy
    timeout at all, neither ever meets SQLITE_BUSY (through ``engine.begin()`` alone they do at once)."""
    url, first = _shared_table(tmp_path)
    engines = [first, stores.writer(stores.open_engine(url, purpose="test", busy_timeout_s=0, synchronous="NORMAL")[0])]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for n in range(150):
                with stores.begin_write(engines[i]) as conn:
                    conn.exec_driver_sql("INSERT INTO t VALUES (?, ?)", (i, n))
                    time.sleep(0.0005)  # hold the write lock a moment, as a batch does
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engines[0].connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM t").scalar() == 300


_WRITER = """
import sys, time
from pilothouse.serving import stores
url, who, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine = stores.writer(stores.open_engine(url, purpose="test", busy_timeout_s=0, synchronous="NORMAL")[0])
print("ready", flush=True)
sys.stdin.readline()
for n in range(rows):
    with stores.begin_write(engine) as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (?, ?)", (who, n))
        time.sleep(0.0005)
"""


def test_writers_in_two_processes_take_turns_without_the_busy_handler(tmp_path: Path) -> None:
    """Two gateway replicas write one store: with no busy timeout at all, neither meets SQLITE_BUSY, because they
    queue on the store's writer lock (through ``engine.begin()`` alone the second one fails at once)."""
    url, engine = _shared_table(tmp_path)
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, url, str(i), "300"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for w in writers:  # both started and connected, then both let go at once: their writes overlap
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        for w in writers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        for w in writers:
            _, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
    finally:
        for w in writers:
            w.kill()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT writer, COUNT(*) FROM t GROUP BY writer").all() == [(0, 300), (1, 300)]


def test_a_writer_killed_holding_the_store_lets_the_next_one_in(tmp_path: Path) -> None:
    """``kill -9`` of a process mid-write (the gateway drill's fault) must not leave the store locked for the others:
    the kernel drops a dead process's lock."""
    _, engine = _shared_table(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pilothouse.serving import stores\n"
        "stores.writer_queue(sys.argv[1]).__enter__()\nprint('holding', flush=True)\ntime.sleep(600)\n"),
        str(tmp_path / "shared.db")], stdout=subprocess.PIPE, text=True)
    wrote = threading.Event()

    def write() -> None:
        with stores.begin_write(engine) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (9, 1)")
        wrote.set()

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        threading.Thread(target=write, daemon=True).start()
        assert not wrote.wait(0.5)  # queued behind the holder
    finally:
        holder.kill()
        holder.wait()
    assert wrote.wait(30)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT writer FROM t").scalars().all() == [9]


def test_a_forked_child_does_not_share_its_parents_turn(tmp_path: Path) -> None:
    """A process forked while its parent writes inherits the parent's open lock file, and with it the parent's lock,
    and the parent's thread lock held: it starts afresh, its own descriptor kept out by the parent's lock."""
    queue = stores.writer_queue(str(tmp_path / "shared.db"))
    with queue:
        child = os.fork()
        if child == 0:
            code = 1
            try:
                assert queue._threads.acquire(blocking=False)  # not the parent's, held at the fork
                fd = queue._descriptor()
                assert fd is not None
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_the_lock_file_writers_fall_back_to_the_busy_handler(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A store whose lock file cannot be opened (here a directory is in its place) still takes writes, and says why
    other processes' writers will wait in SQLite's busy handler."""
    (tmp_path / f"shared.db{stores.WRITER_LOCK_SUFFIX}").mkdir()
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = stores.writer(stores.open_engine(url, purpose="test", busy_timeout_s=1, synchronous="NORMAL")[0])
    with caplog.at_level(logging.WARNING, logger="pilothouse.serving.stores"), stores.begin_write(engine) as conn:
        conn.exec_driver_sql("CREATE TABLE t (n INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT n FROM t").scalars().all() == [1]
    assert "busy handler instead of queueing" in caplog.text


def test_a_group_commit_that_finds_the_file_locked_past_the_busy_timeout_is_retried(tmp_path: Path) -> None:
    """The writers' statements run on the driver's cursor (``prepared``), not through ``Connection.execute``;
    SQLite's "database is locked" must still surface as SQLAlchemy's OperationalError, which the retry
    recognises: the record lands once, after the other process lets go, instead of failing the request."""
    from pilothouse.serving.audit import AuditRecord

    path = tmp_path / "shared.db"
    log = AuditLog(f"sqlite:///{path}", busy_timeout_s=0.02)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.3, other.execute, args=("COMMIT",))
    releaser.start()
    started = time.monotonic()
    assert log.append(AuditRecord(id="r1", tenant="team"))
    assert time.monotonic() - started >= 0.25  # it did meet the lock, and waited it out
    releaser.join()
    assert [r.id for r in log.tail()] == ["r1"]
    log.close()
    other.close()


def _locked() -> Exception:
    return sa.exc.OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked"))


@pytest.mark.parametrize(("failures", "error", "calls", "outcome"), [
    (2, "locked", 3, contextlib.nullcontext()),  # retried until the lock is free
    (100, "locked", stores.LOCKED_ATTEMPTS,      # bounded: the last busy error reaches the caller
     pytest.raises(sa.exc.OperationalError, match="locked")),
    (1, "disk I/O error", 1,                     # any other error: at once, never replayed
     pytest.raises(sa.exc.OperationalError, match="disk I/O error")),
], ids=["retried", "bounded", "not-busy"])
def test_retry_when_locked_replays_only_busy_errors_and_gives_up(
        failures: int, error: str, calls: int, outcome: contextlib.AbstractContextManager[Any]) -> None:
    attempts: list[int] = []

    @stores.retry_when_locked
    def write(value: str) -> str:
        attempts.append(1)
        if len(attempts) <= failures:
            raise _locked() if error == "locked" else sa.exc.OperationalError("INSERT", {}, Exception(error))
        return value

    with outcome:
        assert write("done") == "done"
    assert len(attempts) == calls


def test_a_held_connection_is_reused_and_replaced_once_it_fails(tmp_path: Path) -> None:
    """The audit writer keeps one connection for all its batches; one that broke (a PostgreSQL restart)
    is invalidated by SQLAlchemy, and the next batch gets a new one instead of failing forever."""
    log = AuditLog(f"sqlite:///{tmp_path / 'held.db'}")
    held = log.held_writer()
    try:
        first = held.run(lambda conn: conn)
        assert held.run(lambda conn: conn) is first
        first.invalidate()  # what SQLAlchemy does to a connection whose database went away
        assert held.run(lambda conn: conn.exec_driver_sql("SELECT COUNT(*) FROM audit_records").scalar()) == 0
        assert held.run(lambda conn: conn) is not first
    finally:
        held.close()
        log.close()


LOST = "server closed the connection unexpectedly"


@pytest.mark.parametrize(("fails", "dead", "outcome", "runs"), [
    # the connection died before the batch reached the server: it runs again on a new one
    ("before commit", True, contextlib.nullcontext(), 2),
    # a live connection refused the batch (a constraint, a full disk): that error, at once
    ("before commit", False, pytest.raises(sa.exc.OperationalError, match=LOST), 1),
    # the commit may have landed: a replay could charge budgets twice
    ("at commit", True, pytest.raises(sa.exc.OperationalError, match=LOST), 1),
])
def test_a_held_connection_replays_a_batch_only_when_it_died_before_the_commit(
        tmp_path: Path, fails: str, dead: bool, outcome: contextlib.AbstractContextManager[Any], runs: int) -> None:
    log = AuditLog(f"sqlite:///{tmp_path / 'held.db'}")
    held = log.held_writer()
    attempts: list[sa.Connection] = []

    def fail(conn: sa.Connection) -> None:
        if dead:
            conn.invalidate()  # what SQLAlchemy's rollback does to a connection whose server went away
        raise sa.exc.OperationalError("SELECT 1", {}, Exception(LOST))

    def work(conn: sa.Connection) -> str:
        attempts.append(conn)
        if len(attempts) == 1:
            if fails == "before commit":
                fail(conn)
            sa.event.listen(conn, "commit", fail, once=True)
        return "written"

    try:
        with outcome:
            assert held.run(work) == "written"
        assert len(attempts) == runs
        assert len({id(conn) for conn in attempts}) == runs  # a replay runs on a new connection
    finally:
        held.close()
        log.close()


@pytest.mark.parametrize(("landed", "runs"), [
    (True, 1),  # the commit landed, then the connection went: its result stands, nothing runs twice
    (False, 2),  # the connection went before the commit landed: nothing of it is there, the batch runs again
])
def test_an_audit_batch_whose_connection_is_lost_at_the_commit_is_looked_up(store_url: str, landed: bool,
                                                                             runs: int) -> None:
    """A PostgreSQL connection lost during COMMIT leaves its outcome unknown; the audit writer looks its rows up
    on a new connection instead of failing every request of the batch (which then answered 503)."""
    log = AuditLog(store_url)
    held = log.held_writer()
    charged: list[sa.Connection] = []

    def lose(conn: sa.Connection) -> None:
        if landed:
            conn.connection.dbapi_connection.execute("COMMIT")  # type: ignore[union-attr]
        conn.invalidate()
        raise sa.exc.OperationalError("COMMIT", {}, Exception(LOST))

    def settle(conn: sa.Connection) -> str:  # the batch's budget work, in the same transaction
        charged.append(conn)
        if len(charged) == 1:
            sa.event.listen(conn, "commit", lose, once=True)
        return "settled"

    try:
        _, done = log.insert_rows_with([as_row(record("req-lost"))], settle, held)
        assert done == "settled" and len(charged) == runs
        assert [r.id for r in log.tail()] == ["req-lost"]
    finally:
        held.close()
        log.close()


def test_an_audit_batch_lost_at_the_commit_whose_rows_predate_it_is_not_replayed(store_url: str) -> None:
    """Rows that were there before (a duplicate insert skipped them) cannot tell whether this commit landed:
    the error stands, as a replay could charge the batch's budgets twice."""
    log = AuditLog(store_url)
    log.insert_rows([as_row(record("req-dup"))])
    held = log.held_writer()
    calls: list[int] = []

    def lose(conn: sa.Connection) -> None:
        conn.invalidate()
        raise sa.exc.OperationalError("COMMIT", {}, Exception(LOST))

    def settle(conn: sa.Connection) -> None:
        calls.append(1)
        sa.event.listen(conn, "commit", lose, once=True)

    try:
        with pytest.raises(sa.exc.OperationalError, match=LOST):
            log.insert_rows_with([as_row(record("req-dup"))], settle, held)
        assert len(calls) == 1
    finally:
        held.close()
        log.close()


class _CountedDateTime(sa.TypeDecorator[datetime]):
    """A DateTime whose binds are counted: how many times Prepared formatted a value."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True
    binds = 0

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        type(self).binds += 1
        return value


def test_prepared_binds_a_repeated_datetime_once_and_every_other_value_as_itself(store_url: str) -> None:
    """The bind of a repeated value is remembered (a batch's ``written_at``); a different value, even an equal
    one or one seen before the last, is bound as itself, never as a neighbour's."""
    engine = sa.create_engine(store_url)
    table = sa.Table("stamps", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("at", sa.DateTime(timezone=True), nullable=False))
    table.metadata.create_all(engine)
    insert = Prepared("INSERT INTO stamps (id, at) VALUES (:id, :at)", at=_CountedDateTime())
    first, second = datetime(2026, 1, 1, 12, 0, 0, 1, tzinfo=UTC), datetime(2026, 1, 2, 0, 0, tzinfo=UTC)
    values = [first, first, second, first, second, datetime(2026, 1, 1, 12, 0, 0, 1, tzinfo=UTC)]
    _CountedDateTime.binds = 0
    try:
        with engine.begin() as conn:
            insert.execute(conn, [{"id": i, "at": at} for i, at in enumerate(values)])
        with engine.connect() as conn:
            stored = [row.at for row in conn.execute(sa.select(table).order_by(table.c.id))]
        assert [at.replace(tzinfo=UTC) if at.tzinfo is None else at for at in stored] == values
        assert _CountedDateTime.binds == 5  # the second row's value is the first's object: bound once for both
    finally:
        table.metadata.drop_all(engine)
        engine.dispose()
