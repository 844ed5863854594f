"""The gateway's routing decision as pure functions: which backends to try, in what order, and when to stop.

The operator already ordered each route's backends (healthy first, fallback chains, budget
downgrades: DESIGN.md §5) and said why. What only the gateway knows at request time is added here:
its own circuit breakers, the request's size against each backend's context window, and the budget
action in force. Nothing here does I/O or awaits, so every decision can be tested exhaustively and
written to the audit record exactly as it was taken.

The ingress drives a request like this::

    p = plan(route, breakers, prompt_tokens=n, max_tokens=m, budget=table.budget, now=clock())
    attempt = p.first                      # None → answer with p.rejection
    while attempt:
        if not breakers[name].allow(force=attempt.forced_probe): attempt = p.after(attempt.backend); continue
        ... call; on failure:
        backend = next_after_failure(p, attempt.backend, failure.error_class, streamed_first_token=...,
                                     side_effect_sent=...)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pilothouse.operator.api.routing import Backend, BudgetRule, Route

from .breaker import Breaker, BreakerState
from .errors import ErrorClass


class Rejection(StrEnum):
    """Why a request gets no attempt at all; the ingress maps these to HTTP answers."""

    BUDGET_EXHAUSTED = "budget_exhausted"  # 429 with the policy's message
    OVER_REQUEST_LIMIT = "over_request_limit"  # the request alone exceeds the per-request budget cap
    CONTEXT_TOO_LONG = "context_too_long"  # no backend's context window fits prompt + max_tokens
    NO_BACKEND = "no_backend"  # the route lists no backend


@dataclass(frozen=True)
class Attempt:
    backend: Backend
    reason: str  # why it is in the plan at this place, for the audit record
    forced_probe: bool = False  # every breaker refused; try this one anyway (Breaker.allow(force=True))


@dataclass(frozen=True)
class Skip:
    backend: Backend
    reason: str  # "context window", "circuit open", "duplicate", "per-request cost cap"


@dataclass(frozen=True)
class Plan:
    """The ordered attempts for one request, plus everything left out and why."""

    step: str
    attempts: tuple[Attempt, ...]
    skipped: tuple[Skip, ...] = ()
    prompt_tokens: int = 0
    max_tokens: int = 0
    rejection: Rejection | None = None
    message: str = ""  # human explanation of the rejection or of the budget action in force
    wait_for_budget: bool = False  # budget action is queue: wait for the ledger before dispatch
    wait_timeout_s: float | None = None

    @property
    def first(self) -> Attempt | None:
        return self.attempts[0] if self.attempts else None

    @property
    def backends(self) -> list[str]:
        return [a.backend.model_deployment for a in self.attempts]

    def after(self, backend: Backend) -> Attempt | None:
        """The attempt following ``backend`` (e.g. when its breaker refused at dispatch time)."""
        i = self.index(backend)
        return self.attempts[i + 1] if i + 1 < len(self.attempts) else None

    def index(self, backend: Backend) -> int:
        """Position of ``backend`` (by ModelDeployment name) among the attempts; ValueError if absent."""
        for i, attempt in enumerate(self.attempts):
            if attempt.backend.model_deployment == backend.model_deployment:
                return i
        raise ValueError(f"backend {backend.model_deployment!r} is not in the plan for step {self.step!r}")


def worst_case_cost(backend: Backend, prompt_tokens: int, max_tokens: int) -> float:
    """USD if the backend used every token it may: what the ledger reserves before dispatch."""
    pricing = backend.pricing
    return (prompt_tokens * pricing.input_per_million_usd + max_tokens * pricing.output_per_million_usd) / 1_000_000


def fits(backend: Backend, needed_tokens: int) -> bool:
    """Unknown context windows fit: the backend itself will say so (context_length) if not."""
    return backend.context_window is None or backend.context_window >= needed_tokens


def _probe_order(breaker: Breaker, now: float) -> tuple[int, float]:
    """When every breaker refuses: half-open ones first, then the one that opened longest ago."""
    half_open = breaker.state_at(now) is BreakerState.HALF_OPEN
    return (0 if half_open else 1, breaker.opened_at if breaker.opened_at is not None else float("-inf"))


def plan(route: Route, breakers: Mapping[str, Breaker], *, prompt_tokens: int, max_tokens: int,
         budget: BudgetRule | None, now: float) -> Plan:
    """Decide the attempts for one request. ``now`` is on the breakers' clock; nothing is mutated.

    A backend without a breaker in ``breakers`` counts as closed.
    """
    def made(attempts: tuple[Attempt, ...] = (), **fields: Any) -> Plan:  # built once: no replace(), 4.8 -> 2.5 us
        return Plan(route.step, attempts, prompt_tokens=prompt_tokens, max_tokens=max_tokens, **fields)

    needed = prompt_tokens + max_tokens
    if budget is not None and budget.action == "reject":
        return made(rejection=Rejection.BUDGET_EXHAUSTED,
                    message=f"budget {budget.policy} exhausted: requests are rejected until it resets")
    if budget is not None and budget.per_request_max_tokens is not None and needed > budget.per_request_max_tokens:
        return made(rejection=Rejection.OVER_REQUEST_LIMIT,
                    message=f"request needs up to {needed} tokens; budget {budget.policy} allows "
                            f"{budget.per_request_max_tokens} per request (lower max_tokens)")
    if not route.backends:
        return made(rejection=Rejection.NO_BACKEND, message=f"step {route.step} has no backend")

    skipped: list[Skip] = []
    candidates: list[Backend] = []  # fit the request, in table order, no duplicates
    seen: set[str] = set()
    max_cost = budget.per_request_max_cost_usd if budget is not None else None
    for b in route.backends:
        if b.model_deployment in seen:
            skipped.append(Skip(b, "duplicate"))
        elif not fits(b, needed):
            skipped.append(Skip(b, f"context window {b.context_window} < {needed} tokens"))
        elif max_cost is not None and worst_case_cost(b, prompt_tokens, max_tokens) > max_cost:
            skipped.append(Skip(b, f"worst-case cost over per-request cap {max_cost} USD"))
        else:
            candidates.append(b)
        seen.add(b.model_deployment)
    if not candidates:
        costly = any(s.reason.startswith("worst-case cost") for s in skipped)
        rejection = Rejection.OVER_REQUEST_LIMIT if costly else Rejection.CONTEXT_TOO_LONG
        return made(skipped=tuple(skipped), rejection=rejection,
                    message="; ".join(f"{s.backend.model_deployment}: {s.reason}" for s in skipped))

    attempts: list[Attempt] = []
    refused: list[Backend] = []
    for b in candidates:
        breaker = breakers.get(b.model_deployment)
        if breaker is None or breaker.would_allow(now):
            state = breaker.state_at(now) if breaker else BreakerState.CLOSED
            why = b.reason if state is BreakerState.CLOSED else f"{b.reason}; half-open probe"
            attempts.append(Attempt(b, why))
        else:
            refused.append(b)
    if not attempts:  # everything refused: probe one rather than fail without trying
        chosen = min(refused, key=lambda b: _probe_order(breakers[b.model_deployment], now))
        attempts.append(Attempt(chosen, f"{chosen.reason}; every circuit open: forced probe", forced_probe=True))
        refused.remove(chosen)
    for b in refused:
        state = breakers[b.model_deployment].state_at(now)
        skipped.append(Skip(b, "circuit open" if state is BreakerState.OPEN else "circuit half-open, probe in flight"))

    if budget is None or budget.action == "none":
        return made(tuple(attempts), skipped=tuple(skipped))
    message = f"budget {budget.policy} exhausted: {budget.action}"
    if budget.action != "queue":  # downgrade: the operator already put the cheaper tier first
        return made(tuple(attempts), skipped=tuple(skipped), message=message)
    timeout = float(budget.queue_timeout_seconds) if budget.queue_timeout_seconds is not None else None
    return made(tuple(attempts), skipped=tuple(skipped), message=message, wait_for_budget=True,
                wait_timeout_s=timeout)


def next_after_failure(plan: Plan, failed_backend: Backend, error_class: ErrorClass, *, streamed_first_token: bool,
                       side_effect_sent: bool) -> Backend | None:
    """The backend to try after ``failed_backend`` failed with ``error_class``, or None to give up.

    Falls back only where the client cannot tell: never once a token was streamed (it would see two
    answers spliced), never when the call may have had a side effect, never for the request's own
    fault (client error) or a cancellation. After a context-length error only a backend with a
    strictly larger context window is worth trying.
    """
    if streamed_first_token or side_effect_sent or not error_class.retry_elsewhere:
        return None
    rest = plan.attempts[plan.index(failed_backend) + 1:]
    if error_class is not ErrorClass.CONTEXT_LENGTH:
        return rest[0].backend if rest else None
    # The failed backend's real window is below what it was asked for: its declared window, or if
    # unknown, the request's size (our token count may be an estimate, but it is all we have).
    floor = failed_backend.context_window or plan.prompt_tokens + plan.max_tokens
    for attempt in rest:
        window = attempt.backend.context_window
        if window is not None and window > floor:
            return attempt.backend
    return None
