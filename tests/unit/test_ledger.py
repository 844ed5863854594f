"""The gateway's budget ledger: cap arithmetic, idempotency, stale reservations, concurrency, and the
operator reading what the gateway wrote (DESIGN.md §5)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilothouse.operator.api import BudgetPolicy, BudgetState
from pilothouse.operator.api.ledger import ledger as ledger_table
from pilothouse.operator.api.ledger import totals as totals_table
from pilothouse.operator.api.ledger import window_bounds
from pilothouse.operator.api.routing import BudgetRule
from pilothouse.operator.budget import SqlSpendReader, evaluate
from pilothouse.serving.ledger import (
    USD_EPSILON,
    Denied,
    LeaseCharge,
    Ledger,
    Reservation,
    ReserveOp,
    SettleOp,
    Usage,
    reservation_id,
)
from tests.pg import throwaway_postgres_database

AT = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
DAY = datetime(2026, 3, 15, tzinfo=UTC)


def rule(*limits: dict[str, Any], per_request: dict[str, Any] | None = None, policy: str = "p") -> BudgetRule:
    return BudgetRule.model_validate({"policy": policy, "state": "Ok", "action": "reject", "limits": list(limits),
                                      **(per_request or {})})



@pytest.fixture
def url(store_url: str) -> str:
    """This module's tests call the store URL ``url``."""
    return store_url

@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    book = Ledger(url)
    yield book
    book.close()


@pytest.fixture
def postgres_ledger(postgres_url: str) -> Iterator[Ledger]:
    with throwaway_postgres_database(postgres_url, "ledger_test") as database_url:
        book = Ledger(database_url)
        yield book
        book.close()


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    yield book
    book.close()


def granted(result: Reservation | Denied) -> Reservation:
    assert isinstance(result, Reservation), getattr(result, "message", result)
    return result


def denied(result: Reservation | Denied) -> Denied:
    assert isinstance(result, Denied), result
    return result


# -- arithmetic --------------------------------------------------------------------------------------


def test_reserve_within_cap_is_in_flight_not_spent(ledger: Ledger) -> None:
    got = granted(ledger.reserve("team", "p", rule({"window": "day", "maxCostUSD": 10}), 4.0, 100, "r1", AT))
    assert (got.id, got.cost_usd, got.tokens, got.created_at, got.replayed) == ("r1/p", 4.0, 100, AT, False)
    assert ledger.in_flight("team", "p", DAY) == Usage(4.0, 100)
    assert ledger.spend("team", "p", DAY) == Usage(0.0, 0)


def test_over_window_cap_is_denied_naming_window_limit_and_reset(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 10})
    ledger.commit(granted(ledger.reserve("team", "p", day, 7.0, 0, "r1", AT)).id, 6.0, 0)
    granted(ledger.reserve("team", "p", day, 3.0, 0, "r2", AT))  # 6 spent + 3 in flight + 1 fits exactly
    granted(ledger.reserve("team", "p", day, 1.0, 0, "r3", AT))
    refused = denied(ledger.reserve("team", "p", day, 0.5, 0, "r4", AT))
    assert (refused.cap, refused.unit, refused.window, refused.limit) == ("window", "USD", "day", 10)
    assert (refused.spent, refused.in_flight, refused.requested) == (6.0, 4.0, 0.5)
    assert refused.resets_at == datetime(2026, 3, 16, tzinfo=UTC)
    assert refused.message.startswith("budget p exhausted for day: spent 6 of 10 USD; resets at 2026-03-16T00:00:00Z")
    assert "4 USD more in flight" in refused.message
    assert ledger.in_flight("team", "p", DAY) == Usage(4.0, 0)  # nothing reserved for the refused one


def test_denial_names_the_window_that_resets_last(ledger: Ledger) -> None:
    both = rule({"window": "hour", "maxCostUSD": 1}, {"window": "day", "maxCostUSD": 1})
    granted(ledger.reserve("team", "p", both, 1.0, 0, "r1", AT))
    refused = denied(ledger.reserve("team", "p", both, 0.1, 0, "r2", AT))
    assert refused.window == "day" and refused.resets_at == datetime(2026, 3, 16, tzinfo=UTC)


