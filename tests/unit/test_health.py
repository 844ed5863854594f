"""ModelDeployment health: reasons a platform team can act on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pilothouse.operator.health import EndpointProber, classify_vllm, env_proxy

GPU_SHORT = {"metadata": {"name": "w-0"}, "status": {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
READY_POD = {"metadata": {"name": "w-1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def test_insufficient_gpu_capacity_is_named_with_the_fix() -> None:
    health = classify_vllm({"status": {}}, [READY_POD, GPU_SHORT], 2)
    assert not health.ready and health.reason == "InsufficientGPUCapacity"
    assert "w-0" in health.message and "nvidia.com/gpu" in health.message


def test_pods_not_ready_until_serve_runs() -> None:
    assert classify_vllm(None, [], 1).reason == "PodsNotReady"
    waiting = classify_vllm({"status": {"serviceStatus": "WaitForServeDeploymentReady"}}, [READY_POD], 1)
    assert (waiting.ready, waiting.reason, waiting.ready_replicas) == (False, "PodsNotReady", 1)


@pytest.mark.parametrize("status", [{"serviceStatus": "Running"},
                                    {"conditions": [{"type": "Ready", "status": "True"}]}])
def test_serve_running_is_ready_in_old_and_new_kuberay(status: dict) -> None:
    assert classify_vllm({"status": status}, [READY_POD], 1).ready


async def _serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> TestServer:
    """A real local HTTP server answering every GET with ``handler``."""
    app = web.Application()
    app.router.add_get("/{path:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_probe_sends_the_key_and_reuses_its_connection() -> None:
    seen: list[tuple[str | None, str, object]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Authorization"), request.path, request.transport))
        return web.json_response({"data": []})

    server = await _serving(handler)
    prober = EndpointProber()
    try:
        first = await prober.probe(f"{server.make_url('/v1/')}", "sk-1")
        second = await prober.probe(f"{server.make_url('/v1')}", "sk-1")
    finally:
        await prober.aclose()
        await server.close()
    assert first.ready and first.reason == "EndpointHealthy" and second.ready
    assert [(auth, path) for auth, path, _ in seen] == [("Bearer sk-1", "/v1/models")] * 2
    assert seen[0][2] is seen[1][2]  # one pooled connection: the next probe of an endpoint costs no new one


@pytest.mark.parametrize(("code", "reason"), [(401, "EndpointUnauthorized"), (403, "EndpointUnauthorized"),
                                              (503, "EndpointUnreachable")])
async def test_probe_failures_are_classified(code: int, reason: str) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=code)

    server = await _serving(handler)
    prober = EndpointProber()
    try:
        health = await prober.probe(str(server.make_url("/v1")), None)
    finally:
        await prober.aclose()
        await server.close()
    assert (health.ready, health.reason) == (False, reason)
    assert str(code) in health.message
    if reason == "EndpointUnauthorized":
        assert "spec.external.apiKeySecretRef" in health.message


async def test_probe_connection_refused_is_unreachable() -> None:
    prober = EndpointProber()
    try:
        health = await prober.probe("http://127.0.0.1:9/v1", None, timeout=2)
    finally:
        await prober.aclose()
    assert health.reason == "EndpointUnreachable" and "ClientConnectorError" in health.message
    assert "http://127.0.0.1:9/v1/models" in health.message


async def test_probe_of_a_silent_endpoint_times_out_with_its_bound() -> None:
    async def handler(_: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    server = await _serving(handler)
    prober = EndpointProber()
    try:
        started = time.monotonic()
        health = await prober.probe(str(server.make_url("/v1")), None, timeout=0.5)
        waited = time.monotonic() - started
    finally:
        await prober.aclose()
        await server.close()
    assert (health.ready, health.reason) == (False, "EndpointUnreachable")
    assert "no answer within 0.5 s" in health.message and waited < 10


async def test_probe_of_a_malformed_url_is_unreachable_not_a_crash() -> None:
    prober = EndpointProber()
    try:
        health = await prober.probe("not-a-url", None)
    finally:
        await prober.aclose()
    assert (health.ready, health.reason) == (False, "EndpointUnreachable")
    assert "not-a-url/models" in health.message


async def test_probe_goes_through_the_proxy_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Managed endpoints often sit behind an egress proxy; ``NO_PROXY`` hosts are reached directly."""
    seen: list[str] = []

    async def proxy_handler(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        return web.json_response({"data": []})

    proxy = await _serving(proxy_handler)
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", str(proxy.make_url("/")))
    monkeypatch.setenv("NO_PROXY", "direct.internal")
    env_proxy.cache_clear()
    prober = EndpointProber()
    try:
        health = await prober.probe("http://models.internal/v1", "sk-1")
        assert env_proxy("http://direct.internal/v1") is None
    finally:
        env_proxy.cache_clear()
        await prober.aclose()
        await proxy.close()
    assert health.ready, health.message
    assert seen == ["http://models.internal/v1/models"]


def test_a_closed_prober_probes_again_from_another_event_loop() -> None:
    """Its session is made on first use, in the loop that uses it: closing it at one ``asyncio.run``'s end does
    not end the prober."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async def once(prober: EndpointProber) -> bool:
        server = await _serving(handler)
        try:
            return (await prober.probe(str(server.make_url("/v1")), None)).ready
        finally:
            await prober.aclose()
            await server.close()

    prober = EndpointProber()
    assert asyncio.run(once(prober)) and asyncio.run(once(prober))
