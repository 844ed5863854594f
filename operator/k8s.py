"""The operator's Kubernetes I/O, over lightkube's async client.

Children are applied create-then-merge-patch rather than with server-side apply: it behaves the
same on every API server and emulator, and the operator owns these objects outright.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, TypeVar

import lightkube
from lightkube import codecs
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret
from lightkube.types import PatchType
from pydantic import ValidationError

from .api import GROUP, KINDS, VERSION, ModelDeployment, Resource, RoutingTable
from .api.common import SecretKeyRef
from .budget import SpendReader
from .health import EndpointProber, Health, classify_vllm
from .render_gateway import ROUTING_FILE, routing_configmap
from .slo import SloReader

R = TypeVar("R", bound=Resource)
GENERIC = {kind.KIND: create_namespaced_resource(GROUP, VERSION, kind.KIND, kind.PLURAL) for kind in KINDS}
RayService = create_namespaced_resource("ray.io", "v1", "RayService", "rayservices")


def as_dict(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else obj.to_dict()


def parse(kind: type[R], raw: dict[str, Any]) -> R:
    return kind.model_validate(raw)


class ClusterEnv:
    """``Env`` for the in-cluster operator."""

    def __init__(self, client: lightkube.AsyncClient, prober: EndpointProber, spend: SpendReader,
                 default_milvus_uri: str | None, slo: SloReader | None = None) -> None:
        self.client = client
        self.prober = prober
        self.spend = spend
        self.slo = slo
        self.default_milvus_uri = default_milvus_uri
        # Dependencies, parsed once per resourceVersion and kept fresh by the watch (observe()).
        # Without it every workflow reconcile listed and validated every model in the namespace:
        # O(workflows x models) per tick, more than a core at 1000 models x 200 workflows.
        self._cache: dict[tuple[str, str], dict[str, tuple[str | None, Resource | None]]] = {}
        # One listing per namespace and kind however many reconciles ask at once: at start-up 32 workflow reconciles
        # found the cache empty together, and each listed and validated all 1000 models.
        self._priming: dict[tuple[str, str], asyncio.Lock] = {}

    async def secret(self, namespace: str, ref: SecretKeyRef) -> str | None:
        try:
            secret = await self.client.get(Secret, ref.name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        if secret.stringData and ref.key in secret.stringData:
            return secret.stringData[ref.key]
        raw = (secret.data or {}).get(ref.key)
        return base64.b64decode(raw).decode() if raw is not None else None

    async def list_raw(self, kind: type[Resource], namespace: str) -> list[dict[str, Any]]:
        return [as_dict(o) async for o in self.client.list(GENERIC[kind.KIND], namespace=namespace)]

    def observe(self, kind: type[Resource], raw: dict[str, Any], *, deleted: bool = False) -> None:
        """Feed one watched object into the cache (parsing only when its resourceVersion moved)."""
        meta = raw["metadata"]
        entries = self._cache.get((kind.KIND, meta.get("namespace", "default")))
        if entries is None:
            return  # namespace not primed yet: the first list() reads it whole
        if deleted:
            entries.pop(meta["name"], None)
            return
        version = meta.get("resourceVersion")
        cached = entries.get(meta["name"])
        if cached is not None and version is not None and cached[0] == version:
            return
        try:
            entries[meta["name"]] = (version, parse(kind, raw))
        except ValidationError:
            entries[meta["name"]] = (version, None)  # reports InvalidSpec itself; cannot be a dependency

    async def list(self, kind: type[R], namespace: str) -> dict[str, R]:
        key = (kind.KIND, namespace)
        if key not in self._cache:
            async with self._priming.setdefault(key, asyncio.Lock()):
                if key not in self._cache:  # the reconcile that held the lock primed it
                    raws = await self.list_raw(kind, namespace)
                    self._cache[key] = {}
                    for raw in raws:
                        self.observe(kind, raw)
        return {name: obj for name, (_, obj) in self._cache[key].items() if obj is not None}  # type: ignore[misc]

    async def vllm_health(self, md: ModelDeployment) -> Health:
        try:
            rayservice = as_dict(await self.client.get(RayService, md.name, namespace=md.namespace))
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            rayservice = None
        owner_label = "ray.io/originated-from-cr-name"
        pods = [as_dict(p) async for p in self.client.list(Pod, namespace=md.namespace,
                                                            labels={owner_label: md.name})]
        # Filter again: label selectors are advisory on some API emulators.
        pods = [p for p in pods if (p.get("metadata", {}).get("labels") or {}).get(owner_label) == md.name]
        return classify_vllm(rayservice, pods, md.spec.replicas.min)

    async def routing_table(self, namespace: str, workflow: str) -> RoutingTable | None:
        name = routing_configmap(workflow)
        try:
            cm = await self.client.get(ConfigMap, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        text = (cm.data or {}).get(ROUTING_FILE)
        return RoutingTable.model_validate_json(text) if text else None

    async def apply(self, obj: dict[str, Any]) -> None:
        """Create, or merge-patch what we own when it exists."""
        resource = codecs.from_dict(obj)
        try:
            await self.client.create(resource)
        except ApiError as exc:
            if exc.status.code != 409:
                raise
            await self.client.patch(type(resource), obj["metadata"]["name"], obj,
                                    namespace=obj["metadata"]["namespace"], patch_type=PatchType.MERGE)

    async def patch_status(self, kind: type[Resource], namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.client.patch(GENERIC[kind.KIND].Status, name, {"status": status}, namespace=namespace,
                                patch_type=PatchType.MERGE)