def test_windows_are_calendar_utc(ledger: Ledger) -> None:
    both = rule({"window": "hour", "maxCostUSD": 1}, {"window": "day", "maxCostUSD": 1.5})
    earlier = AT - timedelta(hours=1)
    ledger.commit(granted(ledger.reserve("team", "p", both, 1.0, 0, "r1", earlier)).id, 1.0, 0)
    granted(ledger.reserve("team", "p", both, 0.5, 0, "r2", AT))  # new hour; the day still has 0.5
    refused = denied(ledger.reserve("team", "p", both, 0.5, 0, "r3", AT))
    assert (refused.window, refused.spent, refused.in_flight) == ("day", 1.0, 0.5)
    assert granted(ledger.reserve("team", "p", both, 1.0, 0, "r4", AT + timedelta(days=1))).cost_usd == 1.0


def test_per_request_caps_refuse_before_touching_windows(ledger: Ledger) -> None:
    capped = rule({"window": "day", "maxCostUSD": 100},
                  per_request={"perRequestMaxCostUSD": 0.5, "per_request_max_tokens": 1000})
    by_cost = denied(ledger.reserve("team", "p", capped, 0.75, 10, "r1", AT))
    assert (by_cost.cap, by_cost.unit, by_cost.limit, by_cost.requested) == ("perRequest", "USD", 0.5, 0.75)
    assert by_cost.window is None and by_cost.resets_at is None
    assert by_cost.message == "budget p caps a single request at 0.5 USD; this one may use up to 0.75 USD"
    by_tokens = denied(ledger.reserve("team", "p", capped, 0.1, 1001, "r2", AT))
    assert (by_tokens.cap, by_tokens.unit, by_tokens.limit) == ("perRequest", "tokens", 1000)
    granted(ledger.reserve("team", "p", capped, 0.5, 1000, "r3", AT))  # at the cap is allowed
    assert ledger.in_flight("team", "p", DAY) == Usage(0.5, 1000)


def test_token_cap_binds_independently_of_cost(ledger: Ledger) -> None:
    tokens = rule({"window": "hour", "maxCostUSD": 100, "maxTokens": 1000})
    granted(ledger.reserve("team", "p", tokens, 0.01, 900, "r1", AT))
    refused = denied(ledger.reserve("team", "p", tokens, 0.01, 101, "r2", AT))
    assert (refused.unit, refused.window, refused.limit, refused.in_flight) == ("tokens", "hour", 1000, 900)
    assert refused.message.startswith("budget p exhausted for hour: spent 0 of 1000 tokens; resets at "
                                      "2026-03-15T14:00:00Z")
    granted(ledger.reserve("team", "p", tokens, 0.01, 100, "r3", AT))


def test_commit_replaces_worst_case_with_actual(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 10})
    first = granted(ledger.reserve("team", "p", day, 8.0, 800, "r1", AT))
    denied(ledger.reserve("team", "p", day, 5.0, 0, "r2", AT))
    assert ledger.commit(first.id, 2.5, 250)
    assert ledger.spend("team", "p", DAY) == Usage(2.5, 250)
    assert ledger.in_flight("team", "p", DAY) == Usage(0.0, 0)
    granted(ledger.reserve("team", "p", day, 5.0, 0, "r2", AT))  # the unused worst case came back


