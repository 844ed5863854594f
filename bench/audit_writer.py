"""CPU per audit record of the gateway's group-commit transaction, by batch size, against SQLite's own floor.

Under steady load the audit writer commits batches of one or two records (a commit ends before the next
request's record comes), so what one small transaction costs is paid per request. Three ways to write the
same rows to the same schema (``audit_records``, WAL, ``synchronous=FULL``), measured in turns so that this
machine's drift hits them alike:

- **raw sqlite3**: ``BEGIN IMMEDIATE``, one ``executemany`` of the insert, ``COMMIT``, on a plain sqlite3
  connection: the floor, SQLite's own work and the fsync;
- **pool connection**: ``AuditLog.insert_rows_with`` checking a connection out of SQLAlchemy's pool for the
  transaction, as every writer but the group-commit thread does;
- **kept connection**: the same call on the connection the audit writer's thread keeps
  (``stores.HeldConnection``), the gateway's path.

Rows are built before timing (the event loop serialises a record; the writer thread only writes it).
Reported: CPU microseconds per record (``time.process_time``: the fsync's kernel time included) and the
kept / pool ratio; a table on stdout and ``bench/results/audit_writer.json``.

Run: ``.venv/bin/python bench/audit_writer.py`` (~30 s; ``--records`` per batch size and variant).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import machine

from pilothouse.serving.audit import INSERT_SQL, AuditLog, AuditRecord, RoutingDecision, TokenUsage, as_row
from pilothouse.serving.dataplane import new_id

RESULTS = Path(__file__).resolve().parent / "results" / "audit_writer.json"
BATCHES = (1, 2, 4, 16, 64)
ROUNDS = 3

Write = Callable[[Sequence[dict[str, Any]]], object]


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


def cpu_per_record(write: Write, batch: int, records: int) -> float:
    batches = [[record() for _ in range(batch)] for _ in range(max(1, records // batch))]
    started = time.process_time()
    for rows in batches:
        write(rows)
    return (time.process_time() - started) / (len(batches) * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000, help="records per batch size, variant and round")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="pilothouse-audit-bench-") as tmp:
        folder = Path(tmp)
        log = AuditLog(f"sqlite:///{folder / 'audit.db'}")
        held = log.held_writer()
        AuditLog(f"sqlite:///{folder / 'raw.db'}").close()  # the same schema for the raw floor
        variants: dict[str, Write] = {
            "raw sqlite3": raw_writer(folder / "raw.db"),
            "pool connection": lambda rows: log.insert_rows_with(rows),
            "kept connection": lambda rows: log.insert_rows_with(rows, None, held),
        }
        samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in variants}
        for _ in range(ROUNDS):
            for batch in BATCHES:
                for name, write in variants.items():
                    samples[name][batch].append(cpu_per_record(write, batch, args.records))
        held.close()
        log.close()

    us = {name: {b: round(statistics.median(v), 1) for b, v in by_batch.items()} for name, by_batch in samples.items()}
    table = Table(title=f"Audit writer: CPU us per record, WAL + synchronous=FULL, median of {ROUNDS} rounds")
    table.add_column("records per commit", justify="right")
    for name in variants:
        table.add_column(name, justify="right")
    table.add_column("kept / pool", justify="right")
    for batch in BATCHES:
        ratio = us["kept connection"][batch] / us["pool connection"][batch]
        table.add_row(str(batch), *(f"{us[name][batch]:.1f}" for name in variants), f"{ratio:.2f}")
    Console(highlight=False).print(table)
    payload = {"benchmark": "audit_writer", "when": machine.measured_at(), "machine": machine.describe("sqlalchemy"),
               "setup": {"records": args.records, "rounds": ROUNDS, "sqlite": sqlite3.sqlite_version},
               "cpu_us_per_record": {name: {str(b): v for b, v in by_batch.items()} for name, by_batch in us.items()},
               "summary": {f"{key}_batch{b}_us": us[name][b] for name, key in
                           (("raw sqlite3", "raw"), ("pool connection", "pool"), ("kept connection", "kept"))
                           for b in (1, 2)}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
