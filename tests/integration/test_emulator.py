"""The emulator keeps the watch contract kopf relies on: a watch resumed from a resourceVersion sees every
change made after it. Without that, a dropped watch stream can hide a deletion from the operator for good."""

from __future__ import annotations

import asyncio

import lightkube
from lightkube.resources.core_v1 import ConfigMap

from .emulator import Emulator


async def test_a_watch_resumed_after_a_delete_sees_the_object_marked_for_deletion(
        emulator: Emulator, kube: lightkube.AsyncClient) -> None:
    created = await kube.create(ConfigMap.from_dict({
        "metadata": {"name": "held", "namespace": "default", "finalizers": ["pilothouse.io/finalizer"]}}))
    before = created.metadata.resourceVersion
    await kube.delete(ConfigMap, "held", namespace="default")

    async def first_event() -> tuple[str, ConfigMap]:
        async for kind, obj in kube.watch(ConfigMap, namespace="default", resource_version=before):
            return kind, obj
        raise AssertionError("the watch ended without an event")

    _, marked = await asyncio.wait_for(first_event(), 10)
    assert marked.metadata.name == "held"
    assert marked.metadata.deletionTimestamp is not None
    assert int(marked.metadata.resourceVersion) > int(before)
    # The object is still there, held by its finalizer, and a read agrees with the watch.
    current = await kube.get(ConfigMap, "held", namespace="default")
    assert current.metadata.resourceVersion == marked.metadata.resourceVersion
