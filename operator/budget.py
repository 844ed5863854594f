"""BudgetPolicy state from ledger spend: the read side of the budget ledger (DESIGN.md §5).

The gateway writes the ledger (reserve → commit/release); the operator only reads committed spend
per policy and window through ``SpendReader``, so either side can change storage without the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import sqlalchemy as sa

from .api import BudgetPolicy, BudgetState
from .api.budget_policy import WindowSpend
from .api.ledger import ledger, metadata, window_bounds
from .conditions import Observation
from .store import open_store


@dataclass(frozen=True)
class Spend:
    cost_usd: float = 0.0
    tokens: int = 0


class SpendReader(Protocol):
    """Committed spend of one policy since a point in time."""

    def spend(self, namespace: str, policy: str, since: datetime) -> Spend: ...


class SqlSpendReader:
    """Reads the ledger table from SQLite (default) or PostgreSQL (by URL)."""

    def __init__(self, url: str) -> None:
        self.engine = open_store(url, metadata)

    def spend(self, namespace: str, policy: str, since: datetime) -> Spend:
        query = sa.select(sa.func.coalesce(sa.func.sum(ledger.c.cost_usd), 0.0),
                          sa.func.coalesce(sa.func.sum(ledger.c.tokens), 0)).where(
            ledger.c.namespace == namespace, ledger.c.policy == policy,
            ledger.c.state == "committed", ledger.c.created_at >= since)
        with self.engine.connect() as conn:
            cost, tokens = conn.execute(query).one()
        return Spend(float(cost), int(tokens))


@dataclass(frozen=True)
class BudgetView:
    state: BudgetState
    windows: list[WindowSpend]
    observations: list[Observation]


def evaluate(policy: BudgetPolicy, reader: SpendReader, at: datetime) -> BudgetView:
    """State is the worst over windows: Exhausted at a cap, Warning at warnAt x cap."""
    state = BudgetState.OK
    windows: list[WindowSpend] = []
    notes: list[str] = []
    rank = {BudgetState.OK: 0, BudgetState.WARNING: 1, BudgetState.EXHAUSTED: 2}
    for limit in policy.spec.limits:
        start, end = window_bounds(limit.window, at)
        spent = reader.spend(policy.namespace, policy.name, start)
        fractions = []
        if limit.max_cost_usd is not None:
            fractions.append(spent.cost_usd / limit.max_cost_usd)
        if limit.max_tokens is not None:
            fractions.append(spent.tokens / limit.max_tokens)
        used = max(fractions)
        window_state = (BudgetState.EXHAUSTED if used >= 1 else
                        BudgetState.WARNING if used >= policy.spec.warn_at else BudgetState.OK)
        if rank[window_state] > rank[state]:
            state = window_state
        if window_state is not BudgetState.OK:
            notes.append(f"{limit.window} window at {used:.0%} (resets {end.isoformat()})")
        windows.append(WindowSpend(
            window=limit.window, spent_usd=round(spent.cost_usd, 6), spent_tokens=spent.tokens,
            remaining_usd=None if limit.max_cost_usd is None else round(max(limit.max_cost_usd - spent.cost_usd, 0), 6),
            remaining_tokens=None if limit.max_tokens is None else max(limit.max_tokens - spent.tokens, 0),
            resets_at=end.isoformat().replace("+00:00", "Z"),
        ))
    detail = "; ".join(notes) or "within all limits"
    exhausted = state is BudgetState.EXHAUSTED
    observations = [
        Observation("Ready", True, "LimitsValid", "limits validated; gateway enforces them"),
        Observation("Degraded", exhausted, "BudgetExhausted" if exhausted else
                    ("BudgetWarning" if state is BudgetState.WARNING else "WithinBudget"),
                    f"{detail}; onExhausted: {policy.spec.on_exhausted.action}" if exhausted else detail),
    ]
    return BudgetView(state, windows, observations)
