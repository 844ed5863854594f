"""Fixtures: the real kopf operator (our handlers, in the test's loop) against the emulator."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import lightkube
import pytest
import pytest_asyncio
from aiohttp import web
from lightkube.config.models import Cluster, User

from pilothouse.operator.kopf_app import OperatorConfig, Runtime, register

from .emulator import Emulator, write_kubeconfig


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as k8s, kmock.Server(k8s):
        k8s.declare_kinds()
        yield k8s


@pytest.fixture
def kubeconfig(emulator: Emulator) -> lightkube.KubeConfig:
    return lightkube.KubeConfig.from_one(cluster=Cluster(server=str(emulator.url).rstrip("/")), user=User(),
                                         namespace="default")


@pytest_asyncio.fixture()
async def kube(kubeconfig: lightkube.KubeConfig) -> AsyncIterator[lightkube.AsyncClient]:
    client = lightkube.AsyncClient(config=kubeconfig, field_manager="tests", trust_env=False)
    yield client
    await client.close()


class _NotKopf:
    """kopf.run_tasks(ignored=...): tasks not running kopf's code (pytest's, aiohttp's) are not kopf's
    to wait for at shutdown; without this every teardown waits 5 s and ends in CancelledError."""

    def __contains__(self, task: object) -> bool:
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        return not (code is not None and f"{os.sep}kopf{os.sep}" in code.co_filename)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest_asyncio.fixture()
async def operator(emulator: Emulator, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Awaitable[Runtime]]]:
    """`await operator(**config)` starts the operator with the same handlers and login `pilothouse operator` uses."""
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", str(emulator.url).rstrip("/"))))
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def start(**overrides: Any) -> Runtime:
        config = OperatorConfig(milvus_uri=str(tmp_path / "milvus.db"), store_url=f"sqlite:///{tmp_path}/store.db",
                                health_interval=0.5)
        for key, value in overrides.items():
            setattr(config, key, value)
        registry = kopf.OperatorRegistry()
        runtime = Runtime(config)
        register(registry, runtime)

        ready = asyncio.Event()
        settings = kopf.OperatorSettings()
        spawned = await kopf.spawn_tasks(registry=registry, settings=settings, clusterwide=True, standalone=True,
                                         stop_flag=stop, ready_flag=ready)
        tasks.append(asyncio.create_task(kopf.run_tasks(spawned, ignored=_NotKopf())))
        await asyncio.wait_for(ready.wait(), 10)
        return runtime

    yield start
    stop.set()
    for task in tasks:
        await asyncio.wait_for(task, 15)


class FakeOpenAI:
    """An OpenAI-compatible endpoint that can be taken down and brought back."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", lambda _: web.json_response({"object": "list", "data": []}))
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port or 0)
        await site.start()
        self.port = self.port or self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest_asyncio.fixture()
async def openai_endpoint() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.stop()
