"""Budget leases: a replica admits requests against headroom it reserved in advance, without a ledger round trip each.

Reserving every request's worst case in the ledger before dispatch is exact, but it makes each
request wait for the ledger's writer thread: at c=32 that wait was most of the gateway's added
latency (bench/gateway_overhead.py: +13 ms p50 with a budget rule, +0.5 ms without). A lease is one
ordinary reservation (state ``reserved``, admitted by the ledger's cap check like any other) sized
for about a thousand requests, the next one reserved before it runs out; requests are then admitted
against it in memory. The ledger rows stay the truth:

* a request admitted from a lease is charged in its audit record's transaction: its actual becomes
  its own ``committed`` row (dated like the lease, so it counts in the windows the lease was admitted
  in), and the same amount leaves the lease's reservation. Committed plus reserved never grows while
  a lease is open, so leases cannot take a policy past its caps: the ledger admitted the whole lease;
* a lease lives ``LIFETIME_S`` at most (well below the ledger's stale-reservation expiry, and never
  past the end of its shortest window), and is released as soon as it is closed and idle: what it
  held unused goes back;
* a replica killed with a lease open leaves it reserved until the ledger's expiry releases it. That
  is why a lease takes at most ``MAX_SHARE`` of a cap: a crash holds that much headroom, no more, and
  only for minutes: the holder renews a heartbeat of each lease it has not handed back every
  ``HEARTBEAT_S``, and ``Ledger.expire`` releases a lease whose heartbeat is older than ``LEASE_STALE``
  (a replica crash-looping with the 30-minute stale expiry alone could hold a whole cap, a tenth per restart);
* near a cap (a lease would not fit, or would be too small to be worth it) requests take the exact
  path: their own reservation, and the policy's downgrade / queue / reject. So the edge behaves as it
  did; only the middle of the budget gets faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pilothouse.operator.api.routing import BudgetRule

from .ledger import (
    USD_EPSILON,
    Denied,
    LeaseCharge,
    Ledger,
    Reservation,
    ReserveOp,
    SettleOp,
    per_request_denial,
    reservation_id,
)

log = logging.getLogger(__name__)

REQUESTS_PER_LEASE = 1024  # worst cases a lease holds: one ledger reservation serves this many requests
PREFETCH_BELOW = 0.25  # of a lease left: the next one is reserved in the background, so no request waits for it
MAX_SHARE = 0.1  # of the smallest cap: the most a lease (and a crashed replica's leftover) may hold
MIN_REQUESTS = 4  # a lease smaller than this many worst cases is not worth its two ledger writes
LIFETIME_S = 30.0
IDLE_S = 1.0  # an idle lease is returned this long after its last request settled
RETRY_AFTER_DENIAL_S = 1.0  # near a cap: per-request reservations for a while, not a lease attempt each
HEARTBEAT_S = 10.0  # renewal period of the leases not yet handed back (ledger.LEASE_STALE: 2 minutes)


@dataclass
class Lease:
    reservation: Reservation
    deadline: float  # monotonic: no new claims after it
    cost_left: float  # headroom still free for new claims
    tokens_left: int
    unit_cost: float  # the worst case it was sized for: below that much left, it is full
    unit_tokens: int
    in_flight: int = 0
    unwritten: int = 0  # settled claims whose charge is not yet committed: the lease must outlive them
    closed: bool = False
    last_used: float = 0.0
    returning: bool = False
    back: asyncio.Event = field(default_factory=asyncio.Event)  # set once the ledger has it back

    @property
    def quiet(self) -> bool:
        """No claim in flight and every settled claim's charge committed."""
        return self.in_flight == 0 and self.unwritten == 0

    @property
    def full(self) -> bool:
        return self.cost_left + USD_EPSILON < self.unit_cost or self.tokens_left < self.unit_tokens


