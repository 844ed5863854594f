"""The in-process engine: a vLLM engine in the same Ray cluster, called through a Serve DeploymentHandle.

Locally (``pilothouse run``) the engines and the gateway share one Ray cluster, so the gateway calls
an engine replica through a ``DeploymentHandle``: no HTTP server in front of vLLM, no extra hop,
no port to allocate, and Ray routes to whichever engine replica is free. A RoutingTable backend
names such an engine with the endpoint ``serve://<app>`` (the app's ingress deployment) or
``serve://<app>/<deployment>``; ``DataPlane`` picks this engine for that scheme and the HTTP
``ExternalEngine`` for everything else. In a cluster the engines live in their own RayService
(another Ray cluster: handles cannot cross), so the table carries their HTTP URL instead.

When the engine replica runs on the gateway's own host (always, with ``pilothouse run`` on one
machine), the same calls go as HTTP over its Unix socket instead (``engines.local_socket``): about an
eighth of a handle call's latency and CPU. The handle remains the path for every other case.

The replica side is ``engines.vllm.PilothouseLLMServer``; the wire between them is plain Python
data, so the gateway never imports vLLM:

* ``complete(path, body) -> (status, body_bytes)``: the OpenAI JSON answer or error object;
* ``stream(path, body)``: a generator whose first item is the HTTP status, then SSE bytes (or,
  when the status is not 200, one error object).

Answers are the same bytes vLLM's own HTTP server would send, so usage and in-band stream errors
are read by the same code as for an external backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pilothouse.operator.api.routing import Backend
from pilothouse.serving.errors import ErrorClass, Failure, classify

from . import EMBEDDINGS, PATHS, BackendError, EngineResult, EngineStream, local_socket
from .external import ExternalEngine, SseStream, complete_result

SCHEME = "serve://"
_T = TypeVar("_T")
DEFAULT_TIMEOUT_S = 60.0


def endpoint(app: str, deployment: str | None = None) -> str:
    """The RoutingTable endpoint of an engine deployed as a Serve application in the gateway's cluster."""
    return f"{SCHEME}{app}" + (f"/{deployment}" if deployment else "")


def is_local(endpoint: str | None) -> bool:
    return bool(endpoint) and endpoint.startswith(SCHEME)  # type: ignore[union-attr]


def parse(endpoint: str) -> tuple[str, str | None]:
    """``serve://app[/deployment]`` → (app, deployment or None). ValueError naming the problem otherwise."""
    if not endpoint.startswith(SCHEME):
        raise ValueError(f"endpoint {endpoint!r} is not a local Serve engine (expected {SCHEME}<app>[/<deployment>])")
    app, _, deployment = endpoint[len(SCHEME):].strip("/").partition("/")
    if not app or "/" in deployment:
        raise ValueError(f"endpoint {endpoint!r}: expected {SCHEME}<app> or {SCHEME}<app>/<deployment>")
    return app, deployment or None


