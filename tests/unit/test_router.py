"""Routing decisions the user notices: which backend answers, when the gateway falls back, when it stops."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pilothouse.operator.api.routing import Backend, BackendPricing, BudgetRule, Route
from pilothouse.operator.routing import Dependencies, compile_table
from pilothouse.serving.breaker import Breaker, BreakerState
from pilothouse.serving.errors import ErrorClass, Failure, classify_status
from pilothouse.serving.router import Plan, Rejection, fits, next_after_failure, plan, worst_case_cost

from .factories import budget, index, model, workflow

AT = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def backend(name: str, ctx: int | None = None, *, healthy: bool = True, role: str = "primary",
            price: tuple[float, float] = (1.0, 2.0)) -> Backend:
    return Backend(model_deployment=name, engine="external", endpoint=f"http://{name}.example/v1", model=f"org/{name}",
                   tier="small", pricing=BackendPricing(input_per_million_usd=price[0],
                                                        output_per_million_usd=price[1]),
                   context_window=ctx, healthy=healthy, role=role, reason=f"{role} {name}")


def route(*backends: Backend) -> Route:
    return Route(step="extract", tier="small", backends=list(backends), max_tokens=512)


def rule(action: str = "none", **kw: object) -> BudgetRule:
    return BudgetRule(policy="team", state="Exhausted" if action != "none" else "Ok", action=action, **kw)


def breakers_for(r: Route, clock: Clock) -> dict[str, Breaker]:
    return {b.model_deployment: Breaker(b.model_deployment, clock=clock) for b in r.backends}


def decide(r: Route, breakers: dict[str, Breaker], clock: Clock, *, prompt: int = 100, max_tokens: int = 100,
           budget_rule: BudgetRule | None = None) -> Plan:
    return plan(r, breakers, prompt_tokens=prompt, max_tokens=max_tokens, budget=budget_rule, now=clock())


def serve(r: Route, breakers: dict[str, Breaker], clock: Clock, outcomes: dict[str, Failure]) -> list[str]:
    """One request driven the way the ingress will drive it; returns the backends actually called."""
    p = decide(r, breakers, clock)
    called: list[str] = []
    current = p.first.backend if p.first else None
    while current is not None:
        attempt = p.attempts[p.index(current)]
        breaker = breakers[current.model_deployment]
        if not breaker.allow(force=attempt.forced_probe):
            following = p.after(current)
            current = following.backend if following else None
            continue
        called.append(current.model_deployment)
        failure = outcomes.get(current.model_deployment)
        if failure is None:
            breaker.record_success()
            return called
        breaker.record_failure(failure.error_class, refused=failure.refused)
        current = next_after_failure(p, current, failure.error_class, streamed_first_token=False,
                                     side_effect_sent=False)
    return called


REFUSED = Failure(ErrorClass.CONNECTION, "refused", refused=True)
TIMEOUT = Failure(ErrorClass.TIMEOUT, "read timeout")


# -- order and breakers ------------------------------------------------------------------------

def test_plan_follows_the_table_order_with_the_tables_reasons() -> None:
    clock = Clock()
    r = route(backend("small"), backend("large", role="fallback"))
    p = decide(r, breakers_for(r, clock), clock)
    assert p.backends == ["small", "large"]
    assert [a.reason for a in p.attempts] == ["primary small", "fallback large"]
    assert p.rejection is None and not p.wait_for_budget


def test_a_backend_without_a_breaker_yet_counts_as_closed() -> None:
    clock = Clock()
    assert decide(route(backend("small")), {}, clock).backends == ["small"]


def test_dead_backend_costs_one_failed_attempt_then_is_skipped_until_cooldown() -> None:
    clock = Clock()
    r = route(backend("small"), backend("large", role="fallback"))
    breakers = breakers_for(r, clock)
    dead = {"small": REFUSED}
    assert serve(r, breakers, clock, dead) == ["small", "large"]
    for _ in range(5):
        assert serve(r, breakers, clock, dead) == ["large"]
    skipped = decide(r, breakers, clock).skipped
    assert [(s.backend.model_deployment, s.reason) for s in skipped] == [("small", "circuit open")]
    clock.t += 10
    assert serve(r, breakers, clock, dead) == ["small", "large"]  # one probe, still dead
    assert serve(r, breakers, clock, dead) == ["large"]
    clock.t += 20
    assert serve(r, breakers, clock, {}) == ["small"]  # back: the probe closes the breaker
    assert breakers["small"].state is BreakerState.CLOSED


def test_timeouts_open_the_breaker_after_three_requests() -> None:
    clock = Clock()
    r = route(backend("small"), backend("large", role="fallback"))
    breakers = breakers_for(r, clock)
    calls = [serve(r, breakers, clock, {"small": TIMEOUT}) for _ in range(5)]
    assert calls == [["small", "large"]] * 3 + [["large"]] * 2


def test_half_open_lets_one_concurrent_request_probe_and_the_others_fall_through() -> None:
    clock = Clock()
    r = route(backend("small"), backend("large", role="fallback"))
    breakers = breakers_for(r, clock)
    serve(r, breakers, clock, {"small": REFUSED})
    clock.t += 10
    plans = [decide(r, breakers, clock) for _ in range(3)]  # three requests arrive together
    assert all(p.backends == ["small", "large"] for p in plans)  # planning does not take the probe
    assert "half-open probe" in plans[0].attempts[0].reason
    allowed = [breakers["small"].allow() for _ in plans]  # dispatch: only one gets through
    assert allowed == [True, False, False]


def test_rate_limited_goes_to_the_next_backend_without_opening_the_breaker() -> None:
    clock = Clock()
    r = route(backend("small"), backend("large", role="fallback"))
    breakers = breakers_for(r, clock)
    limited = {"small": classify_status(429, b'{"error": {"message": "slow down"}}')}
    for _ in range(10):
        assert serve(r, breakers, clock, limited) == ["small", "large"]
    assert breakers["small"].state is BreakerState.CLOSED


def test_when_every_circuit_is_open_the_least_recently_opened_is_probed() -> None:
    clock = Clock()
    r = route(backend("a"), backend("b"), backend("c"))
    breakers = breakers_for(r, clock)
    for name, at in (("a", 1000.0), ("b", 995.0), ("c", 998.0)):
        clock.t = at
        breakers[name].record_failure(ErrorClass.CONNECTION, refused=True)
    clock.t = 1001.0
    p = decide(r, breakers, clock)
    assert p.backends == ["b"] and p.attempts[0].forced_probe
    assert {s.backend.model_deployment for s in p.skipped} == {"a", "c"}
    assert serve(r, breakers, clock, {}) == ["b"]


def test_when_every_circuit_refuses_a_half_open_one_is_probed_before_an_older_open_one() -> None:
    clock = Clock(900.0)
    r = route(backend("a"), backend("b"))
    breakers = breakers_for(r, clock)
    breakers["a"].record_failure(ErrorClass.CONNECTION, refused=True)
    while clock.t < 970:  # a keeps failing its probes: opened last at 970 for 60 s
        clock.t = breakers["a"].retry_at
        assert breakers["a"].allow()
        breakers["a"].record_failure(ErrorClass.CONNECTION)
    assert breakers["a"].opened_at == 970 and breakers["a"].retry_at == 1030
    clock.t = 985.0
    breakers["b"].record_failure(ErrorClass.CONNECTION, refused=True)  # half-open from 995
    clock.t = 1000.0
    assert breakers["b"].allow()  # another request is probing b right now
    p = decide(r, breakers, clock)
    assert p.backends == ["b"] and p.attempts[0].forced_probe


# -- context window ----------------------------------------------------------------------------

def test_backends_whose_context_window_is_too_small_are_skipped_with_the_reason() -> None:
    clock = Clock()
    r = route(backend("small", ctx=4096), backend("large", ctx=32768, role="fallback"), backend("unknown"))
    p = decide(r, breakers_for(r, clock), clock, prompt=4000, max_tokens=512)
    assert p.backends == ["large", "unknown"]
    assert p.skipped[0].backend.model_deployment == "small"
    assert p.skipped[0].reason.startswith("context window")


def test_no_backend_large_enough_is_a_rejection_not_an_attempt() -> None:
    clock = Clock()
    r = route(backend("small", ctx=4096), backend("medium", ctx=8192))
    p = decide(r, breakers_for(r, clock), clock, prompt=9000, max_tokens=1000)
    assert p.attempts == () and p.rejection is Rejection.CONTEXT_TOO_LONG
    assert "small" in p.message and "medium" in p.message


def test_context_length_error_falls_back_only_to_a_larger_context_backend() -> None:
    clock = Clock()
    r = route(backend("a", ctx=8192), backend("b", ctx=8192), backend("c", ctx=4096 * 3), backend("d"))
    p = decide(r, breakers_for(r, clock), clock, prompt=4000, max_tokens=512)
    a, _b, c, _d = r.backends
    assert next_after_failure(p, a, ErrorClass.CONTEXT_LENGTH, streamed_first_token=False,
                              side_effect_sent=False) == c
    assert next_after_failure(p, c, ErrorClass.CONTEXT_LENGTH, streamed_first_token=False,
                              side_effect_sent=False) is None  # d's window is unknown: no evidence it is larger


def test_context_length_on_a_backend_of_unknown_window_needs_one_larger_than_the_request() -> None:
    clock = Clock()
    r = route(backend("a"), backend("b", ctx=4000), backend("c", ctx=8000))
    p = decide(r, breakers_for(r, clock), clock, prompt=3000, max_tokens=1000)
    assert next_after_failure(p, r.backends[0], ErrorClass.CONTEXT_LENGTH, streamed_first_token=False,
                              side_effect_sent=False) == r.backends[2]


# -- when falling back is not safe ------------------------------------------------------------

@pytest.fixture
def two() -> tuple[Plan, Backend, Backend]:
    clock = Clock()
    r = route(backend("small"), backend("large", role="fallback"))
    return decide(r, breakers_for(r, clock), clock), r.backends[0], r.backends[1]


@pytest.mark.parametrize("cls", [ErrorClass.TIMEOUT, ErrorClass.CONNECTION, ErrorClass.SERVER,
                                 ErrorClass.RATE_LIMITED])
def test_backend_failures_fall_back_to_the_next(two: tuple[Plan, Backend, Backend], cls: ErrorClass) -> None:
    p, small, large = two
    assert next_after_failure(p, small, cls, streamed_first_token=False, side_effect_sent=False) == large
    assert next_after_failure(p, large, cls, streamed_first_token=False, side_effect_sent=False) is None


@pytest.mark.parametrize("cls", list(ErrorClass))
def test_no_retry_after_the_first_streamed_token(two: tuple[Plan, Backend, Backend], cls: ErrorClass) -> None:
    p, small, _ = two
    assert next_after_failure(p, small, cls, streamed_first_token=True, side_effect_sent=False) is None


@pytest.mark.parametrize("cls", list(ErrorClass))
def test_no_retry_when_a_side_effect_may_have_happened(two: tuple[Plan, Backend, Backend], cls: ErrorClass) -> None:
    p, small, _ = two
    assert next_after_failure(p, small, cls, streamed_first_token=False, side_effect_sent=True) is None


@pytest.mark.parametrize("cls", [ErrorClass.CLIENT, ErrorClass.CANCELLED])
def test_the_requests_own_fault_or_a_cancellation_is_not_retried(two: tuple[Plan, Backend, Backend],
                                                                 cls: ErrorClass) -> None:
    p, small, _ = two
    assert next_after_failure(p, small, cls, streamed_first_token=False, side_effect_sent=False) is None


def test_a_backend_not_in_the_plan_is_a_bug(two: tuple[Plan, Backend, Backend]) -> None:
    p, _, _ = two
    with pytest.raises(ValueError, match="not in the plan"):
        next_after_failure(p, backend("ghost"), ErrorClass.SERVER, streamed_first_token=False,
                           side_effect_sent=False)


# -- budget ------------------------------------------------------------------------------------

def test_budget_reject_gives_an_empty_plan_with_the_reason() -> None:
    clock = Clock()
    r = route(backend("small"))
    p = decide(r, breakers_for(r, clock), clock, budget_rule=rule("reject"))
    assert p.attempts == () and p.rejection is Rejection.BUDGET_EXHAUSTED
    assert "team" in p.message and "exhausted" in p.message


def test_budget_queue_marks_the_plan_to_wait_with_the_timeout() -> None:
    clock = Clock()
    r = route(backend("small"))
    p = decide(r, breakers_for(r, clock), clock, budget_rule=rule("queue", queue_timeout_seconds=30))
    assert p.backends == ["small"] and p.wait_for_budget and p.wait_timeout_s == 30.0
    assert p.rejection is None


def test_budget_ok_does_not_wait() -> None:
    clock = Clock()
    r = route(backend("small"))
    p = decide(r, breakers_for(r, clock), clock, budget_rule=rule("none"))
    assert not p.wait_for_budget and p.message == ""


def test_budget_downgrade_routes_to_the_cheaper_tier_the_operator_put_first() -> None:
    d = Dependencies(models={m.name: m for m in (model("big", tier="large"), model("cheap", tier="small"))},
                     indexes={"docs": index()}, budgets={"budget": budget(state="Exhausted")})
    table = compile_table(workflow(tier="large", budget_ref="budget"), d, None, AT)
    clock = Clock()
    r = table.routes[0]
    p = decide(r, breakers_for(r, clock), clock, budget_rule=table.budget)
    assert p.backends == ["cheap", "big"] and p.attempts[0].backend.role == "downgrade"
    assert "downgrade" in p.message and not p.wait_for_budget


def test_per_request_token_cap_rejects_the_request() -> None:
    clock = Clock()
    r = route(backend("small"))
    p = decide(r, breakers_for(r, clock), clock, prompt=900, max_tokens=200,
               budget_rule=rule(per_request_max_tokens=1000))
    assert p.rejection is Rejection.OVER_REQUEST_LIMIT and "1100" in p.message


def test_per_request_cost_cap_skips_backends_too_expensive_for_the_worst_case() -> None:
    clock = Clock()
    r = route(backend("premium", price=(100, 100)), backend("cheap", price=(1, 1)))
    p = decide(r, breakers_for(r, clock), clock, prompt=1000, max_tokens=1000,
               budget_rule=rule(per_request_max_cost_usd=0.01))
    assert p.backends == ["cheap"] and "cost" in p.skipped[0].reason
    priced_out = decide(route(r.backends[0]), breakers_for(r, clock), clock, prompt=1000, max_tokens=1000,
                        budget_rule=rule(per_request_max_cost_usd=0.01))
    assert priced_out.rejection is Rejection.OVER_REQUEST_LIMIT


def test_worst_case_cost_prices_prompt_and_all_max_tokens_per_million() -> None:
    b = backend("x", price=(3.0, 15.0))
    assert worst_case_cost(b, 1_000, 2_000) == pytest.approx(0.003 + 0.030)
    assert worst_case_cost(b, 0, 0) == 0


def test_empty_route_is_a_rejection() -> None:
    clock = Clock()
    assert decide(route(), {}, clock).rejection is Rejection.NO_BACKEND


# -- properties --------------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]
NOW = 1000.0
STATES = ["missing", "closed", "open", "half_open", "probing"]


def make_breaker(name: str, state: str, opened_ago: float) -> Breaker | None:
    if state == "missing":
        return None
    clock = Clock(NOW - (10 + opened_ago if state in ("half_open", "probing") else opened_ago % 10))
    b = Breaker(name, clock=clock)
    if state != "closed":
        b.record_failure(ErrorClass.CONNECTION, refused=True)
    clock.t = NOW
    if state == "probing":
        assert b.allow()
    return b


backends_st = st.lists(st.builds(backend, st.sampled_from(NAMES), st.none() | st.integers(1, 10_000),
                                 healthy=st.booleans()), max_size=8)
breakers_st = st.dictionaries(st.sampled_from(NAMES), st.tuples(st.sampled_from(STATES), st.floats(0, 100)))


@given(backends_st, breakers_st, st.integers(0, 6000), st.integers(0, 6000))
def test_plan_properties(backends: list[Backend], states: dict[str, tuple[str, float]], prompt: int,
                         max_tokens: int) -> None:
    breakers = {n: b for n, (s, ago) in states.items() if (b := make_breaker(n, s, ago)) is not None}
    before = {n: (b.state_at(NOW), b.would_allow(NOW)) for n, b in breakers.items()}
    r = route(*backends)
    p = plan(r, breakers, prompt_tokens=prompt, max_tokens=max_tokens, budget=None, now=NOW)
    names = p.backends
    first_index = {}
    for i, b in enumerate(backends):
        first_index.setdefault(b.model_deployment, i)

    assert len(names) == len(set(names)), "a backend appears twice"
    assert all(fits(a.backend, prompt + max_tokens) for a in p.attempts), "context window too small"
    assert [first_index[n] for n in names] == sorted(first_index[n] for n in names), "table order broken"
    allowed = [n for n, i in sorted(first_index.items(), key=lambda kv: kv[1])
               if fits(backends[i], prompt + max_tokens) and (n not in breakers or breakers[n].would_allow(NOW))]
    if allowed:
        assert names == allowed and not any(a.forced_probe for a in p.attempts)
    elif p.attempts:
        assert len(p.attempts) == 1 and p.attempts[0].forced_probe
    assert len(p.attempts) + len(p.skipped) == len(backends), "every backend is accounted for"
    assert {n: (b.state_at(NOW), b.would_allow(NOW)) for n, b in breakers.items()} == before, "plan mutated"


@given(backends_st, st.integers(0, 6000), st.integers(0, 6000), st.data())
def test_context_length_fallback_only_ever_goes_larger_and_forward(backends: list[Backend], prompt: int,
                                                                   max_tokens: int, data: st.DataObject) -> None:
    p = plan(route(*backends), {}, prompt_tokens=prompt, max_tokens=max_tokens, budget=None, now=NOW)
    if not p.attempts:
        return
    failed = data.draw(st.sampled_from([a.backend for a in p.attempts]))
    nxt = next_after_failure(p, failed, ErrorClass.CONTEXT_LENGTH, streamed_first_token=False, side_effect_sent=False)
    if nxt is not None:
        assert p.index(nxt) > p.index(failed)
        assert nxt.context_window is not None
        assert nxt.context_window > (failed.context_window or prompt + max_tokens)