def test_a_lease_charge_moves_spend_from_the_lease_to_the_requests_own_row(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 20})
    lease = granted(ledger.reserve("team", "p", day, 10.0, 1000, "lease-1", AT))

    def charge(request: str, actual: tuple[float, int] | None) -> None:
        ledger.apply([SettleOp(lease.id, actual, LeaseCharge(f"{request}/p", "team", "p", lease.created_at))])

    charge("r1", (3.0, 300))
    assert ledger.spend("team", "p", DAY) == Usage(3.0, 300)  # its own committed row...
    assert ledger.in_flight("team", "p", DAY) == Usage(7.0, 700)  # ...taken out of the lease: never counted twice
    charge("r2", None)  # a request that used nothing leaves the lease as it was
    assert ledger.in_flight("team", "p", DAY) == Usage(7.0, 700)
    denied(ledger.reserve("team", "p", day, 10.5, 0, "r3", AT))  # 3 spent + 7 leased: 10 left, not 10.5
    assert ledger.release(lease.id)  # the lease returns what it held unused
    assert ledger.in_flight("team", "p", DAY) == Usage(0.0, 0)
    charge("r4", (1.0, 100))  # a request that settles after its lease was returned is still recorded
    assert ledger.spend("team", "p", DAY) == Usage(4.0, 400) and ledger.in_flight("team", "p", DAY) == Usage(0.0, 0)


def test_release_frees_in_flight_and_spends_nothing(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 10})
    first = granted(ledger.reserve("team", "p", day, 10.0, 0, "r1", AT))
    denied(ledger.reserve("team", "p", day, 1.0, 0, "r2", AT))
    assert ledger.release(first.id)
    assert ledger.in_flight("team", "p", DAY) == ledger.spend("team", "p", DAY) == Usage(0.0, 0)
    granted(ledger.reserve("team", "p", day, 10.0, 0, "r2", AT))


@pytest.mark.parametrize(("first", "second"), [("commit", "commit"), ("release", "release"),
                                                ("commit", "release"), ("release", "commit")])
def test_commit_and_release_take_effect_once(ledger: Ledger, first: str, second: str) -> None:
    got = granted(ledger.reserve("team", "p", rule({"window": "day", "maxCostUSD": 10}), 4.0, 40, "r1", AT))

    def do(action: str) -> bool:
        return ledger.commit(got.id, 1.0, 10) if action == "commit" else ledger.release(got.id)

    assert do(first) is True
    assert do(second) is False
    assert ledger.spend("team", "p", DAY) == (Usage(1.0, 10) if first == "commit" else Usage(0.0, 0))
    assert ledger.in_flight("team", "p", DAY) == Usage(0.0, 0)
    assert ledger.commit("no-such-id", 1.0, 1) is False and ledger.release("no-such-id") is False


def test_commit_above_worst_case_is_recorded_and_logged(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    got = granted(ledger.reserve("team", "p", rule({"window": "day", "maxCostUSD": 10}), 1.0, 100, "r1", AT))
    assert ledger.commit(got.id, 1.5, 150)
    assert ledger.spend("team", "p", DAY) == Usage(1.5, 150)  # real spend is never under-reported
    assert "above its worst case" in caplog.text


def test_retried_request_reserves_once(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 10})
    first = granted(ledger.reserve("team", "p", day, 6.0, 0, "r1", AT))
    again = granted(ledger.reserve("team", "p", day, 6.0, 0, "r1", AT))  # would not fit if counted twice
    assert again.replayed and again.id == first.id
    assert ledger.in_flight("team", "p", DAY) == Usage(6.0, 0)


def test_long_request_ids_map_to_a_stable_id_that_fits_the_column(ledger: Ledger) -> None:
    policy = "p" * 63
    long_id = reservation_id(str(uuid.uuid4()), policy)
    assert len(long_id) <= 64 and long_id.startswith("h:")
    request = "0123456789abcdef" * 4
    got = granted(ledger.reserve("team", policy, rule({"window": "day", "maxCostUSD": 1}, policy=policy),
                                 0.1, 1, request, AT))
    assert got.id == reservation_id(request, policy) and ledger.commit(got.id, 0.1, 1)


def test_policies_and_namespaces_do_not_share_budget(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 1})
    granted(ledger.reserve("team", "p", day, 1.0, 0, "r1", AT))
    granted(ledger.reserve("other", "p", day, 1.0, 0, "r1", AT))
    granted(ledger.reserve("team", "q", rule({"window": "day", "maxCostUSD": 1}, policy="q"), 1.0, 0, "r1", AT))


