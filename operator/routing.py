"""The RoutingTable compiler: workflow + dependency health → the table the gateway serves from.

Degraded mode is *computed* here, never hand-edited (DESIGN.md §5, §6): the same inputs always give
the same table, and the revision moves only when routing content changes, so the gateway reloads
exactly when behaviour changes and the reason for every choice travels with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from . import conditions
from .api import AutonomousWorkflow, BudgetPolicy, ModelDeployment, RoutingTable, VectorIndex
from .api.routing import Backend, BackendPricing, BudgetLimit, BudgetRule, Retrieval, Route, SemanticCacheRule
from .api.workflow import RERANK_MAX_TOKENS
from .render_model import endpoint


@dataclass(frozen=True)
class RefProblem:
    """A workflow reference that cannot be honoured; becomes Ready=False with this reason."""

    field: str
    reason: str  # DependencyMissing | InvalidSpec
    message: str


@dataclass(frozen=True)
class Dependencies:
    """Everything in the workflow's namespace the compiler may look at."""

    models: Mapping[str, ModelDeployment]
    indexes: Mapping[str, VectorIndex]
    budgets: Mapping[str, BudgetPolicy]
    default_milvus_uri: str | None = None  # what a VectorIndex without spec.milvus.uri uses


def health(obj: ModelDeployment | VectorIndex) -> tuple[bool, str]:
    """(healthy, reason) from the object's Ready condition; no status yet counts as unhealthy."""
    conds = [c.dump() for c in obj.status.conditions] if obj.status else []
    ready = conditions.get(conds, "Ready")
    if ready is None:
        return False, "NotReconciled"
    return ready["status"] == "True", ready["reason"]


def _tier_members(deps: Dependencies, tier: str) -> list[ModelDeployment]:
    return sorted((m for m in deps.models.values() if m.spec.tier == tier), key=lambda m: m.name)


def check_refs(wf: AutonomousWorkflow, deps: Dependencies) -> list[RefProblem]:
    problems: list[RefProblem] = []
    for field, name in wf.model_refs():
        if name not in deps.models:
            problems.append(RefProblem(field, "DependencyMissing", f"{field}: ModelDeployment {name!r} not found "
                                       f"in namespace {wf.namespace}; create it or fix the name"))
    for field, name in wf.index_refs():
        if name not in deps.indexes:
            problems.append(RefProblem(field, "DependencyMissing", f"{field}: VectorIndex {name!r} not found "
                                       f"in namespace {wf.namespace}; create it or fix the name"))
    for i, step in enumerate(wf.spec.steps):
        if step.generate and not step.generate.model_deployment_ref:
            tier = step.generate.tier or wf.spec.routing.default_tier
            field = f"spec.steps[{i}].generate.tier" if step.generate.tier else "spec.routing.defaultTier"
            if not _tier_members(deps, tier):
                problems.append(RefProblem(field, "DependencyMissing",
                                           f"{field}: no ModelDeployment has tier {tier!r} in namespace "
                                           f"{wf.namespace}; set spec.tier on one or pick another tier"))
    ref = wf.spec.budget_policy_ref
    if ref and ref not in deps.budgets:
        problems.append(RefProblem("spec.budgetPolicyRef", "DependencyMissing",
                                   f"spec.budgetPolicyRef: BudgetPolicy {ref!r} not found in namespace "
                                   f"{wf.namespace}; create it or fix the name"))
    if ref and ref in deps.budgets:
        on = deps.budgets[ref].spec.on_exhausted
        if on.action == "downgrade" and on.downgrade_tier and not _tier_members(deps, on.downgrade_tier):
            problems.append(RefProblem("spec.budgetPolicyRef", "InvalidSpec",
                                       f"BudgetPolicy {ref!r} downgrades to tier {on.downgrade_tier!r}, which no "
                                       "ModelDeployment in this namespace has"))
    return problems


