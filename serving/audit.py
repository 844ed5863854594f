"""The audit trail: one append-only record per request and per workflow step (DESIGN.md §5).

A record must be enough to reconstruct the decision path afterwards (``pilothouse audit show``):
which backend was chosen and why, every fallback with its error class, the budget reservation and
what became of it, the cache, tokens, latency and the trace id. Content is stored verbatim only when
the workflow's RoutingTable says so (``audit_store_prompts`` / ``audit_store_outputs``); otherwise
only its SHA-256, so a record can still prove *which* prompt was sent without keeping it.

"Durable before the response is acknowledged" is the expensive part. Committing (and fsyncing) one
transaction per request would cap the gateway at the disk's fsync rate, so ``AuditWriter`` group
commits: one background thread takes everything queued since its last commit and writes it in a
single transaction; each ``await writer.write(record)`` resolves only once the batch holding its
record committed. Under load, batches grow and the fsync cost is shared; at low load a batch is one
record and the latency is one commit.

Storage is the ``audit_records`` table over SQLAlchemy: a SQLite file (WAL, ``synchronous=FULL`` on
this engine's connections so a commit survives power loss, not only a process crash) or PostgreSQL
by URL. Inserts are ``ON CONFLICT DO NOTHING`` on the id, so a retried write cannot duplicate a row.
There is no update API; ``purge`` deletes whole records past their retention.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import stores
from .group_commit import GroupCommitter
from .prepared import Prepared

if TYPE_CHECKING:
    from .ledger import Ledger, SettleOp

T = TypeVar("T")

log = logging.getLogger(__name__)

# -- the record --------------------------------------------------------------------------------------


class _Part(BaseModel):
    # Records outlive the code that wrote them: a newer gateway may add fields an older CLI must
    # still be able to show, so unknown fields are ignored on read rather than refused.
    model_config = ConfigDict(extra="ignore")


class RetrievalHit(_Part):
    id: str
    score: float
    mode: str


class RoutingAttempt(_Part):
    """One try of one backend. ``error_class`` is None for the attempt that answered."""

    backend: str
    error_class: str | None = None
    message: str = ""
    latency_ms: float | None = None


class RoutingDecision(_Part):
    backend: str | None = Field(default=None, description="Backend that answered; None when none did.")
    reason: str = ""
    table_revision: int | None = None
    attempts: list[RoutingAttempt] = Field(default_factory=list)


class BudgetTrail(_Part):
    """Reserve → commit or release, or the denial that stopped the request."""

    policy: str
    reservation_id: str | None = None
    reserved_usd: float | None = None
    committed_usd: float | None = None
    released: bool = False
    denied: str | None = Field(default=None, description="The 429 message when the reservation was refused.")


class TokenUsage(_Part):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ActionTaken(_Part):
    """A side effect a step performed; the idempotency key is what makes a retry not repeat it."""

    model_config = ConfigDict(extra="allow")
    idempotency_key: str | None = None
    kind: str | None = None


class HumanDecision(_Part):
    reviewer: str
    decision: str
    reason: str | None = None
    ts: datetime | None = None


class AuditRecord(_Part):
    """One request (``kind="request"``) or one workflow step (``kind="step"``).

    ``id`` is the primary key: the request id for a request record. A step record needs its own id
    (e.g. ``<run_id>/<step>``) so it does not collide with the request that carried it.
    """

    id: str = Field(min_length=1, max_length=128)
    kind: Literal["request", "step"] = "request"
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))
    trace_id: str = ""
    run_id: str | None = None
    tenant: str
    workflow: str | None = None
    route: str | None = Field(default=None, description="Route / step name within the workflow.")
    model: str | None = Field(default=None, description="The model the client asked for, as sent.")
    inputs: Any = None
    inputs_hash: str | None = None
    retrieval: list[RetrievalHit] = Field(default_factory=list)
    routing: RoutingDecision | None = None
    budget: list[BudgetTrail] = Field(default_factory=list)
    cache_hit: bool = False
    usage: TokenUsage | None = None
    output: Any = None
    output_hash: str | None = None
    status_code: int | None = None
    latency_ms: float | None = None
    action: ActionTaken | None = None
    human_decision: HumanDecision | None = None

    @field_validator("ts")
    @classmethod
    def _aware_utc(cls, ts: datetime) -> datetime:
        """Retention and ``tail`` compare timestamps; a naive one would be guessed wrong, so refuse it."""
        if ts.tzinfo is None:
            raise ValueError("ts must be timezone-aware (UTC)")
        return ts.astimezone(UTC)


def content_hash(content: Any) -> str:
    """``sha256:<hex>`` of text as UTF-8, or of anything else as canonical JSON (sorted keys).

    Canonical so the same messages hash the same whichever process or dict order produced them. An unpaired
    surrogate is hashed as its code point's three bytes (``surrogatepass``) instead of failing: valid text hashes
    as it always did.
    """
    data = content if isinstance(content, bytes) else _text(content).encode("utf-8", "surrogatepass")
    return "sha256:" + hashlib.sha256(data).hexdigest()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
"""One encoder for every hash: ``json.dumps`` with arguments builds a new encoder per call, ~9,000 of the ~29,000
instructions a one-message chat's canonical text took (callgrind), twice per request (prompt and answer)."""


