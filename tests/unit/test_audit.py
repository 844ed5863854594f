"""The audit trail (DESIGN.md §5): records round-trip, content is hashed under a no-content policy,
and an awaited write is on disk — group committed — before the gateway may acknowledge."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import sqlite3
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pilothouse.operator.api.routing import BudgetRule
from pilothouse.serving import audit as audit_module
from pilothouse.serving.audit import (
    ActionTaken,
    AuditLog,
    AuditRecord,
    AuditWriter,
    BudgetTrail,
    HumanDecision,
    RetrievalHit,
    RoutingAttempt,
    RoutingDecision,
    TokenUsage,
    content_hash,
    redact,
)
from pilothouse.serving.ledger import LeaseCharge, Ledger, Reservation, SettleOp, Usage
from tests.pg import drop_connections, throwaway_postgres_database

AT = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
PROMPT = [{"role": "user", "content": "Invoice 4711 from ACME, IBAN DE89 3704 0044 0532 0130 00"}]



@pytest.fixture
def url(store_url: str) -> str:
    """This module's tests call the store URL ``url``."""
    return store_url

@pytest.fixture
def log(url: str) -> Iterator[AuditLog]:
    with AuditLog(url) as opened:
        yield opened


def record(record_id: str = "req-1", **changes: Any) -> AuditRecord:
    inputs, inputs_hash = redact(PROMPT, store=changes.pop("store_prompts", True))
    fields: dict[str, Any] = {
        "id": record_id, "ts": AT, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "tenant": "acme",
        "workflow": "invoice-triage", "route": "extract", "model": "invoice-triage/extract",
        "inputs": inputs, "inputs_hash": inputs_hash,
        "retrieval": [RetrievalHit(id="doc-1#3", score=0.82, mode="hybrid")],
        "routing": RoutingDecision(backend="invoice-large", reason="primary timed out", table_revision=3, attempts=[
            RoutingAttempt(backend="invoice-small", error_class="timeout", message="read timeout", latency_ms=2001),
            RoutingAttempt(backend="invoice-large", latency_ms=430.5)]),
        "budget": [BudgetTrail(policy="invoice-budget", reservation_id=f"{record_id}/invoice-budget",
                               reserved_usd=0.0123, committed_usd=0.004)],
        "usage": TokenUsage(prompt_tokens=120, completion_tokens=30),
        "output": "approve", "output_hash": content_hash("approve"), "status_code": 200, "latency_ms": 2450.3,
        "action": ActionTaken(idempotency_key="idem-7", kind="erp.post", target="erp-prod"),
        "human_decision": HumanDecision(reviewer="ana", decision="approved", ts=AT),
    }
    return AuditRecord(**(fields | changes))


def count(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(audit_module.audit_records)).scalar_one()
    finally:
        engine.dispose()


# -- the record --------------------------------------------------------------------------------------


def test_round_trip_keeps_the_whole_decision_path(log: AuditLog) -> None:
    original = record()
    assert log.append(original) is True
    assert log.get("req-1") == original
    assert log.get("nope") is None


def test_timestamps_are_aware_utc() -> None:
    converted = record(ts=datetime(2026, 3, 15, 14, 30, tzinfo=timezone(timedelta(hours=1)))).ts
    assert converted == AT and converted.tzinfo is UTC
    with pytest.raises(ValueError, match="timezone-aware"):
        record(ts=datetime(2026, 3, 15, 13, 30))


def test_unknown_fields_from_a_newer_writer_are_ignored_on_read() -> None:
    data = record().model_dump(mode="json") | {"something_new": 1}
    assert AuditRecord.model_validate(data) == record()


# -- redaction ---------------------------------------------------------------------------------------


def test_redact_keeps_only_a_stable_hash_when_the_policy_says_no() -> None:
    kept, digest = redact(PROMPT, store=False)
    assert kept is None and digest is not None and digest.startswith("sha256:") and len(digest) == 7 + 64
    reordered = [{"content": PROMPT[0]["content"], "role": "user"}]  # same messages, other key order
    assert redact(reordered, store=False)[1] == digest == redact(PROMPT, store=True)[1]
    assert redact(PROMPT, store=True)[0] == PROMPT
    assert redact("text", store=False)[1] == content_hash(b"text") != content_hash("other")
    assert redact(None, store=False) == (None, None)


