"""CPU per audit record of the gateway's group-commit transaction, by batch size, against SQLite's own floor.

At moderate load (~1,300 RPS, ``gateway_overhead.py``'s c=32) the audit writer commits batches of one or two
records (a commit ends before the next request's record comes), so what one small transaction costs is paid per
request; at its c=256 (~1,700 RPS, the event loop saturated) batches hold ~25. Four ways to write the
same rows to the same schema (``audit_records``, WAL, ``synchronous=FULL``), measured in turns so that this
machine's drift hits them alike:

- **raw sqlite3**: ``BEGIN IMMEDIATE``, one ``executemany`` of the insert, ``COMMIT``, on a plain sqlite3
  connection: the floor, SQLite's own work and the fsync;
- **pool connection**: ``AuditLog.insert_rows_with`` checking a connection out of SQLAlchemy's pool for the
  transaction, as every writer but the group-commit thread does;
- **kept connection**: the same call on the connection the audit writer's thread keeps
  (``stores.HeldConnection``), the gateway's path;
- **kept + lease charges**: the same, each record with the budget charge the gateway settles in its
  transaction when a BudgetPolicy applies (``Ledger.settle_in``: the request's committed ledger row, the
  lease's remaining headroom and the running totals), as in ``gateway_overhead.py``'s production setup.

Rows and charges are built before timing (the event loop serialises a record and settles its claim; the
writer thread only writes them).
Reported: CPU microseconds per record (``time.process_time``: the fsync's kernel time included) and the
kept / pool ratio; a table on stdout and ``bench/results/audit_writer.json``.

A second table times one-record commits the way a lightly loaded gateway makes them: each after ``--idle-ms``
(20) of idle, as at concurrency 1, where every request waits for its own commit before it is answered. Wall
and CPU milliseconds per commit, median over ``--idle-commits``, against the same commits back to back. The
idle commit is dearer for every variant, SQLite's own included (cold caches after the pause): the ratio of
kept + lease charges to raw sqlite3 in that column is what the gateway's code adds there.

Run: ``.venv/bin/python bench/audit_writer.py`` (~40 s; ``--records`` per batch size and variant).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import machine

from pilothouse.operator.api.routing import BudgetRule
from pilothouse.serving.audit import INSERT_SQL, AuditLog, AuditRecord, RoutingDecision, TokenUsage, as_row
from pilothouse.serving.dataplane import new_id
from pilothouse.serving.ledger import LeaseCharge, Ledger, Reservation, SettleOp
from pilothouse.serving.stores import HeldConnection

RESULTS = Path(__file__).resolve().parent / "results" / "audit_writer.json"
BATCHES = (1, 2, 4, 16, 64)
PACES = ("idle", "back to back")  # the idle table's two ways of committing one record
ROUNDS = 3

Write = Callable[[Sequence[Any]], object]
Prepare = Callable[[dict[str, Any]], Any]


def record() -> dict[str, Any]:
    """The row of a gateway answer with a budget trail's worth of fields (prompts and outputs as hashes)."""
    return as_row(AuditRecord(
        id=new_id(), ts=datetime.now(UTC), trace_id="0af7651916cd43dd8448eb211c80319c", tenant="team-bench",
        workflow="wf", route="extract", model="wf/extract", inputs_hash="sha256:" + "b" * 64,
        routing=RoutingDecision(backend="small", reason="primary", table_revision=1, attempts=[]),
        usage=TokenUsage(prompt_tokens=14, completion_tokens=16), output_hash="sha256:" + "c" * 64,
        status_code=200, latency_ms=3.2))


def raw_writer(path: Path) -> Write:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")

    def write(rows: Sequence[dict[str, Any]]) -> None:
        written_at = datetime.now(UTC).isoformat()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_SQL, [{**r, "ts": r["ts"].isoformat(), "written_at": written_at} for r in rows])
        conn.execute("COMMIT")
    return write


def lease_writer(log: AuditLog, ledger: Ledger, held: HeldConnection) -> tuple[Write, Prepare]:
    """(write, charge): ``charge(row)`` pairs a row with its request's charge to one open budget lease (a day
    cap far above what the run spends), ``write`` commits such pairs the way the audit writer's thread does."""
    rule = BudgetRule.model_validate({"policy": "bench", "state": "Ok", "action": "reject",
                                      "limits": [{"window": "day", "maxCostUSD": 1e9}]})
    lease = ledger.reserve("bench", "bench", rule, 1e6, 10**12, new_id(), datetime.now(UTC))
    assert isinstance(lease, Reservation), lease

    def charge(row: dict[str, Any]) -> tuple[dict[str, Any], SettleOp]:
        return row, SettleOp(lease.id, (0.00052, 30), LeaseCharge(row["id"], "bench", "bench", lease.created_at))

    def write(items: Sequence[tuple[dict[str, Any], SettleOp]]) -> None:
        ops = [op for _, op in items]
        log.insert_rows_with([row for row, _ in items], lambda conn: ledger.settle_in(conn, ops), held)
    return write, charge


def _same(row: dict[str, Any]) -> dict[str, Any]:
    return row


