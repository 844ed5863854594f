"""The kopf operator: thin handlers that load an object, run its reconciler, and do the I/O.

Per kind: create/update/resume reconcile at once; a timer re-checks health, so degraded mode
needs no human. Dependency kinds also have a watch-event hook: when a ModelDeployment,
VectorIndex or BudgetPolicy changes phase, every workflow in its namespace is recompiled at once
instead of at its next timer tick.

Finalizers: only VectorIndex has an explicit delete handler (reclaimPolicy: Delete must drop
Milvus collections). Timers make kopf add its finalizer to every kind, so while the operator is
down deletions of Pilothouse objects wait; remove ``pilothouse.io/finalizer`` by hand to force one.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import kopf
import lightkube
from lightkube.core.exceptions import ApiError
from pydantic import ValidationError

from . import budget_policy, conditions, model_deployment, vector_index, workflow
from .api import GROUP, VERSION, AutonomousWorkflow, BudgetPolicy, ModelDeployment, Resource, VectorIndex
from .budget import SqlSpendReader
from .conditions import Observation
from .env import Outcome, status_doc
from .health import EndpointProber
from .k8s import ClusterEnv, parse
from .manifests import describe
from .render_gateway import GATEWAY_IMAGE
from .slo import SloReader

log = logging.getLogger("pilothouse.operator")
K = TypeVar("K")  # the key of a task that runs once at a time (a namespace, an object)
FINALIZER = "pilothouse.io/finalizer"
API_RETRY_S = 2.0


@dataclass
class OperatorConfig:
    milvus_uri: str | None = None
    store_url: str = "sqlite:///pilothouse.db"
    health_interval: float = 10.0
    # Workflows recompile on dependency events; their timer is only a safety-net resync.
    resync_interval: float = 300.0
    gateway_image: str = GATEWAY_IMAGE
    # kopf runs one worker per object; without a cap, 1000 objects created at once mean 1000
    # concurrent probes and API calls, connection-pool timeouts and a retry storm.
    max_concurrent_reconciles: int = 32


@dataclass
class Runtime:
    """Per-process state: the Env, a lock per object, and what was last applied."""

    config: OperatorConfig
    env: ClusterEnv | None = None
    locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)
    applied: dict[tuple[str, str, str], str] = field(default_factory=dict)
    phases: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    refreshing: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    checking: dict[tuple[str, str, str], asyncio.Task[None]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    slots: asyncio.Semaphore | None = None

    def lock(self, key: tuple[str, str, str]) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def slot(self) -> asyncio.Semaphore:
        if self.slots is None:  # created lazily: it must belong to the operator's event loop
            self.slots = asyncio.Semaphore(self.config.max_concurrent_reconciles)
        return self.slots


def _key(kind: type[Resource], body: kopf.Body | dict[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return kind.KIND, meta.get("namespace", "default"), meta["name"]


def _raw(body: kopf.Body | dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(body)))


async def _reconcile_workflow(wf: AutonomousWorkflow, env: ClusterEnv, config: OperatorConfig) -> Outcome:
    return await workflow.reconcile(wf, env, gateway_image=config.gateway_image, in_cluster=True)


def _reconciler(kind: type[Resource], config: OperatorConfig) -> Callable[[Any, ClusterEnv], Awaitable[Outcome]]:
    if kind is AutonomousWorkflow:
        return lambda obj, env: _reconcile_workflow(obj, env, config)
    return {ModelDeployment: model_deployment.reconcile, VectorIndex: vector_index.reconcile,
            BudgetPolicy: budget_policy.reconcile}[kind]  # type: ignore[return-value]


async def sync(kind: type[Resource], body: kopf.Body | dict[str, Any], rt: Runtime, *, force_apply: bool) -> None:
    """Reconcile one object: status, events on transitions, children. Never raises for bad specs."""
    env = rt.env
    if env is None:
        return  # shutting down
    key = _key(kind, body)
    raw = _raw(body)
    old_status = raw.get("status") or {}
    generation = raw["metadata"].get("generation")
    async with rt.lock(key), rt.slot():
        try:
            obj = parse(kind, raw)
        except ValidationError as exc:
            message = "; ".join(describe(exc))
            outcome = Outcome(phase="Failed", observations=[
                Observation("Ready", False, "InvalidSpec", f"{message} — fix the spec and re-apply")])
            await _write_status(kind, body, env, outcome, old_status, generation)
            raise kopf.PermanentError(f"InvalidSpec: {message}") from None
        try:
            outcome = await _reconciler(kind, rt.config)(obj, env)
            for child in outcome.children:
                kopf.append_owner_reference(child, owner=body)
                child_key = (child["kind"], child["metadata"]["namespace"], child["metadata"]["name"])
                digest = hashlib.sha256(json.dumps(child, sort_keys=True).encode()).hexdigest()
                if force_apply or rt.applied.get(child_key) != digest:
                    await env.apply(child)
                    rt.applied[child_key] = digest
            await _write_status(kind, body, env, outcome, old_status, generation)
        except ApiError as exc:
            # A conflict, a vanished object or an overloaded API server passes: retry in seconds, not after
            # kopf's default backoff for unexpected errors (60 s), which also stalls the health timer.
            code = exc.status.code or 0
            if code not in (404, 409, 429) and code < 500:
                raise
            raise kopf.TemporaryError(f"the API server answered {code} ({exc.status.message}); retrying",
                                      delay=API_RETRY_S) from exc
        except httpx2.TransportError as exc:
            # lightkube's client (httpx2): a keep-alive connection the API server closed, a reset under load,
            # a server restarting. As transient as a 5xx, and as quick to retry.
            raise kopf.TemporaryError(f"the API server connection failed ({exc!r}); retrying",
                                      delay=API_RETRY_S) from exc
        for reason, message in outcome.events:
            kopf.info(body, reason=reason, message=message)
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(_summary(outcome), delay=outcome.retry_after)


def _summary(outcome: Outcome) -> str:
    return next((f"{o.reason}: {o.message}" for o in outcome.observations if o.type == "Ready"), "retry")


async def _write_status(kind: type[Resource], body: kopf.Body | dict[str, Any], env: ClusterEnv, outcome: Outcome,
                        old_status: dict[str, Any], generation: int | None) -> None:
    new = status_doc(outcome, old_status, generation)
    if new == old_status:
        return
    _, namespace, name = _key(kind, body)
    await env.patch_status(kind, namespace, name, new)
    for cond in conditions.transitions(old_status.get("conditions", []), new["conditions"]):
        bad = (cond["type"] == "Ready") == (cond["status"] != "True")
        kopf.event(body, type="Warning" if bad else "Normal", reason=cond["reason"],
                   message=f"{cond['type']}={cond['status']}: {cond['message']}"[:1000])


def _start_once(tasks: dict[K, asyncio.Task[None]], key: K, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``start()`` as the task of ``key`` unless that key's task is still running; a finished task leaves."""
    running = tasks.get(key)
    if running is not None and not running.done():
        return
    task = tasks[key] = asyncio.create_task(start())
    task.add_done_callback(lambda done: tasks.pop(key, None) if tasks.get(key) is done else None)


