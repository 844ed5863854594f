"""Budget leases: a replica admits requests against headroom it reserved in advance, without a ledger round trip each.

Reserving every request's worst case in the ledger before dispatch is exact, but it makes each
request wait for the ledger's writer thread: at c=32 that wait was most of the gateway's added
latency (bench/gateway_overhead.py: +13 ms p50 with a budget rule, +0.5 ms without). A lease is one
ordinary reservation (state ``reserved``, admitted by the ledger's cap check like any other) sized
for a few dozen requests; requests are then admitted against it in memory. The ledger rows stay the
truth:

* a request admitted from a lease is charged in its audit record's transaction: its actual becomes
  its own ``committed`` row (dated like the lease, so it counts in the windows the lease was admitted
  in), and the same amount leaves the lease's reservation. Committed plus reserved never grows while
  a lease is open, so leases cannot take a policy past its caps: the ledger admitted the whole lease;
* a lease lives ``LIFETIME_S`` at most (well below the ledger's stale-reservation expiry, and never
  past the end of its shortest window), and is released as soon as it is closed and idle: what it
  held unused goes back;
* a replica killed with a lease open leaves it reserved until the ledger's expiry releases it. That
  is why a lease takes at most ``MAX_SHARE`` of a cap: a crash can hold that much headroom, no more;
* near a cap (a lease would not fit, or would be too small to be worth it) requests take the exact
  path: their own reservation, and the policy's downgrade / queue / reject. So the edge behaves as it
  did; only the middle of the budget gets faster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pilothouse.operator.api.routing import BudgetRule

from .ledger import Denied, LeaseCharge, Ledger, Reservation, ReserveOp, SettleOp, reservation_id

log = logging.getLogger(__name__)

REQUESTS_PER_LEASE = 64  # worst cases a lease holds: one ledger reservation serves this many requests
MAX_SHARE = 0.1  # of the smallest cap: the most a lease (and a crashed replica's leftover) may hold
MIN_REQUESTS = 4  # a lease smaller than this many worst cases is not worth its two ledger writes
LIFETIME_S = 30.0
IDLE_S = 1.0  # an idle lease is returned this long after its last request settled
RETRY_AFTER_DENIAL_S = 1.0  # near a cap: per-request reservations for a while, not a lease attempt each


@dataclass
class Lease:
    reservation: Reservation
    deadline: float  # monotonic: no new claims after it
    cost_left: float  # headroom still free for new claims
    tokens_left: int
    in_flight: int = 0
    closed: bool = False
    released: bool = False
    last_used: float = 0.0


@dataclass(frozen=True)
class Claim:
    """A request's share of a lease: its worst case, held until it settles."""

    lease: Lease
    row_id: str
    cost_usd: float
    tokens: int


def lease_size(rule: BudgetRule, worst_cost: float, worst_tokens: int) -> tuple[float, int] | None:
    """(USD, tokens) a lease for requests of this worst case should hold, or None when one is not worth it."""
    cost, tokens = worst_cost * REQUESTS_PER_LEASE, worst_tokens * REQUESTS_PER_LEASE
    for limit in rule.limits:
        if limit.max_cost_usd is not None:
            cost = min(cost, limit.max_cost_usd * MAX_SHARE)
        if limit.max_tokens is not None:
            tokens = min(tokens, int(limit.max_tokens * MAX_SHARE))
    if cost < worst_cost * MIN_REQUESTS or tokens < worst_tokens * MIN_REQUESTS:
        return None
    return cost, tokens


