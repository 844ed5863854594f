"""kmock's KubernetesEmulator, completed where kopf depends on real API-server behaviour.

kmock 0.8 stores objects and serves watches, but (DESIGN.md §9) it does not generate uid,
resourceVersion, generation or names from generateName, answers JSON-patch test failures with 500
(a real server: 422), sends error bodies as ``application/json; charset=utf-8`` (lightkube only
raises ApiError on exactly ``application/json``), replays every object on watch whatever
resourceVersion is asked, snapshots before subscribing (events written in between are lost), and
marks an object with finalizers for deletion without a new resourceVersion (a watch resumed after that
event never sees it, and kopf never finalizes the object), and sends a deletion with the version of the
object's last update and keeps no record of it (a watch resumed after the deletion never hears of it).
Like a real API server, the record of deletions is a window (``WATCH_HISTORY`` per resource): a watch resumed
from before it is answered 410 Gone ("too old resource version"), and kopf lists again.
Each of those makes kopf misbehave in ways a real cluster never would; this subclass fixes them.
It also forgets each request once served: kmock keeps every request and walks that log to route
the next one (O(requests²) per run), which made the emulator, not the operator, the bottleneck
beyond a few thousand calls. Nothing here asserts on the request log. And it finds the object a
request names by its key, as an API server does, where kmock compares the request with every stored
object: with 1000 ModelDeployments, 200 workflows and their Events, that scan was 60% of the emulator's CPU.
"""

from __future__ import annotations

import datetime
import secrets
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import aiobus

from pilothouse.operator.api import GROUP, KINDS, VERSION

VERBS = {"list", "watch", "get", "create", "patch", "delete"}
WATCH_HISTORY = 1000
"""Deletions kept per resource for resumed watches: without a bound, every deletion of a long run stayed in memory."""


def _version(raw: dict[str, Any]) -> int:
    return int(raw.get("metadata", {}).get("resourceVersion") or 0)


@attrs.mutable(weakref_slot=True)
class _DeletionBus(aiobus.Bus[Any]):
    """One resource's event bus; every DELETED event put on it goes through ``on_delete`` first."""

    on_delete: Callable[[dict[str, Any]], dict[str, Any]] = attrs.field(kw_only=True)

    async def put(self, item: Any) -> None:
        await super().put(self.on_delete(item) if item.get("type") == "DELETED" else item)


class _Buses(dict[Any, aiobus.Bus[Any]]):
    def __init__(self, on_delete: Callable[[Any, dict[str, Any]], dict[str, Any]]) -> None:
        super().__init__()
        self.on_delete = on_delete

    def __missing__(self, resource: Any) -> aiobus.Bus[Any]:
        bus = self[resource] = _DeletionBus(on_delete=lambda event: self.on_delete(resource, event))
        return bus


