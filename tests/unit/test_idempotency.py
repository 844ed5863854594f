"""``Idempotency-Key`` store (serving/idempotency.py) on SQLite and PostgreSQL: claim, replay, conflict,
abandon, purge, and two concurrent claims of one key are exclusive."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pilothouse.serving.dataplane import DataPlane
from pilothouse.serving.idempotency import Claimed, Conflict, IdempotencyStore, Stored
from pilothouse.serving.table_source import TableSource
from tests.polling import eventually


@pytest.fixture
def store(store_url: str) -> Iterator[IdempotencyStore]:
    opened = IdempotencyStore(store_url)
    yield opened
    opened.close()


def test_claim_complete_replay_and_conflict(store: IdempotencyStore) -> None:
    claimed = store.claim("acme", "k1", b'{"a":1}', "req-1")
    assert isinstance(claimed, Claimed)
    in_flight = store.claim("acme", "k1", b'{"a":1}', "req-2")
    assert isinstance(in_flight, Conflict)
    assert "in progress" in in_flight.message
    store.complete(claimed.row_id, 200, "application/json", b'{"ok":true}')
    assert store.claim("acme", "k1", b'{"a":1}', "req-3") == Stored(200, "application/json", b'{"ok":true}', "req-1")
    different = store.claim("acme", "k1", b'{"a":2}', "req-4")
    assert isinstance(different, Conflict)
    assert "different request body" in different.message
    assert isinstance(store.claim("other-tenant", "k1", b'{"a":1}', "req-5"), Claimed)  # keys are per tenant


def test_abandoned_claim_can_be_retried_and_purge_drops_old_keys(store: IdempotencyStore) -> None:
    first = store.claim("acme", "k2", b"x", "req-1")
    assert isinstance(first, Claimed)
    store.abandon(first.row_id)
    assert isinstance(store.claim("acme", "k2", b"x", "req-2"), Claimed)
    assert store.purge(timedelta(hours=1)) == 0
    assert store.purge(timedelta(seconds=-1)) == 1
    assert isinstance(store.claim("acme", "k2", b"x", "req-3"), Claimed)


def test_a_claim_left_pending_is_released_once_stale_and_a_retry_is_dispatched(store: IdempotencyStore) -> None:
    """A request that died holding its key (a crash, a store outage when it tried to give it back) must not make
    every retry a 409 until the key's retention ends."""
    dead = store.claim("acme", "k5", b"z", "req-1")
    answered = store.claim("acme", "k6", b"z", "req-2")
    assert isinstance(dead, Claimed) and isinstance(answered, Claimed)
    store.complete(answered.row_id, 200, "application/json", b"{}")
    assert store.release_stale(timedelta(minutes=30)) == 0  # a claim this young may belong to a running request
    assert isinstance(store.claim("acme", "k5", b"z", "req-3"), Conflict)
    later = datetime.now(UTC) + timedelta(minutes=31)
    assert store.release_stale(timedelta(minutes=30), now=later) == 1  # only the pending one: answers are kept
    assert isinstance(store.claim("acme", "k5", b"z", "req-4"), Claimed)
    assert isinstance(store.claim("acme", "k6", b"z", "req-5"), Stored)


async def test_the_gateways_upkeep_releases_stale_claims(tmp_path: Path) -> None:
    plane = DataPlane(TableSource(str(tmp_path / "routing.json")), f"sqlite:///{tmp_path}/store.db")
    stores = await plane.stores()
    assert isinstance(stores.idempotency.claim("acme", "k", b"x", "req-1"), Claimed)
    upkeep = asyncio.create_task(plane.maintain(interval_s=0.01, stale_after=timedelta(0)))
    try:
        await eventually(lambda: isinstance(stores.idempotency.claim("acme", "k", b"x", "req-2"), Claimed))
    finally:
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep
        await plane.aclose()


async def test_async_wrappers(store: IdempotencyStore) -> None:
    claimed = await store.aclaim("acme", "k3", b"y", "req-1")
    assert isinstance(claimed, Claimed)
    await store.acomplete(claimed.row_id, 200, "text/plain", b"done")
    assert isinstance(await store.aclaim("acme", "k3", b"y", "req-2"), Stored)
    other = await store.aclaim("acme", "k4", b"y", "req-3")
    assert isinstance(other, Claimed)
    await store.aabandon(other.row_id)
    assert isinstance(await store.aclaim("acme", "k4", b"y", "req-4"), Claimed)


def test_concurrent_claims_of_one_key_are_exclusive(store: IdempotencyStore) -> None:
    results: list[object] = []
    barrier = threading.Barrier(8)

    def claim(n: int) -> None:
        barrier.wait()
        results.append(store.claim("acme", "race", b"z", f"req-{n}"))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(isinstance(r, Claimed) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 7
