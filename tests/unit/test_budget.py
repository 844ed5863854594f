"""BudgetPolicy state from the ledger's committed spend."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from pilothouse.operator.api import BudgetPolicy, BudgetState
from pilothouse.operator.api.budget_policy import Window
from pilothouse.operator.api.ledger import ledger
from pilothouse.operator.budget import SqlSpendReader, evaluate, window_bounds
from pilothouse.operator.slo import SloReader
from tests.pg import drop_connections, throwaway_postgres_database

AT = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)


def policy(**limit: float) -> BudgetPolicy:
    return BudgetPolicy.model_validate({"metadata": {"name": "p", "namespace": "team"},
                                        "spec": {"limits": [{"window": "day", **limit}], "warnAt": 0.8}})


@pytest.fixture
def reader(tmp_path: Path) -> SqlSpendReader:
    return SqlSpendReader(f"sqlite:///{tmp_path}/ledger.db")


def spend(reader: SqlSpendReader, *rows: tuple[str, float, int, datetime, str]) -> None:
    with reader.engine.begin() as conn:
        conn.execute(ledger.insert(), [{"id": f"r{i}", "namespace": "team", "policy": policy_name, "state": state,
                                        "cost_usd": cost, "tokens": tokens, "created_at": at}
                                       for i, (policy_name, cost, tokens, at, state) in enumerate(rows)])


def test_window_bounds_are_calendar_utc() -> None:
    assert window_bounds(Window.HOUR, AT) == (datetime(2026, 3, 15, 13, tzinfo=UTC),
                                              datetime(2026, 3, 15, 14, tzinfo=UTC))
    assert window_bounds(Window.DAY, AT)[1] == datetime(2026, 3, 16, tzinfo=UTC)
    assert window_bounds(Window.MONTH, datetime(2026, 12, 31, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(("cost", "state"), [(1.0, BudgetState.OK), (8.0, BudgetState.WARNING),
                                             (10.0, BudgetState.EXHAUSTED)])
def test_state_follows_committed_spend(reader: SqlSpendReader, cost: float, state: BudgetState) -> None:
    spend(reader, ("p", cost, 100, AT, "committed"))
    view = evaluate(policy(maxCostUSD=10), reader, AT)
    assert view.state is state
    assert view.windows[0].remaining_usd == pytest.approx(10 - cost)
    assert view.windows[0].resets_at == "2026-03-16T00:00:00Z"


def test_only_committed_spend_in_window_of_this_policy_counts(reader: SqlSpendReader) -> None:
    yesterday = datetime(2026, 3, 14, 23, 59, tzinfo=UTC)
    spend(reader, ("p", 50.0, 0, yesterday, "committed"), ("p", 50.0, 0, AT, "reserved"),
          ("p", 50.0, 0, AT, "released"), ("other", 50.0, 0, AT, "committed"), ("p", 2.0, 0, AT, "committed"))
    view = evaluate(policy(maxCostUSD=10), reader, AT)
    assert view.state is BudgetState.OK and view.windows[0].spent_usd == 2.0


def test_token_cap_exhausts_independently_of_cost(reader: SqlSpendReader) -> None:
    spend(reader, ("p", 0.01, 1000, AT, "committed"))
    view = evaluate(policy(maxCostUSD=10, maxTokens=1000), reader, AT)
    assert view.state is BudgetState.EXHAUSTED
    degraded = next(o for o in view.observations if o.type == "Degraded")
    assert degraded.reason == "BudgetExhausted" and "onExhausted: reject" in degraded.message


def test_reader_works_on_an_existing_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    SqlSpendReader(url)
    again = SqlSpendReader(url)  # create_all must be idempotent: the gateway may have made the table
    assert sa.inspect(again.engine).has_table("budget_ledger")


def test_the_operator_reads_on_after_postgresql_drops_its_connections(postgres_url: str) -> None:
    """A PostgreSQL restart closes the operator's pooled connections: the next budget and SLO reads must
    succeed on new ones, not fail the status update that drew a dead connection."""
    with throwaway_postgres_database(postgres_url, "operator_reads") as url:
        reader, slo = SqlSpendReader(url), SloReader(url)
        try:
            spend(reader, ("p", 2.0, 0, AT, "committed"))
            assert evaluate(policy(maxCostUSD=10), reader, AT).windows[0].spent_usd == 2.0
            assert slo.figures("team", "wf", now=AT).runs == 0
            assert drop_connections(url) >= 2  # the pooled connection of each reader
            assert evaluate(policy(maxCostUSD=10), reader, AT).windows[0].spent_usd == 2.0
            assert slo.figures("team", "wf", now=AT).runs == 0
        finally:
            reader.engine.dispose()
            slo.close()
