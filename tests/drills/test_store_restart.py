"""PostgreSQL restarted under load: the gateway refuses what it cannot make durable, then serves again by itself.

The gateway app (ASGITransport, in the test's loop) keeps its audit records, budget ledger and leases in a
PostgreSQL server of its own, which is stopped as an administrator would (``pg_ctl stop -m fast``: every
session ended, open transactions rolled back), kept down for a moment and started again, while 16 clients
keep sending. Then:

* while it is down, a request is refused with a 503 that says to retry, whether it was admitted from a
  budget lease and its record could not be written, or it needed a ledger reservation of its own; none is
  answered 500, and none is acknowledged (200) without its record;
* once it is back, every request is answered 200, without restarting the gateway: no connection it held
  from before the restart fails a request;
* every 200 has its audit record and a committed ledger row of the same amount, and the running totals
  equal the rows: nothing acknowledged was lost, nothing charged twice;
* the log says why requests were refused without a traceback for each of them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from pilothouse.operator.api.ledger import ledger, totals
from pilothouse.operator.api.routing import BudgetRule
from pilothouse.serving.audit import AuditLog
from tests.fakes.openai_backend import FakeBackend
from tests.pg import TempPostgres, or_skip, temp_postgres
from tests.unit.test_gateway_requests import HELLO, A, make_table

from .conftest import in_process_gateway

pytestmark = pytest.mark.drill

CLIENTS = 16
BEFORE_S, DOWN_S, AFTER_S = 1.5, 5.0, 3.0
# A lease holds a tenth of the cap (budget_lease.MAX_SHARE): 0.005 USD, 250 of these requests' worst cases
# (tests/drills/test_budget_race.py), so the leases run out within the outage and requests then need a
# reservation of their own. The whole drill spends well under the cap.
CAP_USD = 0.05
PER_REQUEST_LOGGERS = {"pilothouse.serving.dataplane", "pilothouse.serving.refusals"}


@pytest.fixture
def server() -> Iterator[TempPostgres]:
    with or_skip(temp_postgres()) as pg:
        yield pg


async def test_postgresql_restarted_under_load(tmp_path: Path, server: TempPostgres,
                                              caplog: pytest.LogCaptureFixture) -> None:
    rule = BudgetRule.model_validate({"policy": "drill", "state": "Ok", "action": "none",
                                      "limits": [{"window": "month", "maxCostUSD": CAP_USD}]})
    answers: list[tuple[float, httpx.Response]] = []  # (when it was sent, the answer)
    async with FakeBackend(model="org/small") as primary, FakeBackend(model="org/large") as fallback:
        primary.latency(0.05)
        async with in_process_gateway(tmp_path, make_table(primary, fallback, budget=rule), server.url) as (_, http):
            stop = asyncio.Event()

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    body = {"model": "wf/extract", "messages": HELLO, "max_tokens": 8, "user": f"c{n}-{i}"}
                    i += 1
                    sent = time.monotonic()
                    answers.append((sent, await http.post("/v1/chat/completions", json=body, headers=A)))

            clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
            await asyncio.sleep(BEFORE_S)
            went_down = time.monotonic()
            await asyncio.to_thread(server.restart, DOWN_S)
            back = time.monotonic()
            await asyncio.sleep(AFTER_S)
            stop.set()
            await asyncio.gather(*clients)

    statuses = Counter(r.status_code for _, r in answers)
    refusals = Counter(r.json()["error"]["code"] for _, r in answers if r.status_code == 503)
    after = [r for sent, r in answers if sent >= back]
    print(f"store restart drill: {len(answers)} requests, {dict(statuses)}, 503s {dict(refusals)}; down "
          f"{back - went_down:.1f} s; {len(after)} sent after it was back")
    assert set(statuses) <= {200, 503}, [r.text for _, r in answers if r.status_code not in (200, 503)][:3]
    # Both ways a request meets the outage: admitted from a lease, then its record could not be written;
    # or, the leases used up, its own reservation could not be made.
    assert set(refusals) == {"audit_unavailable", "store_unavailable"}, refusals
    assert after and all(r.status_code == 200 for r in after), [r.text for r in after if r.status_code != 200][:3]
    # The outage is logged, but not with a traceback per refused request (the writer logs one per failed batch,
    # the budget leases one per failed lease operation, at most one a second).
    per_request = [r for r in caplog.records if r.exc_info and r.name in PER_REQUEST_LOGGERS]
    assert not per_request, sorted({(r.name, r.getMessage()[:80]) for r in per_request})

    engine = sa.create_engine(server.url)
    try:
        with engine.connect() as conn:
            rows = {row.id: row for row in conn.execute(sa.select(ledger))}
            (month,) = conn.execute(sa.select(totals).where(totals.c.window == "month")).all()
    finally:
        engine.dispose()
    committed = {rid: row for rid, row in rows.items() if row.state == "committed"}
    with AuditLog(server.url, create=False) as audit:
        for _, response in answers:
            if response.status_code == 200:
                record = audit.get(response.headers["x-pilothouse-request-id"])
                assert record is not None and record.status_code == 200
                trail = record.budget[0]
                assert committed[trail.reservation_id].cost_usd == pytest.approx(trail.committed_usd)
    assert statuses[200] <= len(committed) <= primary.served["/v1/chat/completions"]
    assert month.committed_usd == pytest.approx(sum(r.cost_usd for r in committed.values()))
