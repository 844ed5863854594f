"""ModelDeployment health: reasons a platform team can act on."""

from __future__ import annotations

import httpx
import pytest

from pilothouse.operator.health import classify_vllm, probe_external

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


def _client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_probe_sends_the_key() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers.get("authorization")
        seen["path"] = request.url.path
        return httpx.Response(200, json={"data": []})

    async with _client(handler) as client:
        health = await probe_external(client, "https://api.example/v1/", "sk-1")
    assert health.ready and health.reason == "EndpointHealthy"
    assert seen == {"auth": "Bearer sk-1", "path": "/v1/models"}


@pytest.mark.parametrize(("code", "reason"), [(401, "EndpointUnauthorized"), (503, "EndpointUnreachable")])
async def test_probe_failures_are_classified(code: int, reason: str) -> None:
    async with _client(lambda _: httpx.Response(code)) as client:
        health = await probe_external(client, "https://api.example/v1", None)
    assert (health.ready, health.reason) == (False, reason)


async def test_probe_connection_refused_is_unreachable() -> None:
    async with httpx.AsyncClient() as client:
        health = await probe_external(client, "http://127.0.0.1:9/v1", None, timeout=2)
    assert health.reason == "EndpointUnreachable" and "ConnectError" in health.message
