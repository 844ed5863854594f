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
  for the rest of their window: any reservation past the stale age, and sooner a budget lease whose
  heartbeat (``renew``, ``budget_leases``) stopped.

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

Group commit: the gateway's ``areserve``, ``acommit`` and ``arelease`` queue their op for one writer
thread (:class:`~pilothouse.serving.group_commit.GroupCommitter`), which applies everything queued
meanwhile in one transaction (:meth:`Ledger.apply`) with a handful of statements per batch, not per
request, and answers each caller when that transaction committed. The sync methods are batches of
one. Admission is unchanged by batching: within a batch, each reservation is checked against the
stored totals plus everything the batch admitted or settled before it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa

from pilothouse.operator.api.budget_policy import Window
from pilothouse.operator.api.ledger import leases, ledger, metadata, totals, window_bounds
from pilothouse.operator.api.routing import BudgetRule

from . import stores
from .group_commit import GroupCommitter
from .prepared import Prepared, placeholders

log = logging.getLogger(__name__)

RESERVED = "reserved"
COMMITTED = "committed"
RELEASED = "released"

LEASE_STALE = timedelta(minutes=2)
"""A budget lease not renewed for this long belongs to a replica that died: ``expire`` releases it. Far above
the holder's renewal period (``budget_lease.HEARTBEAT_S``), so a slow write never loses a live lease."""

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


TotalsKey = tuple[str, str, str, datetime]
"""(namespace, policy, window, window start) of one ``budget_totals`` row."""
_ZERO = (0.0, 0, 0.0, 0)  # committed USD, committed tokens, reserved USD, reserved tokens


def per_request_denial(namespace: str, rule: BudgetRule, worst_cost_usd: float, worst_tokens: int) -> Denied | None:
    """The refusal of a request whose worst case alone is above the rule's per-request caps, or None. A function of
    its own so the budget leases' hot path can ask without building a ``ReserveOp`` (~18,000 instructions a request)."""
    if (cap := rule.per_request_max_cost_usd) is not None and worst_cost_usd > cap + USD_EPSILON:
        return Denied(namespace, rule.policy, "perRequest", "USD", cap, worst_cost_usd)
    if (cap_tokens := rule.per_request_max_tokens) is not None and worst_tokens > cap_tokens:
        return Denied(namespace, rule.policy, "perRequest", "tokens", cap_tokens, worst_tokens)
    return None


@dataclass(frozen=True)
class ReserveOp:
    """One request's reservation against one policy; checked for sense when built, before any queueing."""

    namespace: str
    policy: str
    rule: BudgetRule
    worst_cost_usd: float
    worst_tokens: int
    request_id: str
    at: datetime

    def __post_init__(self) -> None:
        if self.rule.policy != self.policy:
            raise ValueError(f"rule is for policy {self.rule.policy!r}, not {self.policy!r}")
        if self.worst_cost_usd < 0 or self.worst_tokens < 0:
            raise ValueError("worst-case cost and tokens must be non-negative")
        object.__setattr__(self, "at", _utc(self.at))

    def per_request_denial(self) -> Denied | None:
        return per_request_denial(self.namespace, self.rule, self.worst_cost_usd, self.worst_tokens)

    @cached_property
    def bounds(self) -> list[tuple[datetime, datetime]]:
        return [window_bounds(limit.window, self.at) for limit in self.rule.limits]

    def limit_keys(self) -> list[TotalsKey]:
        """The totals row each window limit is checked against, in ``rule.limits`` order."""
        return [(self.namespace, self.policy, Window(limit.window).value, start)
                for limit, (start, _) in zip(self.rule.limits, self.bounds, strict=True)]

    def window_denial(self, sums: Sequence[Sequence[float]]) -> Denied | None:
        """The refusing window that resets last, or None when every window has room.

        ``sums[i]`` is limit i's window as (committed USD, committed tokens, reserved USD, reserved tokens).
        """
        refusals: list[Denied] = []
        for limit, (_, end), (spent_cost, spent_tokens, flying_cost, flying_tokens) in zip(
                self.rule.limits, self.bounds, sums, strict=True):
            # Running float sums may keep a few ULPs of reservations long gone: report those as none.
            flying_cost = flying_cost if abs(flying_cost) > USD_EPSILON else 0.0
            cap = limit.max_cost_usd
            if cap is not None and spent_cost + flying_cost + self.worst_cost_usd > cap + USD_EPSILON:
                refusals.append(Denied(self.namespace, self.policy, "window", "USD", cap, self.worst_cost_usd,
                                       limit.window, float(spent_cost), float(flying_cost), end))
            cap_tokens = limit.max_tokens
            if cap_tokens is not None and spent_tokens + flying_tokens + self.worst_tokens > cap_tokens:
                refusals.append(Denied(self.namespace, self.policy, "window", "tokens", cap_tokens, self.worst_tokens,
                                       limit.window, int(spent_tokens), int(flying_tokens), end))
        return max(refusals, key=lambda d: d.resets_at or self.at, default=None)


