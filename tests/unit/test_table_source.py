"""RoutingTable hot reload: newer tables swap in, stale or broken files never replace a good one."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pilothouse.operator.api import RoutingTable
from pilothouse.operator.routing import Dependencies, compile_table
from pilothouse.serving.table_source import TableSource, TableUnavailable

from .factories import index, model, workflow

AT = datetime(2026, 1, 1, tzinfo=UTC)


def table(revision: int = 1, *, small_healthy: bool = True) -> RoutingTable:
    d = Dependencies(models={"small": model("small", fallback=["large"], healthy=small_healthy),
                             "large": model("large", tier="large")}, indexes={"docs": index()}, budgets={})
    return compile_table(workflow(), d, None, AT).model_copy(update={"revision": revision})


_mtime = iter(range(1, 10**6))


def write(path: Path, content: RoutingTable | str) -> None:
    """Write like the operator does, with a strictly newer mtime (the test runs faster than the clock)."""
    path.write_text(content if isinstance(content, str) else content.model_dump_json(by_alias=True, indent=2))
    ns = 1_700_000_000_000_000_000 + next(_mtime) * 1_000_000_000
    os.utime(path, ns=(ns, ns))


def order(t: RoutingTable) -> list[str]:
    return [b.model_deployment for b in t.routes[0].backends]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "wf.json"
    write(p, table(1))
    return p


def test_loads_the_file_on_start(path: Path) -> None:
    source = TableSource(path)
    assert source.ready and source.revision == 1 and source.last_error is None
    assert order(source.current()) == ["small", "large"]


def test_a_higher_revision_is_swapped_in_while_in_flight_readers_keep_theirs(path: Path) -> None:
    source = TableSource(path)
    in_flight = source.current()
    write(path, table(2, small_healthy=False))
    assert source.refresh()
    assert source.revision == 2 and order(source.current()) == ["large", "small"]
    assert in_flight.revision == 1 and order(in_flight) == ["small", "large"]  # untouched
    assert source.loads == 2


def test_unchanged_file_is_not_swapped_again(path: Path) -> None:
    source = TableSource(path)
    assert not source.refresh()
    write(path, table(1))  # rewritten, same content: mtime moved, nothing else
    assert not source.refresh()
    assert source.loads == 1 and source.last_error is None


def test_a_stale_revision_is_ignored_with_a_log_line(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(path, table(5))
    source = TableSource(path)
    write(path, table(4, small_healthy=False))
    with caplog.at_level(logging.WARNING, logger="pilothouse.serving.table_source"):
        assert not source.refresh()
    assert source.revision == 5 and order(source.current()) == ["small", "large"]
    assert "revision 4" in caplog.text and "revision 4" in (source.last_error or "")


def test_the_same_revision_with_other_content_is_ignored(path: Path) -> None:
    source = TableSource(path)
    write(path, table(1, small_healthy=False))
    assert not source.refresh()
    assert order(source.current()) == ["small", "large"] and source.last_error


def test_an_invalid_file_keeps_the_last_good_table_and_records_why(path: Path) -> None:
    source = TableSource(path)
    good = source.current()
    write(path, '{"kind": "RoutingTable", "workflow": "wf"')  # caught mid-write
    assert not source.refresh()
    assert source.current() is good and "invalid RoutingTable" in (source.last_error or "")
    write(path, '{"kind": "RoutingTable"}')  # valid JSON, not a table
    assert not source.refresh()
    assert source.current() is good and "workflow: Field required" in (source.last_error or "")
    write(path, table(2))
    assert source.refresh() and source.revision == 2 and source.last_error is None


def test_the_served_content_coming_back_clears_the_error(path: Path) -> None:
    source = TableSource(path)
    write(path, "not json")
    source.refresh()
    assert source.last_error
    write(path, table(1))
    assert not source.refresh()
    assert source.last_error is None


def test_a_deleted_file_keeps_the_table(path: Path) -> None:
    source = TableSource(path)
    path.unlink()
    assert not source.refresh()
    assert source.revision == 1 and "cannot read" in (source.last_error or "")


def test_no_table_yet_is_not_ready_until_one_appears(tmp_path: Path) -> None:
    path = tmp_path / "later.json"
    source = TableSource(path)
    assert not source.ready
    with pytest.raises(TableUnavailable, match="no valid RoutingTable"):
        source.current()
    write(path, table(3))
    assert source.refresh() and source.current().revision == 3


def test_a_table_of_another_workflow_is_refused(path: Path) -> None:
    source = TableSource(path)
    write(path, table(2).model_copy(update={"workflow": "other"}))
    assert not source.refresh()
    assert source.current().workflow == "wf" and "other" in (source.last_error or "")


async def test_watch_picks_up_a_new_revision(path: Path) -> None:
    source = TableSource(path)
    watcher = asyncio.create_task(source.watch(interval=0.01))
    try:
        write(path, table(2, small_healthy=False))
        for _ in range(200):
            if source.revision == 2:
                break
            await asyncio.sleep(0.01)
        assert source.revision == 2
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
