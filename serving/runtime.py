"""The workflow runtime: an AutonomousWorkflow's steps, run by run, durable and resumable.

retrieve → generate → validate → act, with the review gate in front of the first act: a run whose
output violates the schema, misses a required field, falls below a confidence threshold, or is about
to take a high-risk action parks in ``review`` and acts on nothing until a human approves (or edits);
a rejected run never acts. Every step is recorded before and after it runs (``serving.runs``), so a
runtime that crashed is resumed at the first step that is not done, from the store alone: the run
keeps a snapshot of the workflow it started with. One audit record per step (``<run_id>/<step>``, then
``#2``, ``#3`` for re-runs after a crash) carries retrieval hits, the action with its idempotency key,
and the human decision.

Models are called through the gateway's OpenAI API (``GatewayClient``), as any client would, so
routing, fallbacks, budgets and the request audit apply; the run id travels in ``x-pilothouse-run-id``
and the gateway reports each request's cost in ``x-pilothouse-cost-usd``. Structured output is asked
for with ``response_format`` (guided decoding where the engine has it) and always checked against the
step's schema here, since not every engine honours it. A retrieve step's optional ``rerank`` keeps the
``topN`` candidates a cross-encoder or a ModelDeployment prefers (``serving.rerank``); one that fails
keeps the fused order and says so in the step record, never failing the run.

When an action fails after it may have had effects (a timeout, a 5xx), or any step fails after an
action succeeded, the declared compensations run, newest first, each at most once (``serving.actions``),
and the run ends ``compensated``; a compensation that itself fails leaves the run ``failed`` with the
reason recorded, for a human.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from pilothouse.operator.api.runs import COMPENSATED, COMPLETED, FAILED, QUEUED, REVIEW, RUNNING
from pilothouse.operator.api.workflow import AutonomousWorkflow, Step, StepType

from .actions import UNDO_SUFFIX, ActionFailed, Actions
from .audit import ActionTaken, AuditLog, AuditRecord, HumanDecision, RetrievalHit, redact
from .confidence import score
from .metrics import Metrics
from .rerank import local_path_problems, rerank, reranker_for
from .retriever import Retriever
from .runs import DONE, STEP_COMPENSATED, STEP_FAILED, NotWaiting, Run, RunError, RunStore, StepRecord

log = logging.getLogger(__name__)

RUN_ID_HEADER = "x-pilothouse-run-id"
COST_HEADER = "x-pilothouse-cost-usd"
WAITING = "waiting"
"""State of the review gate's step record while the run is parked."""
GATE = "(review)"
"""Name of the gate's step record when the workflow declares no review step (not a valid step name)."""
QUERY_CHARS = 2000
"""How much of the input document is sent as the retrieval query."""


# -- the model client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    content: str
    tokens: list[tuple[str, float]] | None
    cost_usd: float
    request_id: str | None
    alternatives: list[list[tuple[str, float]]] | None = None
    """Per generated token, the (token, logprob) candidates the engine listed, when ``top_logprobs`` was asked."""
    model: str | None = None
    """The backend model that answered (a fallback answers under its own name)."""


class ModelCallFailed(Exception):
    pass


class ModelClient(Protocol):
    """One chat completion for a workflow step (the gateway, in production and in tests)."""

    async def chat(self, *, model: str, messages: list[dict[str, Any]], schema: dict[str, Any] | None,
                   schema_name: str, max_tokens: int, temperature: float, run_id: str,
                   top_logprobs: int | None = None) -> Completion: ...


