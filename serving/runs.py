"""Durable workflow runs: every step's input, output and decision, human decisions, and who runs what now.

The tables are declared in ``pilothouse.operator.api.runs`` (the operator reads SLO figures from them).
What makes a run survive a crash:

* Each step is recorded ``started`` (with its input) before it runs and ``done`` (with its output and
  decision) after, each in its own committed transaction; a resumed run skips ``done`` steps, reloading
  their outputs, and re-runs the first step that is not done. For an act step that means sending the
  same idempotency key again (``serving.actions`` makes that at most once).
* A run is executed by one runtime at a time: ``claim`` takes a lease (owner + expiry) with a
  conditional UPDATE, so two processes resuming the same run cannot both act. A runtime that died
  leaves its lease to expire; then any runtime may take the run over.
* A human decision is accepted only while the run waits in ``review``, in the same transaction that
  moves it on; a decision for a run in any other state is refused with that state (``NotWaiting``).

SQLite (WAL, ``synchronous=FULL``: a recorded step survives power loss) or PostgreSQL by URL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from pilothouse.operator.api.runs import (
    FAILED,
    QUEUED,
    REJECTED,
    REVIEW,
    RUNNING,
    metadata,
    run_decisions,
    run_steps,
    runs,
)

from . import stores

DONE = "done"
STARTED = "started"
STEP_FAILED = "failed"
STEP_COMPENSATED = "compensated"


class RunError(Exception):
    """A request about a run that cannot be honoured; the message says why and what state it is in."""


class RunNotFound(RunError):
    pass


class NotWaiting(RunError):
    """A review decision for a run that is not waiting for one."""

    def __init__(self, run_id: str, state: str) -> None:
        super().__init__(f"run {run_id} is {state}, not waiting for review; only runs in state 'review' "
                         "take a decision")
        self.state = state


class RunBusy(RunError):
    """Another live runtime holds the run's lease."""


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(at: datetime | None) -> datetime | None:
    """SQLite hands DateTime back naive; it was written in UTC."""
    return None if at is None else (at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, ensure_ascii=False)


@dataclass(frozen=True)
class Run:
    id: str
    namespace: str
    workflow: str
    state: str
    spec: dict[str, Any]
    input: str
    meta: dict[str, Any]
    fields: dict[str, Any] | None
    confidence: float | None
    review_reason: str | None
    error: str | None
    reviewed: bool
    cost_usd: float
    latency_s: float
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    lease_owner: str | None
    lease_until: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Run:
        m = row._mapping
        return cls(id=m["id"], namespace=m["namespace"], workflow=m["workflow"], state=m["state"],
                   spec=json.loads(m["spec"]), input=m["input"], meta=json.loads(m["meta"] or "{}"),
                   fields=_load(m["fields"]), confidence=m["confidence"], review_reason=m["review_reason"],
                   error=m["error"], reviewed=bool(m["reviewed"]), cost_usd=m["cost_usd"] or 0.0,
                   latency_s=m["latency_s"] or 0.0, created_at=_aware(m["created_at"]) or _now(),
                   updated_at=_aware(m["updated_at"]) or _now(), finished_at=_aware(m["finished_at"]),
                   lease_owner=m["lease_owner"], lease_until=_aware(m["lease_until"]))


@dataclass(frozen=True)
class StepRecord:
    step: str
    position: int
    type: str
    state: str
    input: Any
    output: Any
    decision: str | None
    error: str | None
    attempts: int
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Decision:
    reviewer: str
    decision: str
    reason: str | None
    fields: dict[str, Any] | None
    decided_at: datetime