class Leases:
    """The leases of one data plane (one per namespace and policy), and the claims against them."""

    def __init__(self, ledger: Ledger, new_id: Callable[[], str]) -> None:
        self.ledger = ledger
        self._new_id = new_id
        self._leases: dict[tuple[str, str], Lease] = {}
        self._acquiring: dict[tuple[str, str], asyncio.Future[Lease | None]] = {}
        self._denied_until: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    async def claim(self, namespace: str, rule: BudgetRule, worst_cost: float, worst_tokens: int, request_id: str,
                    at: datetime) -> Claim | None:
        """This request's worst case from the policy's lease, opening one if needed; None: reserve it alone."""
        key = (namespace, rule.policy)
        now = time.monotonic()
        for _ in range(2):  # the current lease, else a fresh one
            lease = self._leases.get(key)
            if lease is not None and now < lease.deadline:
                if lease.cost_left < worst_cost or lease.tokens_left < worst_tokens:
                    # One lease per policy: its headroom comes back as its requests settle; until then this
                    # request takes the exact path, so the lease never holds more than one request's worth
                    # of headroom that a refused request could have used.
                    return None
                lease.cost_left -= worst_cost
                lease.tokens_left -= worst_tokens
                lease.in_flight += 1
                lease.last_used = now
                return Claim(lease, reservation_id(request_id, rule.policy), worst_cost, worst_tokens)
            if lease is not None:
                self._close(key, lease)
            if now < self._denied_until.get(key, 0.0):
                return None
            pending = self._acquiring.get(key)
            if pending is None:
                pending = self._acquiring[key] = asyncio.ensure_future(
                    self._acquire(key, rule, worst_cost, worst_tokens, at))
            if await asyncio.shield(pending) is None:
                return None
            now = time.monotonic()
        return None

    def settle(self, claim: Claim, actual: tuple[float, int] | None) -> SettleOp:
        """The ledger op recording a claim's outcome (for the audit record's transaction); frees its worst case."""
        lease = claim.lease
        used_cost, used_tokens = actual if actual is not None else (0.0, 0)
        lease.cost_left += max(claim.cost_usd - used_cost, 0.0)
        lease.tokens_left += max(claim.tokens - used_tokens, 0)
        lease.in_flight -= 1
        lease.last_used = time.monotonic()
        res = lease.reservation
        if lease.closed and lease.in_flight == 0:
            self._release(lease)
        return SettleOp(res.id, actual, LeaseCharge(claim.row_id, res.namespace, res.policy, res.created_at))

    async def aclose(self) -> None:
        """Return every lease (the gateway is stopping); claims still in flight keep theirs until they settle."""
        for key, lease in list(self._leases.items()):
            self._close(key, lease)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _acquire(self, key: tuple[str, str], rule: BudgetRule, worst_cost: float, worst_tokens: int,
                       at: datetime) -> Lease | None:
        try:
            size = lease_size(rule, worst_cost, worst_tokens)
            if size is None:
                self._denied_until[key] = time.monotonic() + RETRY_AFTER_DENIAL_S
                return None
            op = ReserveOp(key[0], key[1], rule, size[0], size[1], f"lease-{self._new_id()}", at)
            ends = min(end for _, end in op.bounds)
            lifetime = min(LIFETIME_S, (ends - op.at).total_seconds() - 1.0)
            if lifetime < 2.0:  # the window is about to turn: its last seconds go the exact way
                self._denied_until[key] = time.monotonic() + max(lifetime + 1.0, RETRY_AFTER_DENIAL_S)
                return None
            result = await self.ledger.areserve(*key, rule, size[0], size[1], op.request_id, op.at)
            if isinstance(result, Denied):
                self._denied_until[key] = time.monotonic() + RETRY_AFTER_DENIAL_S
                return None
            lease = Lease(result, time.monotonic() + lifetime, size[0], size[1], last_used=time.monotonic())
            self._leases[key] = lease
            self._watch(key, lease)
            return lease
        except Exception:
            log.exception("opening a budget lease for %s/%s failed; reserving per request", *key)
            self._denied_until[key] = time.monotonic() + RETRY_AFTER_DENIAL_S
            return None
        finally:
            self._acquiring.pop(key, None)

    def _watch(self, key: tuple[str, str], lease: Lease) -> None:
        """Close the lease at its deadline, or once idle for ``IDLE_S``."""
        async def watch() -> None:
            while not lease.closed:
                now = time.monotonic()
                idle_at = lease.last_used + IDLE_S if lease.in_flight == 0 else now + IDLE_S
                wake = min(lease.deadline, idle_at)
                if now >= wake:
                    self._close(key, lease)
                    return
                await asyncio.sleep(wake - now)

        self._spawn(watch())

    def _close(self, key: tuple[str, str], lease: Lease) -> None:
        lease.closed = True
        if self._leases.get(key) is lease:
            del self._leases[key]
        if lease.in_flight == 0:
            self._release(lease)

    def _release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            self._spawn(self._return(lease))

    async def _return(self, lease: Lease) -> None:
        try:
            await self.ledger.arelease(lease.reservation.id)
        except Exception:
            log.warning("returning budget lease %s failed; the ledger's expiry will", lease.reservation.id,
                        exc_info=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
