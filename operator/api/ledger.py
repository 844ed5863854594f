"""The budget ledger table: the one storage contract between gateway (writer) and operator (reader).

One row per reservation and policy. The gateway inserts it as ``reserved`` with the worst-case
cost before dispatch, then moves it to ``committed`` (actual cost) or ``released``. Spend is the
sum of committed rows in a window; what is reserved is in flight. Declared here, beside the API
models, because both sides use it and neither may import the other (DESIGN.md §3).

``budget_totals`` is the gateway's accelerator, not part of the contract: running sums of
``budget_ledger`` per policy and calendar window (hour, day and month, whatever the policy's limits),
committed and reserved, kept by the gateway in the same transaction as each ledger row change so a
reservation's cap check reads one row per window instead of summing the window's rows. It is derived
from ``budget_ledger`` and can be rebuilt from it at any time (``Ledger.rebuild_totals``); the
operator does not read it.

``budget_leases`` is the gateway's too: a heartbeat per budget lease (one ``reserved`` ledger row holding
headroom for many requests, ``serving/budget_lease.py``), renewed while the replica holding it lives, so
the lease of a replica that died is released minutes later instead of at the stale-reservation expiry.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from .budget_policy import Window

metadata = sa.MetaData()

ledger = sa.Table(
    "budget_ledger",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("namespace", sa.String(63), nullable=False),
    sa.Column("policy", sa.String(63), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # reserved | committed | released
    sa.Column("cost_usd", sa.Float, nullable=False, default=0.0),
    sa.Column("tokens", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_budget_ledger_policy_time", "namespace", "policy", "created_at"),
)

totals = sa.Table(
    "budget_totals",
    metadata,
    sa.Column("namespace", sa.String(63), primary_key=True),
    sa.Column("policy", sa.String(63), primary_key=True),
    sa.Column("window", sa.String(8), primary_key=True),  # hour | day | month
    sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("committed_usd", sa.Float, nullable=False, default=0.0),
    sa.Column("committed_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("reserved_usd", sa.Float, nullable=False, default=0.0),
    sa.Column("reserved_tokens", sa.BigInteger, nullable=False, default=0),
)


leases = sa.Table(
    "budget_leases",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the lease's budget_ledger row
    sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
)


def window_bounds(window: Window | str, at: datetime) -> tuple[datetime, datetime]:
    """[start, next start) of the calendar window (UTC) containing ``at``.

    Lives beside the table because writer and reader must agree on what "this window" is: the
    gateway caps reservations per window and the operator reports spend per window with it.
    """
    at = at.astimezone(UTC)
    match Window(window):
        case Window.HOUR:
            start = at.replace(minute=0, second=0, microsecond=0)
            return start, start + timedelta(hours=1)
        case Window.DAY:
            start = at.replace(hour=0, minute=0, second=0, microsecond=0)
            return start, start + timedelta(days=1)
        case Window.MONTH:
            start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            nxt = (start + timedelta(days=32)).replace(day=1)
            return start, nxt
