"""`pilothouse audit show|tail` as an operator runs them: a subprocess, exit codes, no tracebacks."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pilothouse.serving.audit import (
    AuditLog,
    AuditRecord,
    BudgetTrail,
    RoutingAttempt,
    RoutingDecision,
    TokenUsage,
    redact,
)

AT = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)


def pilothouse(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pilothouse", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, **(env or {})})


def fallback_record(record_id: str = "req-1", ts: datetime = AT) -> AuditRecord:
    inputs, inputs_hash = redact([{"role": "user", "content": "secret prompt"}], store=False)
    return AuditRecord(
        id=record_id, ts=ts, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", tenant="acme", workflow="invoice-triage",
        route="extract", model="invoice-triage/extract", inputs=inputs, inputs_hash=inputs_hash,
        routing=RoutingDecision(backend="invoice-large", reason="fallback: primary timed out", table_revision=3,
                                attempts=[RoutingAttempt(backend="invoice-small", error_class="timeout",
                                                         message="read timeout after 2000 ms", latency_ms=2001),
                                          RoutingAttempt(backend="invoice-large", latency_ms=430.5)]),
        budget=[BudgetTrail(policy="invoice-budget", reservation_id="req-1/invoice-budget", reserved_usd=0.0123,
                            committed_usd=0.004)],
        usage=TokenUsage(prompt_tokens=120, completion_tokens=30), output="[bold]approve[/]", status_code=200,
        latency_ms=2450.3)


@pytest.fixture
def store(tmp_path: Path) -> str:
    """The default store of a user running in tmp_path: sqlite:///.pilothouse/pilothouse.db."""
    with AuditLog(f"sqlite:///{tmp_path}/.pilothouse/pilothouse.db") as log:
        log.append(fallback_record())
        log.append(AuditRecord(id="req-2", ts=AT + timedelta(seconds=1), tenant="acme", workflow="invoice-triage",
                               route="extract", budget=[BudgetTrail(policy="invoice-budget",
                                                                    denied="budget invoice-budget exhausted for day")],
                               status_code=429, latency_ms=1.5))
        log.append(AuditRecord(id="req-3", ts=AT + timedelta(seconds=2), tenant="beta", cache_hit=True,
                               status_code=200, latency_ms=0.8))
    return f"sqlite:///{tmp_path}/.pilothouse/pilothouse.db"


def test_show_prints_the_decision_path(store: str, tmp_path: Path) -> None:
    result = pilothouse("audit", "show", "req-1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for expected in ("req-1", "tenant acme", "invoice-triage/extract", "table revision 3", "chose invoice-large",
                     "1. invoice-small timeout: read timeout after 2000 ms", "2. invoice-large ok",
                     "reserved $0.0123 → committed $0.004", "cache: miss", "120 prompt + 30 completion",
                     "status 200", "2450.3 ms", "inputs: not stored sha256:",
                     "[bold]approve[/]"):  # user data is printed as it is, never read as markup
        assert expected in text, (expected, text)
    assert "secret prompt" not in text


def test_show_a_denied_request(store: str, tmp_path: Path) -> None:
    result = pilothouse("audit", "show", "req-2", "--store-url", store, cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert "budget invoice-budget: denied — budget invoice-budget exhausted for day" in result.stdout


def test_unknown_id_is_one_clear_error_line(store: str, tmp_path: Path) -> None:
    result = pilothouse("audit", "show", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == "error: no audit record with id 'nope' in sqlite:///.pilothouse/pilothouse.db"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite:///missing/pilothouse.db", "no audit store at missing/pilothouse.db"),
    ("not a url", "is not a database URL"),
])
def test_a_wrong_store_is_one_clear_error_line(tmp_path: Path, url: str, message: str) -> None:
    result = pilothouse("audit", "show", "req-1", cwd=tmp_path, env={"PILOTHOUSE_STORE_URL": url})
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "missing").exists()  # reading never creates a store


def test_a_database_without_audit_table(tmp_path: Path) -> None:
    (tmp_path / "other.db").write_bytes(b"")
    result = pilothouse("audit", "tail", "--store-url", f"sqlite:///{tmp_path}/other.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot read the audit store" in result.stderr and "Traceback" not in result.stderr


def test_tail_prints_recent_records_one_line_each(store: str, tmp_path: Path) -> None:
    result = pilothouse("audit", "tail", "--limit", "2", cwd=tmp_path, env={"PILOTHOUSE_STORE_URL": store})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("2026-03-15T13:30:01.000Z  req-2  request  acme  invoice-triage/extract")
    assert "429" in lines[0] and "budget-denied" in lines[0]
    assert "req-3" in lines[1] and "cache-hit" in lines[1]
    everything = pilothouse("audit", "tail", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[1] for line in everything] == ["req-1", "req-2", "req-3"]
    assert "fallbacks: invoice-small:timeout" in everything[0]


def test_tail_follow_prints_new_records_until_ctrl_c(store: str, tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "pilothouse", "audit", "tail", "--follow", "--limit", "1",
                                "--interval", "0.05"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None and process.stderr is not None
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()], daemon=True).start()
    try:
        assert "req-3" in lines.get(timeout=30)  # the backlog: only the newest record
        with AuditLog(store) as log:
            log.append(AuditRecord(id="live-1", ts=datetime.now(UTC), tenant="acme", status_code=200))
        assert "live-1" in lines.get(timeout=10)  # printed as written, not when the pipe buffer fills
        time.sleep(0.2)
        assert lines.empty()  # nothing printed twice
    finally:
        process.send_signal(signal.SIGINT)
        stderr = process.stderr.read()
        process.wait(timeout=10)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
