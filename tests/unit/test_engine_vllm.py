"""The local vllm engine's pure parts, without a Ray cluster: endpoints, payloads, error classes, the
handle engine's translation of replica answers, the replica's translation of vLLM objects, the local
engine config, the tiny model, and local mode's RoutingTable endpoint."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError
from ray import exceptions as ray_exc
from ray.serve import exceptions as serve_exc
from ray.serve._private.common import DeploymentID

from pilothouse.operator import model_deployment
from pilothouse.operator.api import ModelDeployment
from pilothouse.operator.local import LocalEnv
from pilothouse.serving.engines import CHAT, COMPLETIONS, EMBEDDINGS, BackendError, local_socket
from pilothouse.serving.engines import handle as h
from pilothouse.serving.errors import ErrorClass
from pilothouse.serving.tiny_model import FILES, make_tiny_llama
from tests.fakes.openai_backend import error_body

CONTEXT_MESSAGE = ("This model's maximum context length is 1024 tokens. However, you requested 3000 tokens "
                   "(2992 in the messages, 8 in the completion). Please reduce the length of the messages.")


def vllm_md(path: str = "./models/tiny", engine: str = "vllm", **vllm: Any) -> ModelDeployment:
    spec: dict[str, Any] = {"model": {"name": path, "servedModelName": "tiny"}, "engine": engine, "tier": "small"}
    if engine == "vllm":
        spec["vllm"] = {"maxModelLen": 1024, **vllm}
    else:
        spec["external"] = {"url": "https://api.example/v1"}
    return ModelDeployment.model_validate({"metadata": {"name": "small", "namespace": "default"}, "spec": spec})


# -- endpoints and payloads --------------------------------------------------------------------------

def test_endpoint_round_trip() -> None:
    assert h.parse(h.endpoint("engine-small")) == ("engine-small", None)
    assert h.parse(h.endpoint("app", "engine")) == ("app", "engine")
    assert h.is_local("serve://engine-small") and not h.is_local("http://x/v1") and not h.is_local(None)


@pytest.mark.parametrize("bad", ["http://x/v1", "serve://", "serve://a/b/c"])
def test_bad_endpoints_name_the_expected_shape(bad: str) -> None:
    with pytest.raises(ValueError, match="serve://<app>"):
        h.parse(bad)


def test_stream_payload_asks_for_usage_and_keeps_the_clients_options() -> None:
    body = {"model": "wf/extract", "messages": [], "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    payload = h.request_payload(CHAT, body, "small", stream=True)
    assert payload["model"] == "small" and payload["stream"] is True
    assert payload["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


def test_complete_payload_drops_stream_fields_and_embeddings_cannot_stream() -> None:
    payload = h.request_payload(COMPLETIONS, {"model": "m", "prompt": "x", "stream": False,
                                              "stream_options": None}, "small", stream=False)
    assert payload == {"model": "small", "prompt": "x"}
    with pytest.raises(ValueError, match="embeddings cannot be streamed"):
        h.request_payload(EMBEDDINGS, {"input": "x"}, "small", stream=True)


# -- error classes -----------------------------------------------------------------------------------

def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="replica gone")


@pytest.mark.parametrize(("exc", "cls", "refused"), [
    (serve_exc.DeploymentUnavailableError(DeploymentID("engine", "engine-small")), ErrorClass.CONNECTION, False),
    (ray_exc.ActorDiedError(), ErrorClass.CONNECTION, False),
    (serve_exc.RayServeException("Application 'engine-small' does not exist."), ErrorClass.CONNECTION, True),
    (serve_exc.BackPressureError(num_queued_requests=10, max_queued_requests=10), ErrorClass.RATE_LIMITED, False),
    (serve_exc.RequestCancelledError("r1"), ErrorClass.CANCELLED, False),
    (TimeoutError(), ErrorClass.TIMEOUT, False),
    (ray_exc.RayTaskError("complete", "Traceback ...", RuntimeError("EngineDeadError: engine core died")),
     ErrorClass.SERVER, False),
    # the handle's gRPC transport: statuses Serve passes through untranslated
    (_rpc_error(grpc.StatusCode.UNAVAILABLE), ErrorClass.CONNECTION, False),
    (_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), ErrorClass.TIMEOUT, False),
    (_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), ErrorClass.RATE_LIMITED, False),
    (_rpc_error(grpc.StatusCode.INTERNAL), ErrorClass.SERVER, False),
])
def test_handle_failures_are_classified(exc: BaseException, cls: ErrorClass, refused: bool) -> None:
    failure = h.classify_handle_error(exc)
    assert (failure.error_class, failure.refused) == (cls, refused)


# -- the handle engine against a stand-in replica ----------------------------------------------------

class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class _Generator:
    """What ``handle.options(stream=True).stream.remote()`` returns: an async iterator with ``cancel``."""

    def __init__(self, items: list[Any]) -> None:
        self._items = iter(items)
        self.cancelled = False

    def __aiter__(self) -> _Generator:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """Answers like ``PilothouseLLMServer``: (status, bytes) for complete; status then bytes for stream."""

    def __init__(self, complete: tuple[int, bytes] | Exception = (200, b"{}"), stream: list[Any] | None = None):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._complete, self._stream = complete, stream or []
        self.generator: _Generator | None = None
        self.complete = _Remote(self._complete_call)
        self.stream = _Remote(self._stream_call)

    async def _complete_call(self, path: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        self.calls.append((path, payload))
        if isinstance(self._complete, Exception):
            raise self._complete
        return self._complete

    def _stream_call(self, path: str, payload: dict[str, Any]) -> _Generator:
        self.calls.append((path, payload))
        self.generator = _Generator(self._stream)
        return self.generator

    def options(self, **_: Any) -> FakeHandle:
        return self


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(local_socket.ENV, "off")  # the handle's own path, even where this process runs a Ray

    def install(handle: FakeHandle) -> h.HandleEngine:
        monkeypatch.setitem(h._handles, ("serve://engine-small", asyncio.get_running_loop()), handle)
        return h.HandleEngine("serve://engine-small", "small")
    return install


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


async def test_complete_forwards_the_engines_bytes_and_usage(fake: Any) -> None:
    body = json.dumps({"choices": [{"message": {"content": "hi"}}],
                       "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}).encode()
    handle = FakeHandle(complete=(200, body))
    result = await fake(handle).complete(CHAT, {"model": "wf/extract", "messages": []})
    assert result.body == body and (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 3)
    assert handle.calls[0][1]["model"] == "small"


async def test_a_context_length_answer_is_classified_for_fallback(fake: Any) -> None:
    engine = fake(FakeHandle(complete=(400, json.dumps(error_body(400, CONTEXT_MESSAGE)).encode())))
    with pytest.raises(BackendError) as caught:
        await engine.complete(CHAT, {"messages": []})
    assert caught.value.error_class is ErrorClass.CONTEXT_LENGTH and caught.value.failure.status_code == 400


async def test_a_vanished_engine_is_a_connection_failure(fake: Any) -> None:
    engine = fake(FakeHandle(complete=serve_exc.DeploymentUnavailableError(DeploymentID("engine", "engine-small"))))
    with pytest.raises(BackendError) as caught:
        await engine.complete(CHAT, {"messages": []})
    assert caught.value.error_class is ErrorClass.CONNECTION and not caught.value.first_token_sent


async def _drain(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def test_stream_reads_usage_from_the_chunk_that_also_carries_done(fake: Any) -> None:
    """The relay settles the budget when it sees [DONE]: usage in the same chunk must already be counted."""
    chunk = _sse({"choices": [{"delta": {"content": "hi"}}]},
                 {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}})
    stream = await fake(FakeHandle(stream=[200, chunk])).stream(CHAT, {"messages": []})
    first = await stream.__anext__()
    assert first == chunk and stream.first_token_sent
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens, stream.usage.estimated) == (4, 1, False)
    assert await _drain(stream) == b""


async def test_stream_errors_before_the_first_token_raise_at_start(fake: Any) -> None:
    handle = FakeHandle(stream=[400, json.dumps(error_body(400, CONTEXT_MESSAGE)).encode()])
    with pytest.raises(BackendError) as caught:
        await fake(handle).stream(CHAT, {"messages": []})
    assert caught.value.error_class is ErrorClass.CONTEXT_LENGTH and not caught.value.first_token_sent


async def test_an_in_band_error_mid_stream_is_a_server_failure_after_the_first_token(fake: Any) -> None:
    chunks = [200, b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
              b'data: {"error": {"message": "EngineCore died", "code": 500}}\n\n']
    handle = FakeHandle(stream=chunks)
    stream = await fake(handle).stream(CHAT, {"messages": []})
    with pytest.raises(BackendError) as caught:
        await _drain(stream)
    assert caught.value.error_class is ErrorClass.SERVER and caught.value.first_token_sent
    await stream.aclose()
    assert handle.generator is not None and handle.generator.cancelled


async def test_a_stream_cut_before_done_is_a_server_failure(fake: Any) -> None:
    stream = await fake(FakeHandle(stream=[200, b'data: {"choices": []}\n\n'])).stream(CHAT, {"messages": []})
    with pytest.raises(BackendError, match=r"before data: \[DONE\]"):
        await _drain(stream)


def test_each_event_loop_gets_its_own_handle_routing_on_that_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handle that routes on its caller's loop is useless on another loop: one per loop, dead loops dropped.
    Its calls go over Serve's inter-deployment gRPC, not as Ray actor tasks."""
    made: list[dict[str, Any]] = []

    class Made:
        def _init(self, **options: Any) -> None:
            made.append(options)

        def options(self, **options: Any) -> Made:
            made[-1] |= options
            return self

    monkeypatch.setattr("ray.serve.get_app_handle", lambda app: Made())
    monkeypatch.setattr(h, "_handles", {})

    async def get() -> Any:
        return h._handle("serve://engine-small"), h._handle("serve://engine-small")

    first, again = asyncio.run(get())
    second, _ = asyncio.run(get())
    assert first is again and second is not first
    assert made == [{"_run_router_in_separate_loop": False, "_by_reference": False}] * 2
    assert len(h._handles) == 1  # the first loop closed: its handle went when the second was made
    h.forget("serve://engine-small")
    assert h._handles == {}


