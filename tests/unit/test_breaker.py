"""Circuit breaker: a dead backend costs a few requests, then none until one probe finds it back."""

from __future__ import annotations

import pytest

from pilothouse.serving.breaker import Breaker, BreakerConfig, BreakerState
from pilothouse.serving.errors import ErrorClass


class Clock:
    """Injectable clock: tests move time instead of sleeping."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> Breaker:
    return Breaker("small", clock=clock)


def fail(b: Breaker, times: int = 1, cls: ErrorClass = ErrorClass.TIMEOUT) -> None:
    for _ in range(times):
        assert b.allow()
        b.record_failure(cls)


def test_starts_closed(breaker: Breaker) -> None:
    assert breaker.state is BreakerState.CLOSED and breaker.gauge == 0
    assert breaker.allow() and breaker.opened_at is None and breaker.retry_at is None


def test_opens_after_three_consecutive_failures(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN and breaker.gauge == 2
    assert breaker.opened_at == clock.t and breaker.retry_at == clock.t + 10
    assert not breaker.allow()


def test_a_success_resets_the_consecutive_count(breaker: Breaker) -> None:
    fail(breaker, 2)
    breaker.record_success()
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_connection_refused_opens_at_once(breaker: Breaker) -> None:
    assert breaker.allow()
    breaker.record_failure(ErrorClass.CONNECTION, refused=True)
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize("cls", [ErrorClass.RATE_LIMITED, ErrorClass.CONTEXT_LENGTH, ErrorClass.CLIENT,
                                 ErrorClass.CANCELLED])
def test_failures_that_are_not_the_backends_health_never_open_it(breaker: Breaker, cls: ErrorClass) -> None:
    fail(breaker, 10, cls)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 2)  # and they do not add to the count of real failures either
    breaker.record_failure(cls)
    assert breaker.state is BreakerState.CLOSED


def test_open_refuses_until_cooldown_then_lets_exactly_one_probe_through(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN and breaker.gauge == 1
    assert breaker.allow()  # the probe
    assert not breaker.allow() and not breaker.allow()  # everyone else: still open for them
    assert breaker.state is BreakerState.HALF_OPEN


def test_probe_success_closes(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(5))


def test_probe_failure_reopens_with_exponential_cooldown_capped(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    cooldowns = []
    for _ in range(5):
        cooldowns.append(breaker.retry_at - clock.t)
        clock.advance(cooldowns[-1])
        assert breaker.allow()
        breaker.record_failure(ErrorClass.SERVER)
        assert breaker.state is BreakerState.OPEN
    assert cooldowns == [10, 20, 40, 60, 60]


def test_cooldown_starts_over_after_a_successful_probe(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.advance(10)
    fail(breaker)  # probe fails: 20 s
    clock.advance(20)
    assert breaker.allow()
    breaker.record_success()
    fail(breaker, 3)
    assert breaker.retry_at == clock.t + 10


def test_rate_limited_probe_frees_the_slot_without_deciding(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_failure(ErrorClass.RATE_LIMITED)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the next request probes
    assert not breaker.allow()


def test_late_failure_of_a_request_sent_before_the_trip_does_not_extend_the_cooldown(breaker: Breaker,
                                                                                      clock: Clock) -> None:
    for _ in range(4):
        assert breaker.allow()  # four requests in flight
    for _ in range(4):
        breaker.record_failure(ErrorClass.TIMEOUT)
    assert breaker.retry_at == clock.t + 10
    clock.advance(10)
    assert breaker.state is BreakerState.HALF_OPEN


def test_would_allow_never_takes_the_probe(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    assert not breaker.would_allow()
    clock.advance(10)
    assert breaker.would_allow() and breaker.would_allow()
    assert breaker.allow()
    assert not breaker.would_allow()


def test_forced_probe_while_open(breaker: Breaker) -> None:
    fail(breaker, 3)
    assert not breaker.allow()
    assert breaker.allow(force=True)
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_a_probe_that_never_reports_frees_its_slot_after_the_probe_timeout(clock: Clock) -> None:
    b = Breaker("x", BreakerConfig(probe_timeout_s=30), clock=clock)
    fail(b, 3)
    clock.advance(10)
    assert b.allow()
    clock.advance(29)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()


def test_config_is_tunable(clock: Clock) -> None:
    b = Breaker("x", BreakerConfig(failure_threshold=1, cooldown_s=1, max_cooldown_s=2), clock=clock)
    fail(b)
    assert b.retry_at == clock.t + 1
    assert BreakerConfig(cooldown_s=1, max_cooldown_s=2).cooldown(5) == 2


def test_repr_names_the_backend_and_state(breaker: Breaker) -> None:
    assert "small" in repr(breaker) and "CLOSED" in repr(breaker)