def _backend(md: ModelDeployment, role: str, reason: str) -> Backend:
    healthy, _ = health(md)
    external = md.spec.external
    return Backend(
        model_deployment=md.name,
        engine=md.spec.engine.value,
        endpoint=(md.status.endpoint if md.status and md.status.endpoint else endpoint(md)),
        model=md.spec.model.name if external else md.served_model_name,
        tier=md.spec.tier,
        pricing=BackendPricing(input_per_million_usd=md.spec.pricing.input_per_million_usd,
                               output_per_million_usd=md.spec.pricing.output_per_million_usd),
        context_window=md.spec.context_window,
        api_key_secret_ref=external.api_key_secret_ref if external else None,
        healthy=healthy,
        role=role,
        reason=reason,
    )


def _chain(primaries: list[ModelDeployment], deps: Dependencies, follow: bool) -> list[Backend]:
    """Primaries, then their fallback chains breadth-first; cycles and missing names are skipped."""
    seen = {m.name for m in primaries}
    out = [_backend(m, "primary", f"primary for tier {m.spec.tier}") for m in primaries]
    queue = list(primaries) if follow else []
    while queue:
        current = queue.pop(0)
        for name in current.spec.fallback:
            if name in seen or name not in deps.models:
                continue
            seen.add(name)
            fb = deps.models[name]
            out.append(_backend(fb, "fallback", f"fallback of {current.name}"))
            queue.append(fb)
    return out


def _order(backends: list[Backend], step: str, active: list[str]) -> list[Backend]:
    """Healthy first, chain order kept; record a fallback whenever a primary is displaced."""
    healthy = [b for b in backends if b.healthy]
    ordered = healthy + [b for b in backends if not b.healthy]
    first = backends[0]
    if not first.healthy and healthy:
        active.append(f"{step}: {first.model_deployment} -> {healthy[0].model_deployment} "
                      f"({first.model_deployment} unhealthy)")
    if not healthy:
        active.append(f"{step}: no healthy backend; gateway will probe {first.model_deployment}")
    return ordered


def _budget_rule(wf: AutonomousWorkflow, deps: Dependencies) -> BudgetRule | None:
    ref = wf.spec.budget_policy_ref
    if not ref or ref not in deps.budgets:
        return None
    policy = deps.budgets[ref]
    state = policy.status.state.value if policy.status and policy.status.state else "Unknown"
    on = policy.spec.on_exhausted
    per = policy.spec.per_request
    return BudgetRule(
        policy=ref,
        state=state,
        action=on.action if state == "Exhausted" else "none",
        downgrade_tier=on.downgrade_tier,
        queue_timeout_seconds=on.queue_timeout_seconds,
        per_request_max_cost_usd=per.max_cost_usd if per else None,
        per_request_max_tokens=per.max_tokens if per else None,
        limits=[BudgetLimit(window=limit.window.value, max_cost_usd=limit.max_cost_usd, max_tokens=limit.max_tokens)
                for limit in policy.spec.limits],
    )


def _rerank_routes(wf: AutonomousWorkflow, deps: Dependencies, follow: bool, active: list[str]) -> list[Route]:
    """A route per retrieve step re-ranked by a ModelDeployment, so its yes/no calls get fallbacks, budgets and
    the audit like any request. No budget downgrade: a cheaper tier would score candidates on another scale."""
    routes = []
    for step in wf.spec.steps:
        rerank = step.retrieve.rerank if step.retrieve else None
        if rerank is None or rerank.model_deployment_ref is None:
            continue
        primary = deps.models[rerank.model_deployment_ref]
        routes.append(Route(step=step.name, tier=primary.spec.tier,
                            backends=_order(_chain([primary], deps, follow), step.name, active),
                            max_tokens=RERANK_MAX_TOKENS))
    return routes