# -- the replica's side: vLLM objects in, bytes out ---------------------------------------------------

def test_replica_translates_requests_errors_and_chunks() -> None:
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    from pilothouse.serving.engines import vllm as v

    request = v.parse_request(CHAT, {"model": "small", "messages": [{"role": "user", "content": "hi"}],
                                     "response_format": {"type": "json_object"}})
    assert request.model == "small" and request.messages[0]["content"] == "hi"
    with pytest.raises(ValidationError) as caught:
        v.parse_request(COMPLETIONS, {"model": "small", "prompt": "x", "max_tokens": "many"})
    error = json.loads(v.validation_error(caught.value))["error"]
    assert error["code"] == 400 and error["param"] == "max_tokens"

    refused = ErrorResponse(error=ErrorInfo(message=CONTEXT_MESSAGE, type="BadRequestError", code=400))
    status, body = v.answer(refused)
    assert status == 400 and json.loads(body)["error"]["message"] == CONTEXT_MESSAGE
    assert v.chunk_bytes(["data: {}\n\n", "data: [DONE]\n\n"]) == b"data: {}\n\ndata: [DONE]\n\n"
    assert json.loads(v.chunk_bytes([refused])[6:])["error"]["code"] == 400


def test_local_engine_config_is_sized_for_a_laptop(tmp_path: Path) -> None:
    from pilothouse.serving.engines import vllm as v

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    config = v.llm_config(vllm_md(), base_dir=tmp_path)
    assert config.model_id == "tiny"
    assert config.model_loading_config.model_source == str((tmp_path / "models" / "tiny").resolve())
    assert config.engine_kwargs["max_model_len"] == 1024 and config.engine_kwargs["enforce_eager"] is True
    assert config.placement_group_config == {"bundles": [{"CPU": 1}]}
    assert config.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert config.runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"  # the model's threads: the bundle's one CPU
    assert config.deployment_config["ray_actor_options"] == {"num_cpus": 0}


