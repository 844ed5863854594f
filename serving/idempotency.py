"""``Idempotency-Key``: a retried request gets the stored answer, never a second backend call or charge.

One row per (tenant, key) in the ``idempotency_keys`` table of the gateway's store (same URL as the
audit log and the ledger). A request *claims* its key before dispatch (insert; the primary key makes
two concurrent claims exclusive), then either stores its 200 answer (``complete``) or gives the
claim back (``abandon``) so a retry of a failed request is tried again. Outcomes of ``claim``:

* ``Claimed``: this request owns the key; dispatch it.
* ``Stored``: same key, same body, answered before: replay ``body`` (no backend, no charge).
* ``Conflict``: same key with a different body (409), or the first request is still running (409).

The body is compared by its SHA-256 over the raw request bytes. Rows are durable (SQLite WAL with
``synchronous=FULL``, or PostgreSQL); ``purge`` drops keys older than their retention, and
``release_stale`` gives back claims whose request died before completing or abandoning them (the gateway's
upkeep, after its stale-reservation expiry), so a retry is dispatched instead of answered 409 for a day.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from . import stores

metadata = sa.MetaData()

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # sha256(tenant \0 key): keys may be long or odd
    sa.Column("body_hash", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending | done
    sa.Column("status_code", sa.Integer),
    sa.Column("content_type", sa.String(128)),
    sa.Column("body", sa.LargeBinary),
    sa.Column("request_id", sa.String(128)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

PENDING = "pending"
DONE = "done"


@dataclass(frozen=True)
class Claimed:
    row_id: str


@dataclass(frozen=True)
class Stored:
    status_code: int
    content_type: str
    body: bytes
    request_id: str | None


@dataclass(frozen=True)
class Conflict:
    message: str


def row_id(tenant: str, key: str) -> str:
    return hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()


def body_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class IdempotencyStore:
    """Sync SQLAlchemy store; the gateway calls the ``a*`` wrappers (threads, not the event loop)."""

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0) -> None:
        self.engine, self.backend = stores.open_engine(url, purpose="idempotency store",
                                                       busy_timeout_s=busy_timeout_s, synchronous="FULL")
        metadata.create_all(stores.writer(self.engine))  # IMMEDIATE: see stores.writer

    def close(self) -> None:
        self.engine.dispose()

    def claim(self, tenant: str, key: str, raw_body: bytes, request_id: str) -> Claimed | Stored | Conflict:
        rid, digest = row_id(tenant, key), body_hash(raw_body)
        try:
            with self.engine.begin() as conn:
                conn.execute(idempotency_keys.insert().values(id=rid, body_hash=digest, state=PENDING,
                                                              request_id=request_id, created_at=datetime.now(UTC)))
            return Claimed(rid)
        except sa.exc.IntegrityError:
            pass
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(idempotency_keys).where(idempotency_keys.c.id == rid)).first()
        if row is None:  # abandoned between our insert and read: claim again
            return self.claim(tenant, key, raw_body, request_id)
        if row.body_hash != digest:
            return Conflict("Idempotency-Key was already used with a different request body.")
        if row.state != DONE:
            return Conflict("A request with this Idempotency-Key is still in progress; retry later.")
        return Stored(row.status_code, row.content_type or "application/json", bytes(row.body or b""),
                      row.request_id)

    def complete(self, rid: str, status_code: int, content_type: str, body: bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(idempotency_keys.update().where(idempotency_keys.c.id == rid)
                         .values(state=DONE, status_code=status_code, content_type=content_type, body=body))

    def abandon(self, *rids: str) -> None:
        """Give back claims whose request will not answer, so a retry with the key is dispatched."""
        with self.engine.begin() as conn:
            conn.execute(idempotency_keys.delete().where(idempotency_keys.c.id.in_(rids),
                                                         idempotency_keys.c.state == PENDING))

    def release_stale(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Give back claims still ``pending`` after ``older_than``: their request died before it could complete or
        abandon them (a crashed replica, a store outage at the time). Until then a retry with the key is told the
        first request is still in progress; after it, the retry is dispatched. ``older_than`` must be far above
        the longest request, or a slow request's retry would run twice (the gateway uses its stale-reservation
        expiry, 30 minutes)."""
        return self._delete_older(older_than, now, idempotency_keys.c.state == PENDING)

    def purge(self, older_than: timedelta) -> int:
        return self._delete_older(older_than, None)

    def _delete_older(self, older_than: timedelta, now: datetime | None, *where: sa.ColumnElement[bool]) -> int:
        cutoff = (now or datetime.now(UTC)) - older_than
        with self.engine.begin() as conn:
            deleted = conn.execute(idempotency_keys.delete().where(idempotency_keys.c.created_at < cutoff, *where))
        return deleted.rowcount

    async def aclaim(self, tenant: str, key: str, raw_body: bytes, request_id: str) -> Claimed | Stored | Conflict:
        return await asyncio.to_thread(self.claim, tenant, key, raw_body, request_id)

    async def acomplete(self, rid: str, status_code: int, content_type: str, body: bytes) -> None:
        await asyncio.to_thread(self.complete, rid, status_code, content_type, body)

    async def aabandon(self, *rids: str) -> None:
        await asyncio.to_thread(self.abandon, *rids)