def _semantic_cache(wf: AutonomousWorkflow, deps: Dependencies) -> SemanticCacheRule | None:
    spec = wf.spec.cache.semantic
    if not spec.enabled:
        return None
    embedding = spec.embedding
    ref = embedding.model_deployment_ref if embedding else None
    backend = _backend(deps.models[ref], "primary", "embeds prompts for the semantic cache") if ref else None
    return SemanticCacheRule(
        threshold=spec.threshold, ttl_seconds=spec.ttl_seconds, max_entries_per_tenant=spec.max_entries_per_tenant,
        milvus_uri=spec.milvus.uri or deps.default_milvus_uri, milvus_token_secret_ref=spec.milvus.token_secret_ref,
        milvus_database=spec.milvus.database, milvus_timeout_seconds=spec.milvus.timeout_seconds,
        embedding_local_path=embedding.local_path if embedding else None,
        embedding_backend=backend,
        dimension=spec.dimension,
    )


def compile_table(wf: AutonomousWorkflow, deps: Dependencies, previous: RoutingTable | None,
                  at: datetime) -> RoutingTable:
    """Compile; assumes ``check_refs`` found nothing fatal."""
    active: list[str] = []
    follow = wf.spec.routing.fallback and wf.spec.degraded_mode.model == "fallback"
    budget = _budget_rule(wf, deps)
    routes: list[Route] = []
    for step in wf.spec.steps:
        gen = step.generate
        if gen is None:
            continue
        if gen.model_deployment_ref:
            primaries = [deps.models[gen.model_deployment_ref]]
        else:
            primaries = _tier_members(deps, gen.tier or wf.spec.routing.default_tier)
        tier = primaries[0].spec.tier
        backends = _order(_chain(primaries, deps, follow), step.name, active)
        if budget and budget.action == "downgrade" and budget.downgrade_tier != tier:
            cheaper = [_backend(m, "downgrade", f"budget {budget.policy} exhausted: downgraded to tier "
                                f"{budget.downgrade_tier}") for m in _tier_members(deps, budget.downgrade_tier or "")]
            names = {b.model_deployment for b in cheaper}
            backends = sorted(cheaper, key=lambda b: not b.healthy) + [
                b for b in backends if b.model_deployment not in names]
            active.append(f"{step.name}: budget {budget.policy} exhausted -> tier {budget.downgrade_tier}")
        routes.append(Route(step=step.name, tier=tier, backends=backends, max_tokens=gen.max_tokens))
    routes += _rerank_routes(wf, deps, follow, active)
    retrieval: list[Retrieval] = []
    for step in wf.spec.steps:
        ret = step.retrieve
        if ret is None:
            continue
        vi = deps.indexes[ret.vector_index_ref]
        ok, why = health(vi)
        mode: str = ret.mode
        reason = f"VectorIndex {vi.name} Ready"
        if not ok and wf.spec.degraded_mode.retrieval == "keywordOnly":
            mode, reason = "keyword-only", f"VectorIndex {vi.name} not Ready ({why}): keyword-only retrieval"
            active.append(f"{step.name}: retrieval keyword-only ({vi.name}: {why})")
        elif not ok:
            reason = f"VectorIndex {vi.name} not Ready ({why}); degradedMode.retrieval is fail"
        retrieval.append(Retrieval(step=step.name, vector_index=vi.name, collection=vi.alias,
                                   milvus_uri=vi.spec.milvus.uri or deps.default_milvus_uri, mode=mode,
                                   top_k=ret.top_k, reason=reason))
    if budget and budget.action in ("queue", "reject"):
        active.append(f"budget {budget.policy} exhausted: {budget.action}")
    table = RoutingTable(
        workflow=wf.name, namespace=wf.namespace, revision=1, generated_at=at,
        degraded=bool(active), active_fallbacks=active, routes=routes, retrieval=retrieval, budget=budget,
        audit_store_prompts=wf.spec.audit.store_prompts, audit_store_outputs=wf.spec.audit.store_outputs,
        semantic_cache=_semantic_cache(wf, deps),
    )
    if previous is None:
        return table
    if previous.content_key() == table.content_key():
        return previous
    return table.model_copy(update={"revision": previous.revision + 1})