def _text(content: Any) -> str:
    return content if isinstance(content, str) else _CANONICAL.encode(content)


UNPAIRED_SURROGATE = re.compile("[\ud800-\udfff]")
"""A surrogate left in a decoded str: its JSON escape had no pair. JSON, but no UTF-8 can carry it."""


def redact(content: Any, store: bool) -> tuple[Any, str | None]:
    """(content to store or None, its hash). The hash is kept either way, to correlate records.

    Content with an unpaired surrogate (a backend's answer may carry the escape; requests with one are refused) is
    kept and hashed with U+FFFD in its place, as Unicode prescribes for ill-formed text: the record is stored as
    JSON, which no UTF-8 can carry it in. Found in the canonical text the hash is taken of anyway."""
    if content is None:
        return None, None
    text = _text(content)
    if not text.isascii() and UNPAIRED_SURROGATE.search(text):  # isascii is a flag CPython keeps: O(1)
        text = UNPAIRED_SURROGATE.sub("\ufffd", text)
        content = text if isinstance(content, str) else json.loads(text)
    return (content if store else None), content_hash(text)  # the canonical text hashes as its content does


# -- the table ---------------------------------------------------------------------------------------

metadata = sa.MetaData()

audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("tenant", sa.String(253), nullable=False),
    sa.Column("workflow", sa.String(253)),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("trace_id", sa.String(64), nullable=False, default=""),
    # When the row was written (UTC, by the writer). ``ts`` is when the request began, so records of
    # long requests land after later ones; followers track this column so none is skipped.
    sa.Column("written_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("record", sa.Text, nullable=False),
)


INSERT_SQL = ("INSERT INTO audit_records (id, ts, tenant, workflow, kind, trace_id, written_at, record) "
              "VALUES (:id, :ts, :tenant, :workflow, :kind, :trace_id, :written_at, :record) "
              "ON CONFLICT (id) DO NOTHING")
"""The one insert of a record (named parameters, as SQLAlchemy's text and sqlite3 both take them)."""
_INSERT = Prepared(INSERT_SQL, ts=audit_records.c.ts.type, written_at=audit_records.c.written_at.type)
"""The group commit's insert (``prepared``: the writer thread's hot path); a retried write cannot duplicate a row."""


def as_row(record: AuditRecord) -> dict[str, Any]:
    """The record as the ``audit_records`` row ``AuditLog.insert_rows`` takes (serialised once, by the caller)."""
    return {"id": record.id, "ts": record.ts, "tenant": record.tenant, "workflow": record.workflow,
            "kind": record.kind, "trace_id": record.trace_id, "record": record.model_dump_json(exclude_none=True)}


FOLLOW_OVERLAP = timedelta(seconds=5)
"""How far back ``follow`` re-reads: a batch stamped just before another writer's later one may commit
after it (or another replica's clock may lag); ids already shown are skipped."""


