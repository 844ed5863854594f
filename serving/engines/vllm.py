"""The ``vllm`` engine in local mode: vLLM's async engine as a Ray Serve deployment beside the gateway.

Built on ``ray.serve.llm`` (``LLMServer``, ``LLMConfig``, ``build_llm_deployment``), the same code a
cluster's RayService runs (``operator/render_model.py``), so local and cluster engines differ only in
how the gateway reaches them: here through a ``DeploymentHandle`` (``engines.handle``), or as HTTP on the
replica's Unix socket when gateway and engine share a host (``engines.local_socket``); there over HTTP.
``PilothouseLLMServer`` adds two plain-data methods to ``LLMServer`` so the gateway replica never
imports vLLM (about a second and hundreds of MB saved per gateway replica): the request is validated
into vLLM's own request types here, and the answer leaves as the bytes vLLM's HTTP server would have
sent.

Sized for a laptop (DESIGN.md §9; 2 cores): one CPU per engine (``placement_group_config`` with a
single ``{"CPU": 1}`` bundle, the replica actor itself at 0 CPUs so the two do not add up), the model
in the EngineCore process on that many threads instead of a spinning worker process beside it
(``inproc_worker``), a 1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``), eager mode (no torch.compile on
CPU: it costs start-up time and buys little for small models), few concurrent sequences, and
``max_model_len`` from the spec.

Metrics: vLLM's own Prometheus collectors (``vllm:num_requests_running``, ``vllm:e2e_request_latency_seconds``,
``vllm:prompt_tokens_total`` ...) live in the replica; the deployment's HTTP face serves exactly them
at ``http://<serve host>:<port>/engines/<ModelDeployment name>/metrics`` (nothing else: inference
goes through the gateway, with its keys and budgets).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import ValidationError
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.utils.batcher import Batcher
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from pilothouse.operator.api import ModelDeployment
from pilothouse.operator.api.model_deployment import Engine

from . import CHAT, COMPLETIONS, EMBEDDINGS
from .handle import endpoint as serve_endpoint
from .local_socket import serve_socket

ROUTE_PREFIX = "/engines"
KV_CACHE_GIB = 1
ENGINE_CPUS = 1  # the engine's placement bundle, and so its model's thread count (``inproc_worker``)
MAX_NUM_SEQS = 16
JSON = dict[str, Any]


def app_name(md: ModelDeployment) -> str:
    """The Serve application of a ModelDeployment's engine (one per model, so each can be redeployed alone)."""
    return f"engine-{md.name}"


def engine_env() -> dict[str, str]:
    """Environment of the engine replica: what vLLM-CPU reads at start, and how Serve runs the replica.

    ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` (part of Serve's throughput-optimized preset) runs
    the server on the replica's main event loop, as vLLM's own server runs on uvicorn's: one thread
    hand-off less per call and per streamed batch. On 2 cores that CPU is the engine's: without it, vLLM
    decoded 10-20% slower under the gateway's handle calls than under direct HTTP (``bench/engine_path.py``).
    """
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB)),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "OMP_NUM_THREADS": str(ENGINE_CPUS)}


def llm_config(md: ModelDeployment, *, base_dir: Path | None = None) -> LLMConfig:
    """The ``ray.serve.llm`` config of a local engine; a relative model path is taken from ``base_dir``."""
    if md.spec.engine is not Engine.VLLM:
        raise ValueError(f"ModelDeployment {md.name!r} has engine {md.spec.engine.value!r}, not vllm")
    source = Path(md.spec.model.name).expanduser()
    if not source.is_absolute():
        source = (base_dir or Path.cwd()) / source
    if not source.is_dir():
        raise FileNotFoundError(f"ModelDeployment {md.name!r}: spec.model.name {md.spec.model.name!r} is not a "
                                f"local directory ({source}); this machine cannot download weights. For a demo "
                                "model run: pilothouse models make-tiny " + md.spec.model.name)
    vllm = md.spec.vllm
    engine_kwargs: JSON = {
        "dtype": vllm.dtype,
        "enforce_eager": True,
        "max_num_seqs": MAX_NUM_SEQS,
        "disable_log_stats": False,  # keeps vLLM's Prometheus collectors (served at .../metrics)
        **({"max_model_len": vllm.max_model_len} if vllm.max_model_len else {}),
        **({"quantization": vllm.quantization} if vllm.quantization else {}),
        **vllm.extra_args,
    }
    return LLMConfig(
        model_loading_config={"model_id": md.served_model_name, "model_source": str(source.resolve())},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": [{"CPU": ENGINE_CPUS}]},
        # vLLM's own collectors in the replica instead of copies re-exported through Ray's metrics agent
        log_engine_metrics=False,
        runtime_env={"env_vars": engine_env()},
        callback_config={"callback_class": LocalWeights},
        # no Serve access log: the face serves only /metrics (each scrape a line) and the gateway's calls come
        # over the socket or a handle; the gateway's audit trail is the request log
        deployment_config={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                           "logging_config": {"enable_access_log": False}},
    )


