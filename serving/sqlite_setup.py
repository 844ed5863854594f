"""SQLite set up for the gateway's stores (ledger, audit, idempotency): WAL and explicit BEGIN.

pysqlite's own transaction handling emits a deferred BEGIN only before DML, so a read-then-write
(a reservation's cap check) would run outside the transaction and two gateways could both see room
under a cap. Following SQLAlchemy's pysqlite documentation, pysqlite's BEGIN is disabled and the
``begin`` event emits one: ``BEGIN IMMEDIATE`` on the engine returned by ``writer()`` takes the
write lock up front, so a second writer waits in the busy handler instead of failing on a lock
upgrade; readers keep a deferred BEGIN and, under WAL, never block writers.
"""

from __future__ import annotations

from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event

_BEGIN_OPTION = "pilothouse_sqlite_begin"


def configure(engine: sa.Engine, *, busy_timeout_s: float, synchronous: Literal["NORMAL", "FULL"]) -> None:
    """NORMAL survives process crashes in WAL mode; FULL also survives power loss (one fsync per commit)."""

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
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get(_BEGIN_OPTION, 'DEFERRED')}")


def writer(engine: sa.Engine) -> sa.Engine:
    """The same engine, whose transactions begin IMMEDIATE (take the write lock at BEGIN)."""
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
