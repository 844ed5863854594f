"""Budget race: 1000 concurrent requests against a budget that admits about a tenth of them.

The real gateway app (ASGITransport, in the test's loop) reserves, dispatches to a FakeBackend with
known usage, and commits. While the requests race, a sampler reads the store from another
connection: committed plus in-flight spend must never pass the cap at any moment it looks, and
after the last answer (and the gateway's budget lease, returned once idle) the committed spend must be
within the cap with nothing left reserved.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pilothouse.operator.api.ledger import ledger, totals
from pilothouse.operator.api.routing import BudgetRule
from pilothouse.serving.audit import AuditLog
from pilothouse.serving.ledger import USD_EPSILON, Ledger
from tests.fakes.openai_backend import FakeBackend
from tests.polling import eventually
from tests.unit.test_gateway_requests import HELLO, A, make_table

from .conftest import in_process_gateway

pytestmark = pytest.mark.drill

REQUESTS = 1000
# "hello there" with max_tokens 8 at 1 / 2 USD per million input / output tokens (factories.model):
# the gateway estimates the prompt at ceil(11 / 4) + 1 message = 4 tokens, so the worst case is
# (4 x 1 + 8 x 2) / 1e6; the fake answers with 2 prompt tokens (words) and 8 completion tokens.
WORST_USD = 20e-6
ACTUAL_USD = 18e-6
LIMIT_USD = 100 * WORST_USD  # admits 100 worst cases at once; 111 actuals fit in all


def policy_sums(engine: sa.Engine) -> tuple[float, float, int]:
    """(committed + reserved USD from the ledger rows, the same from the running totals, reserved rows)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(ledger.c.cost_usd), 0.0),
                                      sa.func.count().filter(ledger.c.state == "reserved"))
                            .where(ledger.c.policy == "race", ledger.c.state.in_(("reserved", "committed")))).one()
        by_totals = conn.execute(sa.select(sa.func.coalesce(sa.func.max(totals.c.committed_usd + totals.c.reserved_usd),
                                                            0.0))
                                 .where(totals.c.policy == "race", totals.c.window == "month")).scalar_one()
    return float(rows[0]), float(by_totals), int(rows[1])


async def test_concurrent_requests_never_spend_past_the_cap(tmp_path: Path, store_url: str) -> None:
    rule = BudgetRule.model_validate({"policy": "race", "state": "Ok", "action": "none",
                                      "limits": [{"window": "month", "maxCostUSD": LIMIT_USD}]})
    async with FakeBackend(model="org/small") as primary, FakeBackend(model="org/large") as fallback:
        primary.latency(0.02)  # answers overlap: many reservations are in flight at once
        table = make_table(primary, fallback, budget=rule)
        async with in_process_gateway(tmp_path, table, store_url) as (_, client):
            book = Ledger(store_url)  # creates the tables the sampler reads before the first request does
            reader = book.engine
            samples: list[tuple[float, float, int]] = []
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    samples.append(await asyncio.to_thread(policy_sums, reader))
                    await asyncio.sleep(0.005)

            async def one(i: int) -> Any:
                body = {"model": "wf/extract", "messages": HELLO, "max_tokens": 8, "user": f"u{i}"}
                return await client.post("/v1/chat/completions", json=body, headers=A)

            sampler = asyncio.create_task(sample())
            responses = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
            done.set()
            await sampler
            # Once idle, the gateway returns its budget lease: what it held unused is reserved no more.
            final = await eventually(lambda: (last := policy_sums(reader))[2] == 0 and last, timeout=10)

    statuses = [r.status_code for r in responses]
    admitted = statuses.count(200)
    refused = statuses.count(429)
    print(f"budget race ({store_url.split(':')[0]}): admitted {admitted} of {REQUESTS}, refused {refused}; "
          f"committed {final[0]:.6f} USD of {LIMIT_USD:.6f}; {len(samples)} samples, peak in flight "
          f"{max(s[2] for s in samples)} reservations")
    assert admitted + refused == REQUESTS, sorted(set(statuses))
    # The first refusal means 100 worst cases were committed or in flight; then actuals free a little room.
    assert 100 <= admitted <= int(LIMIT_USD / ACTUAL_USD + USD_EPSILON)
    for by_rows, by_totals, _ in [*samples, final]:
        assert by_rows <= LIMIT_USD + USD_EPSILON, ("rows", by_rows, by_totals)
        assert by_totals <= LIMIT_USD + USD_EPSILON, ("totals", by_rows, by_totals)
    assert any(s[2] > 1 for s in samples), "the sampler never saw the race in flight"
    spent, _, left_reserved = final
    assert left_reserved == 0
    assert spent == pytest.approx(admitted * ACTUAL_USD)
    # Nothing reached the backend without a reservation, and every answer was committed once.
    assert primary.requests == admitted and fallback.requests == 0
    with AuditLog(store_url, create=False) as log:
        records = {r.id: r for r in log.tail(limit=2 * REQUESTS)}
    assert len(records) == REQUESTS
    for response in responses:
        record = records[response.headers["x-pilothouse-request-id"]]
        assert record.status_code == response.status_code and record.budget[0].policy == "race"
        if response.status_code == 200:
            assert record.budget[0].committed_usd == pytest.approx(ACTUAL_USD)
        else:
            body = response.json()["error"]
            assert body["code"] == "budget_exhausted" and "budget race exhausted for month" in body["message"]
            assert record.budget[0].denied and record.budget[0].reservation_id is None
    # The running totals agree with the rows.
    with reader.connect() as conn:
        kept = conn.execute(sa.select(totals.c.committed_usd, totals.c.reserved_usd)
                            .where(totals.c.policy == "race", totals.c.window == "month")).one()
    assert kept.committed_usd == pytest.approx(spent) and abs(kept.reserved_usd) <= USD_EPSILON
    book.close()
