"""The RoutingTable compiler: every degraded case of DESIGN.md §6 that the operator owns."""

from __future__ import annotations

from datetime import UTC, datetime

from pilothouse.operator.routing import Dependencies, check_refs, compile_table

from .factories import budget, index, model, workflow

AT = datetime(2026, 1, 1, tzinfo=UTC)


def deps(*models, indexes=(), budgets=()) -> Dependencies:
    return Dependencies(models={m.name: m for m in models}, indexes={i.name: i for i in indexes},
                        budgets={b.name: b for b in budgets})


def order(table, route: int = 0) -> list[str]:
    return [b.model_deployment for b in table.routes[route].backends]


def test_all_healthy_routes_primary_then_fallback_chain() -> None:
    d = deps(model("small", fallback=["large"]), model("large", tier="large", fallback=["huge"]),
             model("huge", tier="huge"), indexes=[index()])
    table = compile_table(workflow(), d, None, AT)
    assert order(table) == ["small", "large", "huge"]
    assert [b.role for b in table.routes[0].backends] == ["primary", "fallback", "fallback"]
    assert table.revision == 1 and not table.degraded and table.active_fallbacks == []
    assert table.retrieval[0].mode == "hybrid"


def test_unhealthy_primary_moves_behind_its_fallback_with_reason() -> None:
    d = deps(model("small", fallback=["large"], healthy=False), model("large", tier="large"), indexes=[index()])
    table = compile_table(workflow(), d, None, AT)
    assert order(table) == ["large", "small"]
    assert table.degraded and table.active_fallbacks == ["extract: small -> large (small unhealthy)"]


def test_fallback_cycles_and_missing_names_do_not_loop_or_fail() -> None:
    d = deps(model("a", fallback=["b", "ghost"]), model("b", fallback=["a"]), indexes=[index()])
    assert order(compile_table(workflow(), d, None, AT)) == ["a", "b"]


def test_no_healthy_backend_is_reported_not_hidden() -> None:
    d = deps(model("small", fallback=["large"], healthy=False), model("large", tier="large", healthy=False),
             indexes=[index()])
    table = compile_table(workflow(), d, None, AT)
    assert "no healthy backend" in table.active_fallbacks[0]


def test_fallback_disabled_keeps_only_primaries() -> None:
    d = deps(model("small", fallback=["large"]), model("large", tier="large"), indexes=[index()])
    wf = workflow(degradedMode={"model": "fail"})
    assert order(compile_table(wf, d, None, AT)) == ["small"]


def test_vector_index_down_switches_retrieval_to_keyword_only() -> None:
    d = deps(model("small"), indexes=[index(healthy=False)])
    table = compile_table(workflow(), d, None, AT)
    assert table.retrieval[0].mode == "keyword-only" and table.degraded
    assert "MilvusUnreachable" in table.retrieval[0].reason


def test_vector_index_down_with_fail_policy_keeps_mode_and_says_why() -> None:
    d = deps(model("small"), indexes=[index(healthy=False)])
    table = compile_table(workflow(degradedMode={"retrieval": "fail"}), d, None, AT)
    assert table.retrieval[0].mode == "hybrid" and "degradedMode.retrieval is fail" in table.retrieval[0].reason


def test_budget_exhausted_downgrade_puts_cheaper_tier_first() -> None:
    d = deps(model("small"), model("large", tier="large"), indexes=[index()], budgets=[budget(state="Exhausted")])
    table = compile_table(workflow(tier="large", budget_ref="budget"), d, None, AT)
    assert order(table) == ["small", "large"] and table.routes[0].backends[0].role == "downgrade"
    assert table.budget.action == "downgrade" and table.degraded
    assert [(lim.window, lim.max_cost_usd) for lim in table.budget.limits] == [("day", 10.0)]


def test_budget_ok_or_warning_takes_no_action() -> None:
    for state in ("Ok", "Warning"):
        d = deps(model("small"), model("large", tier="large"), indexes=[index()], budgets=[budget(state=state)])
        table = compile_table(workflow(tier="large", budget_ref="budget"), d, None, AT)
        assert table.budget.action == "none" and order(table) == ["large"]


def test_budget_exhausted_queue_and_reject_are_carried_to_the_gateway() -> None:
    for action in ("queue", "reject"):
        d = deps(model("small"), indexes=[index()], budgets=[budget(state="Exhausted", action=action)])
        table = compile_table(workflow(budget_ref="budget"), d, None, AT)
        assert table.budget.action == action and f"exhausted: {action}" in table.active_fallbacks[-1]
    assert table.budget.queue_timeout_seconds is None


def test_revision_moves_only_when_routing_content_changes() -> None:
    healthy = deps(model("small", fallback=["large"]), model("large", tier="large"), indexes=[index()])
    first = compile_table(workflow(), healthy, None, AT)
    same = compile_table(workflow(), healthy, first, datetime(2026, 1, 2, tzinfo=UTC))
    assert same.revision == 1 and same.generated_at == first.generated_at
    broken = deps(model("small", fallback=["large"], healthy=False), model("large", tier="large"), indexes=[index()])
    degraded = compile_table(workflow(), broken, same, AT)
    recovered = compile_table(workflow(), healthy, degraded, AT)
    assert (degraded.revision, recovered.revision) == (2, 3)
    assert order(recovered) == ["small", "large"]


def test_missing_references_name_the_field() -> None:
    wf = workflow(tier="medium", budget_ref="nope")
    problems = check_refs(wf, deps(model("small")))
    fields = {p.field for p in problems}
    assert fields == {"spec.steps[0].retrieve.vectorIndexRef", "spec.steps[1].generate.tier", "spec.budgetPolicyRef"}
    assert all(p.reason == "DependencyMissing" for p in problems)
    assert any("VectorIndex 'docs' not found" in p.message for p in problems)


def test_downgrade_to_a_tier_nobody_serves_is_invalid_spec() -> None:
    d = deps(model("large", tier="large"), indexes=[index()], budgets=[budget(downgradeTier="tiny")])
    problems = check_refs(workflow(tier="large", budget_ref="budget"), d)
    assert [p.reason for p in problems] == ["InvalidSpec"] and "tiny" in problems[0].message