def test_expire_releases_only_stale_reservations(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 10})
    stale = granted(ledger.reserve("team", "p", day, 4.0, 0, "old", AT - timedelta(minutes=30)))
    done = granted(ledger.reserve("team", "p", day, 1.0, 0, "done", AT - timedelta(minutes=30)))
    ledger.commit(done.id, 1.0, 0)
    fresh = granted(ledger.reserve("team", "p", day, 2.0, 0, "new", AT - timedelta(minutes=1)))
    assert ledger.expire(timedelta(minutes=10), now=AT) == 1
    assert ledger.in_flight("team", "p", DAY) == Usage(2.0, 0)
    assert ledger.spend("team", "p", DAY) == Usage(1.0, 0)
    assert ledger.commit(stale.id, 4.0, 0) is False  # the crashed request's late commit is refused
    assert ledger.commit(fresh.id, 2.0, 0) is True
    assert ledger.expire(timedelta(minutes=10), now=AT) == 0


def test_expire_releases_more_stale_reservations_than_one_statement_reads(ledger: Ledger) -> None:
    """A gateway that crashed under load leaves thousands of reservations; every one comes back, in one call,
    whatever the database's limit on bound parameters."""
    day = rule({"window": "day", "maxCostUSD": 1e6})
    old = AT - timedelta(minutes=30)
    ops = [ReserveOp("team", "p", day, 0.5, 5, f"crashed-{i:04d}", old) for i in range(2500)]
    assert all(isinstance(r, Reservation) for r in ledger.apply(ops))
    assert ledger.in_flight("team", "p", DAY) == Usage(1250.0, 12500)
    assert ledger.expire(timedelta(minutes=10), now=AT) == 2500
    assert ledger.in_flight("team", "p", DAY) == Usage(0.0, 0)
    assert ledger.expire(timedelta(minutes=10), now=AT) == 0


def test_expire_releases_a_lease_whose_heartbeat_stopped_within_minutes(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 10})
    dead = granted(ledger.reserve("team", "p", day, 1.0, 0, "lease-dead", AT - timedelta(minutes=5)))
    live = granted(ledger.reserve("team", "p", day, 2.0, 0, "lease-live", AT - timedelta(minutes=5)))
    ledger.renew([dead.id, live.id], now=AT - timedelta(minutes=5))
    ledger.renew([live.id], now=AT - timedelta(seconds=20))
    ledger.renew([live.id], now=AT - timedelta(seconds=10))  # a renewal moves the heartbeat, it adds no row
    assert ledger.expire(timedelta(minutes=30), now=AT) == 1  # long before the stale expiry
    assert ledger.in_flight("team", "p", DAY) == Usage(2.0, 0)
    assert ledger.commit(live.id, 2.0, 0) is True
    assert ledger.expire(timedelta(minutes=30), now=AT) == 0


def test_inputs_are_checked(ledger: Ledger, tmp_path: Path) -> None:
    day = rule({"window": "day", "maxCostUSD": 1})
    with pytest.raises(ValueError, match="naive"):
        ledger.reserve("team", "p", day, 0.1, 1, "r1", datetime(2026, 3, 15, 13))
    with pytest.raises(ValueError, match="policy"):
        ledger.reserve("team", "q", day, 0.1, 1, "r1", AT)
    with pytest.raises(ValueError, match="mysql"):
        Ledger("mysql://u@localhost/db")


async def test_async_wrappers_run_off_the_event_loop(ledger: Ledger) -> None:
    got = granted(await ledger.areserve("team", "p", rule({"window": "day", "maxCostUSD": 1}), 0.5, 5, "r1", AT))
    assert await ledger.acommit(got.id, 0.25, 3)
    other = granted(await ledger.areserve("team", "p", rule({"window": "day", "maxCostUSD": 1}), 0.5, 5, "r2", AT))
    assert await ledger.arelease(other.id)
    assert await ledger.aexpire(timedelta(seconds=1), now=AT) == 0
    assert ledger.spend("team", "p", DAY) == Usage(0.25, 3)