def cpu_per_record(write: Write, batch: int, records: int, prepare: Prepare = _same) -> float:
    batches = [[prepare(record()) for _ in range(batch)] for _ in range(max(1, records // batch))]
    started = time.process_time()
    for rows in batches:
        write(rows)
    return (time.process_time() - started) / (len(batches) * batch) * 1e6


def commit_ms(write: Write, prepare: Prepare, idle_s: float, commits: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one one-record commit, median over ``commits``, each after ``idle_s`` asleep."""
    rows = [[prepare(record())] for _ in range(commits)]
    wall: list[float] = []
    cpu: list[float] = []
    for batch in rows:
        if idle_s:
            time.sleep(idle_s)
        started, started_cpu = time.perf_counter(), time.process_time()
        write(batch)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000, help="records per batch size, variant and round")
    parser.add_argument("--idle-ms", type=float, default=20.0, help="pause before each commit of the idle table")
    parser.add_argument("--idle-commits", type=int, default=100, help="commits per variant and round, idle table")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    machine.sample_speed()
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="pilothouse-audit-bench-") as tmp:
        folder = Path(tmp)
        log = AuditLog(f"sqlite:///{folder / 'audit.db'}")
        held = log.held_writer()
        charged_log = AuditLog(f"sqlite:///{folder / 'charged.db'}")  # records and ledger in one store, as the gateway
        ledger = Ledger(f"sqlite:///{folder / 'charged.db'}")
        charged_held = charged_log.held_writer()
        write_charged, charge = lease_writer(charged_log, ledger, charged_held)
        AuditLog(f"sqlite:///{folder / 'raw.db'}").close()  # the same schema for the raw floor
        variants: dict[str, tuple[Write, Prepare]] = {
            "raw sqlite3": (raw_writer(folder / "raw.db"), _same),
            "pool connection": (lambda rows: log.insert_rows_with(rows), _same),
            "kept connection": (lambda rows: log.insert_rows_with(rows, None, held), _same),
            "kept + lease charges": (write_charged, charge),
        }
        samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in variants}
        paced: dict[str, dict[str, list[tuple[float, float]]]] = {name: {pace: [] for pace in PACES}
                                                                  for name in variants}
        for _ in range(ROUNDS):
            for batch in BATCHES:
                for name, (write, prepare) in variants.items():
                    samples[name][batch].append(cpu_per_record(write, batch, args.records, prepare))
            for name, (write, prepare) in variants.items():
                for pace in PACES:
                    idle_s = args.idle_ms / 1e3 if pace == "idle" else 0.0
                    paced[name][pace].append(commit_ms(write, prepare, idle_s, args.idle_commits))
        for closing in (held, charged_held, log, charged_log, ledger):
            closing.close()

    us = {name: {b: round(statistics.median(v), 1) for b, v in by_batch.items()} for name, by_batch in samples.items()}
    table = Table(title=f"Audit writer: CPU us per record, WAL + synchronous=FULL, median of {ROUNDS} rounds")
    table.add_column("records per commit", justify="right")
    for name in variants:
        table.add_column(name, justify="right")
    table.add_column("kept / pool", justify="right")
    for batch in BATCHES:
        ratio = us["kept connection"][batch] / us["pool connection"][batch]
        table.add_row(str(batch), *(f"{us[name][batch]:.1f}" for name in variants), f"{ratio:.2f}")
    console = Console(highlight=False)
    console.print(table)
    ms = {name: {pace: {"wall": round(statistics.median(wall for wall, _ in runs), 3),
                        "cpu": round(statistics.median(cpu for _, cpu in runs), 3)} for pace, runs in by.items()}
          for name, by in paced.items()}
    idle_table = Table(title=f"One-record commit, ms: after {args.idle_ms:g} ms idle (as at concurrency 1) and back to "
                             f"back (hot); median of {ROUNDS} rounds of {args.idle_commits}")
    for col in ("variant", "idle wall", "idle CPU", "hot wall", "hot CPU", "idle / hot"):
        idle_table.add_column(col, justify="left" if col == "variant" else "right")
    for name, by in ms.items():
        idle_table.add_row(name, *(f"{by[pace][clock]:.3f}" for pace in PACES for clock in ("wall", "cpu")),
                           f"{by['idle']['wall'] / by['back to back']['wall']:.1f}x")
    console.print(idle_table)
    payload = {"benchmark": "audit_writer", "when": machine.measured_at(), "machine": machine.describe("sqlalchemy"),
               "setup": {"records": args.records, "rounds": ROUNDS, "sqlite": sqlite3.sqlite_version,
                         "idle_ms": args.idle_ms, "idle_commits": args.idle_commits},
               "cpu_us_per_record": {name: {str(b): v for b, v in by_batch.items()} for name, by_batch in us.items()},
               "one_record_commit_ms": ms,
               "summary": {f"{key}_batch{b}_us": us[name][b] for name, key in
                           (("raw sqlite3", "raw"), ("pool connection", "pool"), ("kept connection", "kept"),
                            ("kept + lease charges", "kept_charges"))
                           for b in (1, 2, 16)}
               | {f"{key}_commit_{pace.replace(' ', '_')}_wall_ms": ms[name][pace]["wall"]
                  for name, key in (("raw sqlite3", "raw"), ("kept + lease charges", "kept_charges"))
                  for pace in PACES}}
    print(f"wrote {machine.save(args.output, payload)}")


if __name__ == "__main__":
    main()