def test_no_content_policy_leaves_no_verbatim_prompt_in_the_store(url: str, log: AuditLog) -> None:
    output, output_hash = redact("approve invoice 4711", store=False)
    log.append(record(store_prompts=False, output=output, output_hash=output_hash))
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        raw = conn.execute(sa.select(audit_module.audit_records.c.record)).scalar_one()
    engine.dispose()
    assert "IBAN" not in raw and "4711" not in raw
    assert redact(PROMPT, store=False)[1] in raw
    stored = log.get("req-1")
    assert stored is not None and stored.inputs is None and stored.output is None
    assert stored.inputs_hash == content_hash(PROMPT)


# -- the table ---------------------------------------------------------------------------------------


def test_duplicate_ids_keep_the_first_row(log: AuditLog) -> None:
    assert log.append(record()) is True
    assert log.append(record(status_code=500)) is False
    stored = log.get("req-1")
    assert stored is not None and stored.status_code == 200
    assert len(log.tail(10)) == 1


def test_tail_is_oldest_first_and_filters_by_time(log: AuditLog) -> None:
    for i in range(5):
        log.append(record(f"r{i}", ts=AT + timedelta(seconds=i)))
    assert [r.id for r in log.tail(3)] == ["r2", "r3", "r4"]
    assert [r.id for r in log.tail(2, after_ts=AT)] == ["r1", "r2"]
    assert log.tail(10, after_ts=AT + timedelta(seconds=4)) == []


def test_purge_deletes_only_what_retention_expired(log: AuditLog) -> None:
    now = AT + timedelta(days=40)
    log.append(record("old-a", ts=AT))
    log.append(record("old-b", ts=AT, workflow="other"))
    log.append(record("new", ts=now - timedelta(days=1)))
    assert log.purge(older_than_days=30, workflow="other", now=now) == 1
    assert [r.id for r in log.tail(10)] == ["old-a", "new"]
    assert log.purge(older_than_days=30, now=now) == 1
    assert [r.id for r in log.tail(10)] == ["new"]


def test_follow_yields_records_written_late_with_an_older_ts(log: AuditLog) -> None:
    log.append(record("before", ts=datetime.now(UTC) - timedelta(seconds=1)))
    log.append(record("first", ts=datetime.now(UTC)))
    stream = log.follow(interval_s=0.01, backlog=1)
    assert next(stream).id == "first"  # the backlog; "before" is not shown later either
    log.append(record("long-request", ts=datetime.now(UTC) - timedelta(minutes=10)))  # started long ago
    log.append(record("quick", ts=datetime.now(UTC)))
    assert {next(stream).id, next(stream).id} == {"long-request", "quick"}
    log.append(record("later", ts=datetime.now(UTC)))
    assert next(stream).id == "later"  # nothing yielded twice
    stream.close()


def test_sqlite_store_is_wal_and_fsyncs_every_commit(tmp_path: Path) -> None:
    with AuditLog(f"sqlite:///{tmp_path}/state/a.db") as log, log.engine.connect() as conn:  # folder made
        assert (tmp_path / "state" / "a.db").is_file()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_other_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="sqlite and postgresql"):
        AuditLog("mysql://localhost/db")


# -- the writer: durable before ack, group committed -------------------------------------------------


async def test_an_awaited_write_is_visible_to_a_new_process_view(url: str, log: AuditLog) -> None:
    writer = AuditWriter(log)
    try:
        await writer.write(record())
        with AuditLog(url, create=False) as fresh:  # a separate engine: only what was committed
            assert fresh.get("req-1") == record()
        if url.startswith("sqlite"):  # and no SQLAlchemy at all: the bare file says the same
            path = sa.make_url(url).database
            assert path is not None
            with sqlite3.connect(path) as raw:
                assert raw.execute("SELECT count(*) FROM audit_records WHERE id = 'req-1'").fetchone() == (1,)
    finally:
        await writer.aclose()


async def test_500_concurrent_writes_land_in_fewer_transactions(url: str, log: AuditLog) -> None:
    writer = AuditWriter(log)
    try:
        await asyncio.gather(*(writer.write(record(f"r{i}")) for i in range(500)))
        assert count(url) == 500
        assert writer.records == 500
        assert writer.batches < 500 and log.transactions == writer.batches
    finally:
        await writer.aclose()


async def test_duplicate_ids_through_the_writer_make_one_row(url: str, log: AuditLog) -> None:
    writer = AuditWriter(log)
    try:
        await asyncio.gather(*(writer.write(record("same", status_code=200 + i)) for i in range(20)))
        await writer.write(record("same", status_code=599))
        assert count(url) == 1
        stored = log.get("same")
        assert stored is not None and stored.status_code != 599
    finally:
        await writer.aclose()