class Emulator(kmock.KubernetesEmulator):
    _rv = [1000]
    served = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = _Buses(self._deleted)
        self.watch_history = WATCH_HISTORY
        self.tombstones: defaultdict[Any, deque[dict[str, Any]]] = defaultdict(
            lambda: deque(maxlen=self.watch_history))
        """The last ``watch_history`` deleted objects as their DELETED events carried them, per resource."""
        self._compacted: dict[Any, int] = {}
        """Per resource, the resourceVersion of the last deletion that left the window: history up to it is gone."""

    def declare_kinds(self) -> None:
        """Built-in kinds, the Pilothouse CRDs and KubeRay's RayService (kopf waits for what is undeclared)."""
        self.resources.load_bundled()
        for kind in KINDS:
            self.resources[f"{GROUP}/{VERSION}/{kind.PLURAL}"] = kmock.ResourceInfo(
                kind=kind.KIND, singular=kind.KIND.lower(), namespaced=True, verbs=VERBS,
                subresources={"status"}, shortnames=kind.SHORT_NAMES, categories=["pilothouse"])
        self.resources["ray.io/v1/rayservices"] = kmock.ResourceInfo(
            kind="RayService", singular="rayservice", namespaced=True, verbs=VERBS, subresources={"status"})

    def _next_rv(self) -> str:
        self._rv[0] += 1
        return str(self._rv[0])

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = self._generate_name(request.resource, request.namespace or meta.get("namespace"),
                                                   meta["generateName"])
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = self._next_rv()
        elif request.resource is not None and request.action == kmock.action.UPDATE:
            key = (request.resource, request.namespace, request.name)
            current = self._objects[key] if key in self._objects else None  # noqa: SIM401 (no .get on kmock views)
            generation = (current.get("metadata", {}).get("generation") or 0) if current is not None else 0
            rv = self._next_rv()
            if isinstance(data, dict):
                meta = data.get("metadata") or {}
                data["metadata"] = meta
                meta["resourceVersion"] = rv
                if "spec" in data and request.subresource != "status":
                    meta["generation"] = generation + 1
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
                if request.subresource != "status" and any(str(op.get("path", "")).startswith("/spec") for op in data):
                    data.append({"op": "add", "path": "/metadata/generation", "value": generation + 1})
        elif request.resource is not None and request.action == kmock.action.DELETE and request.name is not None:
            await self._mark_for_deletion((request.resource, request.namespace, request.name))
        try:
            return await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
        finally:
            self.served += 1
            self._requests[:] = [r for r in self._requests if r is not request]
            for payload in self._payloads:
                if len(payload._requests) > 64:
                    del payload._requests[:]

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[Any]:
        """kmock's private lookup (its ``__get_objs``), by key when the request names one object in its namespace:
        a fetch, a patch, a delete, a create's answer. Listings and cluster-wide requests scan, as kmock does."""
        if not strict or request.name is None:
            return super()._KubernetesEmulator__get_objs(request, strict)  # type: ignore[misc]
        key = (request.resource, request.namespace, request.name)
        return [self._objects[key]] if key in self._objects else []

    def _generate_name(self, resource: Any, namespace: str | None, prefix: str) -> str:
        """A name from ``generateName`` that no live object has: API servers since Kubernetes 1.31 retry on a
        collision rather than answer 409 (six hex digits collided about once per few thousand kopf Events)."""
        while True:
            name = prefix + secrets.token_hex(3)
            key = (resource, namespace, name)
            if key not in self._objects or self._objects[key].deleted:
                return name

    async def _mark_for_deletion(self, key: tuple[Any, str | None, str]) -> None:
        """kmock's own marking, with the new resourceVersion a real API server gives it, in one lock hold;
        kmock then finds the object marked and only answers the DELETE."""
        async with self._lock:
            found = self._objects[key] if key in self._objects else None  # noqa: SIM401 (no .get on kmock views)
            if found is None or found.deleted:
                return
            meta = found.get("metadata", {})
            if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                found.patch({"metadata": {"deletionTimestamp": datetime.datetime.now(datetime.UTC).isoformat(),
                                          "resourceVersion": self._next_rv()}})
                await self._buses[key[0]].put({"type": "MODIFIED", "object": found.raw})

    def _deleted(self, resource: Any, event: dict[str, Any]) -> dict[str, Any]:
        """A deletion, as a real API server records it: a resourceVersion of its own, kept for resumed watches.
        kmock publishes it under its lock, so a watch's snapshot sees the tombstone and the event together."""
        raw = event["object"]
        stamped = {**raw, "metadata": {**raw.get("metadata", {}), "resourceVersion": self._next_rv()}}
        history = self.tombstones[resource]
        if len(history) == history.maxlen:
            self._compacted[resource] = _version(history[0])
        history.append(stamped)
        return {**event, "object": stamped}

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        response = await super()._render_error(exc)
        return aiohttp.web.Response(
            body=response.body, status=response.status, headers={"Content-Type": "application/json"}
        )

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(self._rv[0])
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""
        since = request.params.get("resourceVersion", "")
        since_n = int(since) if since.isdigit() else None
        bus = self._buses[request.resource]
        get_objs = self._KubernetesEmulator__get_objs  # type: ignore[attr-defined]
        check = self._KubernetesEmulator__check  # type: ignore[attr-defined]

        def wanted(raw: dict[str, Any]) -> bool:
            meta = raw.get("metadata", {})
            return bool(check(request, request.resource, meta.get("namespace"), meta.get("name"), strict=False))

        events: list[dict[str, Any]] = []
        mark = None
        async with self._lock:  # writers publish under this lock: snapshot and mark are atomic
            compacted = self._compacted.get(request.resource, 0)
            if since_n is None or since_n >= compacted:  # else a deletion it needs has left the window
                events = [{"type": "ADDED", "object": o.raw} for o in get_objs(request, strict=False)
                          if not o.deleted]
                if since_n is not None:  # resumed: what changed after that version, deletions included, in order
                    events = [e for e in events if _version(e["object"]) > since_n]
                    events += [{"type": "DELETED", "object": raw} for raw in self.tombstones.get(request.resource, ())
                               if _version(raw) > since_n and wanted(raw)]
                    events.sort(key=lambda e: _version(e["object"]))
                mark = await bus.mark()
        if mark is None:
            yield {"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired",
                "code": 410, "message": f"too old resource version: {since_n} ({compacted})"}}
            return
        for event in events:
            yield event
        async for event in bus.stream(since=mark):
            if wanted(event.get("object", {})):
                yield event


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for the emulator: no auth, one context. Both kopf and lightkube read it."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "anonymous", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "anonymous",
                                                        "namespace": "default"}}],
    }))
    return path