@dataclass(frozen=True)
class LeaseCharge:
    """Where a request admitted from a budget lease records its spend: its own committed row, dated like the
    lease so the spend falls in the windows the lease was admitted in."""

    row_id: str
    namespace: str
    policy: str
    created_at: datetime


@dataclass(frozen=True)
class SettleOp:
    """Commit a reservation at ``actual`` (cost USD, tokens), or release it when ``actual`` is None.

    With ``lease``, ``reservation_id`` is a budget lease's row and the op charges one request to it:
    ``actual`` becomes the committed row ``lease.row_id`` and leaves the lease's reservation (the lease
    stays reserved); without ``actual`` there is nothing to write.
    """

    reservation_id: str
    actual: tuple[float, int] | None
    lease: LeaseCharge | None = None


LedgerOp = ReserveOp | SettleOp


def _add(deltas: dict[TotalsKey, list[float]], namespace: str, policy: str, created_at: datetime, *,
         reserved: tuple[float, int] = (0.0, 0), committed: tuple[float, int] = (0.0, 0)) -> None:
    """Count a change in every window (hour, day, month) containing ``created_at``."""
    for window, start in _window_starts(created_at):
        acc = deltas.setdefault((namespace, policy, window, start), [0.0, 0, 0.0, 0])
        acc[0] += committed[0]
        acc[1] += committed[1]
        acc[2] += reserved[0]
        acc[3] += reserved[1]


@functools.lru_cache(maxsize=64)
def _window_starts(at: datetime) -> tuple[tuple[str, datetime], ...]:
    """(window, start) of every window containing ``at``. Cached: a lease's charges, most of a batch, share
    its ``created_at``; the calendar arithmetic of each was ~15% of the audit writer's CPU for a budgeted
    batch (0.63 -> 0.53 ms for 4 requests)."""
    return tuple((window.value, window_bounds(window, at)[0]) for window in Window)


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


# -- the batch's statements -------------------------------------------------------------------------
# Plain SQL, built once: composing Core constructs per batch (and hashing them for SQLAlchemy's
# compiled cache) cost ~10x the SQLite work of a batch (4-5 ms against ~0.5 ms, measured here), and
# it is the gateway's hot path; the writes go further and skip ``Connection.execute`` (``prepared``).
# The syntax is common to SQLite (>= 3.24) and PostgreSQL; the typed bind parameters and result
# columns keep SQLAlchemy's DateTime handling (SQLite stores UTC text).
_TS = sa.DateTime(timezone=True)


class _Row(NamedTuple):
    """A ``budget_ledger`` row as the batch reads it."""

    id: str
    namespace: str
    policy: str
    state: str
    cost_usd: float
    tokens: int
    created_at: datetime


_ROWS_CHUNK = 1024  # ids per SELECT: far below SQLite's and PostgreSQL's bound-parameter limits


@functools.cache
def _sql_rows(n: int, lock: bool) -> Prepared:
    return Prepared(f"SELECT id, namespace, policy, state, cost_usd, tokens, created_at FROM budget_ledger "
                    f"WHERE id IN ({placeholders('id', n)}) ORDER BY id" + (" FOR UPDATE" if lock else ""),
                    columns={"created_at": _TS})


def _rows_by_id(conn: sa.Connection, ids: Sequence[str], *, lock: bool = False) -> list[_Row]:
    """The ledger rows of ``ids``, locked FOR UPDATE with ``lock`` (PostgreSQL; pass ``ids`` sorted, so every
    batch takes its row locks in id order).

    At most ``_ROWS_CHUNK`` ids per statement, each list padded to a power of two by repeating an id, so
    eleven statements serve every batch size."""
    found: list[_Row] = []
    for at in range(0, len(ids), _ROWS_CHUNK):
        chunk = ids[at:at + _ROWS_CHUNK]
        n = 1 << (len(chunk) - 1).bit_length()
        params = {f"id_{i}": rid for i, rid in enumerate([*chunk, *[chunk[-1]] * (n - len(chunk))])}
        found += (_Row(*row) for row in _sql_rows(n, lock).rows(conn, params))
    return found