# -- SQLite serialization ----------------------------------------------------------------------------


def test_writers_begin_immediate_and_readers_deferred(sqlite_ledger: Ledger) -> None:
    seen: list[str] = []  # what SQLite itself was asked to run, whichever layer sent it
    sqlite_ledger.engine.dispose()
    sa.event.listen(sqlite_ledger.engine, "connect", lambda dbapi, _: dbapi.set_trace_callback(seen.append))
    got = granted(sqlite_ledger.reserve("team", "p", rule({"window": "day", "maxCostUSD": 1}), 0.5, 5, "r1", AT))
    sqlite_ledger.commit(got.id, 0.5, 5)
    sqlite_ledger.spend("team", "p", DAY)
    begins = [stmt for stmt in seen if stmt.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN IMMEDIATE", "BEGIN DEFERRED"]
    with sqlite_ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_a_reservation_waits_for_another_writer_instead_of_failing(sqlite_ledger: Ledger, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another gateway in the middle of its reservation
    result: list[Reservation | Denied] = []
    worker = threading.Thread(target=lambda: result.append(
        sqlite_ledger.reserve("team", "p", rule({"window": "day", "maxCostUSD": 1}), 0.5, 5, "r1", AT)))
    worker.start()
    time.sleep(0.3)
    assert result == []  # blocked on the write lock, not reading a stale total
    other.execute("COMMIT")
    worker.join(timeout=10)
    other.close()
    assert isinstance(result[0], Reservation)


def test_postgres_serializes_per_policy_with_an_advisory_lock(postgres_ledger: Ledger) -> None:
    """A transaction holding policy p's lock (another gateway mid-reservation) makes p's reservation
    wait, while policy q goes ahead: serialization is per policy, not for the whole table."""
    result: list[Reservation | Denied] = []
    with postgres_ledger.engine.connect() as other, other.begin():
        other.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('team' || '/' || 'p'))"))
        worker = threading.Thread(target=lambda: result.append(
            postgres_ledger.reserve("team", "p", rule({"window": "day", "maxCostUSD": 1}), 0.5, 5, "r1", AT)))
        worker.start()
        other_policy = rule({"window": "day", "maxCostUSD": 1}, policy="q")
        granted(postgres_ledger.reserve("team", "q", other_policy, 0.5, 5, "r1", AT))
        time.sleep(0.3)
        assert result == []
    worker.join(timeout=10)
    assert isinstance(result[0], Reservation)


# -- properties --------------------------------------------------------------------------------------

PROPERTY_RULE = {"hour": (5.0, 500), "day": (12.0, None)}
PROPERTY_START = datetime(2026, 3, 15, 22, 30, tzinfo=UTC)  # 3 hours of minutes cross hours and a day

operations = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.floats(0, 4, allow_nan=False), st.integers(0, 300), st.integers(0, 180)),
    st.tuples(st.just("commit"), st.integers(0, 1000), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 1000)),
), max_size=40)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_reserved_plus_committed_never_exceeds_any_cap(ledger: Ledger, ops: list[tuple[Any, ...]]) -> None:
    """Whatever the interleaving, every window's committed + reserved stays within its cap, and the
    ledger grants exactly when a reference model says there is room (except within float noise)."""
    policy = f"p{uuid.uuid4().hex[:12]}"  # one ledger file per test; a fresh policy per example
    limits = [{"window": w, "maxCostUSD": cost, "maxTokens": tokens} for w, (cost, tokens) in PROPERTY_RULE.items()]
    budget = rule(*limits, policy=policy)
    rows: dict[str, list[Any]] = {}  # id -> [state, cost, tokens, at]: the reference model
    live: list[Reservation] = []

    def used(window: str, at: datetime) -> tuple[float, int]:
        start, end = window_bounds(window, at)
        counted = [r for r in rows.values() if r[0] != "released" and start <= r[3] < end]
        return sum(r[1] for r in counted), sum(r[2] for r in counted)

    for n, op in enumerate(ops):
        if op[0] == "reserve":
            _, cost, tokens, minute = op
            at = PROPERTY_START + timedelta(minutes=minute)
            margins = []
            for window, (cap_usd, cap_tokens) in PROPERTY_RULE.items():
                spent_usd, spent_tokens = used(window, at)
                margins.append(cap_usd - (spent_usd + cost))
                if cap_tokens is not None:
                    margins.append(cap_tokens - (spent_tokens + tokens))
            result = ledger.reserve("team", policy, budget, cost, tokens, f"r{n}", at)
            if all(abs(m) > 1e-6 for m in margins):
                assert isinstance(result, Reservation) == all(m > 0 for m in margins), (margins, result)
            if isinstance(result, Reservation):
                rows[result.id] = ["reserved", cost, tokens, at]
                live.append(result)
        elif op[0] == "commit" and live:
            got = live.pop(op[1] % len(live))
            actual_cost, actual_tokens = got.cost_usd * op[2], int(got.tokens * op[2])  # never above worst case
            assert ledger.commit(got.id, actual_cost, actual_tokens)
            rows[got.id] = ["committed", actual_cost, actual_tokens, got.created_at]
        elif op[0] == "release" and live:
            got = live.pop(op[1] % len(live))
            assert ledger.release(got.id)
            rows[got.id][0] = "released"

        windows = {(window, window_bounds(window, r[3])) for r in rows.values() for window in PROPERTY_RULE}
        for window, (start, end) in windows:
            cap_usd, cap_tokens = PROPERTY_RULE[window]
            spent = ledger.spend("team", policy, start, end)
            flying = ledger.in_flight("team", policy, start, end)
            assert spent.cost_usd + flying.cost_usd <= cap_usd + USD_EPSILON
            assert cap_tokens is None or spent.tokens + flying.tokens <= cap_tokens
            assert spent.cost_usd + flying.cost_usd == pytest.approx(used(window, start)[0], abs=1e-9)


