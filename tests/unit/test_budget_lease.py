"""Budget leases against a real ledger: admission in memory, spend recorded per request, headroom returned safely."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from pilothouse.operator.api.ledger import leases as ledger_leases
from pilothouse.operator.api.ledger import ledger
from pilothouse.operator.api.routing import BudgetRule
from pilothouse.serving import budget_lease
from pilothouse.serving.budget_lease import MAX_SHARE, REQUESTS_PER_LEASE, Leases, lease_size
from pilothouse.serving.dataplane import STALE_RESERVATION
from pilothouse.serving.ledger import LEASE_STALE, Ledger, SettleOp
from tests.polling import eventually

NOW = datetime.now(UTC)
SINCE = NOW - timedelta(days=40)
WORST = (1e-3, 100)


def rule(cap_usd: float) -> BudgetRule:
    return BudgetRule.model_validate({"policy": "p", "state": "Ok", "action": "reject",
                                      "limits": [{"window": "month", "maxCostUSD": cap_usd}]})


@pytest_asyncio.fixture
async def book(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    yield ledger
    ledger.close()


def leases_for(book: Ledger) -> Leases:
    ids = itertools.count()
    return Leases(book, lambda: f"{next(ids):032x}")


def commit(book: Ledger, leases: Leases, ops: list[SettleOp]) -> None:
    """What the audit writer does with the charges: one transaction, then each lease hears its charge is written."""
    book.apply(ops)
    for op in ops:
        leases.written(op)


def test_a_lease_holds_many_worst_cases_and_at_most_a_share_of_the_cap() -> None:
    assert lease_size(rule(1000.0), *WORST) == (WORST[0] * REQUESTS_PER_LEASE, WORST[1] * REQUESTS_PER_LEASE)
    assert lease_size(rule(0.1), *WORST) == (0.1 * MAX_SHARE, WORST[1] * REQUESTS_PER_LEASE)
    assert lease_size(rule(0.02), *WORST) is None  # 10% of the cap is 2 worst cases: not worth a lease


async def test_claims_come_from_one_reservation_and_each_charge_is_its_own_row(book: Ledger) -> None:
    leases = leases_for(book)
    claims = [await leases.claim("team", rule(1000.0), *WORST, f"r{i}", NOW) for i in range(10)]
    assert all(c is not None for c in claims) and len({c.lease.reservation.id for c in claims}) == 1
    assert book.batches == 1
    lease_cost = WORST[0] * REQUESTS_PER_LEASE
    assert book.in_flight("team", "p", SINCE).cost_usd == lease_cost
    commit(book, leases, [c.settle((WORST[0] / 2, 50)) for c in claims])
    assert book.spend("team", "p", SINCE) == (pytest.approx(10 * WORST[0] / 2), 500)
    assert book.in_flight("team", "p", SINCE).cost_usd == pytest.approx(lease_cost - 10 * WORST[0] / 2)
    await leases.aclose()  # quiet: handed back
    assert book.in_flight("team", "p", SINCE) == (0.0, 0)


async def test_steady_traffic_reserves_one_lease_per_lease_worth_of_requests(book: Ledger) -> None:
    """The next lease is reserved once, when the current one runs low, and waits its turn instead of going
    back idle: each reservation and return is a ledger write, and every spare lease holds headroom."""
    leases = leases_for(book)
    requests = 3 * REQUESTS_PER_LEASE
    ids = iter(range(requests))

    async def client() -> None:
        for i in ids:
            claim = await leases.claim("team", rule(1000.0), *WORST, f"r{i}", NOW)
            assert claim is not None
            await asyncio.sleep(0)  # the request is in flight: the event loop runs other tasks
            commit(book, leases, [claim.settle(WORST)])

    await asyncio.gather(*(client() for _ in range(32)))
    await leases.aclose()
    with book.engine.connect() as conn:
        reserved = conn.execute(sa.select(sa.func.count()).where(ledger.c.id.like("lease-%"))).scalar()
    assert reserved == 4  # three used up, and the one reserved while the third ran low
    assert book.spend("team", "p", SINCE) == (pytest.approx(requests * WORST[0]), requests * WORST[1])
    assert book.in_flight("team", "p", SINCE) == (0.0, 0)


async def test_a_lease_goes_back_only_after_its_last_charge_is_committed(book: Ledger) -> None:
    """Returned before its charge is written, a lease would free headroom that charge still needs."""
    leases = leases_for(book)
    claim = await leases.claim("team", rule(1000.0), *WORST, "r1", NOW)
    assert claim is not None
    op = claim.settle((WORST[0], 100))
    await leases.aclose()  # closed, but its charge is still on its way
    await asyncio.sleep(0.05)
    assert book.in_flight("team", "p", SINCE).cost_usd > 0
    commit(book, leases, [op])
    await leases.aclose()
    assert book.in_flight("team", "p", SINCE) == (0.0, 0) and book.spend("team", "p", SINCE) == (WORST[0], 100)


async def test_near_the_cap_requests_go_the_exact_way_and_drain_returns_what_leases_held(book: Ledger) -> None:
    leases = leases_for(book)
    cap = rule(0.64)  # a lease is 10% of it: 64 worst cases
    claim = await leases.claim("team", cap, *WORST, "r1", NOW)
    assert claim is not None and book.in_flight("team", "p", SINCE).cost_usd == 0.064
    # Another replica took the rest of the cap: no second lease fits, the next request reserves alone.
    book.reserve("team", "p", cap, 0.64 - 0.064, 0, "elsewhere", NOW)
    claims = [claim]
    for i in range(63):  # the first lease still serves, 64 worst cases in all...
        more = await leases.claim("team", cap, *WORST, f"more{i}", NOW)
        assert more is not None
        claims.append(more)
    assert await leases.claim("team", cap, *WORST, "over", NOW) is None  # ...then it is full
    drained = asyncio.ensure_future(leases.drain("team", "p"))
    await asyncio.sleep(0.05)
    assert not drained.done()  # its claims are in flight
    commit(book, leases, [c.settle(None) for c in claims])
    assert await asyncio.wait_for(drained, 5)
    assert book.in_flight("team", "p", SINCE).cost_usd == 0.64 - 0.064  # only the other replica's reservation


async def test_a_dead_replicas_lease_comes_back_in_minutes_and_a_live_ones_stays(book: Ledger) -> None:
    """A crash-looping replica must not hold a tenth of the cap per restart for the 30-minute stale expiry."""
    dead, live = leases_for(book), Leases(book, lambda: "live")
    crashed = await dead.claim("team", rule(1000.0), *WORST, "r1", NOW)  # its replica dies with this in flight
    running = await live.claim("team", rule(1000.0), *WORST, "r2", NOW)
    assert crashed is not None and running is not None
    alone = book.reserve("team", "p", rule(1000.0), *WORST, "exact", NOW)  # a request's own reservation
    lease_cost = WORST[0] * REQUESTS_PER_LEASE
    assert book.in_flight("team", "p", SINCE).cost_usd == pytest.approx(2 * lease_cost + WORST[0])

    later = datetime.now(UTC) + LEASE_STALE + timedelta(seconds=1)
    book.renew([running.lease.reservation.id], now=later)  # the live replica's heartbeat went on
    assert book.expire(STALE_RESERVATION, now=later) == 1
    assert book.in_flight("team", "p", SINCE).cost_usd == pytest.approx(lease_cost + WORST[0])  # live lease, request
    assert alone.id and book.commit(alone.id, WORST[0], 100)

    commit(book, dead, [crashed.settle((WORST[0], 100))])  # a charge that arrives after all is still spend
    assert book.spend("team", "p", SINCE) == (pytest.approx(2 * WORST[0]), 200)
    await live.aclose()
    commit(book, live, [running.settle(None)])
    await live.aclose()
    assert book.in_flight("team", "p", SINCE) == (0.0, 0)


async def test_the_holder_renews_its_leases_until_it_hands_them_back(book: Ledger,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_lease, "HEARTBEAT_S", 0.05)
    leases = leases_for(book)

    def renewed() -> list[datetime]:
        with book.engine.connect() as conn:
            return list(conn.execute(sa.select(ledger_leases.c.renewed_at)).scalars())

    claim = await leases.claim("team", rule(1000.0), *WORST, "r1", NOW)
    assert claim is not None
    first = renewed()
    assert len(first) == 1  # renewed before the first claim was admitted
    await eventually(lambda: renewed()[0] > first[0])
    commit(book, leases, [claim.settle(None)])
    await leases.aclose()  # handed back: nothing left to renew
    await asyncio.sleep(0.05)
    last = renewed()
    await asyncio.sleep(0.25)
    assert renewed() == last
