"""The budget ledger table: the one storage contract between gateway (writer) and operator (reader).

One row per reservation and policy. The gateway inserts it as ``reserved`` with the worst-case
cost before dispatch, then moves it to ``committed`` (actual cost) or ``released``. Spend is the
sum of committed rows in a window; what is reserved is in flight. Declared here, beside the API
models, because both sides use it and neither may import the other (DESIGN.md §3).
"""

from __future__ import annotations

import sqlalchemy as sa

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