# -- concurrency -------------------------------------------------------------------------------------


def test_200_concurrent_reservations_admit_exactly_what_the_cap_allows(ledger: Ledger) -> None:
    worst, cap = 0.25, 12.5  # room for exactly 50 worst cases (binary-exact, so no float slack involved)
    day = rule({"window": "day", "maxCostUSD": cap, "maxTokens": 50 * 1000})
    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: ledger.reserve("team", "p", day, worst, 1000, f"req-{i}", AT), range(200)))
    reserved_s = time.perf_counter() - started
    wins = [r for r in results if isinstance(r, Reservation)]
    assert len(wins) == 50
    assert all(isinstance(r, Denied) and r.window == "day" for r in results if not isinstance(r, Reservation))
    assert ledger.in_flight("team", "p", DAY) == Usage(cap, 50_000)

    rng = random.Random(7)
    actuals = {r.id: (rng.uniform(0, worst), rng.randint(0, 1000)) for r in wins}
    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(lambda r: ledger.commit(r.id, *actuals[r.id]), wins))
    spent = ledger.spend("team", "p", DAY)
    assert spent.cost_usd == pytest.approx(sum(c for c, _ in actuals.values())) and spent.cost_usd <= cap
    assert ledger.in_flight("team", "p", DAY) == Usage(0.0, 0)
    print(f"200 reservations over 32 threads: {reserved_s * 1000:.0f} ms; "
          f"reserve+commit: {(time.perf_counter() - started) * 1000:.0f} ms")


async def test_concurrent_async_requests_are_group_committed_and_admit_exactly_the_cap(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 12.5})  # room for exactly 50 worst cases of 0.25
    results = await asyncio.gather(*(ledger.areserve("team", "p", day, 0.25, 1000, f"req-{i}", AT)
                                     for i in range(200)))
    wins = [r for r in results if isinstance(r, Reservation)]
    assert len(wins) == 50
    assert all(isinstance(r, Denied) and r.window == "day" for r in results if not isinstance(r, Reservation))
    assert await asyncio.gather(*(ledger.acommit(r.id, 0.125, 500) for r in wins)) == [True] * 50
    assert ledger.spend("team", "p", DAY) == Usage(6.25, 25_000)
    assert ledger.in_flight("team", "p", DAY) == Usage(0.0, 0)
    assert 0 < ledger.batches < 250, "250 async ops should share transactions"


