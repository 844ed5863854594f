"""Reconcile an AutonomousWorkflow: check references, compile the RoutingTable, render the gateway."""

from __future__ import annotations

import asyncio

from .api import AutonomousWorkflow, BudgetPolicy, ModelDeployment, VectorIndex
from .api.common import now
from .conditions import Observation
from .env import Env, Outcome
from .render_gateway import endpoint, render
from .routing import Dependencies, check_refs, compile_table


async def dependencies(env: Env, namespace: str) -> Dependencies:
    return Dependencies(
        models=await env.list(ModelDeployment, namespace),
        indexes=await env.list(VectorIndex, namespace),
        budgets=await env.list(BudgetPolicy, namespace),
        default_milvus_uri=env.default_milvus_uri,
    )


async def reconcile(wf: AutonomousWorkflow, env: Env, *, gateway_image: str | None = None,
                    in_cluster: bool = False) -> Outcome:
    """``in_cluster``: the rendered gateway runs as pods, whose storage is reported (EphemeralStore); locally
    (``pilothouse run``) the gateway's store is a file on this machine and the rendered children are unused."""
    deps = await dependencies(env, wf.namespace)
    problems = check_refs(wf, deps)
    if problems:
        first = problems[0]
        message = "; ".join(p.message for p in problems)
        return Outcome(phase="Failed", retry_after=30, observations=[
            Observation("Ready", False, first.reason, message),
            Observation("Degraded", False, first.reason, ""),
        ])
    previous = await env.routing_table(wf.namespace, wf.name)
    table = compile_table(wf, deps, previous, now())
    retrieval = {r.mode for r in table.retrieval}
    status = {
        "endpoint": endpoint(wf),
        "routingRevision": table.revision,
        "retrievalMode": "keyword-only" if "keyword-only" in retrieval else ("hybrid" if retrieval else "none"),
        "budgetState": table.budget.state if table.budget else None,
        "activeFallbacks": table.active_fallbacks,
    }
    if env.slo is not None:
        figures = await asyncio.to_thread(env.slo.figures, wf.namespace, wf.name)
        if figures.runs:
            status["slo"] = figures.model_dump(mode="json", by_alias=True, exclude_none=True)
    summary = "; ".join(table.active_fallbacks) or "all dependencies healthy"
    message = f"revision {table.revision}: {summary}"
    generate = {s.name for s in wf.spec.steps if s.generate}  # a re-rank without a model degrades, not fails
    if not all(r.backends and r.backends[0].healthy for r in table.routes if r.step in generate):
        ready, reason = False, "NoHealthyBackend"
    elif table.budget and table.budget.action == "reject":
        ready, reason = False, "BudgetExhausted"
    else:
        ready, reason = True, "DegradedMode" if table.degraded else "RoutingCompiled"
    kwargs = {"image": gateway_image} if gateway_image else {}
    return Outcome(
        status={k: v for k, v in status.items() if v is not None},
        phase=("Degraded" if table.degraded else "Ready") if ready else "Failed",
        observations=[
            Observation("Ready", ready, reason, message),
            Observation("Degraded", table.degraded, "DegradedMode" if table.degraded else "Healthy",
                        message if table.degraded else ""),
            Observation("Progressing", False, "Stable", ""),
            *([_store_observation(wf)] if in_cluster else []),
        ],
        children=render(wf, table, **kwargs),
        routing_table=table,
    )


def _store_observation(wf: AutonomousWorkflow) -> Observation:
    """Whether the gateway's ledger and audit trail outlive its pods: a user who set no shared store
    learns it from the status, before a replaced pod takes its audit records with it."""
    if wf.spec.gateway.store_url_secret_ref is not None:
        return Observation("EphemeralStore", False, "SharedStore", "")
    return Observation("EphemeralStore", True, "PodLocalStore", (
        "spec.gateway.storeUrlSecretRef is not set: each gateway pod keeps its ledger and audit trail in a "
        "SQLite file in its own /tmp, so budget caps apply per pod, the operator reports no spend, and a "
        "replaced pod's audit records are lost; set it to a Secret key holding the URL of the PostgreSQL "
        "the operator reads (--store-url)"))
