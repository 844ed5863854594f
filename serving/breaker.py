"""Per-backend circuit breaker: the gateway's fast, local answer to "is this backend dead?".

The operator's health timers take seconds to tens of seconds to move a backend down the
RoutingTable (DESIGN.md §6). Between those updates, a dead backend would cost every request a
connect timeout; the breaker makes it cost at most a few requests, then none until a cooldown has
passed, after which exactly one probe request finds out whether it is back.

Concurrency: a breaker belongs to one asyncio event loop (one per gateway replica) and is never
shared across threads. Every method is O(1) and does not await, so no lock is needed: the loop
cannot interleave two calls. Results are not tied to the request that was allowed: a result
arriving while the breaker is open (a request that started before the trip) is ignored, and any
result arriving while half-open is taken as the probe's outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from .errors import ErrorClass

Clock = Callable[[], float]


class BreakerState(IntEnum):
    """The value is what the Prometheus gauge exports: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3  # consecutive breaker-counting failures that open a closed breaker
    cooldown_s: float = 10.0  # first open period
    max_cooldown_s: float = 60.0  # cap for the exponential growth on repeated trips
    backoff: float = 2.0  # cooldown multiplier per consecutive trip
    probe_timeout_s: float = 60.0  # a probe that never reports back frees its slot after this long

    def cooldown(self, trips: int) -> float:
        """Open period after the ``trips``-th consecutive trip (1-based)."""
        return min(self.cooldown_s * self.backoff ** max(trips - 1, 0), self.max_cooldown_s)


class Breaker:
    """closed → open (N failures, or one refused connection) → half-open (one probe) → closed/open."""

    __slots__ = ("_failures", "_opened_at", "_probe_started", "_retry_at", "_state", "_trips", "clock", "config",
                 "name")

    def __init__(self, name: str = "", config: BreakerConfig | None = None, clock: Clock = time.monotonic) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self.clock = clock
        self._state = BreakerState.CLOSED  # stored state; OPEN whose cooldown has passed reads as HALF_OPEN
        self._failures = 0  # consecutive counting failures while closed
        self._trips = 0  # consecutive trips without a successful probe; drives the cooldown
        self._opened_at: float | None = None
        self._retry_at = 0.0
        self._probe_started: float | None = None  # set while the single half-open probe is in flight

    # -- reading -------------------------------------------------------------------------------
    def state_at(self, now: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now >= self._retry_at:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def state(self) -> BreakerState:
        return self.state_at(self.clock())

    @property
    def gauge(self) -> int:
        """0 closed, 1 half-open, 2 open."""
        return int(self.state)

    @property
    def opened_at(self) -> float | None:
        """Clock time of the latest trip; None while closed. The router probes the oldest first."""
        return self._opened_at

    @property
    def retry_at(self) -> float | None:
        """When the cooldown ends and a probe becomes possible; None while closed."""
        return None if self._state is BreakerState.CLOSED else self._retry_at

    def _probe_free(self, now: float) -> bool:
        return self._probe_started is None or now - self._probe_started >= self.config.probe_timeout_s

    def would_allow(self, now: float | None = None) -> bool:
        """Would ``allow()`` say yes? Never changes state: planning must not take the probe slot."""
        now = self.clock() if now is None else now
        state = self.state_at(now)
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and self._probe_free(now))

    # -- the request path ----------------------------------------------------------------------
    def allow(self, *, force: bool = False) -> bool:
        """May a request be sent now? In half-open, yes for exactly one probe until it reports.

        ``force`` takes the probe even while open (the router does this when every backend of a
        route is refused, so that a system where everything is down still finds out it came back).
        """
        now = self.clock()
        state = self.state_at(now)
        if state is BreakerState.CLOSED:
            return True
        if not (force or (state is BreakerState.HALF_OPEN and self._probe_free(now))):
            return False
        self._state = BreakerState.HALF_OPEN
        self._probe_started = now
        return True

    def record_success(self) -> None:
        now = self.clock()
        state = self.state_at(now)
        if state is BreakerState.OPEN:
            return  # a request from before the trip; the probe decides
        self._close()

    def record_failure(self, error_class: ErrorClass, *, refused: bool = False) -> None:
        """Record a failed call. Only timeout/connection/server failures move the breaker.

        ``refused`` (connection refused: nothing is listening) opens a closed breaker at once.
        Non-counting failures (429, context length, client error, cancelled) leave the state as
        it is; in half-open they free the probe slot so the next request probes instead.
        """
        now = self.clock()
        state = self.state_at(now)
        if not error_class.counts_for_breaker:
            if state is BreakerState.HALF_OPEN:
                self._probe_started = None
            return
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN:
            self._trip(now)
            return
        self._failures += 1
        if refused or self._failures >= self.config.failure_threshold:
            self._trip(now)

    def _trip(self, now: float) -> None:
        self._trips += 1
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._retry_at = now + self.config.cooldown(self._trips)
        self._failures = 0
        self._probe_started = None

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trips = 0
        self._opened_at = None
        self._probe_started = None

    def __repr__(self) -> str:
        return f"Breaker({self.name!r}, {self.state.name}, failures={self._failures}, trips={self._trips})"