@pytest.mark.parametrize(("world_size", "backend"), [(1, "uni"), (2, "mp")])
def test_a_single_worker_engine_runs_its_model_in_the_engine_core(monkeypatch: pytest.MonkeyPatch,
                                                                   world_size: int, backend: str) -> None:
    """One worker: vLLM's ``uni`` executor (no worker process); more than one keeps ray.serve.llm's ``mp``."""
    from types import SimpleNamespace

    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from pilothouse.serving.engines import vllm as v
    from pilothouse.serving.engines.inproc_worker import InProcessWorkerEngine

    def prepared(self: Any, ctx: Any) -> tuple[Any, Any, Any]:
        parallel = SimpleNamespace(world_size=world_size, distributed_executor_backend="mp")
        return SimpleNamespace(distributed_executor_backend="mp"), "frontend", SimpleNamespace(parallel_config=parallel)

    monkeypatch.setattr(VLLMEngine, "_prepare_engine_config", prepared)
    engine_args, frontend, config = InProcessWorkerEngine._prepare_engine_config(object.__new__(InProcessWorkerEngine),
                                                                                 None)
    assert engine_args.distributed_executor_backend == config.parallel_config.distributed_executor_backend == backend
    assert frontend == "frontend"
    server = object.__new__(v.PilothouseLLMServer)
    assert server._get_default_engine_class() is InProcessWorkerEngine


def test_local_engine_config_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    from pilothouse.serving.engines import vllm as v

    with pytest.raises(FileNotFoundError, match=r"spec.model.name .*make-tiny"):
        v.llm_config(vllm_md("./nowhere"), base_dir=tmp_path)
    with pytest.raises(ValueError, match="not vllm"):
        v.llm_config(vllm_md("gpt-4o-mini", engine="external"))


# -- tiny model and local mode -----------------------------------------------------------------------

def test_tiny_model_is_complete_small_and_left_alone_once_written(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "tiny")
    assert all((path / name).is_file() for name in FILES)
    assert sum(f.stat().st_size for f in path.iterdir()) < 4 << 20
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_llama(path) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete tiny model"):
        make_tiny_llama(tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


async def test_local_mode_routes_to_the_started_engine(tmp_path: Path) -> None:
    env = LocalEnv(tmp_path / "state", engine_endpoints={"small": "serve://engine-small"})
    try:
        outcome = await model_deployment.reconcile(vllm_md(str(tmp_path)), env)
    finally:
        await env.prober.aclose()
    assert outcome.status["endpoint"] == "serve://engine-small" and outcome.phase == "Ready"