async def test_close_flushes_everything_queued(url: str, log: AuditLog) -> None:
    writer = AuditWriter(log)
    waiting = [asyncio.create_task(writer.write(record(f"r{i}"))) for i in range(200)]
    await asyncio.sleep(0)  # every task has queued its record
    writer.close()
    assert count(url) == 200
    await asyncio.gather(*waiting)
    with pytest.raises(RuntimeError, match="closed"):
        await writer.write(record("late"))
    writer.close()  # idempotent


async def test_a_failed_commit_fails_every_waiter(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_rows: object, _also: object = None, _held: object = None) -> tuple[int, None]:
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(log, "insert_rows_with", broken)
    writer = AuditWriter(log)
    try:
        results = await asyncio.gather(*(writer.write(record(f"r{i}")) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, sa.exc.OperationalError) for r in results)
    finally:
        await writer.aclose()


async def test_writes_go_on_after_postgresql_drops_every_connection(postgres_url: str) -> None:
    """A PostgreSQL restart, an idle timeout or a pooler's reset closes the gateway's connections under it.
    The writer's kept connection is then dead, but no batch was sent on it: the next batch runs again on a new
    connection instead of failing its requests (503), and its budget charges are counted once."""
    with throwaway_postgres_database(postgres_url, "audit_drop") as url, AuditLog(url) as log:
        ledger = Ledger(url)
        writer = AuditWriter(log, ledger=ledger)
        day = BudgetRule.model_validate({"policy": "p", "state": "Ok", "action": "reject",
                                         "limits": [{"window": "day", "maxCostUSD": 100}]})
        lease = ledger.reserve("team", "p", day, 50.0, 5000, "lease-1", AT)
        assert isinstance(lease, Reservation)

        def charged(record_id: str) -> Awaitable[bool | None]:
            charge = LeaseCharge(f"{record_id}/p", "team", "p", lease.created_at)
            return writer.write(record(record_id), SettleOp(lease.id, (0.5, 50), charge))

        try:
            assert await charged("before")
            assert drop_connections(url) >= 1  # the writer's kept connection among them
            assert await asyncio.gather(*(charged(f"after-{i}") for i in range(5))) == [True] * 5
            assert count(url) == 6
            assert ledger.spend("team", "p", AT.replace(hour=0, minute=0)) == Usage(3.0, 300)  # 6 x 0.5, once each
        finally:
            await writer.aclose()
            ledger.close()


async def test_a_cancelled_waiter_still_gets_its_record_written(url: str, log: AuditLog) -> None:
    writer = AuditWriter(log)
    try:
        task = asyncio.create_task(writer.write(record("gone")))
        await asyncio.sleep(0)
        task.cancel()
        await writer.write(record("after"))  # FIFO: "gone" committed in this batch or an earlier one
        assert log.get("gone") is not None
    finally:
        await writer.aclose()


async def test_an_unserializable_record_fails_its_caller_only(log: AuditLog) -> None:
    writer = AuditWriter(log)
    try:
        with pytest.raises(Exception, match="serialize"):
            await writer.write(record("bad", inputs={"x": object()}))
        await writer.write(record("good"))
        assert log.get("good") is not None and log.get("bad") is None
    finally:
        await writer.aclose()


def test_group_commit_beats_one_commit_per_record(tmp_path: Path) -> None:
    """Not a benchmark, a sanity bound: concurrent writers must share commits."""
    ids = itertools.count()

    async def burst(writer: AuditWriter) -> None:
        await asyncio.gather(*(writer.write(record(f"r{next(ids)}")) for _ in range(300)))

    with AuditLog(f"sqlite:///{tmp_path}/g.db") as log:
        writer = AuditWriter(log)
        asyncio.run(burst(writer))
        writer.close()
        assert writer.batches <= 300 // 2


def test_an_answer_with_an_unpaired_surrogate_is_hashed_and_valid_text_hashes_as_before() -> None:
    """A backend's answer may carry an unpaired surrogate escape; hashing it must not fail the request's record.
    Valid text keeps its hash (UTF-8, canonical JSON), so hashes of earlier records still match."""
    assert content_hash("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash([{"role": "user", "content": "é"}]) == "sha256:" + hashlib.sha256(
        '[{"content":"é","role":"user"}]'.encode()).hexdigest()
    odd = content_hash("a\ud800")
    assert odd.startswith("sha256:") and odd not in (content_hash("a"), content_hash("a\ufffd"))
    assert content_hash({"output": "a\ud800"}).startswith("sha256:")
