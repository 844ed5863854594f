"""kill -9 of the gateway under load: what the client saw acknowledged survives, nothing is charged twice.

The gateway runs as its own process under uvicorn (``build_app``, one worker) on a SQLite file: the
same app ``pilothouse serve`` puts on Ray Serve, started in about two seconds instead of fifteen,
and a single process whose death is the whole gateway's death (under Ray the proxy and replica
are separate processes and a kill of one is a different drill). 32 clients keep it busy against a
FakeBackend slow enough that every moment has requests holding reservations; after 200
acknowledgements the process group gets SIGKILL. Then, on the same store:

* every 200 the client received has its audit record and a committed ledger row of the same amount;
* the running totals equal the rows (crash-atomic with them), and no backend answer was charged twice;
* the reservations of requests killed in flight are released by ``expire``, called explicitly;
* a restarted gateway serves and commits again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from pilothouse.localrun import serve_port
from pilothouse.operator.api.ledger import ledger, totals
from pilothouse.operator.api.routing import BudgetRule
from pilothouse.serving.audit import AuditLog
from pilothouse.serving.ledger import USD_EPSILON, Ledger
from tests.fakes.openai_backend import FakeBackend
from tests.polling import eventually
from tests.unit.test_gateway_requests import HELLO, A, make_table

from .conftest import KEYS

pytestmark = pytest.mark.drill

ROOT = Path(__file__).parents[2]
CLIENTS = 32
KILL_AFTER = 200
SERVE = ("import sys, uvicorn; from pilothouse.serving.gateway import build_app; "
         "uvicorn.run(build_app(sys.argv[1], api_keys=sys.argv[2], store_url=sys.argv[3]), host='127.0.0.1', "
         "port=int(sys.argv[4]), log_level='warning')")



async def start_gateway(folder: Path, store_url: str, port: int, log: Any) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVE, str(folder / "routing.json"), str(folder / "keys.json"), store_url, str(port),
        cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            if process.returncode is not None:
                raise AssertionError(f"gateway exited with {process.returncode}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return process
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("gateway not ready in 60 s")


async def kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


def store_rows(store_url: str) -> tuple[dict[str, Any], list[Any]]:
    """Ledger rows by id, and the totals rows, read raw (no Ledger: it rebuilds the totals on start)."""
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(sa.select(ledger))}
        sums = list(conn.execute(sa.select(totals).where(totals.c.window == "month")))
    engine.dispose()
    return rows, sums


async def test_kill_9_under_load_loses_no_acknowledged_request_and_charges_none_twice(tmp_path: Path) -> None:
    rule = BudgetRule.model_validate({"policy": "drill", "state": "Ok", "action": "none",
                                      "limits": [{"window": "month", "maxCostUSD": 1000}]})
    store_url = f"sqlite:///{tmp_path}/store.db"
    port = serve_port()
    log = (tmp_path / "gateway.log").open("w")
    acknowledged: list[httpx.Response] = []
    unanswered = 0
    async with FakeBackend(model="org/small") as primary, FakeBackend(model="org/large") as fallback:
        primary.latency(0.25)  # every request spends its time at the backend, holding a reservation
        (tmp_path / "routing.json").write_text(make_table(primary, fallback, budget=rule)
                                               .model_dump_json(by_alias=True))
        (tmp_path / "keys.json").write_text(json.dumps(KEYS))
        process = await start_gateway(tmp_path, store_url, port, log)
        try:
            enough = asyncio.Event()
            limits = httpx.Limits(max_connections=CLIENTS)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as http:

                async def client(n: int) -> None:
                    nonlocal unanswered
                    i = 0
                    while True:
                        body = {"model": "wf/extract", "messages": HELLO, "max_tokens": 8, "user": f"c{n}-{i}"}
                        i += 1
                        try:
                            response = await http.post("/v1/chat/completions", json=body, headers=A)
                        except httpx.TransportError:
                            unanswered += 1
                            return
                        assert response.status_code == 200, response.text
                        acknowledged.append(response)
                        if len(acknowledged) >= KILL_AFTER:
                            enough.set()

                clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
                await asyncio.wait_for(enough.wait(), 120)
                await kill(process)
                killed_at = datetime.now(UTC)
                await asyncio.gather(*clients)
            served_by_backend = primary.served["/v1/chat/completions"]

            rows, sums = await asyncio.to_thread(store_rows, store_url)
            committed = {rid: row for rid, row in rows.items() if row.state == "committed"}
            orphans = [row for row in rows.values() if row.state == "reserved"]
            print(f"kill -9 drill: {len(acknowledged)} acknowledged, {unanswered} cut off; ledger {len(committed)} "
                  f"committed, {len(orphans)} reserved at the kill; backend answered {served_by_backend}")

            # Every acknowledged answer: audit record and committed reservation of the same amount.
            with AuditLog(store_url, create=False) as audit:
                for response in acknowledged:
                    record = audit.get(response.headers["x-pilothouse-request-id"])
                    assert record is not None and record.status_code == 200
                    trail = record.budget[0]
                    row = committed[trail.reservation_id]
                    assert row.cost_usd == pytest.approx(trail.committed_usd)
                # ... and every 200 in the audit log, acknowledged or not, was committed (settle precedes audit).
                for record in audit.tail(limit=10 * KILL_AFTER):
                    assert record.status_code == 200 and record.budget[0].reservation_id in committed
            # Nothing double-charged: one row per request (ids are keys), never more commits than answers,
            # and the running totals moved in the same transactions as the rows, kill or not.
            assert len(acknowledged) <= len(committed) <= served_by_backend
            (month,) = sums
            assert month.committed_usd == pytest.approx(sum(r.cost_usd for r in committed.values()))
            assert month.committed_tokens == sum(r.tokens for r in committed.values())
            assert month.reserved_tokens == sum(r.tokens for r in orphans)
            assert unanswered > 0 and orphans, "the kill found nothing in flight: the drill tested nothing"

            # Restart on the same store; release what the dead process left in flight.
            process = await start_gateway(tmp_path, store_url, port, log)
            book = Ledger(store_url)
            released = await book.aexpire(timedelta(0), now=killed_at)
            assert released == len(orphans)
            assert book.in_flight("default", "drill", killed_at - timedelta(days=31)).tokens == 0
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                after = await http.post("/v1/chat/completions", json={"model": "wf/extract", "messages": HELLO,
                                                                      "max_tokens": 8}, headers=A)
            assert after.status_code == 200, after.text

            async def idle() -> Any:  # the restarted gateway returns its budget lease once idle
                found = await asyncio.to_thread(store_rows, store_url)
                return not [r for r in found[0].values() if r.state == "reserved"] and found

            rows, (month,) = await eventually(idle, timeout=15)
            assert sum(r.state == "committed" for r in rows.values()) == len(committed) + 1
            assert abs(month.reserved_usd) <= USD_EPSILON and month.reserved_tokens == 0
            book.close()
            with sa.create_engine(store_url).connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        finally:
            await kill(process)
            log.close()
