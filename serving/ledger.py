"""The data-plane budget ledger: reserve the worst case before dispatch, commit actuals after (DESIGN.md §5).

The gateway is the only writer of the ``budget_ledger`` table declared in
``pilothouse.operator.api.ledger``; the operator only reads committed spend from it. A request's
life in the table is one row per policy:

* ``reserve`` inserts a ``reserved`` row carrying the worst case (prompt tokens + max_tokens at the
  backend's price) — but only if, for every window limit of the policy, committed spend plus what
  is in flight plus this worst case stays within the cap. Check and insert happen under one
  per-policy lock, so N concurrent requests can never overspend: whatever they will actually cost
  was already counted at its worst when they were admitted.
* ``commit`` replaces the worst case with the actual usage (state ``committed``); ``release`` gives
  the reservation back (state ``released``) when the request failed before using the backend.
* ``expire`` releases reservations a crashed gateway left behind, which would otherwise hold budget
  for the rest of their window.

Spend is attributed to the window in which it was *reserved* (``created_at``), the same column the
operator's reader filters on, so both sides agree on which window a request belongs to.

Running totals: reserve, commit, release and expire also update ``budget_totals`` (declared beside
the ledger table) in the same transaction — reserve adds the worst case to ``reserved`` of the
policy's hour, day and month windows containing ``created_at``; commit moves it to ``committed`` as
the actual; release and expire take it back out of ``reserved`` — so a reservation's cap check reads
one totals row per window limit instead of summing the window's ledger rows: O(1) per window, not
O(rows). ``budget_ledger`` is written exactly as before and stays the source of truth;
``rebuild_totals`` recomputes the totals from it, and runs when a ``Ledger`` starts.

Serialization per policy: SQLite takes the database write lock at ``BEGIN IMMEDIATE`` (SQLAlchemy's
``begin`` event emits it; pysqlite's own implicit BEGIN is switched off, as the SQLAlchemy pysqlite
docs prescribe), so a reservation's read and write cannot interleave with another writer's, and WAL
keeps the operator's reads from blocking it. PostgreSQL takes
``pg_advisory_xact_lock(hashtext(namespace || '/' || policy))`` inside the transaction, so only
requests of the same policy queue behind each other.

The engine is synchronous. The gateway's event loop must not block on it: it calls ``areserve``,
``acommit``, ``arelease`` and ``aexpire``, which run the sync method in ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from pilothouse.operator.api.budget_policy import Window
from pilothouse.operator.api.ledger import ledger, metadata, totals, window_bounds
from pilothouse.operator.api.routing import BudgetLimit, BudgetRule

from . import stores

log = logging.getLogger(__name__)

RESERVED = "reserved"
COMMITTED = "committed"
RELEASED = "released"

USD_EPSILON = 1e-9
"""Tolerance of the USD cap comparisons: costs are floats, and a sum of worst cases that is exactly
the cap in decimal (50 x 0.2 = 10) can land a few ULPs above it in binary. A nano-dollar is far
below anything a price table can express, so it cannot admit a request a real cap should refuse."""

_ID_LENGTH = 64  # budget_ledger.id is String(64)


class Usage(NamedTuple):
    """Cost and tokens summed over ledger rows; a tuple so callers may unpack ``cost, tokens``."""

    cost_usd: float
    tokens: int


@dataclass(frozen=True)
class Reservation:
    """A granted reservation: pass ``id`` to ``commit`` or ``release`` exactly once."""

    id: str
    namespace: str
    policy: str
    cost_usd: float
    tokens: int
    created_at: datetime
    replayed: bool = False
    """True when this request id already had a row for this policy (a retried request): nothing new
    was reserved and the amounts are those stored, so budget is not taken twice for one request."""


@dataclass(frozen=True)
class Denied:
    """Why a reservation was refused: enough for the gateway's 429 and for its onExhausted action.

    ``cap`` is ``perRequest`` (this request alone is too expensive: retrying will never help, so
    ``window`` and ``resets_at`` are None) or ``window`` (the window's cap, counting committed
    spend and what is in flight, has no room for this request's worst case until ``resets_at``).
    Amounts are in ``unit`` — USD or tokens.
    """

    namespace: str
    policy: str
    cap: Literal["perRequest", "window"]
    unit: Literal["USD", "tokens"]
    limit: float
    requested: float
    window: str | None = None
    spent: float = 0.0
    in_flight: float = 0.0
    resets_at: datetime | None = None

    @property
    def message(self) -> str:
        """Human-readable reason, worded for an HTTP 429 body."""
        if self.cap == "perRequest":
            return (f"budget {self.policy} caps a single request at {_amount(self.limit)} {self.unit}; "
                    f"this one may use up to {_amount(self.requested)} {self.unit}")
        resets = _rfc3339(self.resets_at) if self.resets_at else "unknown"
        message = (f"budget {self.policy} exhausted for {self.window}: spent {_amount(self.spent)} of "
                   f"{_amount(self.limit)} {self.unit}; resets at {resets}")
        if self.in_flight:  # otherwise "spent 2 of 10" reads as if there were room
            message += (f" ({_amount(self.in_flight)} {self.unit} more in flight; this request needs up to "
                        f"{_amount(self.requested)} {self.unit})")
        return message


def reservation_id(request_id: str, policy: str) -> str:
    """Row id of one request's reservation against one policy.

    ``<request_id>/<policy>`` while it fits the 64-character column (readable in the table); a
    SHA-256 digest of it beyond that, so long request ids (UUID + a 63-character policy name) still
    map to one stable id — the uniqueness that makes a retried ``reserve`` a no-op.
    """
    readable = f"{request_id}/{policy}"
    if len(readable) <= _ID_LENGTH:
        return readable
    return "h:" + hashlib.sha256(readable.encode()).hexdigest()[: _ID_LENGTH - 2]


class Ledger:
    """Writes the budget ledger over SQLAlchemy: SQLite (a file path URL) by default, PostgreSQL by URL.

    Use a SQLite *file*: an in-memory database is private to one connection, so it cannot be
    shared by the gateway's threads, let alone with the operator. Extra keyword arguments go to
    ``sqlalchemy.create_engine`` (pool sizing, for instance).
    """

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, **engine_options: Any) -> None:
        # Only SQLite and PostgreSQL: the cap check relies on their write serialization.
        self.engine, self.backend = stores.open_engine(url, purpose="budget ledger", busy_timeout_s=busy_timeout_s,
                                                       synchronous="NORMAL", create_dir=False, **engine_options)
        # Writers open their transaction with BEGIN IMMEDIATE on SQLite; readers keep a deferred BEGIN
        # so reporting spend never waits for (or blocks) a reservation.
        self._writer = stores.writer(self.engine)
        metadata.create_all(self.engine)
        self.rebuild_totals()

    def close(self) -> None:
        self.engine.dispose()

    # -- writes ------------------------------------------------------------------------------------

    @stores.retry_when_locked
    def reserve(self, namespace: str, policy: str, rule: BudgetRule, worst_cost_usd: float, worst_tokens: int,
                request_id: str, at: datetime) -> Reservation | Denied:
        """Reserve this request's worst case against ``rule``'s caps, or say which cap refuses it.

        Per-request caps are checked first (no database work). Then, under the policy's lock, every
        window limit must have room: committed + in flight (``reserved`` rows created in the window)
        + this worst case ≤ cap, cost and tokens separately. When several windows refuse, the one
        that resets last is reported: that is when the request could first succeed.

        ``rule.action`` and ``rule.state`` are the operator's view and are not consulted: the ledger
        enforces caps from its own rows, and the gateway applies the action to a ``Denied``.
        """
        if rule.policy != policy:
            raise ValueError(f"rule is for policy {rule.policy!r}, not {policy!r}")
        if worst_cost_usd < 0 or worst_tokens < 0:
            raise ValueError("worst-case cost and tokens must be non-negative")
        at = _utc(at)
        if (cap := rule.per_request_max_cost_usd) is not None and worst_cost_usd > cap + USD_EPSILON:
            return Denied(namespace, policy, "perRequest", "USD", cap, worst_cost_usd)
        if (cap_tokens := rule.per_request_max_tokens) is not None and worst_tokens > cap_tokens:
            return Denied(namespace, policy, "perRequest", "tokens", cap_tokens, worst_tokens)

        rid = reservation_id(request_id, policy)
        with self._write(namespace, policy) as conn:
            existing = conn.execute(sa.select(ledger).where(ledger.c.id == rid)).first()
            if existing is not None:
                log.info("reservation %s exists (%s); not reserving twice", rid, existing.state)
                return Reservation(rid, existing.namespace, existing.policy, existing.cost_usd, existing.tokens,
                                   _stored(existing.created_at), replayed=True)
            denied = self._check_windows(conn, namespace, policy, rule.limits, worst_cost_usd, worst_tokens, at)
            if denied is not None:
                return denied
            conn.execute(ledger.insert().values(id=rid, namespace=namespace, policy=policy, state=RESERVED,
                                                cost_usd=worst_cost_usd, tokens=worst_tokens, created_at=at))
            self._add_totals(conn, namespace, policy, at, reserved=(worst_cost_usd, worst_tokens))
        return Reservation(rid, namespace, policy, worst_cost_usd, worst_tokens, at)

    @stores.retry_when_locked
    def commit(self, reservation_id: str, actual_cost_usd: float, actual_tokens: int) -> bool:
        """Record the actual usage; True only if this call moved the row from ``reserved`` to ``committed``.

        A second commit, a commit after ``release`` or ``expire``, or an unknown id changes nothing
        and returns False. Actuals above the reserved worst case are recorded as they are — the
        ledger must not under-report real spend — but logged as a warning, because they mean the
        backend produced more than max_tokens or the price table is wrong, and only that can push
        spend past a cap.
        """
        with self._write() as conn:
            row = conn.execute(sa.select(ledger.c.state, ledger.c.cost_usd, ledger.c.tokens, ledger.c.namespace,
                                         ledger.c.policy, ledger.c.created_at)
                               .where(ledger.c.id == reservation_id).with_for_update()).first()
            if row is None:
                log.warning("commit of unknown reservation %s ignored", reservation_id)
                return False
            if row.state != RESERVED:
                log.info("commit of %s reservation %s ignored", row.state, reservation_id)
                return False
            if actual_cost_usd > row.cost_usd + USD_EPSILON or actual_tokens > row.tokens:
                log.warning("reservation %s committed above its worst case: %s USD / %s tokens > %s USD / %s tokens",
                            reservation_id, actual_cost_usd, actual_tokens, row.cost_usd, row.tokens)
            done = conn.execute(ledger.update().where(ledger.c.id == reservation_id, ledger.c.state == RESERVED)
                                .values(state=COMMITTED, cost_usd=actual_cost_usd, tokens=actual_tokens))
            if done.rowcount != 1:
                return False
            self._add_totals(conn, row.namespace, row.policy, _stored(row.created_at),
                             reserved=(-row.cost_usd, -row.tokens), committed=(actual_cost_usd, actual_tokens))
            return True

    @stores.retry_when_locked
    def release(self, reservation_id: str) -> bool:
        """Give the reservation back; True only if this call moved it from ``reserved`` to ``released``.

        The row keeps the worst case it reserved (for audit); released rows count nowhere.
        """
        with self._write() as conn:
            row = conn.execute(sa.select(ledger.c.namespace, ledger.c.policy, ledger.c.cost_usd, ledger.c.tokens,
                                         ledger.c.created_at)
                               .where(ledger.c.id == reservation_id, ledger.c.state == RESERVED)
                               .with_for_update()).first()
            if row is None:
                return False
            done = conn.execute(ledger.update().where(ledger.c.id == reservation_id, ledger.c.state == RESERVED)
                                .values(state=RELEASED))
            if done.rowcount != 1:
                return False
            self._add_totals(conn, row.namespace, row.policy, _stored(row.created_at),
                             reserved=(-row.cost_usd, -row.tokens))
            return True

    @stores.retry_when_locked
    def expire(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Release reservations still in flight after ``older_than``; returns how many.

        A gateway that crashes between reserve and commit leaves ``reserved`` rows that would hold
        their worst case until the window ends. The gateway calls this at startup and then
        periodically (about once a minute), with ``older_than`` well above the longest a request can
        live (upstream timeout x attempts + queue timeout): every replica runs it, and a reservation
        of a request still running elsewhere must not be released, or its later commit is refused
        (returns False) and that spend is lost to the ledger.
        """
        cutoff = _utc(now or datetime.now(UTC)) - older_than
        stale = sa.and_(ledger.c.state == RESERVED, ledger.c.created_at < cutoff)
        with self._write() as conn:
            rows = conn.execute(sa.select(ledger.c.id, ledger.c.namespace, ledger.c.policy, ledger.c.cost_usd,
                                          ledger.c.tokens, ledger.c.created_at)
                                .where(stale).order_by(ledger.c.id).with_for_update()).all()
            released = 0
            for row in rows:  # one by one, so a row committed meanwhile is neither released nor subtracted
                done = conn.execute(ledger.update().where(ledger.c.id == row.id, ledger.c.state == RESERVED)
                                    .values(state=RELEASED))
                if done.rowcount == 1:
                    released += 1
                    self._add_totals(conn, row.namespace, row.policy, _stored(row.created_at),
                                     reserved=(-row.cost_usd, -row.tokens))
        if released:
            log.warning("released %d stale reservations created before %s", released, _rfc3339(cutoff))
        return released

    def rebuild_totals(self) -> None:
        """Recompute ``budget_totals`` from the ledger rows (startup, tests, or after manual edits).

        Runs under the write lock (SQLite) or with the ledger locked against writers (PostgreSQL), so
        no reservation changes rows between the scan and the new totals.
        """
        sums: dict[tuple[str, str, str, datetime], list[float]] = {}
        with self._write() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text("LOCK TABLE budget_ledger, budget_totals IN SHARE ROW EXCLUSIVE MODE"))
            rows = conn.execute(sa.select(ledger.c.namespace, ledger.c.policy, ledger.c.state, ledger.c.cost_usd,
                                          ledger.c.tokens, ledger.c.created_at)
                                .where(ledger.c.state.in_((COMMITTED, RESERVED))))
            for row in rows:
                offset = 0 if row.state == COMMITTED else 2
                for window in Window:
                    start, _ = window_bounds(window, _stored(row.created_at))
                    acc = sums.setdefault((row.namespace, row.policy, window.value, start), [0.0, 0, 0.0, 0])
                    acc[offset] += row.cost_usd
                    acc[offset + 1] += row.tokens
            conn.execute(totals.delete())
            if sums:
                conn.execute(totals.insert(), [
                    {"namespace": ns, "policy": policy, "window": window, "window_start": start,
                     "committed_usd": acc[0], "committed_tokens": acc[1], "reserved_usd": acc[2],
                     "reserved_tokens": acc[3]}
                    for (ns, policy, window, start), acc in sums.items()])

    # -- reads -------------------------------------------------------------------------------------

    def spend(self, namespace: str, policy: str, since: datetime, until: datetime | None = None) -> Usage:
        """Committed cost and tokens of a policy for rows reserved in [since, until)."""
        return self._sum(namespace, policy, COMMITTED, since, until)

    def in_flight(self, namespace: str, policy: str, since: datetime, until: datetime | None = None) -> Usage:
        """Worst cases still reserved (neither committed nor released) in [since, until)."""
        return self._sum(namespace, policy, RESERVED, since, until)

    # -- async wrappers for the gateway's event loop -------------------------------------------------

    async def areserve(self, namespace: str, policy: str, rule: BudgetRule, worst_cost_usd: float,
                       worst_tokens: int, request_id: str, at: datetime) -> Reservation | Denied:
        return await asyncio.to_thread(self.reserve, namespace, policy, rule, worst_cost_usd, worst_tokens,
                                       request_id, at)

    async def acommit(self, reservation_id: str, actual_cost_usd: float, actual_tokens: int) -> bool:
        return await asyncio.to_thread(self.commit, reservation_id, actual_cost_usd, actual_tokens)

    async def arelease(self, reservation_id: str) -> bool:
        return await asyncio.to_thread(self.release, reservation_id)

    async def aexpire(self, older_than: timedelta, now: datetime | None = None) -> int:
        return await asyncio.to_thread(self.expire, older_than, now)

    # -- internals ---------------------------------------------------------------------------------

    @contextmanager
    def _write(self, namespace: str | None = None, policy: str | None = None) -> Iterator[sa.Connection]:
        """A write transaction, serialized per policy (PostgreSQL) or per database (SQLite)."""
        with self._writer.begin() as conn:
            if self.backend == "postgresql" and namespace is not None and policy is not None:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(CAST(:namespace AS text) || '/' || "
                                     "CAST(:policy AS text)))"), {"namespace": namespace, "policy": policy})
            yield conn

    def _check_windows(self, conn: sa.Connection, namespace: str, policy: str, limits: Sequence[BudgetLimit],
                       worst_cost_usd: float, worst_tokens: int, at: datetime) -> Denied | None:
        """The refusing window that resets last, or None when every window has room."""
        if not limits:
            return None
        bounds = [window_bounds(limit.window, at) for limit in limits]
        keys = {(Window(limit.window).value, start) for limit, (start, _) in zip(limits, bounds, strict=True)}
        found = {(row.window, _stored(row.window_start)): row[2:] for row in conn.execute(
            sa.select(totals.c.window, totals.c.window_start, totals.c.committed_usd, totals.c.committed_tokens,
                      totals.c.reserved_usd, totals.c.reserved_tokens)
            .where(totals.c.namespace == namespace, totals.c.policy == policy,
                   sa.or_(*(sa.and_(totals.c.window == w, totals.c.window_start == st) for w, st in keys))))}
        sums: list[Any] = []
        for limit, (start, _) in zip(limits, bounds, strict=True):
            committed_usd, committed_tokens, reserved_usd, reserved_tokens = found.get(
                (Window(limit.window).value, start), (0.0, 0, 0.0, 0))
            # Running float sums may keep a few ULPs of reservations long gone: report those as none.
            sums += [committed_usd, committed_tokens, reserved_usd if abs(reserved_usd) > USD_EPSILON else 0.0,
                     reserved_tokens]
        refusals: list[Denied] = []
        for i, (limit, (_, end)) in enumerate(zip(limits, bounds, strict=True)):
            spent_cost, spent_tokens, flying_cost, flying_tokens = sums[4 * i: 4 * i + 4]
            cap = limit.max_cost_usd
            if cap is not None and spent_cost + flying_cost + worst_cost_usd > cap + USD_EPSILON:
                refusals.append(Denied(namespace, policy, "window", "USD", cap, worst_cost_usd, limit.window,
                                       float(spent_cost), float(flying_cost), end))
            cap_tokens = limit.max_tokens
            if cap_tokens is not None and spent_tokens + flying_tokens + worst_tokens > cap_tokens:
                refusals.append(Denied(namespace, policy, "window", "tokens", cap_tokens, worst_tokens, limit.window,
                                       int(spent_tokens), int(flying_tokens), end))
        return max(refusals, key=lambda d: d.resets_at or at, default=None)

    def _add_totals(self, conn: sa.Connection, namespace: str, policy: str, created_at: datetime, *,
                    reserved: tuple[float, int] = (0.0, 0), committed: tuple[float, int] = (0.0, 0)) -> None:
        """Add to the running totals of every window (hour, day, month) containing ``created_at``.

        Always in the same window order, so concurrent PostgreSQL transactions lock totals rows alike.
        """
        insert = postgresql.insert if self.backend == "postgresql" else sqlite.insert
        for window in Window:
            start, _ = window_bounds(window, created_at)
            stmt = insert(totals).values(namespace=namespace, policy=policy, window=window.value, window_start=start,
                                         committed_usd=committed[0], committed_tokens=committed[1],
                                         reserved_usd=reserved[0], reserved_tokens=reserved[1])
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[totals.c.namespace, totals.c.policy, totals.c.window, totals.c.window_start],
                set_={name: totals.c[name] + stmt.excluded[name]
                      for name in ("committed_usd", "committed_tokens", "reserved_usd", "reserved_tokens")}))

    def _sum(self, namespace: str, policy: str, state: str, since: datetime, until: datetime | None) -> Usage:
        query = sa.select(sa.func.coalesce(sa.func.sum(ledger.c.cost_usd), 0.0),
                          sa.func.coalesce(sa.func.sum(ledger.c.tokens), 0)).where(
            ledger.c.namespace == namespace, ledger.c.policy == policy, ledger.c.state == state,
            ledger.c.created_at >= _utc(since))
        if until is not None:
            query = query.where(ledger.c.created_at < _utc(until))
        with self.engine.connect() as conn:
            cost, tokens = conn.execute(query).one()
        return Usage(float(cost), int(tokens))


def _utc(at: datetime) -> datetime:
    """Aware UTC. SQLite stores datetimes without their offset, so every value and bound must be in
    UTC to compare; a naive datetime is refused rather than guessed (local time would shift windows)."""
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()}: pass an aware one (UTC)")
    return at.astimezone(UTC)


def _stored(at: datetime) -> datetime:
    """A created_at read back: SQLite returns it naive, but it was written in UTC."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _amount(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