def request_refresh(namespace: str, rt: Runtime) -> None:
    """Coalesce recompiles: a burst of N dependency changes costs one or two passes, not N."""
    rt.dirty.add(namespace)
    _start_once(rt.refreshing, namespace, lambda: _refresh_loop(namespace, rt))


async def _refresh_loop(namespace: str, rt: Runtime) -> None:
    while namespace in rt.dirty:
        rt.dirty.discard(namespace)
        try:
            complete = await refresh_workflows(namespace, rt)
        except Exception:  # a failed pass must not kill the loop
            log.exception("recompiling workflows in %s failed; retrying in %g s", namespace, API_RETRY_S)
            complete = False
        if not complete and rt.env is not None:
            # Nothing else would redo it before the workflows' resync (minutes): their tables stay stale.
            rt.dirty.add(namespace)
            await asyncio.sleep(API_RETRY_S)


async def refresh_workflows(namespace: str, rt: Runtime) -> bool:
    """Recompile every workflow of a namespace (a dependency changed health); False when the API server
    refused a write and the pass must be repeated."""
    if rt.env is None:
        return True
    # All at once, as many in flight as the reconcile slots allow. One after another, each workflow's API calls (read
    # its table, write it, write its status) waited on the previous workflow's, and on a slot among the models'
    # health checks: 4.2 s for 200 workflows against 1.5 s at once (bench/reconcile_scale.py, on the emulator).
    outcomes = await asyncio.gather(*(sync(AutonomousWorkflow, raw, rt, force_apply=False)
                                      for raw in await rt.env.list_raw(AutonomousWorkflow, namespace)),
                                    return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, kopf.TemporaryError):  # a wait (retry_after) is its handlers' to retry; API errors ours
            if isinstance(outcome.__cause__, ApiError | httpx2.TransportError):
                return False
        elif isinstance(outcome, BaseException) and not isinstance(outcome, kopf.PermanentError):
            raise outcome  # InvalidSpec (PermanentError) is its own handlers' to report; anything else is a bug
    return True


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    """Attach all handlers to a registry (the CLI uses kopf's default one, tests a fresh one)."""

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In-cluster service account first, then KUBECONFIG / ~/.kube/config (a fresh registry has none)."""
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)
        client = lightkube.AsyncClient(field_manager="pilothouse")  # in-cluster, else $KUBECONFIG
        rt.env = ClusterEnv(client, EndpointProber(), SqlSpendReader(rt.config.store_url), rt.config.milvus_uri,
                            SloReader(rt.config.store_url))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        env, rt.env = rt.env, None  # timers still finishing see no env and stand down
        for task in [*rt.refreshing.values(), *rt.checking.values()]:
            task.cancel()
        if env is not None:
            await env.prober.aclose()
            await env.client.close()

    @kopf.on.probe(registry=registry, id="reconciled")
    def probe(**_: Any) -> int:
        return len(rt.applied)

    for kind in (ModelDeployment, VectorIndex, BudgetPolicy, AutonomousWorkflow):
        _register_kind(registry, rt, kind)

    @kopf.on.delete(GROUP, VERSION, VectorIndex.PLURAL, registry=registry, id="reclaim")
    async def reclaim(body: kopf.Body, **_: Any) -> None:
        from .milvus import MilvusUnreachable

        assert rt.env is not None
        try:
            vi = parse(VectorIndex, _raw(body))
        except ValidationError:
            return  # never reconciled, nothing to reclaim
        try:
            message = await vector_index.finalize(vi, rt.env)
        except MilvusUnreachable as exc:
            raise kopf.TemporaryError(f"{exc}; the finalizer waits for Milvus", delay=15) from exc
        kopf.info(body, reason="Reclaimed", message=message)

    for kind in (ModelDeployment, VectorIndex, BudgetPolicy):
        _register_dependency_watch(registry, rt, kind)


def _register_kind(registry: kopf.OperatorRegistry, rt: Runtime, kind: type[Resource]) -> None:
    args = (GROUP, VERSION, kind.PLURAL)

    @kopf.on.resume(*args, registry=registry, id="reconcile")
    @kopf.on.create(*args, registry=registry, id="reconcile")
    @kopf.on.update(*args, registry=registry, id="reconcile")
    async def reconcile(body: kopf.Body, retry: int, **_: Any) -> None:
        # The first attempt re-applies every child (drift since the last pass is corrected); a retry (after an
        # API error or a wait) applies only what has changed or not landed since, so a flaky API server sees
        # one write per child, not all of them again on each attempt, and each attempt makes progress.
        await sync(kind, body, rt, force_apply=retry == 0)

    interval = rt.config.resync_interval if kind is AutonomousWorkflow else rt.config.health_interval

    @kopf.on.timer(*args, registry=registry, id="health", interval=interval, initial_delay=interval)
    async def health(body: kopf.Body, **_: Any) -> None:
        if rt.env is not None:
            start_check(kind, body, rt)


def start_check(kind: type[Resource], body: kopf.Body | dict[str, Any], rt: Runtime) -> None:
    """Start a health check of one object unless its previous one is still running, and return at once.

    kopf holds an object's deletion (its finalizer) until the object's timers return, and never cancels
    a timer: a check waiting on a dependency that does not answer (a Milvus call, the object's lock held
    by a slow reconcile) would keep a deleted object forever. So the timer only starts the check, and
    a slow dependency costs one check per object, not one per tick.
    """
    _start_once(rt.checking, _key(kind, body), lambda: _check(kind, body, rt))


async def _check(kind: type[Resource], body: kopf.Body | dict[str, Any], rt: Runtime) -> None:
    try:
        await sync(kind, body, rt, force_apply=False)
    except (kopf.PermanentError, kopf.TemporaryError):
        pass  # InvalidSpec is already in the status; anything temporary is retried by the next tick
    except Exception:  # the next tick is the retry; a failed check must not end the timer's checks
        log.exception("health check of %s %s/%s failed; the next tick retries", *_key(kind, body))


def _register_dependency_watch(registry: kopf.OperatorRegistry, rt: Runtime, kind: type[Resource]) -> None:
    @kopf.on.event(GROUP, VERSION, kind.PLURAL, registry=registry, id="dependents")
    async def changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        if rt.env is not None:
            rt.env.observe(kind, _raw(body), deleted=type == "DELETED")
        key = _key(kind, body)
        phase = None if type == "DELETED" else (body.get("status") or {}).get("phase")
        if rt.phases.get(key, "<unseen>") == phase:
            return
        first = key not in rt.phases
        rt.phases[key] = phase
        if not first and rt.env is not None:
            request_refresh(key[1], rt)


class EndlessBackoffs:
    """kopf's retry delays for its own API requests: 1, 2, 5, 10 s, then every 30 s until the server answers.

    With a finite list kopf gives up on a request after the last delay, and when that request was the
    patch removing a finalizer, nothing retries it: the deletion has no further event, so the object
    hangs with its finalizer (the operator chaos drill saw six 500s in a row do that). Controllers built
    on client-go requeue such writes for as long as it takes; so does this, logging every failed attempt.
    Not Sized, so kopf counts attempts without a total; a fresh iterator per request.
    """

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1.0, 2.0, 5.0, 10.0), itertools.repeat(30.0))


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for long-lived, well-behaved operation (DESIGN.md §9 pitfalls)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pilothouse.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="pilothouse.io")
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.inactivity_timeout = 600  # watch streams go quiet behind load balancers
    settings.watching.reconnect_backoff = 1.0
    settings.networking.error_backoffs = EndlessBackoffs()
    settings.queueing.error_delays = [1, 2, 5, 10, 30, 60]
    settings.posting.level = logging.INFO


async def run(*, namespaces: list[str], milvus_uri: str | None, store_url: str, liveness: str,
              verbose: bool) -> None:
    """Entry point of `pilothouse operator`."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not verbose:
        for noisy in ("httpx", "httpx2", "pymilvus"):  # one line per API call drowns what matters
            logging.getLogger(noisy).setLevel(logging.WARNING)
    registry = kopf.OperatorRegistry()
    # Health-timer period in seconds; no CLI flag on purpose (benchmarks and tests tune it).
    interval = float(os.environ.get("PILOTHOUSE_HEALTH_INTERVAL") or 10.0)
    register(registry, Runtime(OperatorConfig(milvus_uri=milvus_uri, store_url=store_url,
                                              health_interval=interval)))
    await kopf.operator(registry=registry, clusterwide=not namespaces, namespaces=namespaces,
                        liveness_endpoint=liveness, standalone=True)