def test_a_batch_settles_first_and_then_admits_in_order(ledger: Ledger) -> None:
    day = rule({"window": "day", "maxCostUSD": 1.0})
    first = granted(ledger.reserve("team", "p", day, 1.0, 10, "r1", AT))
    second = ReserveOp("team", "p", day, 0.5, 5, "r2", AT)
    results = ledger.apply([second, SettleOp(first.id, (0.25, 2)), second,
                            ReserveOp("team", "p", day, 0.5, 5, "r3", AT), SettleOp("nobody/p", None)])
    assert isinstance(results[0], Reservation) and not results[0].replayed  # room the commit freed: 0.75
    assert results[1] is True
    assert isinstance(results[2], Reservation) and results[2].replayed and results[2].id == results[0].id
    assert denied(results[3]).spent == 0.25 and denied(results[3]).in_flight == 0.5  # type: ignore[arg-type]
    assert results[4] is False
    assert ledger.spend("team", "p", DAY) == Usage(0.25, 2)
    assert ledger.in_flight("team", "p", DAY) == Usage(0.5, 5)


# -- the operator reads what the gateway writes ------------------------------------------------------


def test_operator_reader_sees_gateway_committed_spend(ledger: Ledger, url: str) -> None:
    day = rule({"window": "day", "maxCostUSD": 10})
    for i, actual in enumerate((4.0, 6.0)):
        ledger.commit(granted(ledger.reserve("team", "p", day, 5.0, 100, f"r{i}", AT)).id, actual, 100)
    granted(ledger.reserve("team", "p", rule({"window": "day", "maxCostUSD": 100}), 50.0, 0, "in-flight", AT))
    reader = SqlSpendReader(url)
    start, _ = window_bounds("day", AT)
    assert tuple(ledger.spend("team", "p", start)) == (reader.spend("team", "p", start).cost_usd,
                                                      reader.spend("team", "p", start).tokens) == (10.0, 200)
    policy = BudgetPolicy.model_validate({"metadata": {"name": "p", "namespace": "team"},
                                          "spec": {"limits": [{"window": "day", "maxCostUSD": 10}]}})
    view = evaluate(policy, reader, AT)
    assert view.state is BudgetState.EXHAUSTED and view.windows[0].spent_usd == 10.0
    with reader.engine.connect() as conn:  # one table, one schema: the same rows from both sides
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger_table)).scalar() == 3


# -- running totals (budget_totals: the gateway's accelerator, derived from budget_ledger) -------------


def _totals_from_rows(book: Ledger) -> dict[tuple[str, str, str, datetime], tuple[float, int, float, int]]:
    """What budget_totals must hold: the row sums of every (namespace, policy, window, window start)."""
    sums: dict[tuple[str, str, str, datetime], list[Any]] = {}
    with book.engine.connect() as conn:
        for row in conn.execute(sa.select(ledger_table)):
            if row.state == "released":
                continue
            created_at = row.created_at.replace(tzinfo=UTC) if row.created_at.tzinfo is None else row.created_at
            for window in ("hour", "day", "month"):
                start = window_bounds(window, created_at)[0]
                acc = sums.setdefault((row.namespace, row.policy, window, start), [0.0, 0, 0.0, 0])
                offset = 0 if row.state == "committed" else 2
                acc[offset] += row.cost_usd
                acc[offset + 1] += row.tokens
    return {key: tuple(acc) for key, acc in sums.items()}  # type: ignore[misc]