class GatewayClient:
    """Calls the gateway's ``/v1/chat/completions``; pass ``client`` to reuse one (or an in-process ASGI app)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, client: httpx.AsyncClient | None = None,
                 timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._own = client is None

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()

    async def chat(self, *, model: str, messages: list[dict[str, Any]], schema: dict[str, Any] | None,
                   schema_name: str, max_tokens: int, temperature: float, run_id: str,
                   top_logprobs: int | None = None) -> Completion:
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "logprobs": True}
        if top_logprobs:
            body["top_logprobs"] = top_logprobs
        if schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        headers = {RUN_ID_HEADER: run_id}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        try:
            response = await self._client.post(f"{self.base_url}/v1/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ModelCallFailed(f"gateway {self.base_url} unreachable: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ModelCallFailed(f"gateway answered {response.status_code} for {model}: {message}")
        data = response.json()
        choice = (data.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content") or ""
        items = ((choice.get("logprobs") or {}).get("content")) or None
        tokens = [(str(t.get("token", "")), float(t.get("logprob", 0.0))) for t in items] if items else None
        alternatives = [[(str(a.get("token", "")), float(a.get("logprob", 0.0))) for a in t.get("top_logprobs") or []]
                        for t in items] if items and top_logprobs else None
        try:
            cost = float(response.headers.get(COST_HEADER, "0") or 0)
        except ValueError:
            cost = 0.0
        return Completion(content, tokens, cost, response.headers.get("x-pilothouse-request-id"), alternatives,
                          data.get("model"))


# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionSummary:
    taken: bool
    key: str | None
    status: int | str | None
    compensated: bool = False


@dataclass(frozen=True)
class RunResult:
    run_id: str
    workflow: str
    state: str
    fields: dict[str, Any] | None
    confidence: float | None
    field_confidence: dict[str, float]
    review_reason: str | None
    action: ActionSummary | None
    cost_usd: float
    latency_s: float
    retrieval_mode: str | None
    error: str | None = None


def run_result(run: Run, steps: Mapping[str, StepRecord]) -> RunResult:
    """What a caller sees of a run, from its stored rows."""
    validation = next((s.output for s in steps.values() if s.type == StepType.VALIDATE and s.output), None) or {}
    retrieval = next((s.output for s in steps.values() if s.type == StepType.RETRIEVE and s.output), None) or {}
    acts = [s for s in steps.values() if s.type == StepType.ACT]
    action = None
    if acts:
        first = acts[0]
        out = first.output or {}
        key = out.get("key") or (first.input or {}).get("key")
        action = ActionSummary(taken=first.state in (DONE, STEP_COMPENSATED) or bool(out.get("maybe_applied")),
                               key=key, status=out.get("status"), compensated=first.state == STEP_COMPENSATED)
    return RunResult(run_id=run.id, workflow=run.workflow, state=run.state, fields=run.fields,
                     confidence=run.confidence, field_confidence=validation.get("field_confidence", {}),
                     review_reason=run.review_reason, action=action, cost_usd=round(run.cost_usd, 9),
                     latency_s=round(run.latency_s, 6), retrieval_mode=retrieval.get("mode"), error=run.error)


class StepFailed(Exception):
    """A step could not complete; ``retryable``: running it again may succeed (nothing was acted on)."""

    def __init__(self, message: str, *, retryable: bool = True, output: dict[str, Any] | None = None,
                 audit: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.retryable, self.output, self.audit = retryable, output, audit or {}


# -- the run in memory -------------------------------------------------------------------------------


@dataclass
class _Ctx:
    run: Run
    wf: AutonomousWorkflow
    fields: dict[str, Any] | None
    hits: list[dict[str, Any]] = field(default_factory=list)
    similarity: float | None = None
    generated: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    acted: list[tuple[Step, str]] = field(default_factory=list)  # (act step, key) done, in order

    @property
    def context_text(self) -> str:
        return "\n\n".join(h["text"] for h in self.hits)


def schema_errors(schema: dict[str, Any] | None, value: Any) -> list[str]:
    """Where ``value`` violates ``schema``, one line per error naming the field; [] when it conforms."""
    if schema is None:
        return []
    try:
        validator = Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    except SchemaError as exc:
        return [f"the step's outputSchema is not a valid JSON schema: {exc.message}"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '(output)'}: {e.message}" for e in errors]


def _generate_step(wf: AutonomousWorkflow) -> Step:
    return next(s for s in wf.spec.steps if s.type is StepType.GENERATE)


def _gate_name(wf: AutonomousWorkflow) -> str:
    return next((s.name for s in wf.spec.steps if s.type is StepType.REVIEW), GATE)


class WorkflowRuntime:
    """Runs, resumes and decides workflow runs over one run store.

    ``workflow`` is needed only to ``start`` runs; resuming and deciding work from each run's snapshot.
    ``model`` (the gateway) and ``retrievers`` (by VectorIndex name) are needed by the steps that use
    them; a run that reaches such a step without one fails that step, recoverably.
    ``owner`` names this runtime in run leases: give a stable one (the pod or host name) and a restarted
    runtime takes its own interrupted runs back at once; other runtimes wait for the lease to expire.
    """

    def __init__(self, workflow: AutonomousWorkflow | None = None, *, store: RunStore,
                 model: ModelClient | None = None, retrievers: Mapping[str, Retriever] | None = None,
                 actions: Actions | None = None, audit: AuditLog | None = None, metrics: Metrics | None = None,
                 tenant: str = "workflow-runtime", lease_s: float = 60.0, owner: str | None = None) -> None:
        self.workflow = workflow
        self.store = store
        self.model = model
        self.retrievers = dict(retrievers or {})
        self.actions = actions or Actions()
        self.audit = audit
        self.metrics = metrics
        self.tenant = tenant
        self.lease = timedelta(seconds=lease_s)
        self.owner = owner or f"runtime-{uuid.uuid4().hex[:12]}"
        if workflow is not None and (problems := local_path_problems(workflow)):
            raise RunError("; ".join(problems))
        if metrics is not None and workflow is not None:
            metrics.allow_run_workflows([workflow.name])

    async def aclose(self) -> None:
        await self.actions.aclose()

    # -- public --------------------------------------------------------------------------------------
    async def start(self, input_text: str, *, run_id: str | None = None,
                    metadata: Mapping[str, Any] | None = None) -> RunResult:
        """Record a new run and execute it; with an existing ``run_id``, resume that run instead."""
        if self.workflow is None:
            raise RunError("this runtime was built without a workflow; it can resume runs but not start them")
        wf = self.workflow
        run_id = run_id or uuid.uuid4().hex
        snapshot = wf.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
        run, created = await asyncio.to_thread(self.store.create, run_id, namespace=wf.namespace, workflow=wf.name,
                                               spec=snapshot, input_text=input_text, meta=dict(metadata or {}))
        if not created and run.workflow != wf.name:
            raise RunError(f"run id {run_id} belongs to workflow {run.workflow}, not {wf.name}")
        if created and not input_text.strip():
            await asyncio.to_thread(self.store.update, run_id, None, state=FAILED,
                                    error="input document is empty: there is nothing to extract from",
                                    finished_at=run.created_at)
            self._finished(wf.name, "failed", 0.0)
            return await self.result(run_id)
        if run.state in (QUEUED, RUNNING):
            return await self.resume(run_id)
        return await self.result(run_id)

    async def result(self, run_id: str) -> RunResult:
        run = await asyncio.to_thread(self.store.get, run_id)
        return run_result(run, await asyncio.to_thread(self.store.steps, run_id))

    async def resume(self, run_id: str) -> RunResult:
        """Continue a run at its first incomplete step (a failed run is retried when it never acted)."""
        steps = await asyncio.to_thread(self.store.steps, run_id)
        retry_failed = not any(s.type == StepType.ACT and (s.state != STEP_FAILED or (s.output or {}).get(
            "maybe_applied")) for s in steps.values())
        run = await asyncio.to_thread(self.store.claim, run_id, self.owner, self.lease, retry_failed=retry_failed)
        started = time.perf_counter()
        try:
            await self._execute(run)
        except Exception as exc:  # never lose a run to a surprise: record it and keep it resumable
            log.exception("run %s failed unexpectedly", run_id)
            await self._end(run, FAILED, started, error=f"unexpected error: {type(exc).__name__}: {exc}")
        return await self.result(run_id)

    async def resume_incomplete(self) -> list[RunResult]:
        """After a restart: resume every queued run and every running one whose runtime's lease expired;
        reject runs that waited for review longer than their workflow's ``review.timeoutHours``."""
        for run in await asyncio.to_thread(self.store.expired_reviews):
            try:
                await self.decide(run.id, "reject", reviewer="pilothouse",
                                  reason="review timed out (review.timeoutHours)")
            except NotWaiting:
                continue
        results = []
        for run_id in await asyncio.to_thread(self.store.incomplete, self.owner):
            try:
                results.append(await self.resume(run_id))
            except RunError as exc:  # taken by another runtime meanwhile
                log.info("not resuming %s: %s", run_id, exc)
        return results

    async def decide(self, run_id: str, decision: str, *, reviewer: str, reason: str | None = None,
                     fields: Mapping[str, Any] | None = None) -> RunResult:
        """A human decision on a run waiting in review; approve and edit resume the run (and act)."""
        run = await asyncio.to_thread(self.store.get, run_id)
        if run.state != REVIEW:
            raise NotWaiting(run_id, run.state)
        if not reviewer.strip():
            raise RunError("reviewer is required: say who decided")
        edited = None
        if decision == "edit":
            if not fields:
                raise RunError("an edit needs the fields to change (e.g. total=120.50)")
            edited = {**(run.fields or {}), **fields}
        if decision != "reject":
            # Approve acts on the stored fields as they are, so they must pass the schema as an edit's do:
            # a model's truncated output would otherwise reach the webhook or the table as nulls.
            gen = _generate_step(AutonomousWorkflow.model_validate(run.spec)).generate
            acting_on = edited if edited is not None else run.fields or {}
            problems = schema_errors(gen.output_schema if gen else None, acting_on)
            if problems and edited is not None:
                raise RunError("the edited fields violate the output schema: " + "; ".join(problems))
            if problems:
                raise RunError("cannot approve: the run's fields violate the output schema (" + "; ".join(problems)
                               + "); correct them with `pilothouse review edit RUN field=value ...`, or reject")
        await asyncio.to_thread(self.store.decide, run_id, reviewer=reviewer, decision=decision, reason=reason,
                                fields=edited)
        if decision == "reject":
            wf = AutonomousWorkflow.model_validate(run.spec)
            steps = await asyncio.to_thread(self.store.steps, run_id)
            gate = _gate_name(wf)
            attempt = (steps[gate].attempts + 1) if gate in steps else 1
            await self._audit(run, wf, gate, attempt, output={"decision": "reject"},
                              human=HumanDecision(reviewer=reviewer, decision="reject", reason=reason))
            self._finished(run.workflow, "rejected", run.latency_s)
            return await self.result(run_id)
        return await self.resume(run_id)

    # -- execution -----------------------------------------------------------------------------------
    async def _execute(self, run: Run) -> None:
        wf = AutonomousWorkflow.model_validate(run.spec)
        records = await asyncio.to_thread(self.store.steps, run.id)
        ctx = _Ctx(run=run, wf=wf, fields=run.fields)
        started = time.perf_counter()
        gate = _gate_name(wf)
        gate_done = records.get(gate) is not None and records[gate].state == DONE
        for position, step in enumerate(wf.spec.steps):
            record = records.get(step.name)
            if record is not None and record.state == DONE:
                self._restore(ctx, step, record)
                continue
            await asyncio.to_thread(self.store.update, run.id, self.owner, lease=self._lease_for(step))
            if step.type in (StepType.ACT, StepType.REVIEW) and not gate_done:
                if not await self._gate(ctx, gate, position, started):
                    return
                gate_done = True
            if step.type is StepType.REVIEW:
                continue  # the gate in front of the first act was this step's decision
            try:
                await self._step(ctx, step, position)
            except StepFailed as exc:
                await self._failed(ctx, step, str(exc), started)
                return
        await self._end(run, COMPLETED, started, outcome="approved" if run.reviewed else "automated")

    def _lease_for(self, step: Step) -> timedelta:
        """Long enough for the step's own timeout: the lease must not lapse while a webhook is in flight."""
        extra = step.act.webhook.timeout_seconds if step.act and step.act.webhook else 0.0
        return self.lease + timedelta(seconds=extra + 30 if extra else 0)

    def _restore(self, ctx: _Ctx, step: Step, record: StepRecord) -> None:
        out = record.output or {}
        match step.type:
            case StepType.RETRIEVE:
                ctx.hits, ctx.similarity = out.get("hits", []), out.get("similarity")
            case StepType.GENERATE:
                ctx.generated = out
            case StepType.VALIDATE:
                ctx.validation = out
            case StepType.ACT:
                ctx.acted.append((step, out.get("key") or (record.input or {}).get("key", "")))
            case _:
                pass

    async def _step(self, ctx: _Ctx, step: Step, position: int) -> None:
        run_id = ctx.run.id
        handler = {StepType.RETRIEVE: self._retrieve, StepType.GENERATE: self._generate,
                   StepType.VALIDATE: self._validate, StepType.ACT: self._act}[step.type]
        step_input = self._input_of(ctx, step)
        attempt = await asyncio.to_thread(self.store.step_started, run_id, step.name, position, step.type.value,
                                          step_input)
        begun = time.perf_counter()
        try:
            output, decision, extra = await handler(ctx, step, step_input)
        except StepFailed as exc:
            await asyncio.to_thread(self.store.step_finished, run_id, step.name, STEP_FAILED, output=exc.output,
                                    error=str(exc))
            await self._audit(ctx.run, ctx.wf, step.name, attempt, inputs=step_input, output=exc.output,
                              status=500, latency_s=time.perf_counter() - begun, **exc.audit)
            raise
        await asyncio.to_thread(self.store.step_finished, run_id, step.name, DONE, output=output, decision=decision)
        await self._audit(ctx.run, ctx.wf, step.name, attempt, inputs=step_input, output=output, status=200,
                          latency_s=time.perf_counter() - begun, **extra)

    def _input_of(self, ctx: _Ctx, step: Step) -> dict[str, Any]:
        match step.type:
            case StepType.RETRIEVE:
                return {"query_chars": min(len(ctx.run.input), QUERY_CHARS)}
            case StepType.GENERATE:
                return {"input_chars": len(ctx.run.input), "context_hits": [h["id"] for h in ctx.hits]}
            case StepType.VALIDATE:
                return {"fields": ctx.fields}
            case _:
                assert step.act is not None
                return {"key": self._key(ctx, step), "kind": "webhook" if step.act.webhook else "sql",
                        "fields": ctx.fields}

    @staticmethod
    def _key(ctx: _Ctx, step: Step) -> str:
        assert step.act is not None
        try:
            return step.act.idempotency_key.format(run_id=ctx.run.id, step=step.name, workflow=ctx.wf.name)
        except (KeyError, IndexError, ValueError) as exc:
            raise StepFailed(f"step {step.name}: act.idempotencyKey {step.act.idempotency_key!r} may use only "
                             f"{{run_id}}, {{step}} and {{workflow}} ({exc})", retryable=False) from None

    async def _retrieve(self, ctx: _Ctx, step: Step, _: Any) -> tuple[Any, str, dict[str, Any]]:
        spec = step.retrieve
        assert spec is not None
        retriever = self.retrievers.get(spec.vector_index_ref)
        if retriever is None:
            raise StepFailed(f"step {step.name}: this runtime has no retriever for VectorIndex "
                             f"{spec.vector_index_ref}")
        query = ctx.run.input[:QUERY_CHARS]
        try:
            result = await asyncio.to_thread(retriever.search, query, top_k=spec.top_k, mode=spec.mode,
                                             filter=spec.filter)
        except Exception as exc:
            raise StepFailed(f"step {step.name}: retrieval failed: {type(exc).__name__}: {exc}") from None
        if result.degraded and ctx.wf.spec.degraded_mode.retrieval == "fail":
            raise StepFailed(f"step {step.name}: retrieval degraded ({result.reason}) and "
                             "degradedMode.retrieval is fail")
        hits, scores, decision = result.hits, None, f"{len(result.hits)} hits ({result.mode})"
        output: dict[str, Any] = {"mode": result.mode, "degraded": result.degraded, "reason": result.reason}
        if spec.rerank is not None:
            reranked = await rerank(reranker_for(spec.rerank, route=f"{ctx.wf.name}/{step.name}", model=self.model),
                                    query, hits, top_n=spec.rerank.top_n, run_id=ctx.run.id)
            hits, scores, output["rerank"] = reranked.hits, reranked.scores, reranked.record()
            decision += (f"; re-rank degraded, fused order kept: {reranked.reason}" if reranked.degraded else
                         f"; re-ranked by {reranked.reranker}, kept {len(hits)}")
            await self._charge(ctx, reranked.cost_usd)
        ctx.hits = [{"id": h.id, "text": h.text, "score": h.score} | ({"rerank_score": scores[i]} if scores else {})
                    for i, h in enumerate(hits)]
        top = max((h.score for h in hits), default=None)  # the similarity of what goes into the prompt
        ctx.similarity = top if result.mode == "dense" and top is not None and 0 <= top <= 1 else None
        output |= {"hits": ctx.hits, "similarity": ctx.similarity}
        audit = {"retrieval": [RetrievalHit(id=h.id, score=h.score, mode=result.mode) for h in hits]}
        return output, decision, audit

    async def _generate(self, ctx: _Ctx, step: Step, _: Any) -> tuple[Any, str, dict[str, Any]]:
        gen = step.generate
        assert gen is not None
        if self.model is None:
            raise StepFailed(f"step {step.name}: this runtime has no model client (gateway) to call")
        prompt = gen.prompt_template.replace("{input}", ctx.run.input).replace("{context}", ctx.context_text)
        try:
            completion = await self.model.chat(model=f"{ctx.wf.name}/{step.name}",
                                                messages=[{"role": "user", "content": prompt}],
                                                schema=gen.output_schema, schema_name=step.name,
                                                max_tokens=gen.max_tokens, temperature=gen.temperature,
                                                run_id=ctx.run.id)
        except ModelCallFailed as exc:
            raise StepFailed(f"step {step.name}: {exc}") from None
        try:
            parsed: Any = json.loads(completion.content)
        except ValueError as exc:
            parsed, errors = None, [f"(output): not JSON: {exc}"]
        else:
            errors = schema_errors(gen.output_schema, parsed) if isinstance(parsed, dict) else \
                ["(output): not a JSON object"]
        fields = parsed if isinstance(parsed, dict) else None
        ctx.fields = fields
        ctx.generated = {"content": completion.content, "fields": fields, "schema_errors": errors,
                         "tokens": completion.tokens, "request_id": completion.request_id,
                         "cost_usd": completion.cost_usd}
        await self._charge(ctx, completion.cost_usd, fields=fields)
        decision = "output conforms to the schema" if not errors else f"schema violated: {'; '.join(errors)}"
        return ctx.generated, decision, {}

    async def _charge(self, ctx: _Ctx, cost_usd: float, **values: Any) -> None:
        """A step's model spend onto its run (and the workflow's cost metric), with other run ``values``."""
        if cost_usd or values:
            await asyncio.to_thread(self.store.update, ctx.run.id, self.owner, add_cost=cost_usd, **values)
        if self.metrics is not None:
            self.metrics.run_cost(ctx.wf.name, cost_usd)

    async def _validate(self, ctx: _Ctx, step: Step, _: Any) -> tuple[Any, str, dict[str, Any]]:
        rules = step.validate_
        assert rules is not None
        ctx.validation = self._validation(ctx, rules.min_confidence, rules.field_thresholds, rules.required_fields)
        await asyncio.to_thread(self.store.update, ctx.run.id, self.owner, confidence=ctx.validation["confidence"])
        return ctx.validation, ctx.validation["reason"] or "all fields above their thresholds", {}

    def _validation(self, ctx: _Ctx, min_confidence: float | None, thresholds: Mapping[str, float],
                    required: Sequence[str]) -> dict[str, Any]:
        """Schema, required fields and confidence; ``passed`` False names the first reason in ``reason``."""
        generated = ctx.generated or {}
        errors = list(generated.get("schema_errors") or [])
        fields = ctx.fields or {}
        if ctx.fields is None:
            errors = errors or ["(output): no fields were generated"]
        missing = [name for name in required if fields.get(name) in (None, "")]
        confidence = score(fields, text=generated.get("content") or "", tokens=generated.get("tokens"),
                           sources=[ctx.run.input, ctx.context_text], retrieval_similarity=ctx.similarity,
                           required=required)
        below = {}
        if min_confidence is not None:
            for name, fc in confidence.fields.items():
                threshold = thresholds.get(name, min_confidence)
                if fc.value < threshold:
                    below[name] = {"confidence": round(fc.value, 4), "threshold": threshold}
        reasons = []
        if errors:
            reasons.append("output violates the schema: " + "; ".join(errors))
        if missing:
            reasons.append("required fields missing: " + ", ".join(missing))
        if below:
            reasons.append("low confidence: " + ", ".join(f"{n} {v['confidence']:.2f} < {v['threshold']:.2f}"
                                                          for n, v in below.items()))
        return {"fields": ctx.fields, "confidence": round(confidence.overall, 6) if not errors else 0.0,
                "field_confidence": confidence.per_field(), "below": below, "missing": missing,
                "schema_errors": errors, "passed": not reasons, "reason": "; ".join(reasons) or None}

    async def _gate(self, ctx: _Ctx, gate: str, position: int, started: float) -> bool:
        """The review gate before acting: True to go on; False when the run parked for a human."""
        wf, run = ctx.wf, ctx.run
        validation = ctx.validation or self._validation(ctx, None, {}, [])
        reasons = [validation["reason"]] if not validation["passed"] else []
        risky = [s.name for s in wf.spec.steps if s.act is not None and s.act.risk == "high"]
        if risky:
            reasons.append(f"high-risk action ({', '.join(risky)}) needs a human's approval")
        review = next((s.review for s in wf.spec.steps if s.type is StepType.REVIEW), None)
        if review is not None and review.when == "always":
            reasons.append("this workflow reviews every run")
        attempt = await asyncio.to_thread(self.store.step_started, run.id, gate, position, StepType.REVIEW.value,
                                          {"reasons": reasons})
        if not reasons:
            output = {"decision": "automatic", "confidence": validation["confidence"]}
            await asyncio.to_thread(self.store.step_finished, run.id, gate, DONE, output=output,
                                    decision="no review needed")
            await self._audit(run, wf, gate, attempt, output=output, status=200)
            return True
        decided = await asyncio.to_thread(self.store.decisions, run.id)
        approval = decided[-1] if decided and decided[-1].decision in ("approve", "edit") else None
        if approval is not None and run.reviewed:
            output = {"decision": approval.decision, "reviewer": approval.reviewer, "reason": approval.reason,
                      "reasons": reasons, "fields": ctx.fields}
            await asyncio.to_thread(self.store.step_finished, run.id, gate, DONE, output=output,
                                    decision=f"{approval.decision} by {approval.reviewer}")
            await self._audit(run, wf, gate, attempt, output=output, status=200, human=HumanDecision(
                reviewer=approval.reviewer, decision=approval.decision, reason=approval.reason,
                ts=approval.decided_at))
            return True
        reason = "; ".join(reasons)
        await asyncio.to_thread(self.store.step_finished, run.id, gate, WAITING, output={"reasons": reasons},
                                decision=f"parked for review: {reason}")
        await self._audit(run, wf, gate, attempt, output={"reasons": reasons}, status=202)
        await asyncio.to_thread(self.store.update, run.id, self.owner, release=True, state=REVIEW, reviewed=True,
                                review_reason=reason, add_latency=time.perf_counter() - started)
        if self.metrics is not None:
            self.metrics.run_parked(wf.name)
        return False

    async def _act(self, ctx: _Ctx, step: Step, step_input: Any) -> tuple[Any, str, dict[str, Any]]:
        act = step.act
        assert act is not None
        key = step_input["key"]
        try:
            result = await self.actions.perform(act, key=key, fields=ctx.fields or {}, run_id=ctx.run.id,
                                                workflow=ctx.wf.name)
        except ActionFailed as exc:
            raise StepFailed(f"step {step.name}: {exc}", retryable=not exc.maybe_applied,
                             output={"key": key, "status": exc.status, "maybe_applied": exc.maybe_applied},
                             audit={"action": ActionTaken(idempotency_key=key, kind=exc.kind, status=exc.status,
                                                          maybe_applied=exc.maybe_applied, error=str(exc))}) from None
        ctx.acted.append((step, key))
        output = {"key": key, "status": result.status, "replayed": result.replayed}
        audit = {"action": ActionTaken(idempotency_key=key, kind=result.kind, status=result.status,
                                       replayed=result.replayed)}
        return output, f"acted ({result.kind} {result.status})", audit

    # -- endings -------------------------------------------------------------------------------------
    async def _failed(self, ctx: _Ctx, step: Step, error: str, started: float) -> None:
        """A step failed: undo what was done (the failed action too, when it may have had effects)."""
        undo: list[tuple[Step, str]] = list(reversed(ctx.acted))
        if step.act is not None:
            records = await asyncio.to_thread(self.store.steps, ctx.run.id)
            if (records[step.name].output or {}).get("maybe_applied"):
                undo.insert(0, (step, records[step.name].output["key"]))
        undo = [(s, key) for s, key in undo if s.act is not None and s.act.compensation is not None]
        if not undo:
            await self._end(ctx.run, FAILED, started, error=error)
            return
        problems = []
        for act_step, key in undo:
            assert act_step.act is not None and act_step.act.compensation is not None
            attempt = (await asyncio.to_thread(self.store.steps, ctx.run.id))[act_step.name].attempts
            try:
                result = await self.actions.perform(act_step.act.compensation, key=key, fields=ctx.fields or {},
                                                    run_id=ctx.run.id, workflow=ctx.wf.name, undo=True)
            except ActionFailed as exc:
                problems.append(f"compensation of {act_step.name} failed: {exc}")
                await self._audit(ctx.run, ctx.wf, f"{act_step.name}/compensation", attempt, status=500,
                                  output={"error": str(exc)},
                                  action=ActionTaken(idempotency_key=key + UNDO_SUFFIX, kind="compensation",
                                                     error=str(exc)))
                continue
            await asyncio.to_thread(self.store.step_finished, ctx.run.id, act_step.name, STEP_COMPENSATED,
                                    output={"key": key, "status": "compensated", "compensation": result.status,
                                            "maybe_applied": True},
                                    decision=f"compensated after: {error}")
            await self._audit(ctx.run, ctx.wf, f"{act_step.name}/compensation", attempt, status=200,
                              output={"compensates": key, "status": result.status},
                              action=ActionTaken(idempotency_key=result.key, kind="compensation",
                                                 status=result.status, compensates=key))
        if problems:
            await self._end(ctx.run, FAILED, started, error=f"{error}; " + "; ".join(problems))
        else:
            await self._end(ctx.run, COMPENSATED, started, error=error)

    async def _end(self, run: Run, state: str, started: float, *, error: str | None = None,
                   outcome: str | None = None) -> None:
        await asyncio.to_thread(self.store.update, run.id, None, release=True, state=state, error=error,
                                finished_at=datetime.now(UTC), add_latency=time.perf_counter() - started)
        total = (await asyncio.to_thread(self.store.get, run.id)).latency_s
        self._finished(run.workflow, outcome or state, total)

    def _finished(self, workflow: str, outcome: str, latency_s: float) -> None:
        if self.metrics is not None:
            self.metrics.run_finished(workflow, outcome, latency_s)

    async def _audit(self, run: Run, wf: AutonomousWorkflow, step: str, attempt: int, *, inputs: Any = None,
                     output: Any = None, status: int | None = None, latency_s: float | None = None,
                     retrieval: list[RetrievalHit] | None = None, action: ActionTaken | None = None,
                     human: HumanDecision | None = None) -> None:
        if self.audit is None:
            return
        stored_inputs, inputs_hash = redact(inputs, wf.spec.audit.store_prompts)
        stored_output, output_hash = redact(output, wf.spec.audit.store_outputs)
        record = AuditRecord(id=f"{run.id}/{step}" + (f"#{attempt}" if attempt > 1 else ""), kind="step",
                             run_id=run.id, tenant=self.tenant, workflow=wf.name, route=step, inputs=stored_inputs,
                             inputs_hash=inputs_hash, retrieval=retrieval or [], output=stored_output,
                             output_hash=output_hash, status_code=status,
                             latency_ms=None if latency_s is None else latency_s * 1000, action=action,
                             human_decision=human)
        await asyncio.to_thread(self.audit.append, record)