_SQL_SETTLE = Prepared("UPDATE budget_ledger SET state = :new_state, cost_usd = :new_cost, tokens = :new_tokens "
                       "WHERE id = :rid")
_INSERT_ROW = ("INSERT INTO budget_ledger (id, namespace, policy, state, cost_usd, tokens, created_at) "
               "VALUES (:id, :namespace, :policy, :state, :cost_usd, :tokens, :created_at)")
_SQL_INSERT = Prepared(_INSERT_ROW, created_at=_TS)
# A charge replayed after a busy error was rolled back with its batch; one already committed stays as it is.
_SQL_INSERT_CHARGE = Prepared(_INSERT_ROW + " ON CONFLICT (id) DO NOTHING", created_at=_TS)
_SQL_TOTALS = sa.text(
    'SELECT "window", window_start, committed_usd, committed_tokens, reserved_usd, reserved_tokens '
    "FROM budget_totals WHERE namespace = :namespace AND policy = :policy AND window_start IN :starts").bindparams(
    sa.bindparam("starts", expanding=True, type_=_TS)).columns(window_start=_TS)
_SQL_ADD_TOTALS = Prepared(
    'INSERT INTO budget_totals (namespace, policy, "window", window_start, committed_usd, committed_tokens, '
    "reserved_usd, reserved_tokens) VALUES (:namespace, :policy, :window, :window_start, :cu, :ct, :ru, :rt) "
    'ON CONFLICT (namespace, policy, "window", window_start) DO UPDATE SET '
    "committed_usd = budget_totals.committed_usd + excluded.committed_usd, "
    "committed_tokens = budget_totals.committed_tokens + excluded.committed_tokens, "
    "reserved_usd = budget_totals.reserved_usd + excluded.reserved_usd, "
    "reserved_tokens = budget_totals.reserved_tokens + excluded.reserved_tokens", window_start=_TS)

