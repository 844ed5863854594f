"""The gateway in front of a real vLLM-CPU engine on Ray Serve, called with the official OpenAI client.

One engine for the whole file (DESIGN.md §9: ≈4 GB, ≈30 s to start on 2 cores): a tiny generated
Llama, deployed with ``engines.vllm.deploy_local_engines`` exactly as ``pilothouse run`` does, and
reached by the gateway through a Serve handle (``serve://`` endpoint). The fallback and embeddings
backend is the controllable FakeBackend over HTTP: a generative engine does not serve
``/v1/embeddings``, and a second (pooling) engine would double the memory of the file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from pilothouse.operator.api import ModelDeployment, RoutingTable
from pilothouse.operator.api.routing import BudgetLimit, BudgetRule
from pilothouse.serving.audit import AuditLog, AuditRecord
from pilothouse.serving.engines import vllm as engine
from pilothouse.serving.tiny_model import make_tiny_llama
from tests.fakes.openai_backend import FakeBackend, ThreadedFake
from tests.integration.test_serve import KEY, served_gateway, table, write

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.vllm]

MAX_MODEL_LEN = 1024
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens: what tests.unit.factories.model prices every backend at


def small_model(path: Path) -> ModelDeployment:
    return ModelDeployment.model_validate({
        "metadata": {"name": "small", "namespace": "default"},
        "spec": {"model": {"name": str(path)}, "engine": "vllm", "vllm": {"maxModelLen": MAX_MODEL_LEN},
                 "tier": "small", "pricing": {"inputPerMillionUSD": PRICE_IN, "outputPerMillionUSD": PRICE_OUT}},
    })


def routing(engine_endpoint: str, fake_url: str) -> RoutingTable:
    """extract: vLLM then the fake (larger window); solo: vLLM alone; embed: the fake alone. A day budget."""
    compiled = table(1, "extract", "solo", "embed", endpoint=fake_url)
    routes = []
    for route in compiled.routes:
        small, large = route.backends
        small = small.model_copy(update={"engine": "vllm", "endpoint": engine_endpoint, "model": "small",
                                         "context_window": MAX_MODEL_LEN})
        large = large.model_copy(update={"context_window": 128_000})
        backends = {"extract": [small, large], "solo": [small], "embed": [large]}[route.step]
        routes.append(route.model_copy(update={"backends": backends, "max_tokens": 64}))
    budget = BudgetRule(policy="team", state="Ok", action="none",
                        limits=[BudgetLimit(window="day", max_cost_usd=100.0)])
    return compiled.model_copy(update={"routes": routes, "budget": budget})


@dataclass(frozen=True)
class Stack:
    url: str
    store_url: str
    fake: FakeBackend
    startup_s: float

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def audit(self, request_id: str) -> AuditRecord:
        with AuditLog(self.store_url, create=False) as log:
            record = log.get(request_id)
        assert record is not None, f"no audit record {request_id}"
        return record


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("vllm")
    model_dir = make_tiny_llama(folder / "tiny-llama")
    with ThreadedFake("org/large") as fake:
        started = time.perf_counter()
        # Serve (and the gateway) first: the engines join the same Serve instance.
        route_file = folder / "routing.json"
        with served_gateway(folder, route_file) as (url, _, store_url):
            endpoints = engine.deploy_local_engines([small_model(model_dir)])
            write(route_file, routing(endpoints["small"], fake.url))
            deadline = time.monotonic() + 15
            while httpx.get(f"{url}/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the gateway did not load the RoutingTable"
                time.sleep(0.1)
            yield Stack(url, store_url, fake, time.perf_counter() - started)


def _committed(record: AuditRecord) -> float | None:
    return record.budget[0].committed_usd if record.budget else None


def _socket_calls(stack: Stack) -> float:
    """Gateway calls the engine replica served on its Unix socket (``engines.local_socket``), from its metrics."""
    text = httpx.get(f"{stack.url}/engines/small/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "pilothouse_engine_socket_requests" for sample in family.samples
               if sample.name.endswith("_total"))


def test_chat_through_the_gateway_commits_the_engines_usage(stack: Stack) -> None:
    """Through the engine replica's socket on this host, not the Serve handle: the faster path locally."""
    before = _socket_calls(stack)
    raw = stack.client().chat.completions.with_raw_response.create(
        model="wf/extract", messages=[{"role": "user", "content": "Extract the invoice number."}], max_tokens=12,
        temperature=0, extra_body={"ignore_eos": True})
    done = raw.parse()
    print(f"\nstack startup (ray.init + gateway + vLLM engine ready): {stack.startup_s:.1f} s")
    assert done.model == "small" and done.choices[0].message.content
    assert done.usage is not None and done.usage.completion_tokens == 12 and done.usage.prompt_tokens > 5
    record = stack.audit(raw.headers["x-pilothouse-request-id"])
    assert record.routing is not None and record.routing.backend == "small"
    assert record.usage is not None
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (done.usage.prompt_tokens, 12)
    expected = (done.usage.prompt_tokens * PRICE_IN + 12 * PRICE_OUT) / 1_000_000
    assert _committed(record) == pytest.approx(expected)
    assert _socket_calls(stack) == before + 1


