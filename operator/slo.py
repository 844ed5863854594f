"""SLO figures of a workflow from its runs: the read side of the run tables (``operator.api.runs``).

Over the runs created in a window (default: the last 7 days) that reached a decision — completed,
rejected, failed, compensated, or waiting in review; queued and running runs are not counted yet:

* automation rate: completed without ever waiting for a human, over all counted runs;
* review rate: runs that waited for a human (whatever came of it);
* compensation rate: runs whose actions were undone (the safety metric);
* p95 latency: nearest-rank 95th percentile of the runs' machine time (time parked for a human is
  excluded: it measures the system, not the reviewers), over finished runs;
* cost per run: model cost summed over counted runs, divided by their number.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from .api.runs import COMPENSATED, COMPLETED, FAILED, REJECTED, REVIEW, metadata, runs
from .api.workflow import SloStatus
from .store import open_store

COUNTED = (COMPLETED, REJECTED, FAILED, COMPENSATED, REVIEW)
FINISHED = (COMPLETED, REJECTED, FAILED, COMPENSATED)


def p95(values: list[float]) -> float | None:
    """Nearest-rank percentile: the smallest value with at least 95% of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class SloReader:
    """Reads the run tables from SQLite (default) or PostgreSQL (by URL)."""

    def __init__(self, url: str) -> None:
        self.engine = open_store(url, metadata)

    def close(self) -> None:
        self.engine.dispose()

    def figures(self, namespace: str, workflow: str, *, window: timedelta = timedelta(days=7),
                now: datetime | None = None) -> SloStatus:
        since = (now or datetime.now(UTC)) - window
        query = sa.select(runs.c.state, runs.c.reviewed, runs.c.cost_usd, runs.c.latency_s).where(
            runs.c.namespace == namespace, runs.c.workflow == workflow, runs.c.created_at >= since,
            runs.c.state.in_(COUNTED))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return SloStatus(runs=0)
        n = len(rows)
        automated = sum(1 for r in rows if r.state == COMPLETED and not r.reviewed)
        return SloStatus(
            runs=n,
            automation_rate=round(automated / n, 4),
            review_rate=round(sum(1 for r in rows if r.reviewed) / n, 4),
            compensation_rate=round(sum(1 for r in rows if r.state == COMPENSATED) / n, 4),
            p95_latency_seconds=p95([r.latency_s or 0.0 for r in rows if r.state in FINISHED]),
            cost_per_run_usd=round(sum(r.cost_usd or 0.0 for r in rows) / n, 9),
        )