def _error(status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": status}}).encode()


def parse_request(path: str, body: Mapping[str, Any]) -> Any:
    """The body as vLLM's request type for ``path``; a pydantic ``ValidationError`` when it is not one."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingChatRequest, EmbeddingCompletionRequest

    if path == CHAT:
        return ChatCompletionRequest.model_validate(body)
    if path == COMPLETIONS:
        return CompletionRequest.model_validate(body)
    if path == EMBEDDINGS:
        kind = EmbeddingChatRequest if "messages" in body else EmbeddingCompletionRequest
        return kind.model_validate(body)
    raise ValueError(f"unsupported path {path!r}")


def validation_error(exc: ValidationError) -> bytes:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return _error(400, f"Invalid request: {first.get('msg', str(exc))}", param=param)


def answer(item: Any) -> tuple[int, bytes]:
    """One non-streamed engine answer (a vLLM response or ``ErrorResponse``) as (status, JSON bytes)."""
    error = getattr(item, "error", None)
    if error is not None and hasattr(error, "code"):
        return int(error.code), json.dumps({"error": error.model_dump()}).encode()
    return 200, item.model_dump_json(exclude_unset=False).encode()


def chunk_bytes(item: Any) -> bytes:
    """One streamed item as SSE bytes: ``LLMServer`` batches SSE strings into lists; an error becomes in-band."""
    parts = []
    for piece in item if isinstance(item, list) else [item]:
        if isinstance(piece, str):
            parts.append(piece)
        else:  # an ErrorResponse: vLLM's HTTP server reports it the same way once the stream has begun
            parts.append(f"data: {json.dumps({'error': piece.error.model_dump()})}\n\n")
    return "".join(parts).encode()


async def first_token_then_batched(items: AsyncGenerator[Any, None],
                                   interval_ms: float | None) -> AsyncGenerator[list[Any], None]:
    """A vLLM output stream as lists: the first token at once (with the role chunks before it), then batches.

    ``LLMServer`` batches a stream's SSE strings every ``interval_ms`` (50 ms by default) so a handle
    stream carries a few Ray objects per request instead of one per token: that is what lets the gateway
    path out-stream vLLM's own server behind Serve's proxy (``bench/engine_path.py``). But ``Batcher``
    holds the *first* batch for a whole interval too, which put 50 ms on every time to first token
    through the gateway. Chat streams open with a role-only chunk per choice, produced by the same engine
    step as the first token: those and the first other item (the token, or an error) leave together as
    soon as that item exists; the rest is batched.
    """
    head: list[Any] = []
    batches: AsyncGenerator[list[Any], None] | None = None
    try:
        async for item in items:
            head.append(item)
            if not (isinstance(item, str) and '"role"' in item):
                break
        if head:
            yield head
        batches = Batcher(items, interval_ms=interval_ms).stream()  # an ended stream gives no batch
        async for batch in batches:
            yield batch
    finally:  # however the consumer stops, stop generating: the batcher owns the engine stream once started
        await (batches.aclose() if batches is not None else items.aclose())


class LocalWeights(CallbackBase):
    """Skip ``ray.serve.llm``'s per-node download task: local weights are already where the engine runs.

    The task would only return the same path, and it leaves an idle Ray worker holding ~0.8 GB of
    imported vLLM behind (measured on 2 cores).
    """

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


@serve.ingress()
class PilothouseLLMServer(LLMServer):
    """``LLMServer`` plus the plain-data calls of ``engines.handle``, served on this host's engine socket too
    (``engines.local_socket``), and a metrics-only HTTP face."""

    async def __init__(self, *args: Any, **kwargs: Any) -> None:  # Serve awaits an async constructor
        await super().__init__(*args, **kwargs)
        self._socket = await serve_socket(self, serve.get_replica_context().app_name)

    async def __del__(self) -> None:
        socket = getattr(self, "_socket", None)
        if socket is not None:
            await socket.close()
        await super().__del__()

    def _get_default_engine_class(self) -> type[Any]:
        from .inproc_worker import InProcessWorkerEngine  # imports vLLM: only the engine replica may

        return InProcessWorkerEngine

    def _batch_output_stream(self, generator: AsyncGenerator[Any, None]) -> AsyncGenerator[list[Any], None]:
        return first_token_then_batched(generator, self._get_batch_interval_ms())

    async def _run(self, path: str, body: Mapping[str, Any]) -> Any:
        request = parse_request(path, body)
        method = {CHAT: self.chat, COMPLETIONS: self.completions, EMBEDDINGS: self.embeddings}[path]
        return await method(request)

    async def complete(self, path: str, body: Mapping[str, Any]) -> tuple[int, bytes]:
        try:
            results = await self._run(path, body)
        except ValidationError as exc:
            return 400, validation_error(exc)
        try:
            async for item in results:
                return answer(item)
        finally:
            await results.aclose()
        return 500, _error(500, "the engine returned no answer", "InternalServerError")

    async def stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[int | bytes]:
        """First the status; then the SSE bytes (200) or one error object."""
        try:
            results = await self._run(path, body)
        except ValidationError as exc:
            yield 400
            yield validation_error(exc)
            return
        try:
            first = True
            async for item in results:
                if first:
                    first = False
                    head = item[0] if isinstance(item, list) and item else item
                    if not isinstance(head, str):  # an ErrorResponse before any token
                        status, content = answer(head)
                        yield status
                        yield content
                        return
                    yield 200
                yield chunk_bytes(item)
        finally:
            await results.aclose()

    async def __serve_build_asgi_app__(self) -> FastAPI:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.get("/metrics")
        def metrics() -> Response:
            return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

        return app


def engine_app(md: ModelDeployment, *, base_dir: Path | None = None,
               server_cls: type[PilothouseLLMServer] = PilothouseLLMServer) -> Any:
    """The Serve application of one ModelDeployment's engine (``server_cls``: a subclass, for benchmarks)."""
    return build_llm_deployment(llm_config(md, base_dir=base_dir), deployment_cls=server_cls,
                                override_serve_options={"name": "engine"})


def deploy_local_engines(mds: Sequence[ModelDeployment], *, base_dir: Path | None = None,
                         server_cls: type[PilothouseLLMServer] = PilothouseLLMServer) -> dict[str, str]:
    """Deploy every ``engine: vllm`` ModelDeployment into the running Serve; {name: RoutingTable endpoint}.

    Ray must be initialised and Serve started (``serve.start``) by the caller. Returns when every
    engine is running (about 30 s for a small model on 2 cores); engines start in parallel. A model
    folder that does not exist raises ``FileNotFoundError`` naming the field before anything starts.
    ``bench/engine_path.py`` passes a ``server_cls`` whose HTTP face is vLLM's own OpenAI server: its baseline.
    """
    vllm_mds = [md for md in mds if md.spec.engine is Engine.VLLM]
    targets = [serve.RunTarget(engine_app(md, base_dir=base_dir, server_cls=server_cls), name=app_name(md),
                               route_prefix=f"{ROUTE_PREFIX}/{md.name}") for md in vllm_mds]
    if targets:
        serve.run_many(targets, wait_for_applications_running=True)
    return {md.name: serve_endpoint(app_name(md)) for md in vllm_mds}


def metrics_url(md: ModelDeployment, serve_base_url: str) -> str:
    """Where vLLM's ``vllm:*`` metrics of a local engine can be scraped (``serve_base_url``: Serve's HTTP address)."""
    return f"{serve_base_url.rstrip('/')}{ROUTE_PREFIX}/{md.name}/metrics"
