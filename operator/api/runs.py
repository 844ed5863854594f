"""Workflow run tables: the storage contract between the workflow runtime (writer) and the operator (reader).

The runtime (``pilothouse.serving.runs``) records every run, every step's input, output and decision,
and every human decision; the operator reads SLO figures from the same rows
(``pilothouse.operator.slo``). Declared here, beside the API models, because both sides use them and
neither may import the other (DESIGN.md §3), as with the budget ledger.

A run's ``state`` is one of :data:`STATES`. ``spec`` is a snapshot of the AutonomousWorkflow (JSON) taken
when the run started, so it can be resumed or approved from the store alone, by any process, even after
the manifest changed. ``latency_s`` is machine time (the runtime's time on the run, summed over resumes),
not wall time: a run parked for a human does not count the hours it waited.
"""

from __future__ import annotations

import sqlalchemy as sa

QUEUED = "queued"
RUNNING = "running"
REVIEW = "review"
COMPLETED = "completed"
REJECTED = "rejected"
FAILED = "failed"
COMPENSATED = "compensated"
STATES = (QUEUED, RUNNING, REVIEW, COMPLETED, REJECTED, FAILED, COMPENSATED)
FINISHED = (COMPLETED, REJECTED, FAILED, COMPENSATED)
"""States no runtime moves a run out of (a failed run that never acted may be retried by ``resume``)."""

metadata = sa.MetaData()

runs = sa.Table(
    "workflow_runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("namespace", sa.String(63), nullable=False),
    sa.Column("workflow", sa.String(253), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # AutonomousWorkflow snapshot (JSON, camelCase)
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("meta", sa.Text, nullable=False, default="{}"),  # caller's metadata (JSON)
    sa.Column("fields", sa.Text),  # the generated fields, or the reviewer's edit (JSON)
    sa.Column("confidence", sa.Float),
    sa.Column("review_reason", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("reviewed", sa.Boolean, nullable=False, default=False),  # parked for a human at least once
    sa.Column("cost_usd", sa.Float, nullable=False, default=0.0),
    sa.Column("latency_s", sa.Float, nullable=False, default=0.0),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("lease_owner", sa.String(64)),  # the runtime executing it now
    sa.Column("lease_until", sa.DateTime(timezone=True)),  # after this, another runtime may take it over
    sa.Index("ix_workflow_runs_workflow_state", "namespace", "workflow", "state"),
    sa.Index("ix_workflow_runs_created", "created_at"),
)

run_steps = sa.Table(
    "workflow_run_steps",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("step", sa.String(63), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # started | done | failed | compensated
    sa.Column("input", sa.Text),  # JSON
    sa.Column("output", sa.Text),  # JSON
    sa.Column("decision", sa.Text),  # why the run went on as it did after this step
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)

run_decisions = sa.Table(
    "workflow_run_decisions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False, index=True),
    sa.Column("reviewer", sa.String(253), nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),  # approve | reject | edit
    sa.Column("reason", sa.Text),
    sa.Column("fields", sa.Text),  # the edited fields (JSON), for edit
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
)
