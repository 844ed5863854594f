"""The act step's side effects: a webhook or a SQL write, at most once per idempotency key, and their undo.

Webhook: the validated fields are POSTed (or PUT, ...) as JSON with an ``Idempotency-Key`` header. At most
once across retries and restarts is a contract with the receiver: the runtime sends a key at most once
per outcome it knows of, but after a crash between "sent" and "recorded" it cannot know whether the
receiver acted, so it sends again with the same key, and the receiver must answer a known key with its
first outcome instead of acting again (the header's contract, as Stripe and the IETF draft define it).
A timeout or a 5xx may have had effects (``ActionFailed.maybe_applied``): the runtime compensates.

SQL write: the runtime owns both sides, so at most once is enforced here. The key is inserted into
``pilothouse_action_keys`` in the target database in the SAME transaction as the statement: either both
commit or neither does, and a replay finds the key and skips the statement. Parameters are bound (never
formatted into the SQL): the validated fields by name, plus ``:idempotency_key``, ``:run_id`` and
``:workflow``. ``setup`` statements (idempotent DDL) run once per database before its first write.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from pilothouse.operator.api.workflow import Action, SqlWrite, Webhook

from . import stores

IDEMPOTENCY_HEADER = "Idempotency-Key"
UNDO_SUFFIX = "#undo"
"""A compensation is itself an action with a key of its own (``<key>#undo``), so it too happens at most once."""

_keys_metadata = sa.MetaData()
action_keys = sa.Table(
    "pilothouse_action_keys",
    _keys_metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("done_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class ActionResult:
    kind: str  # webhook | sql
    key: str
    status: int | str  # HTTP status, or "written" / "replayed" for SQL
    replayed: bool = False


class ActionFailed(Exception):
    """The action did not succeed. ``maybe_applied``: it may still have had an effect (timeout, 5xx)."""

    def __init__(self, message: str, *, kind: str, maybe_applied: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.maybe_applied, self.status = kind, maybe_applied, status


def _params(fields: Mapping[str, Any], key: str, run_id: str, workflow: str) -> dict[str, Any]:
    values = {name: json.dumps(v) if isinstance(v, dict | list) else v for name, v in fields.items()}
    return {**values, "idempotency_key": key, "run_id": run_id, "workflow": workflow}


class Actions:
    """Performs actions; owns an HTTP client and one engine per target database URL."""

    def __init__(self, client: httpx.AsyncClient | None = None, env: Mapping[str, str] | None = None) -> None:
        self._client = client
        self._own_client = client is None
        self._env = os.environ if env is None else env
        self._engines: dict[str, sa.Engine] = {}
        self._setup_done: set[tuple[str, tuple[str, ...]]] = set()

    async def aclose(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    async def perform(self, action: Action, *, key: str, fields: Mapping[str, Any], run_id: str,
                      workflow: str, undo: bool = False) -> ActionResult:
        """Do ``action`` once for ``key``; raises ActionFailed. ``undo``: ``action`` is the compensation of
        the action sent with ``key``: it is sent with the key ``<key>#undo`` and still binds ``key``."""
        if action.webhook is not None:
            return await self._webhook(action.webhook, key, fields, run_id, workflow, undo)
        assert action.sql is not None
        return await asyncio.to_thread(self._sql, action.sql, key, fields, run_id, workflow, undo)

    # -- webhook -------------------------------------------------------------------------------------
    def _headers(self, hook: Webhook, key: str) -> dict[str, str]:
        headers = {IDEMPOTENCY_HEADER: key}
        ref = hook.headers_secret_ref
        if ref is not None:
            raw = self._env.get(ref.env_var)
            if raw is None:
                raise ActionFailed(f"webhook.headersSecretRef: environment variable {ref.env_var} is not set",
                                   kind="webhook", maybe_applied=False)
            try:
                extra = json.loads(raw)
                assert isinstance(extra, dict)
            except (ValueError, AssertionError):
                raise ActionFailed(f"webhook.headersSecretRef: {ref.env_var} must hold a JSON object of headers",
                                   kind="webhook", maybe_applied=False) from None
            headers.update({str(k): str(v) for k, v in extra.items()})
        return headers

    async def _webhook(self, hook: Webhook, key: str, fields: Mapping[str, Any], run_id: str, workflow: str,
                       undo: bool) -> ActionResult:
        if self._client is None:
            self._client = httpx.AsyncClient()
        body = {"run_id": run_id, "workflow": workflow, "idempotency_key": key, "fields": dict(fields),
                "compensates": key if undo else None}
        sent_key = key + UNDO_SUFFIX if undo else key
        try:
            response = await self._client.request(hook.method, hook.url, json=body,
                                                  headers=self._headers(hook, sent_key),
                                                  timeout=hook.timeout_seconds)
        except httpx.TimeoutException:
            raise ActionFailed(f"webhook {hook.method} {hook.url} timed out after {hook.timeout_seconds:g} s",
                               kind="webhook", maybe_applied=True) from None
        except httpx.HTTPError as exc:
            # Refused before anything was sent cannot have acted; a connection lost mid-request may have.
            maybe = not isinstance(exc, httpx.ConnectError)
            raise ActionFailed(f"webhook {hook.method} {hook.url} failed: {type(exc).__name__}: {exc}",
                               kind="webhook", maybe_applied=maybe) from None
        if response.is_success:
            return ActionResult("webhook", sent_key, response.status_code)
        raise ActionFailed(f"webhook {hook.method} {hook.url} answered {response.status_code}: "
                           f"{response.text[:200]}", kind="webhook", maybe_applied=response.status_code >= 500,
                           status=response.status_code)

    # -- SQL -----------------------------------------------------------------------------------------
    def _engine(self, write: SqlWrite) -> sa.Engine:
        url = write.url
        if write.url_secret_ref is not None:
            url = self._env.get(write.url_secret_ref.env_var)
            if not url:
                raise ActionFailed(f"sql.urlSecretRef: environment variable {write.url_secret_ref.env_var} is not "
                                   "set", kind="sql", maybe_applied=False)
        if not url:
            raise ActionFailed("sql: set url or urlSecretRef", kind="sql", maybe_applied=False)
        engine = self._engines.get(url)
        if engine is None:
            try:
                engine, _ = stores.open_engine(url, purpose="act step sql", busy_timeout_s=30.0, synchronous="FULL")
            except (ValueError, sa.exc.ArgumentError) as exc:
                raise ActionFailed(f"sql.url {url!r}: {exc}", kind="sql", maybe_applied=False) from None
            _keys_metadata.create_all(stores.writer(engine))  # IMMEDIATE: see stores.writer
            self._engines[url] = engine
        done = (url, tuple(write.setup))
        if write.setup and done not in self._setup_done:
            with stores.writer(engine).begin() as conn:
                for ddl in write.setup:
                    conn.execute(sa.text(ddl))
            self._setup_done.add(done)
        return engine

    def _sql(self, write: SqlWrite, key: str, fields: Mapping[str, Any], run_id: str, workflow: str,
             undo: bool) -> ActionResult:
        try:
            return self._write(write, key, fields, run_id, workflow, undo)
        except sa.exc.StatementError as exc:  # the transaction rolled back: key and statement both undone
            detail = str(exc.orig if exc.orig is not None else exc).splitlines()[0]
            raise ActionFailed(f"sql statement failed (rolled back, nothing written): {detail}", kind="sql",
                               maybe_applied=False) from None

    @stores.retry_when_locked
    def _write(self, write: SqlWrite, key: str, fields: Mapping[str, Any], run_id: str, workflow: str,
               undo: bool) -> ActionResult:
        engine = self._engine(write)
        dialect = sqlite if engine.dialect.name == "sqlite" else postgresql
        claimed = key + UNDO_SUFFIX if undo else key
        claim = (dialect.insert(action_keys).values(key=claimed, done_at=datetime.now(UTC))
                 .on_conflict_do_nothing().returning(action_keys.c.key))
        with stores.writer(engine).begin() as conn:
            if conn.execute(claim).first() is None:  # the key was there: done before
                return ActionResult("sql", claimed, "replayed", replayed=True)
            conn.execute(sa.text(write.statement), _params(fields, key, run_id, workflow))
        return ActionResult("sql", claimed, "written")