def request_payload(path: str, body: Mapping[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """The body the engine gets: the backend's model name, and usage asked for on every stream.

    The gateway's budget commit needs the engine's own token counts; vLLM reports them at the end
    of a stream only when ``stream_options.include_usage`` is set.
    """
    if path not in PATHS:
        raise ValueError(f"unsupported path {path!r}; expected one of {sorted(PATHS)}")
    payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    payload["model"] = model
    if stream:
        if path == EMBEDDINGS:
            raise ValueError("embeddings cannot be streamed")
        options = body.get("stream_options")
        payload["stream"] = True
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return payload


_GRPC_CLASSES = {"UNAVAILABLE": ErrorClass.CONNECTION, "DEADLINE_EXCEEDED": ErrorClass.TIMEOUT,
                 "CANCELLED": ErrorClass.CANCELLED, "RESOURCE_EXHAUSTED": ErrorClass.RATE_LIMITED}


def classify_handle_error(exc: BaseException) -> Failure:
    """A failed handle call, in the gateway's classes.

    A missing application or replica, or a replica that died, means nothing serves this backend:
    ``connection`` (refused when the application does not exist, so the breaker opens at once). Serve
    shedding load is ``rate_limited``. An exception raised by the engine itself (vLLM's
    ``EngineDeadError``) arrives wrapped in ``RayTaskError``: ``server``. The calls go over gRPC
    (``_handle``): a status Serve does not translate itself is read by its code.
    """
    import grpc
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    message = f"{type(exc).__name__}: {exc}".rstrip(": ")[:500]
    if isinstance(exc, grpc.aio.AioRpcError):
        return Failure(_GRPC_CLASSES.get(exc.code().name, ErrorClass.SERVER), message)
    if isinstance(exc, serve_exc.BackPressureError):
        return Failure(ErrorClass.RATE_LIMITED, message)
    if isinstance(exc, serve_exc.RequestCancelledError | asyncio.CancelledError):
        return Failure(ErrorClass.CANCELLED, message)
    if isinstance(exc, serve_exc.DeploymentUnavailableError | serve_exc.ReplicaUnavailableError
                  | ray_exc.ActorDiedError | ray_exc.ActorUnavailableError | ray_exc.RayActorError):
        return Failure(ErrorClass.CONNECTION, message)
    if isinstance(exc, serve_exc.RayServeException) and "does not exist" in str(exc):
        return Failure(ErrorClass.CONNECTION, message, refused=True)
    if isinstance(exc, ray_exc.GetTimeoutError | TimeoutError):
        return Failure(ErrorClass.TIMEOUT, message)
    if isinstance(exc, ray_exc.RayTaskError):
        return Failure(ErrorClass.SERVER, message)
    return classify(exc)


_handles: dict[tuple[str, asyncio.AbstractEventLoop], Any] = {}


def _handle(endpoint: str) -> Any:
    """One handle per endpoint and event loop: creating one asks the Serve controller.

    The handle routes on the caller's own event loop (``_run_router_in_separate_loop=False``) instead of
    Serve's router thread: every call and every streamed item then skips two cross-thread hand-offs,
    which on a 2-core machine compete with the engine itself for the CPU (``bench/engine_path.py``).
    Such a handle belongs to the loop that made it, hence one per loop.

    Calls go over the inter-deployment gRPC server every replica runs (``_by_reference=False``) rather
    than as Ray actor tasks: the payloads are plain data, never ObjectRefs, and a Ray actor call with
    Serve's rejection protocol is a streaming task whose every item is another RPC back to the caller.
    A call then costs about half the latency and a third of the CPU at both ends (``bench/handle_hop.py``:
    0.93 ms of CPU per non-streamed call against 2.46), CPU a 2-core machine takes from the engine.
    """
    loop = asyncio.get_running_loop()
    handle = _handles.get((endpoint, loop))
    if handle is None:
        from ray import serve

        app, deployment = parse(endpoint)
        handle = serve.get_app_handle(app) if deployment is None else serve.get_deployment_handle(deployment, app)
        handle._init(_run_router_in_separate_loop=False)
        handle = handle.options(_by_reference=False)
        for key in [k for k in _handles if k[1].is_closed()]:
            del _handles[key]
        _handles[(endpoint, loop)] = handle
    return handle


def forget(endpoint: str) -> None:
    """Drop the cached handles of an endpoint (its application was deleted or redeployed)."""
    for key in [k for k in _handles if k[0] == endpoint]:
        del _handles[key]


class HandleStream(SseStream):
    """A streamed answer from an engine replica, through a Serve handle."""

    def __init__(self, response: Any, started: float, timeout_s: float) -> None:
        self._response = response  # DeploymentResponseGenerator, already past its status item
        self._timeout_s = timeout_s
        super().__init__(started)

    async def aclose(self) -> None:
        await super().aclose()
        self._response.cancel()  # stops generation in the replica when the client left early

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:  # a replica that stops answering is a timeout, as a silent HTTP backend would be
            try:
                yield await asyncio.wait_for(self._response.__anext__(), self._timeout_s)
            except StopAsyncIteration:
                return

    def _classify(self, exc: Exception) -> Failure:
        return classify_handle_error(exc)


class HandleEngine:
    """Calls one engine deployment through a Serve handle. Cheap to create: handles are cached per process."""

    __slots__ = ("_app", "_endpoint", "model", "timeout_s")

    def __init__(self, endpoint: str, model: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        app, deployment = parse(endpoint)
        self._app = app if deployment is None else None  # an app's engine may be on this host's socket
        self._endpoint = endpoint
        self.model = model
        self.timeout_s = timeout_s

    @classmethod
    def for_backend(cls, backend: Backend, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> HandleEngine:
        if not backend.endpoint:
            raise ValueError(f"backend {backend.model_deployment!r} has no endpoint yet")
        return cls(backend.endpoint, backend.model, timeout_s=timeout_s)

    def _get(self) -> Any:
        try:
            return _handle(self._endpoint)
        except Exception as exc:
            raise BackendError(classify_handle_error(exc)) from exc

    async def _on_socket(self, send: Callable[[ExternalEngine], Awaitable[_T]]) -> _T | None:
        """``send`` over the engine replica's socket on this host (``engines.local_socket``); None when there is
        none to use, and the handle is the path."""
        return None if self._app is None else await local_socket.call(self._app, self.model, self.timeout_s, send)

    async def complete(self, path: str, body: Mapping[str, Any]) -> EngineResult:
        result = await self._on_socket(lambda engine: engine.complete(path, body))
        if result is not None:
            return result
        payload = request_payload(path, body, self.model, stream=False)
        handle = self._get()
        started = time.perf_counter()
        try:
            status, content = await asyncio.wait_for(_awaited(handle.complete.remote(path, payload)), self.timeout_s)
        except Exception as exc:
            raise BackendError(classify_handle_error(exc)) from exc
        return complete_result(status, content, time.perf_counter() - started)

    async def stream(self, path: str, body: Mapping[str, Any]) -> EngineStream:
        """Start a stream; returns once the engine accepted the request (errors before that raise here)."""
        stream = await self._on_socket(lambda engine: engine.stream(path, body))
        if stream is not None:
            return stream
        payload = request_payload(path, body, self.model, stream=True)
        handle = self._get()
        started = time.perf_counter()
        response = handle.options(stream=True).stream.remote(path, payload)
        try:
            status = await asyncio.wait_for(response.__anext__(), self.timeout_s)
            if status != 200:
                content = await asyncio.wait_for(response.__anext__(), self.timeout_s)
        except StopAsyncIteration:
            raise BackendError(Failure(ErrorClass.SERVER, "the engine closed the stream before any chunk")) from None
        except Exception as exc:
            response.cancel()
            raise BackendError(classify_handle_error(exc)) from exc
        if status != 200:
            raise BackendError(classify((status, content)))
        return HandleStream(response, started, self.timeout_s)


async def _awaited(response: Any) -> Any:
    """A coroutine around a DeploymentResponse, so ``wait_for`` can cancel it (which cancels the call)."""
    return await response


__all__ = ["SCHEME", "HandleEngine", "HandleStream", "classify_handle_error", "endpoint",
           "forget", "is_local", "parse", "request_payload"]