_SQL_RENEW = Prepared("INSERT INTO budget_leases (id, renewed_at) VALUES (:id, :renewed_at) "
                      "ON CONFLICT (id) DO UPDATE SET renewed_at = excluded.renewed_at", renewed_at=_TS)


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
        metadata.create_all(self._writer)  # IMMEDIATE: see stores.writer
        self.rebuild_totals()
        self._committer: GroupCommitter[LedgerOp, Reservation | Denied | bool] | None = None
        self._group_lock = threading.Lock()

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
        self.engine.dispose()

    # -- writes ------------------------------------------------------------------------------------

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
        result = self.apply([ReserveOp(namespace, policy, rule, worst_cost_usd, worst_tokens, request_id, at)])[0]
        assert not isinstance(result, bool)
        return result

    def commit(self, reservation_id: str, actual_cost_usd: float, actual_tokens: int) -> bool:
        """Record the actual usage; True only if this call moved the row from ``reserved`` to ``committed``.

        A second commit, a commit after ``release`` or ``expire``, or an unknown id changes nothing
        and returns False. Actuals above the reserved worst case are recorded as they are — the
        ledger must not under-report real spend — but logged as a warning, because they mean the
        backend produced more than max_tokens or the price table is wrong, and only that can push
        spend past a cap.
        """
        return bool(self.apply([SettleOp(reservation_id, (actual_cost_usd, actual_tokens))])[0])

    def release(self, reservation_id: str) -> bool:
        """Give the reservation back; True only if this call moved it from ``reserved`` to ``released``.

        The row keeps the worst case it reserved (for audit); released rows count nowhere.
        """
        return bool(self.apply([SettleOp(reservation_id, None)])[0])

    @stores.retry_when_locked
    def apply(self, ops: Sequence[LedgerOp]) -> list[Reservation | Denied | bool]:
        """Apply reservations, commits and releases in one transaction; one result per op, in order.

        Settlements run first and their effect on the totals is visible to the reservations after
        them, so a batch admits exactly what the same ops one transaction each would have admitted
        had the settlements come first — which they may: ops in one batch are concurrent requests.
        Replaying a batch after a busy error is safe: nothing of the failed attempt was committed.
        """
        results: list[Reservation | Denied | bool | None] = [None] * len(ops)
        reserves: list[tuple[int, ReserveOp]] = []
        settles: list[tuple[int, SettleOp]] = []
        for i, op in enumerate(ops):
            if isinstance(op, SettleOp):
                settles.append((i, op))
            elif (denied := op.per_request_denial()) is not None:
                results[i] = denied
            else:
                reserves.append((i, op))
        if reserves or settles:
            deltas: dict[TotalsKey, list[float]] = {}
            with self._write(sorted({(op.namespace, op.policy) for _, op in reserves})) as conn:
                if settles:
                    self._settle(conn, settles, results, deltas)
                if reserves:
                    self._reserve(conn, reserves, results, deltas)
                self._apply_totals(conn, deltas)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    @stores.retry_when_locked
    def expire(self, older_than: timedelta, now: datetime | None = None, lease_stale: timedelta = LEASE_STALE) -> int:
        """Release reservations still in flight after ``older_than``, and budget leases not renewed for
        ``lease_stale``; returns how many.

        A gateway that crashes between reserve and commit leaves ``reserved`` rows that would hold
        their worst case until the window ends. The gateway calls this at startup and then
        periodically (about once a minute), with ``older_than`` well above the longest a request can
        live (upstream timeout x attempts + queue timeout): every replica runs it, and a reservation
        of a request still running elsewhere must not be released, or its later commit is refused
        (returns False) and that spend is lost to the ledger. A lease says itself whether its holder
        lives (``renew``), so a dead replica's lease, up to a tenth of a cap, comes back in minutes.
        A request charged to a lease released under it still records its spend (``SettleOp.lease``).
        """
        at = _utc(now or datetime.now(UTC))
        cutoff, lease_cutoff = at - older_than, at - lease_stale
        with self._write() as conn:
            expired = conn.execute(
                sa.select(ledger.c.id).outerjoin(leases, leases.c.id == ledger.c.id)
                .where(ledger.c.state == RESERVED,
                       sa.or_(ledger.c.created_at < cutoff, leases.c.renewed_at < lease_cutoff))
                .order_by(ledger.c.id)).scalars().all()
            released = sum(self.settle_in(conn, [SettleOp(rid, None) for rid in expired]))
            conn.execute(sa.delete(leases).where(leases.c.renewed_at < lease_cutoff))
        if released:
            log.warning("released %d stale reservations (created before %s, or leases not renewed since %s)",
                        released, _rfc3339(cutoff), _rfc3339(lease_cutoff))
        return released

    @stores.retry_when_locked
    def renew(self, lease_ids: Sequence[str], now: datetime | None = None) -> None:
        """Heartbeat of budget leases this replica still holds: ``expire`` leaves them alone."""
        if not lease_ids:
            return
        at = _utc(now or datetime.now(UTC))
        with self._write() as conn:
            _SQL_RENEW.execute(conn, [{"id": lease_id, "renewed_at": at} for lease_id in sorted(lease_ids)])

    async def arenew(self, lease_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.renew, lease_ids)

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
        op = ReserveOp(namespace, policy, rule, worst_cost_usd, worst_tokens, request_id, at)
        if (denied := op.per_request_denial()) is not None:
            return denied
        result = await self._group().submit(op)
        assert not isinstance(result, bool)
        return result

    async def acommit(self, reservation_id: str, actual_cost_usd: float, actual_tokens: int) -> bool:
        return await self.asettle(SettleOp(reservation_id, (actual_cost_usd, actual_tokens)))

    async def arelease(self, reservation_id: str) -> bool:
        return await self.asettle(SettleOp(reservation_id, None))

    async def asettle(self, op: SettleOp) -> bool:
        return bool(await self.put_settle(op))

    def put_settle(self, op: SettleOp) -> asyncio.Future[Reservation | Denied | bool]:
        """``asettle`` without the coroutine: the group commit's own future (its result is truthy when the op moved
        the row). A caller that shields the write or adds callbacks to it then needs no Task around a coroutine."""
        return self._group().put(op)

    def settle_in(self, conn: sa.Connection, ops: Sequence[SettleOp]) -> list[bool]:
        """Settle in a write transaction the caller holds on this ledger's database (the audit writer's, so a
        request's record and its commit are one write). Same rules as ``commit`` and ``release``."""
        results: list[Reservation | Denied | bool | None] = [None] * len(ops)
        deltas: dict[TotalsKey, list[float]] = {}
        self._settle(conn, list(enumerate(ops)), results, deltas)
        self._apply_totals(conn, deltas)
        return [r is True for r in results]

    async def aexpire(self, older_than: timedelta, now: datetime | None = None) -> int:
        return await asyncio.to_thread(self.expire, older_than, now)

    @property
    def batches(self) -> int:
        """Transactions the group-commit thread applied; fewer than async ops when batching works."""
        return self._committer.batches if self._committer is not None else 0

    def _group(self) -> GroupCommitter[LedgerOp, Reservation | Denied | bool]:
        """The group-commit thread, started by the first async write (sync users never need one)."""
        with self._group_lock:
            if self._committer is None:
                self._committer = GroupCommitter(self.apply, name="pilothouse-ledger-writer")
            return self._committer

    # -- internals ---------------------------------------------------------------------------------

    @contextmanager
    def _write(self, policies: Sequence[tuple[str, str]] = ()) -> Iterator[sa.Connection]:
        """A write transaction, serialized per policy (PostgreSQL) or per database (SQLite).

        PostgreSQL: the policies' advisory locks are taken first and in sorted order, before any row
        lock, so two gateways' batches can wait for each other but never deadlock.
        """
        with stores.begin_write(self._writer) as conn:
            if self.backend == "postgresql":
                for namespace, policy in policies:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(CAST(:namespace AS text) || '/' || "
                                         "CAST(:policy AS text)))"), {"namespace": namespace, "policy": policy})
            yield conn

    def _settle(self, conn: sa.Connection, settles: Sequence[tuple[int, SettleOp]],
                results: list[Reservation | Denied | bool | None], deltas: dict[TotalsKey, list[float]]) -> None:
        """Commit or release ``reserved`` rows; a row already settled (or unknown) gives False."""
        ids = sorted({op.reservation_id for _, op in settles})
        # SQLite: the write lock is held already
        rows = {row.id: row for row in _rows_by_id(conn, ids, lock=self.backend == "postgresql")}
        states = {rid: row.state for rid, row in rows.items()}
        held = {rid: (row.cost_usd, row.tokens) for rid, row in rows.items()}  # a lease's shrinks as it is charged
        updates: list[dict[str, Any]] = []
        lease_updates: dict[str, dict[str, Any]] = {}
        charged: list[dict[str, Any]] = []
        # A lease's charges, most of a budgeted batch, all fall in the lease's windows: summed here and counted
        # once per lease, not twice per request (those two window updates were ~5% of a budgeted batch's CPU).
        # [committed USD, committed tokens, reserved USD, reserved tokens] by (namespace, policy, created_at)
        lease_sums: defaultdict[tuple[str, str, datetime], list[float]] = defaultdict(lambda: [0.0, 0, 0.0, 0])
        for i, op in settles:
            rid = op.reservation_id
            row = rows.get(rid)
            results[i] = False
            if op.lease is not None:
                results[i] = True
                if op.actual is None:
                    continue  # a request admitted from a lease that used nothing: the lease keeps its headroom
                cost, tokens = op.actual
                charge = op.lease
                charged.append({"id": charge.row_id, "namespace": charge.namespace, "policy": charge.policy,
                                "state": COMMITTED, "cost_usd": cost, "tokens": tokens,
                                "created_at": charge.created_at})
                sums = lease_sums[(charge.namespace, charge.policy, charge.created_at)]
                sums[0] += cost
                sums[1] += tokens
                if row is not None and states[rid] == RESERVED:  # else the lease was released or expired already
                    left_cost, left_tokens = held[rid]
                    taken = (min(cost, left_cost), min(tokens, left_tokens))
                    held[rid] = (left_cost - taken[0], left_tokens - taken[1])
                    lease_updates[rid] = {"rid": rid, "new_state": RESERVED, "new_cost": held[rid][0],
                                          "new_tokens": held[rid][1]}  # one UPDATE per lease: its last value
                    sums = lease_sums[(row.namespace, row.policy, _stored(row.created_at))]
                    sums[2] -= taken[0]
                    sums[3] -= taken[1]
                continue
            if row is None or states[rid] != RESERVED:
                if op.actual is not None:
                    log.info("commit of %s reservation %s ignored", states.get(rid, "unknown"), rid)
                continue
            lease_updates.pop(rid, None)  # a lease released in this batch: its final state is this op's
            reserved_cost, reserved_tokens = held[rid]
            cost, tokens = op.actual if op.actual is not None else (reserved_cost, reserved_tokens)
            if op.actual is not None and (cost > reserved_cost + USD_EPSILON or tokens > reserved_tokens):
                log.warning("reservation %s committed above its worst case: %s USD / %s tokens > %s USD / %s tokens",
                            rid, cost, tokens, reserved_cost, reserved_tokens)
            states[rid] = COMMITTED if op.actual is not None else RELEASED
            updates.append({"rid": rid, "new_state": states[rid], "new_cost": cost, "new_tokens": tokens})
            committed = (cost, tokens) if op.actual is not None else (0.0, 0)
            _add(deltas, row.namespace, row.policy, _stored(row.created_at), committed=committed,
                 reserved=(-reserved_cost, -reserved_tokens))
            results[i] = True
        for (namespace, policy, at), (cost, tokens, held_cost, held_tokens) in lease_sums.items():
            _add(deltas, namespace, policy, at, committed=(cost, int(tokens)), reserved=(held_cost, int(held_tokens)))
        _SQL_INSERT_CHARGE.execute(conn, charged)
        # The rows are locked (FOR UPDATE, or SQLite's write lock): their state was read under it.
        _SQL_SETTLE.execute(conn, [*updates, *lease_updates.values()])

    def _reserve(self, conn: sa.Connection, reserves: Sequence[tuple[int, ReserveOp]],
                 results: list[Reservation | Denied | bool | None], deltas: dict[TotalsKey, list[float]]) -> None:
        """Admit in order against the stored totals plus this batch's own changes to them."""
        rids = [reservation_id(op.request_id, op.policy) for _, op in reserves]
        held: dict[str, Reservation] = {row.id: Reservation(row.id, row.namespace, row.policy, row.cost_usd,
                                                           row.tokens, _stored(row.created_at), replayed=True)
                                        for row in _rows_by_id(conn, rids)}
        stored = self._load_totals(conn, {key for _, op in reserves for key in op.limit_keys()})
        inserts: list[dict[str, Any]] = []
        for (i, op), rid in zip(reserves, rids, strict=True):
            if rid in held:
                log.info("reservation %s exists; not reserving twice", rid)
                results[i] = replace(held[rid], replayed=True)
                continue
            sums = [[a + b for a, b in zip(stored.get(key, _ZERO), deltas.get(key, _ZERO), strict=True)]
                    for key in op.limit_keys()]
            if (denied := op.window_denial(sums)) is not None:
                results[i] = denied
                continue
            inserts.append({"id": rid, "namespace": op.namespace, "policy": op.policy, "state": RESERVED,
                            "cost_usd": op.worst_cost_usd, "tokens": op.worst_tokens, "created_at": op.at})
            _add(deltas, op.namespace, op.policy, op.at, reserved=(op.worst_cost_usd, op.worst_tokens))
            results[i] = held[rid] = Reservation(rid, op.namespace, op.policy, op.worst_cost_usd, op.worst_tokens,
                                                 op.at)
        _SQL_INSERT.execute(conn, inserts)

    @staticmethod
    def _load_totals(conn: sa.Connection, keys: set[TotalsKey]) -> dict[TotalsKey, tuple[float, ...]]:
        """The stored totals rows of ``keys``: one query per policy of the batch (usually one)."""
        starts: dict[tuple[str, str], set[datetime]] = {}
        for namespace, policy, _, start in keys:
            starts.setdefault((namespace, policy), set()).add(start)
        found: dict[TotalsKey, tuple[float, ...]] = {}
        for (namespace, policy), when in sorted(starts.items()):
            for row in conn.execute(_SQL_TOTALS, {"namespace": namespace, "policy": policy, "starts": sorted(when)}):
                found[(namespace, policy, row[0], _stored(row[1]))] = tuple(row[2:])
        return found

    @staticmethod
    def _apply_totals(conn: sa.Connection, deltas: dict[TotalsKey, list[float]]) -> None:
        """Add the batch's changes to the running totals, in key order (PostgreSQL row locks alike everywhere)."""
        _SQL_ADD_TOTALS.execute(conn, [
            {"namespace": namespace, "policy": policy, "window": window, "window_start": start,
             "cu": cu, "ct": int(ct), "ru": ru, "rt": int(rt)}
            for (namespace, policy, window, start), (cu, ct, ru, rt) in sorted(deltas.items())])

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