class AuditLog:
    """The ``audit_records`` table: append, read back, purge. Sync; use ``AuditWriter`` from asyncio.

    ``create=False`` opens an existing store read-mostly (the CLI): no table or directory is made.
    """

    def __init__(self, url: str, *, create: bool = True, busy_timeout_s: float = 30.0, **engine_options: Any) -> None:
        self.engine, self.backend = stores.open_engine(url, purpose="audit log", busy_timeout_s=busy_timeout_s,
                                                       synchronous="FULL", create_dir=create, **engine_options)
        self._writer = stores.writer(self.engine)
        self._count_lock = threading.Lock()
        self.transactions = 0
        """Write transactions committed by this instance (the group-commit measure)."""
        if create:
            metadata.create_all(self._writer)  # IMMEDIATE: see stores.writer

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- writes ------------------------------------------------------------------------------------

    def append(self, record: AuditRecord) -> bool:
        """Write one record in its own transaction; False when its id was already there."""
        return self.insert_rows([as_row(record)]) == 1

    def insert_rows(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert prepared rows in one transaction; returns how many were new (duplicates are skipped),
        or -1 where the driver does not count an executemany."""
        return self.insert_rows_with(rows)[0] if rows else 0

    def held_writer(self) -> stores.HeldConnection:
        """A write connection for one thread to keep (the group-commit writer's); pass it to ``insert_rows_with``."""
        return stores.HeldConnection(self._writer)

    @stores.retry_when_locked
    def insert_rows_with(self, rows: Sequence[dict[str, Any]], also: Callable[[sa.Connection], T] | None = None,
                         held: stores.HeldConnection | None = None) -> tuple[int, T | None]:
        """Insert rows and first run ``also`` in the same write transaction: the gateway settles the budget of
        the requests these records describe there, so a request's record and its ledger commit are one write.
        ``held``: the calling thread's kept connection, else one from the pool."""
        written_at = datetime.now(UTC)
        params = [{**row, "written_at": written_at} for row in rows]

        def write(conn: sa.Connection) -> tuple[int, T | None]:
            done = also(conn) if also is not None else None
            return _INSERT.execute(conn, params), done

        def landed(conn: sa.Connection) -> bool | None:
            """Whether this write's commit landed: its rows are there with its ``written_at``. Rows already there
            from before (a duplicate insert skips) cannot tell, and neither can a write of no rows."""
            ids = [row["id"] for row in rows]
            if not ids:
                return None
            stamps = {_stored(stamp) for stamp in
                      conn.execute(sa.select(audit_records.c.written_at).where(audit_records.c.id.in_(ids))).scalars()}
            if written_at in stamps:
                return True
            return None if stamps else False

        if held is not None:
            inserted, done = held.run(write, landed)
        else:
            with stores.begin_write(self._writer) as conn:
                inserted, done = write(conn)
        with self._count_lock:
            self.transactions += 1
        return inserted, done

    @stores.retry_when_locked
    def purge(self, older_than_days: float, workflow: str | None = None, now: datetime | None = None) -> int:
        """Retention: delete records whose ``ts`` is older than the cutoff (of one workflow, or all)."""
        cutoff = (now or datetime.now(UTC)).astimezone(UTC) - timedelta(days=older_than_days)
        query = audit_records.delete().where(audit_records.c.ts < cutoff)
        if workflow is not None:
            query = query.where(audit_records.c.workflow == workflow)
        with stores.begin_write(self._writer) as conn:
            return conn.execute(query).rowcount

    # -- reads -------------------------------------------------------------------------------------

    def get(self, record_id: str) -> AuditRecord | None:
        with self.engine.connect() as conn:
            text = conn.execute(sa.select(audit_records.c.record).where(audit_records.c.id == record_id)).scalar()
        return None if text is None else AuditRecord.model_validate_json(text)

    def tail(self, limit: int = 20, after_ts: datetime | None = None) -> list[AuditRecord]:
        """Oldest first: the newest ``limit`` records, or the first ``limit`` with ``ts`` after ``after_ts``."""
        query = sa.select(audit_records.c.record)
        if after_ts is None:
            query = query.order_by(audit_records.c.ts.desc(), audit_records.c.id.desc()).limit(limit)
        else:
            query = (query.where(audit_records.c.ts > after_ts.astimezone(UTC))
                     .order_by(audit_records.c.ts, audit_records.c.id).limit(limit))
        with self.engine.connect() as conn:
            texts = list(conn.execute(query).scalars())
        if after_ts is None:
            texts.reverse()
        return [AuditRecord.model_validate_json(text) for text in texts]

    def follow(self, interval_s: float = 1.0, backlog: int = 20) -> Iterator[AuditRecord]:
        """The newest ``backlog`` records, then each record as it is written; polls, never ends.

        Tracks the write time, not ``ts``, so a long request written late is not skipped; re-reads
        ``FOLLOW_OVERLAP`` back and skips ids already seen. The cursor starts at the store's newest
        write time, not this machine's clock, which may differ from the gateway's.
        """
        with self.engine.connect() as conn:
            newest = conn.execute(sa.select(sa.func.max(audit_records.c.written_at))).scalar()
        cursor = _stored(newest) if newest is not None else datetime.now(UTC)
        seen = dict.fromkeys(self._written_since(cursor - FOLLOW_OVERLAP, ids_only=True), cursor)
        for record in self.tail(backlog):
            seen[record.id] = cursor
            yield record
        while True:
            for record_id, written_at, text in self._written_since(cursor - FOLLOW_OVERLAP):
                cursor = max(cursor, written_at)
                if record_id not in seen:
                    seen[record_id] = written_at
                    yield AuditRecord.model_validate_json(text)
            horizon = cursor - 2 * FOLLOW_OVERLAP
            seen = {key: at for key, at in seen.items() if at >= horizon}
            time.sleep(interval_s)

    def _written_since(self, since: datetime, *, ids_only: bool = False) -> list[Any]:
        """(id, written_at, record) of rows written at or after ``since``, in write order; or just ids."""
        columns = [audit_records.c.id] if ids_only else [audit_records.c.id, audit_records.c.written_at,
                                                          audit_records.c.record]
        query = (sa.select(*columns).where(audit_records.c.written_at >= since)
                 .order_by(audit_records.c.written_at, audit_records.c.ts, audit_records.c.id))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if ids_only:
            return [row.id for row in rows]
        return [(row.id, _stored(row.written_at), row.record) for row in rows]


def _stored(at: datetime) -> datetime:
    """SQLite hands DateTime back naive; it was written in UTC."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# -- the group-committing writer ---------------------------------------------------------------------

class AuditWriter:
    """Durable-before-ack writes from asyncio, group committed by one background thread.

    ``await write(record)`` returns once the transaction holding the record committed, and raises
    if it failed: the gateway must not acknowledge a request whose record is not on disk.
    Cancelling the awaiting task does not withdraw the record; it is still written.

    ``write(record, settle)`` also commits or releases the request's budget reservation in that same
    transaction (``ledger`` must be the same database's): one durable write per answered request
    instead of two, and never a commit without its record or a record without its commit.
    """

    def __init__(self, log: AuditLog, *, ledger: Ledger | None = None, max_batch: int = 2000) -> None:
        self.log = log
        self.ledger = ledger
        self._held = log.held_writer()  # used by the committer thread only
        self._committer: GroupCommitter[tuple[dict[str, Any], SettleOp | None], bool | None] = GroupCommitter(
            self._insert, name="pilothouse-audit-writer", max_batch=max_batch)

    @property
    def batches(self) -> int:
        """Transactions committed by this writer; fewer than records when group commit works."""
        return self._committer.batches

    @property
    def records(self) -> int:
        return self._committer.items

    async def write(self, record: AuditRecord, settle: SettleOp | None = None) -> bool | None:
        """None, or with ``settle`` whether it moved the reservation (see ``Ledger.commit``)."""
        return await self.put(record, settle)

    def put(self, record: AuditRecord, settle: SettleOp | None = None) -> asyncio.Future[bool | None]:
        """``write`` as the future of its result (see ``GroupCommitter.put``)."""
        return self.put_row(as_row(record), settle)  # serialized here: a bad record fails its caller

    def put_row(self, row: dict[str, Any], settle: SettleOp | None = None) -> asyncio.Future[bool | None]:
        """``put`` of a record its caller serialised (``as_row``) before taking the settlement it rides with."""
        if settle is not None and self.ledger is None:
            raise ValueError("this audit writer has no ledger to settle budgets in")
        return self._committer.put((row, settle))

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Stop taking records, commit everything queued, stop the thread. Idempotent."""
        self._committer.close(timeout_s)
        self._held.close()

    async def aclose(self, timeout_s: float | None = 30.0) -> None:
        await asyncio.to_thread(self.close, timeout_s)

    def _insert(self, items: Sequence[tuple[dict[str, Any], SettleOp | None]]) -> list[bool | None]:
        settles = [(i, op) for i, (_, op) in enumerate(items) if op is not None]
        ledger = self.ledger

        def settle(conn: sa.Connection) -> list[bool]:
            return ledger.settle_in(conn, [op for _, op in settles]) if ledger is not None and settles else []

        _, settled = self.log.insert_rows_with([row for row, _ in items], settle, self._held)
        results: list[bool | None] = [None] * len(items)
        for (i, _), moved in zip(settles, settled or [], strict=True):
            results[i] = moved
        return results