def _stored_totals(book: Ledger) -> dict[tuple[str, str, str, datetime], tuple[float, int, float, int]]:
    with book.engine.connect() as conn:
        rows = conn.execute(sa.select(totals_table)).all()
    return {(r.namespace, r.policy, r.window, r.window_start.replace(tzinfo=UTC) if r.window_start.tzinfo is None
             else r.window_start.astimezone(UTC)):
            (r.committed_usd, r.committed_tokens, r.reserved_usd, r.reserved_tokens) for r in rows}


def _assert_totals_match_rows(book: Ledger) -> None:
    expected, stored = _totals_from_rows(book), _stored_totals(book)
    for key in expected.keys() | stored.keys():
        want, got = expected.get(key, (0.0, 0, 0.0, 0)), stored.get(key, (0.0, 0, 0.0, 0))
        assert got[0] == pytest.approx(want[0], abs=1e-9) and got[2] == pytest.approx(want[2], abs=1e-9), key
        assert (got[1], got[3]) == (want[1], want[3]), key


totals_operations = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.sampled_from(["p", "q"]), st.floats(0, 4, allow_nan=False),
              st.integers(0, 300), st.integers(0, 60 * 24 * 40)),
    st.tuples(st.just("commit"), st.integers(0, 1000), st.floats(0, 1.5)),
    st.tuples(st.just("release"), st.integers(0, 1000)),
    st.tuples(st.just("expire"), st.integers(0, 60 * 24 * 40)),
    st.tuples(st.just("charge"), st.integers(0, 1000), st.floats(0, 0.6)),  # a request on a budget lease
), max_size=30)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=totals_operations)
def test_totals_equal_row_sums_after_any_sequence_and_after_rebuild(ledger: Ledger, ops: list[tuple[Any, ...]]) -> None:
    with ledger.engine.begin() as conn:  # one ledger per test: each example starts from an empty table
        conn.execute(ledger_table.delete())
    ledger.rebuild_totals()
    budget = {name: rule({"window": "day", "maxCostUSD": 50, "maxTokens": 5000}, policy=name) for name in "pq"}
    start = datetime(2026, 3, 1, tzinfo=UTC)
    live: list[Reservation] = []
    for n, op in enumerate(ops):
        if op[0] == "reserve":
            _, policy, cost, tokens, minute = op
            result = ledger.reserve("team", policy, budget[policy], cost, tokens, f"r{n}",
                                    start + timedelta(minutes=minute))
            if isinstance(result, Reservation):
                live.append(result)
        elif op[0] == "commit" and live:
            got = live.pop(op[1] % len(live))
            ledger.commit(got.id, got.cost_usd * op[2], int(got.tokens * op[2]))  # may exceed the worst case
        elif op[0] == "release" and live:
            ledger.release(live.pop(op[1] % len(live)).id)
        elif op[0] == "charge" and live:  # the reservation stays live as a lease; may be charged past what it holds
            got = live[op[1] % len(live)]
            ledger.apply([SettleOp(got.id, (got.cost_usd * op[2], int(got.tokens * op[2])),
                                   LeaseCharge(f"c{n}/{got.policy}", "team", got.policy, got.created_at))])
        elif op[0] == "expire":
            ledger.expire(timedelta(0), start + timedelta(minutes=op[1]))
        _assert_totals_match_rows(ledger)
    with ledger.engine.begin() as conn:  # totals wrong or lost: rebuild recomputes them from the rows
        conn.execute(totals_table.update().values(committed_usd=123.0, reserved_tokens=-7))
    ledger.rebuild_totals()
    _assert_totals_match_rows(ledger)


def test_totals_are_rebuilt_on_startup_from_existing_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    book = Ledger(url)
    granted(book.reserve("team", "p", rule({"window": "day", "maxCostUSD": 10}), 4.0, 0, "r1", AT))
    with book.engine.begin() as conn:
        conn.execute(totals_table.delete())  # as if the rows came from a gateway without totals
    book.close()
    book = Ledger(url)
    _assert_totals_match_rows(book)
    refused = denied(book.reserve("team", "p", rule({"window": "day", "maxCostUSD": 10}), 7.0, 0, "r2", AT))
    assert refused.in_flight == 4.0
    book.close()