@dataclass(frozen=True)
class Claim:
    """A request's share of a lease: its worst case, held until it settles."""

    lease: Lease
    row_id: str
    cost_usd: float
    tokens: int

    def settle(self, actual: tuple[float, int] | None) -> SettleOp:
        """The ledger op recording this claim's outcome (for the audit record's transaction); frees its worst case."""
        lease = self.lease
        used_cost, used_tokens = actual if actual is not None else (0.0, 0)
        lease.cost_left += max(self.cost_usd - used_cost, 0.0)
        lease.tokens_left += max(self.tokens - used_tokens, 0)
        lease.in_flight -= 1
        lease.unwritten += 1
        lease.last_used = time.monotonic()
        res = lease.reservation
        return SettleOp(res.id, actual, LeaseCharge(self.row_id, res.namespace, res.policy, res.created_at))


def _running_low(lease: Lease) -> bool:
    """Less than ``PREFETCH_BELOW`` of the lease is free: time the next one was on its way."""
    return lease.cost_left < lease.reservation.cost_usd * PREFETCH_BELOW


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
    """The open leases of one data plane, per namespace and policy, and the claims against them."""

    def __init__(self, ledger: Ledger, new_id: Callable[[], str]) -> None:
        self.ledger = ledger
        self._new_id = new_id
        self._open: dict[tuple[str, str], list[Lease]] = {}
        self._by_id: dict[str, Lease] = {}
        self._acquiring: dict[tuple[str, str], asyncio.Future[Lease | None]] = {}
        self._denied_until: dict[tuple[str, str], float] = {}
        self._last_claim: dict[tuple[str, str], float] = {}  # monotonic: a policy whose leases are in use
        self._tasks: set[asyncio.Future[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    async def claim(self, namespace: str, rule: BudgetRule, worst_cost: float, worst_tokens: int, request_id: str,
                    at: datetime) -> Claim | None:
        """This request's worst case from one of the policy's leases, opening one if none has room; None:
        reserve it alone (its policy refuses it alone, it is near a cap, or a lease is not worth it)."""
        if per_request_denial(namespace, rule, worst_cost, worst_tokens):
            return None  # the exact path refuses it, and says why
        key = (namespace, rule.policy)
        claim = self._take(key, rule, worst_cost, worst_tokens, request_id, at)
        if claim is None and time.monotonic() >= self._denied_until.get(key, 0.0):
            pending = self._acquiring.get(key) or self._start_acquiring(key, rule, worst_cost, worst_tokens, at)
            if await asyncio.shield(pending) is not None:
                claim = self._take(key, rule, worst_cost, worst_tokens, request_id, at)
        return claim

    def _take(self, key: tuple[str, str], rule: BudgetRule, worst_cost: float, worst_tokens: int, request_id: str,
              at: datetime) -> Claim | None:
        """A claim on the first open lease with room; the next lease is reserved before this one is full."""
        now = time.monotonic()
        for lease in self._open.get(key, ()):
            if now < lease.deadline and lease.cost_left + USD_EPSILON >= worst_cost and \
                    lease.tokens_left >= worst_tokens:
                lease.cost_left -= worst_cost
                lease.tokens_left -= worst_tokens
                lease.in_flight += 1
                lease.last_used = self._last_claim[key] = now
                if _running_low(lease) and key not in self._acquiring and now >= self._denied_until.get(key, 0.0) \
                        and not self._has_next(key, now):
                    self._start_acquiring(key, rule, worst_cost, worst_tokens, at)
                return Claim(lease, reservation_id(request_id, rule.policy), worst_cost, worst_tokens)
        return None

    def _has_next(self, key: tuple[str, str], now: float) -> bool:
        """An open lease of the policy that still takes claims and is not running low: the next one is here."""
        return any(not lease.closed and now < lease.deadline and not _running_low(lease) for lease in self._open[key])

    def _start_acquiring(self, key: tuple[str, str], rule: BudgetRule, worst_cost: float, worst_tokens: int,
                         at: datetime) -> asyncio.Future[Lease | None]:
        pending = self._acquiring[key] = asyncio.ensure_future(self._acquire(key, rule, worst_cost, worst_tokens, at))
        return pending

    def written(self, op: SettleOp) -> None:
        """A claim's charge is committed (or failed for good). Only then may its lease go back: returned
        earlier, the headroom it held for that charge could be reserved by another request first."""
        lease = self._by_id.get(op.reservation_id)
        if lease is None or op.lease is None:
            return
        lease.unwritten -= 1
        if lease.closed or lease.full:  # a full lease's scraps go back as soon as it is quiet
            self._close(lease)

    async def drain(self, namespace: str, policy: str, timeout_s: float = 10.0) -> bool:
        """Near the cap: stop leasing for a while and wait until this replica's leases are back in the ledger.

        A reservation refused while leases still hold headroom (their requests in flight, and the
        scraps of full ones) might fit once they are returned; the caller retries it once. So a lease
        never makes a request fail that the exact path would have admitted, only wait a request's time.
        Returns whether there was anything to wait for.
        """
        key = (namespace, policy)
        self._denied_until[key] = time.monotonic() + RETRY_AFTER_DENIAL_S
        leases = self._open.get(key, [])
        if not leases:
            return False
        leases = list(leases)
        for lease in leases:
            self._close(lease)
        with contextlib.suppress(TimeoutError):  # a request stuck in flight: the ledger's expiry has its lease
            await asyncio.wait_for(asyncio.gather(*(lease.back.wait() for lease in leases)), timeout_s)
        return True

    async def aclose(self) -> None:
        """Return every lease (the gateway is stopping); claims still in flight keep theirs until they settle."""
        for leases in list(self._open.values()):
            for lease in list(leases):
                self._close(lease)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()

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
            await self.ledger.arenew([result.id])  # before any claim: from now on a crash costs minutes, not 30
            now = time.monotonic()
            lease = Lease(result, now + lifetime, size[0], size[1], worst_cost, worst_tokens, last_used=now)
            self._open.setdefault(key, []).append(lease)
            self._by_id[result.id] = lease
            self._watch(lease)
            if self._heartbeat is None or self._heartbeat.done():
                self._heartbeat = asyncio.ensure_future(self._beat())
            return lease
        except Exception:
            log.exception("opening a budget lease for %s/%s failed; reserving per request", *key)
            self._denied_until[key] = time.monotonic() + RETRY_AFTER_DENIAL_S
            return None
        finally:
            self._acquiring.pop(key, None)

    async def _beat(self) -> None:
        """Renew every lease not yet handed back until none is left; a failed renewal is retried next period
        (``LEASE_STALE`` is many periods)."""
        while self._by_id:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.ledger.arenew(list(self._by_id))
            except Exception:
                log.warning("renewing %d budget lease(s) failed; retrying in %g s", len(self._by_id), HEARTBEAT_S,
                            exc_info=True)

    def _watch(self, lease: Lease) -> None:
        """Stop claims at the lease's deadline, and close it once its policy is idle for ``IDLE_S``.

        Idle is per policy, not per lease: the next lease, reserved while the current one runs low,
        takes no claim until that one is full, and must not go back meanwhile only to be reserved again.
        """
        key = (lease.reservation.namespace, lease.reservation.policy)

        async def watch() -> None:
            while not lease.closed:
                now = time.monotonic()
                last = max(lease.last_used, self._last_claim.get(key, 0.0))
                idle_at = last + IDLE_S if lease.quiet else now + IDLE_S
                wake = min(lease.deadline, idle_at)
                if now >= wake:
                    self._close(lease)
                    return
                await asyncio.sleep(wake - now)

        self._spawn(watch())

    def _close(self, lease: Lease) -> None:
        """No more claims; handed back to the ledger once its last claim settled."""
        lease.closed = True
        if lease.quiet and not lease.returning:
            lease.returning = True
            res = lease.reservation
            leases = self._open.get((res.namespace, res.policy), [])
            if lease in leases:
                leases.remove(lease)
            self._by_id.pop(res.id, None)
            self._spawn(self._return(lease))

    async def _return(self, lease: Lease) -> None:
        try:
            await self.ledger.arelease(lease.reservation.id)
        except Exception:
            log.warning("returning budget lease %s failed; the ledger's expiry will", lease.reservation.id,
                        exc_info=True)
        finally:
            lease.back.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