class RunStore:
    """The run tables over SQLAlchemy. Synchronous; the runtime calls it through ``asyncio.to_thread``."""

    def __init__(self, url: str, *, create: bool = True, busy_timeout_s: float = 30.0) -> None:
        self.url = url
        self.engine, self.backend = stores.open_engine(url, purpose="run store", busy_timeout_s=busy_timeout_s,
                                                       synchronous="FULL", create_dir=create)
        self._writer = stores.writer(self.engine)
        if create:
            metadata.create_all(self._writer)  # IMMEDIATE: see stores.writer

    def close(self) -> None:
        self.engine.dispose()

    # -- runs --------------------------------------------------------------------------------------
    @stores.retry_when_locked
    def create(self, run_id: str, *, namespace: str, workflow: str, spec: dict[str, Any], input_text: str,
               meta: dict[str, Any] | None = None) -> tuple[Run, bool]:
        """(run, created). An existing id is returned as it is (False): starting twice is resuming."""
        now = _now()
        with stores.begin_write(self._writer) as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
            if row is not None:
                return Run.from_row(row), False
            conn.execute(runs.insert().values(
                id=run_id, namespace=namespace, workflow=workflow, state=QUEUED, spec=json.dumps(spec),
                input=input_text, meta=json.dumps(meta or {}, default=str), reviewed=False, cost_usd=0.0,
                latency_s=0.0, created_at=now, updated_at=now))
            return Run.from_row(conn.execute(sa.select(runs).where(runs.c.id == run_id)).one()), True

    def get(self, run_id: str) -> Run:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in the run store")
        return Run.from_row(row)

    def list(self, *, states: Iterable[str] | None = None, workflow: str | None = None,
             limit: int = 100) -> list[Run]:
        """Newest first."""
        query = sa.select(runs).order_by(runs.c.created_at.desc(), runs.c.id).limit(limit)
        if states is not None:
            query = query.where(runs.c.state.in_(list(states)))
        if workflow is not None:
            query = query.where(runs.c.workflow == workflow)
        with self.engine.connect() as conn:
            return [Run.from_row(row) for row in conn.execute(query)]

    def incomplete(self, owner: str | None = None, at: datetime | None = None) -> list[str]:
        """Ids of runs a runtime should pick up, oldest first: queued, running under an expired lease, or
        running under ``owner``'s own lease (that runtime restarted: its runs are orphans now, not busy)."""
        at = at or _now()
        query = sa.select(runs.c.id).where(
            sa.or_(runs.c.state == QUEUED,
                   sa.and_(runs.c.state == RUNNING, sa.or_(runs.c.lease_until.is_(None),
                                                           runs.c.lease_until < at,
                                                           runs.c.lease_owner == owner)))
        ).order_by(runs.c.created_at)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    @stores.retry_when_locked
    def claim(self, run_id: str, owner: str, lease: timedelta, *, retry_failed: bool = False) -> Run:
        """Take the run to execute it: queued, running under an expired lease (or this owner's), or failed
        when ``retry_failed``. Raises RunBusy / RunError naming the state otherwise."""
        now = _now()
        takeable = [runs.c.state == QUEUED,
                    sa.and_(runs.c.state == RUNNING, sa.or_(runs.c.lease_until.is_(None), runs.c.lease_until < now,
                                                            runs.c.lease_owner == owner))]
        if retry_failed:
            takeable.append(runs.c.state == FAILED)
        with stores.begin_write(self._writer) as conn:
            taken = conn.execute(runs.update().where(runs.c.id == run_id, sa.or_(*takeable)).values(
                state=RUNNING, lease_owner=owner, lease_until=now + lease, updated_at=now, error=None)).rowcount
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in the run store")
        run = Run.from_row(row)
        if not taken:
            if run.state == RUNNING:
                raise RunBusy(f"run {run_id} is being executed by {run.lease_owner} (lease until "
                              f"{run.lease_until:%Y-%m-%d %H:%M:%S} UTC)")
            raise RunError(f"run {run_id} is {run.state}; nothing to resume")
        return run

    @stores.retry_when_locked
    def update(self, run_id: str, owner: str | None, *, release: bool = False, add_cost: float = 0.0,
               add_latency: float = 0.0, lease: timedelta | None = None, **values: Any) -> None:
        """Change the run's columns; when ``owner`` is given only while it still holds the lease."""
        now = _now()
        changes: dict[str, Any] = {"updated_at": now, **values}
        if "fields" in changes:
            changes["fields"] = _dump(changes["fields"])
        if add_cost:
            changes["cost_usd"] = runs.c.cost_usd + add_cost
        if add_latency:
            changes["latency_s"] = runs.c.latency_s + add_latency
        if lease is not None:
            changes["lease_until"] = now + lease
        if release:
            changes.update(lease_owner=None, lease_until=None)
        query = runs.update().where(runs.c.id == run_id)
        if owner is not None:
            query = query.where(runs.c.lease_owner == owner)
        with stores.begin_write(self._writer) as conn:
            if conn.execute(query.values(**changes)).rowcount == 0 and owner is not None:
                raise RunBusy(f"run {run_id}: this runtime lost its lease (another runtime took the run over)")

    # -- steps -------------------------------------------------------------------------------------
    def steps(self, run_id: str) -> dict[str, StepRecord]:
        query = sa.select(run_steps).where(run_steps.c.run_id == run_id).order_by(run_steps.c.position)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return {r.step: StepRecord(step=r.step, position=r.position, type=r.type, state=r.state,
                                   input=_load(r.input), output=_load(r.output), decision=r.decision, error=r.error,
                                   attempts=r.attempts, started_at=_aware(r.started_at) or _now(),
                                   finished_at=_aware(r.finished_at)) for r in rows}

    @stores.retry_when_locked
    def step_started(self, run_id: str, step: str, position: int, type_: str, input_: Any) -> int:
        """Record (or re-record, counting the attempt) that a step starts; returns the attempt number."""
        now = _now()
        with stores.begin_write(self._writer) as conn:
            attempts = conn.execute(sa.select(run_steps.c.attempts).where(
                run_steps.c.run_id == run_id, run_steps.c.step == step)).scalar()
            if attempts is None:
                conn.execute(run_steps.insert().values(run_id=run_id, step=step, position=position, type=type_,
                                                       state=STARTED, input=_dump(input_), attempts=1,
                                                       started_at=now))
                return 1
            conn.execute(run_steps.update().where(run_steps.c.run_id == run_id, run_steps.c.step == step).values(
                state=STARTED, input=_dump(input_), attempts=attempts + 1, started_at=now, finished_at=None,
                error=None))
            return attempts + 1

    @stores.retry_when_locked
    def step_finished(self, run_id: str, step: str, state: str, *, output: Any = None, decision: str | None = None,
                      error: str | None = None) -> None:
        with stores.begin_write(self._writer) as conn:
            conn.execute(run_steps.update().where(run_steps.c.run_id == run_id, run_steps.c.step == step).values(
                state=state, output=_dump(output), decision=decision, error=error, finished_at=_now()))

    # -- review ------------------------------------------------------------------------------------
    @stores.retry_when_locked
    def decide(self, run_id: str, *, reviewer: str, decision: str, reason: str | None,
               fields: dict[str, Any] | None = None) -> Run:
        """Record a human decision on a run waiting in review and move it on in the same transaction:
        approve / edit → queued (a runtime resumes it), reject → rejected. NotWaiting otherwise."""
        if decision not in ("approve", "reject", "edit"):
            raise RunError(f"decision must be approve, reject or edit, not {decision!r}")
        now = _now()
        values: dict[str, Any] = {"updated_at": now}
        if decision == "reject":
            values.update(state=REJECTED, finished_at=now)
        else:
            values.update(state=QUEUED)
        if fields is not None:
            values["fields"] = _dump(fields)
        with stores.begin_write(self._writer) as conn:
            moved = conn.execute(runs.update().where(runs.c.id == run_id, runs.c.state == REVIEW)
                                 .values(**values)).rowcount
            if not moved:
                state = conn.execute(sa.select(runs.c.state).where(runs.c.id == run_id)).scalar()
                if state is None:
                    raise RunNotFound(f"no run with id {run_id!r} in the run store")
                raise NotWaiting(run_id, state)
            conn.execute(run_decisions.insert().values(run_id=run_id, reviewer=reviewer, decision=decision,
                                                       reason=reason, fields=_dump(fields), decided_at=now))
            return Run.from_row(conn.execute(sa.select(runs).where(runs.c.id == run_id)).one())

    def decisions(self, run_id: str) -> list[Decision]:
        query = sa.select(run_decisions).where(run_decisions.c.run_id == run_id).order_by(run_decisions.c.id)
        with self.engine.connect() as conn:
            return [Decision(r.reviewer, r.decision, r.reason, _load(r.fields), _aware(r.decided_at) or _now())
                    for r in conn.execute(query)]

    def expired_reviews(self, at: datetime | None = None) -> list[Run]:
        """Runs in review whose workflow's ``review.timeoutHours`` has passed since they were parked."""
        at = at or _now()
        expired = []
        for run in self.list(states=[REVIEW], limit=10_000):
            review = next((s.get("review") or {} for s in run.spec.get("spec", {}).get("steps", [])
                           if s.get("type") == "review"), {})
            if at - run.updated_at > timedelta(hours=float(review.get("timeoutHours", 72))):
                expired.append(run)
        return expired