def test_streamed_chat_reports_usage_and_is_audited(stack: Stack) -> None:
    client = stack.client()
    with client.chat.completions.with_streaming_response.create(
            model="wf/extract", messages=[{"role": "user", "content": "hello there"}], max_tokens=10,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as response:
        request_id = response.headers["x-pilothouse-request-id"]
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and usage.completion_tokens == 10
    record = stack.audit(request_id)
    assert record.usage is not None and record.usage.completion_tokens == 10
    assert record.usage.prompt_tokens == usage.prompt_tokens
    assert _committed(record) == pytest.approx((usage.prompt_tokens * PRICE_IN + 10 * PRICE_OUT) / 1_000_000)


def test_completions(stack: Stack) -> None:
    done = stack.client().completions.create(model="wf/extract", prompt="Invoice number INV-", max_tokens=6,
                                             extra_body={"ignore_eos": True})
    assert done.model == "small" and done.choices[0].text
    assert done.usage is not None and done.usage.completion_tokens == 6


def test_structured_output_matches_the_schema(stack: Stack) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["currency", "approved"],
              "properties": {"currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                             "approved": {"type": "boolean"}}}
    done = stack.client().chat.completions.create(
        model="wf/extract", messages=[{"role": "user", "content": "Currency and approval as JSON."}], max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema, "strict": True}})
    content = done.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), schema)


def test_logprobs_come_back(stack: Stack) -> None:
    done = stack.client().chat.completions.create(
        model="wf/extract", messages=[{"role": "user", "content": "hello"}], max_tokens=4, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True})
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 4
    assert all(len(token.top_logprobs) == 2 and token.logprob <= 0 for token in logprobs.content)


def test_embeddings_go_to_the_embedding_backend(stack: Stack) -> None:
    """The tiny engine is generative; the embed route's backend (the fake) answers embeddings."""
    done = stack.client().embeddings.create(model="wf/embed", input=["invoice total", "vendor name"])
    assert [len(d.embedding) for d in done.data] == [stack.fake.embedding_dim] * 2
    with pytest.raises(openai.APIStatusError) as caught:  # the engine refuses it, and says so
        stack.client().embeddings.create(model="wf/solo", input="invoice total")
    assert 400 <= caught.value.status_code < 500


def test_models_list_names_the_routes(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == ["wf/extract", "wf/solo", "wf/embed"]
    assert (models.data[0].model_extra or {})["backends"] == ["small", "org/large"]


def _too_long() -> str:
    """~3x the context in real tokens, yet under it by the gateway's characters/4 estimate."""
    return " ".join(f"{i:x}" for i in range(700))


def test_context_too_long_falls_back_to_the_larger_window(stack: Stack) -> None:
    served = stack.fake.served["/v1/chat/completions"]
    raw = stack.client().chat.completions.with_raw_response.create(
        model="wf/extract", messages=[{"role": "user", "content": _too_long()}], max_tokens=8)
    assert raw.parse().model == "org/large"
    assert stack.fake.served["/v1/chat/completions"] == served + 1
    record = stack.audit(raw.headers["x-pilothouse-request-id"])
    assert record.routing is not None
    assert [(a.backend, a.error_class) for a in record.routing.attempts] == [("small", "context_length"),
                                                                             ("large", None)]


def test_context_too_long_without_fallback_is_a_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(model="wf/solo", messages=[{"role": "user", "content": _too_long()}],
                                               max_tokens=8)
    assert caught.value.code == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in caught.value.message


def test_vllm_metrics_are_scrapable(stack: Stack) -> None:
    text = httpx.get(f"{stack.url}/engines/small/metrics").text
    assert "vllm:prompt_tokens_total" in text and "vllm:num_requests_running" in text


def test_the_model_runs_in_the_engine_core_process(stack: Stack) -> None:
    """No separate vLLM worker process spinning beside the EngineCore: it cost a whole core on 2 (``inproc_worker``)."""
    titles = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            titles.append(" ".join(proc.cmdline()))
    assert sum(t.startswith("VLLM::EngineCore") for t in titles) == 1, titles
    assert not [t for t in titles if t.startswith("VLLM::Worker")]


def test_a_dead_engine_falls_back(stack: Stack) -> None:
    """Last: deletes the engine. The next request is served by the fallback, the failure classed as connection."""
    serve.delete(engine.app_name(small_model(Path("unused"))))
    raw = stack.client().chat.completions.with_raw_response.create(
        model="wf/extract", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert raw.parse().model == "org/large"
    record = stack.audit(raw.headers["x-pilothouse-request-id"])
    assert record.routing is not None
    assert [(a.backend, a.error_class) for a in record.routing.attempts] == [("small", "connection"),
                                                                             ("large", None)]
