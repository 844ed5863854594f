"""The human review queue on the gateway: ``GET/POST /v1/reviews``.

``GET /v1/reviews`` lists runs waiting for a human (newest first; ``?workflow=`` filters);
``GET /v1/reviews/{run_id}`` shows one run in any state, with its steps and decisions;
``POST /v1/reviews/{run_id}`` takes ``{"decision": "approve" | "reject" | "edit", "reviewer": ...,
"reason": ..., "fields": {...}}``. Approve and edit resume the run here, so its action happens before
the answer (at most once, whoever else tries); reject ends it without acting. A decision for a run
that is not waiting is a 409 naming the run's state. Errors are OpenAI-shaped like every gateway error.

Runs are resumed from their stored snapshot, so the gateway needs nothing of the workflow but the
store: the same ``store_url`` as the ledger and the audit log.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pilothouse.operator.api.runs import REVIEW

from .audit import AuditLog
from .metrics import Metrics
from .openai_schema import openai_error
from .runs import NotWaiting, Run, RunError, RunNotFound, RunStore
from .runtime import WorkflowRuntime, run_result


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject", "edit"]
    reviewer: str = Field(min_length=1, max_length=253)
    reason: str | None = Field(default=None, max_length=4096)
    fields: dict[str, Any] | None = None


def summary(run: Run) -> dict[str, Any]:
    """A queue entry: what a reviewer needs to decide."""
    return {"id": run.id, "object": "workflow.run", "workflow": run.workflow, "namespace": run.namespace,
            "state": run.state, "review_reason": run.review_reason, "fields": run.fields,
            "confidence": run.confidence, "created_at": run.created_at.isoformat(),
            "updated_at": run.updated_at.isoformat()}


def detail(store: RunStore, run: Run) -> dict[str, Any]:
    steps = store.steps(run.id)
    return {**summary(run), "input": run.input, "error": run.error,
            "result": dataclasses.asdict(run_result(run, steps)),
            "steps": [{"step": s.step, "type": s.type, "state": s.state, "decision": s.decision, "error": s.error,
                       "attempts": s.attempts, "output": s.output} for s in steps.values()],
            "decisions": [{"reviewer": d.reviewer, "decision": d.decision, "reason": d.reason, "fields": d.fields,
                           "decided_at": d.decided_at.isoformat()} for d in store.decisions(run.id)]}


class ReviewQueue:
    """Opens the run store (and a runtime over it) on first use, so probes never touch the database."""

    def __init__(self, store_url: str, metrics: Metrics | None = None) -> None:
        self.store_url = store_url
        self.metrics = metrics
        self._runtime: WorkflowRuntime | None = None
        self._lock = asyncio.Lock()

    async def runtime(self) -> WorkflowRuntime:
        if self._runtime is None:
            async with self._lock:
                if self._runtime is None:
                    store, audit = await asyncio.to_thread(lambda: (RunStore(self.store_url),
                                                                    AuditLog(self.store_url)))
                    self._runtime = WorkflowRuntime(store=store, audit=audit, metrics=self.metrics,
                                                    tenant="reviewer")
        return self._runtime

    async def aclose(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.aclose()
            runtime.store.close()
            if runtime.audit is not None:
                runtime.audit.close()


def router(queue: ReviewQueue) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/reviews")
    async def waiting(workflow: str | None = None, limit: int = 100) -> JSONResponse:
        runtime = await queue.runtime()
        runs = await asyncio.to_thread(runtime.store.list, states=[REVIEW], workflow=workflow,
                                       limit=max(1, min(limit, 1000)))
        return JSONResponse({"object": "list", "data": [summary(r) for r in runs]})

    @api.get("/v1/reviews/{run_id}")
    async def show(run_id: str) -> JSONResponse:
        runtime = await queue.runtime()
        try:
            run = await asyncio.to_thread(runtime.store.get, run_id)
        except RunNotFound as exc:
            return openai_error(404, str(exc), param="run_id", code="run_not_found")
        return JSONResponse(await asyncio.to_thread(detail, runtime.store, run))

    @api.post("/v1/reviews/{run_id}")
    async def decide(run_id: str, body: ReviewDecision) -> JSONResponse:
        runtime = await queue.runtime()
        try:
            result = await runtime.decide(run_id, body.decision, reviewer=body.reviewer, reason=body.reason,
                                          fields=body.fields)
        except RunNotFound as exc:
            return openai_error(404, str(exc), param="run_id", code="run_not_found")
        except NotWaiting as exc:
            return openai_error(409, str(exc), param="run_id", code="run_not_waiting")
        except RunError as exc:
            return openai_error(400, str(exc), param="fields" if body.decision == "edit" else None,
                                code="invalid_decision")
        return JSONResponse(dataclasses.asdict(result))

    return api
