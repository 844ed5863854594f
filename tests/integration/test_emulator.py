"""The emulator keeps the watch contract kopf relies on: a watch resumed from a resourceVersion sees every
change made after it. Without that, a dropped watch stream can hide a deletion from the operator for good."""

from __future__ import annotations

import asyncio

import lightkube
import pytest
from lightkube.resources.core_v1 import ConfigMap

from . import emulator as emulator_module
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


async def test_a_watch_resumed_after_a_deletion_replays_it_once(emulator: Emulator,
                                                                kube: lightkube.AsyncClient) -> None:
    """A deletion has a resourceVersion of its own: a watch resumed from before it hears of it (kopf then runs
    what depends on the object being gone); one resumed from the deletion's own version does not hear it again."""
    created = await kube.create(ConfigMap.from_dict({"metadata": {"name": "gone", "namespace": "default"}}))
    before = created.metadata.resourceVersion
    await kube.delete(ConfigMap, "gone", namespace="default")

    async def first_event(since: str) -> tuple[str, ConfigMap]:
        async for kind, obj in kube.watch(ConfigMap, namespace="default", resource_version=since):
            return kind, obj
        raise AssertionError("the watch ended without an event")

    kind, deleted = await asyncio.wait_for(first_event(before), 10)
    assert (kind, deleted.metadata.name) == ("DELETED", "gone")
    assert int(deleted.metadata.resourceVersion) > int(before)
    await kube.create(ConfigMap.from_dict({"metadata": {"name": "next", "namespace": "default"}}))
    kind, after = await asyncio.wait_for(first_event(deleted.metadata.resourceVersion), 10)
    assert (kind, after.metadata.name) == ("ADDED", "next")


async def test_deletions_beyond_the_watch_window_answer_a_resumed_watch_with_410_gone(
        emulator: Emulator, kube: lightkube.AsyncClient) -> None:
    """A real API server keeps a window of history, and so does the emulator (memory stays bounded in long runs):
    a watch resumed inside it still hears every deletion, one resumed from before it gets 410 Gone, on which kopf
    (and lightkube) list again instead of missing a deletion silently."""
    emulator.watch_history = 3
    created = [await kube.create(ConfigMap.from_dict({"metadata": {"name": f"cm-{i}", "namespace": "default"}}))
               for i in range(5)]
    before = created[0].metadata.resourceVersion
    for i in range(5):
        await kube.delete(ConfigMap, f"cm-{i}", namespace="default")
    history = next(iter(emulator.tombstones.values()))
    assert [raw["metadata"]["name"] for raw in history] == ["cm-2", "cm-3", "cm-4"]

    async def events(since: str) -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        async for kind, obj in kube.watch(ConfigMap, namespace="default", resource_version=since):
            seen.append((kind, obj.metadata.name))
            if obj.metadata.name == "cm-4":
                break
        return seen

    with pytest.raises(lightkube.ApiError) as gone:
        await asyncio.wait_for(events(before), 10)
    assert gone.value.status.code == 410 and "too old resource version" in gone.value.status.message
    inside = history[0]["metadata"]["resourceVersion"]  # cm-2's deletion: the window still holds what follows
    assert await asyncio.wait_for(events(inside), 10) == [("DELETED", "cm-3"), ("DELETED", "cm-4")]


async def test_generate_name_retries_a_taken_name_instead_of_answering_conflict(
        emulator: Emulator, kube: lightkube.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf names its Events with generateName; at a thousand objects six random hex digits collided, and the
    emulator answered 409 where an API server (1.31+) draws another name."""
    draws = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(emulator_module.secrets, "token_hex", lambda _n: next(draws))
    names = [(await kube.create(ConfigMap.from_dict({"metadata": {"generateName": "evt-", "namespace": "default"}})))
             .metadata.name for _ in range(2)]
    assert names == ["evt-aaaaaa", "evt-bbbbbb"]
