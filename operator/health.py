"""Health of a ModelDeployment: classify KubeRay/pod state (pure) and probe external endpoints (I/O).

Reasons are specific on purpose: a platform team must tell "buy GPUs" (InsufficientGPUCapacity)
from "wait" (PodsNotReady) from "the provider is down or the key is wrong" (EndpointUnreachable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from pilothouse.egress import KEEPALIVE_EXPIRY_S, env_proxy

from .conditions import Observation

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Health:
    ready: bool
    reason: str
    message: str
    ready_replicas: int | None = None
    endpoint: str | None = None  # where this environment serves the model, when not render_model.endpoint()

    def observations(self) -> list[Observation]:
        return [
            Observation("Ready", self.ready, self.reason, self.message),
            Observation("Degraded", not self.ready, self.reason if not self.ready else "Healthy",
                        "" if self.ready else self.message),
        ]


def _unschedulable_gpu(pod: dict[str, Any]) -> str | None:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and (
            "nvidia.com/gpu" in cond.get("message", "")
        ):
            return cond.get("message", "")
    return None


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []))


def _rayservice_running(rayservice: dict[str, Any]) -> bool:
    status = rayservice.get("status", {})
    if status.get("serviceStatus") == "Running":
        return True
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))


def classify_vllm(rayservice: dict[str, Any] | None, pods: list[dict[str, Any]], min_replicas: int) -> Health:
    """Ready only when KubeRay says the Serve app runs; otherwise say why not."""
    for pod in pods:
        message = _unschedulable_gpu(pod)
        if message is not None:
            name = pod.get("metadata", {}).get("name", "?")
            return Health(False, "InsufficientGPUCapacity",
                          f"pod {name} cannot be scheduled: {message} — add GPU nodes to the pool "
                          "or lower spec.nodePool.gpu.count / spec.replicas.min")
    ready_pods = sum(_pod_ready(p) for p in pods)
    if rayservice is not None and _rayservice_running(rayservice):
        return Health(True, "ServeRunning", "vLLM is serving through Ray Serve", ready_replicas=ready_pods)
    if rayservice is None:
        return Health(False, "PodsNotReady", "RayService not created yet", ready_replicas=0)
    return Health(False, "PodsNotReady",
                  f"{ready_pods} of {len(pods)} Ray pods ready; waiting for the Serve application "
                  f"(at least {min_replicas} replica(s))", ready_replicas=ready_pods)


class EndpointProber:
    """Probes external ModelDeployments' endpoints over one pooled aiohttp session, made on first use.

    Why aiohttp and not httpx: the operator probes every external model each health interval (1000 models at
    10 s is 100 probes a second), so the client's CPU per call is most of an idle operator's CPU. Against a
    local OpenAI-style server (``bench/probe_client.py``), httpx 0.28 spent 571-1,561 us of CPU a probe and
    aiohttp 67-143 us, concurrency 1 to 32.

    Proxies and keep-alive as the gateway's calls to the same endpoints have them (:mod:`pilothouse.egress`). The
    session belongs to the event loop that made it: it is made on the first probe after start or ``aclose``.
    """

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=KEEPALIVE_EXPIRY_S)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def probe(self, base_url: str, api_key: str | None, timeout: float = PROBE_TIMEOUT_S) -> Health:
        """GET {base}/models: the cheapest call every OpenAI-compatible server answers."""
        url = f"{base_url.rstrip('/')}/models"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            async with self._client().get(url, headers=headers, allow_redirects=False, proxy=env_proxy(base_url),
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                status = response.status
                await response.read()  # read whole, the connection is pooled again for the next probe
        except TimeoutError:
            return Health(False, "EndpointUnreachable", f"GET {url} failed: no answer within {timeout:g} s")
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp cannot request
            return Health(False, "EndpointUnreachable", f"GET {url} failed: {type(exc).__name__}: {exc}")
        # No latency in the result: status must only change when health does, or every probe of
        # every model becomes an API write (1000 models at 10 s = 100 writes/s for nothing).
        if status in (401, 403):
            return Health(False, "EndpointUnauthorized",
                          f"GET {url} answered {status}: check spec.external.apiKeySecretRef")
        if status >= 400:
            return Health(False, "EndpointUnreachable", f"GET {url} answered HTTP {status}")
        return Health(True, "EndpointHealthy", f"GET {url} answered")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
