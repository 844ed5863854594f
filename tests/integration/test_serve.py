"""The real gateway on Ray Serve, called with the official OpenAI client: what `pilothouse serve` runs.

One Ray + Serve per module (≈6-12 s to start on 2 cores, DESIGN.md §9); teardown is always
``serve.shutdown()`` then ``ray.shutdown()`` so no Ray process outlives the tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import ray
from ray import serve

from pilothouse.localrun import serve_port
from pilothouse.operator.api import RoutingTable
from pilothouse.operator.routing import Dependencies, compile_table
from pilothouse.serving import serve as gateway
from pilothouse.serving.audit import AuditLog, AuditRecord
from tests.fakes.openai_backend import FakeBackend, ThreadedFake
from tests.polling import eventually_sync
from tests.unit.factories import model, workflow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "sk-integration-0123456789"


def table(revision: int, *steps: str, endpoint: str | None = None) -> RoutingTable:
    """Every backend's endpoint is ``endpoint`` (the fake backend) when given."""
    deps = Dependencies(models={"small": model("small", fallback=["large"]), "large": model("large", tier="large")},
                        indexes={}, budgets={})
    spec = [{"name": s, "type": "generate", "generate": {"tier": "small", "promptTemplate": "{input}"}} for s in steps]
    compiled = compile_table(workflow(retrieve=False, steps=spec), deps, None, datetime.now(UTC))
    if endpoint is not None:
        routes = [r.model_copy(update={"backends": [b.model_copy(update={"endpoint": endpoint}) for b in r.backends]})
                  for r in compiled.routes]
        compiled = compiled.model_copy(update={"routes": routes})
    return compiled.model_copy(update={"revision": revision})


def write(path: Path, t: RoutingTable) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(t.model_dump_json(by_alias=True, indent=2))
    os.replace(tmp, path)



@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:PORT
    direct_url: str  # the gateway replica's direct port
    routing: Path
    store_url: str
    startup_s: float
    fake: FakeBackend

    def client(self, api_key: str = KEY, *, direct: bool = False) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.direct_url if direct else self.url}/v1", api_key=api_key, max_retries=0,
                             timeout=10)


def kill_leftovers(children: list[psutil.Process]) -> None:
    """Ray's and vLLM's processes that outlived the shutdown (a ``VLLM::EngineCore`` orphan), by process group."""
    own = os.getpgid(0)
    for proc in children:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if proc.is_running():
                pgid = os.getpgid(proc.pid)
                if pgid != own:
                    os.killpg(pgid, signal.SIGKILL)
                else:
                    proc.kill()


@contextlib.contextmanager
def served_gateway(folder: Path, routing: Path) -> Iterator[tuple[str, str, str]]:
    """Local Ray with Serve and the gateway on a free port, and on a direct port (API key ``KEY`` → team-a, a SQLite
    store in ``folder``): yields (base URL, direct URL, store URL); Serve, Ray and any stray child are gone
    afterwards."""
    keys = folder / "keys.yaml"
    keys.write_text(f"{KEY}: team-a\n")
    store_url = f"sqlite:///{folder.resolve()}/store.db"
    port, direct_port = serve_port(), serve_port()
    os.environ.update(gateway.ray_env())
    # Children that predate Ray (the session's PostgreSQL server) are not ours to kill afterwards.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        args = gateway.GatewayArgs(routing=str(routing), api_keys=str(keys), store_url=store_url,
                                   direct_port=direct_port, direct_host="127.0.0.1")
        gateway.start(args, host="127.0.0.1", port=port)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{direct_port}", store_url
    finally:
        children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        serve.shutdown()
        ray.shutdown()
        kill_leftovers(children)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("serve")
    with ThreadedFake("org/small") as fake:
        routing = folder / "routing.json"
        write(routing, table(1, "extract", endpoint=fake.url))
        started = time.perf_counter()
        with served_gateway(folder, routing) as (url, direct_url, store_url):
            yield Served(url, direct_url, routing, store_url, time.perf_counter() - started, fake)


def test_models_through_the_openai_client(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["wf/extract"]
    assert models.data[0].owned_by == "default"
    assert (models.data[0].model_extra or {})["backends"] == ["org/small", "org/large"]
    print(f"\nRay Serve fixture startup (ray.init + serve.run): {served.startup_s:.1f} s")


def test_a_bad_key_is_an_authentication_error(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        served.client("sk-wrong").models.list()
    assert caught.value.code == "invalid_api_key"


def test_probes_need_no_key(served: Served) -> None:
    assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{served.url}/readyz")
    assert ready.status_code == 200 and ready.json()["revision"] == 1


def test_body_limit_holds_through_the_serve_proxy(served: Served) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(f"{served.url}/v1/chat/completions", content=b" " * (2 << 20), headers=headers)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{served.url}/v1/chat/completions", content=(b" " * 65536 for _ in range(32)),
                         headers=headers)
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(f"{served.url}/v1/chat/completions", content=b'{"\xff": 1}', headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_encoding"


def test_models_latency_sequential(served: Served) -> None:
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        client.get("/v1/models")  # warm the connection
        samples = []
        for _ in range(50):
            start = time.perf_counter()
            assert client.get("/v1/models").status_code == 200
            samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    print(f"\nGET /v1/models, 50 sequential: p50 {statistics.median(samples):.2f} ms, "
          f"p90 {samples[44]:.2f} ms, max {samples[-1]:.2f} ms")
    assert statistics.median(samples) < 100


def test_chat_through_ray_serve_with_the_openai_client(served: Served) -> None:
    """Non-streamed and streamed chat through the Serve proxy, the gateway replica and a real HTTP backend."""
    client = served.client()
    messages = [{"role": "user", "content": "hello there"}]
    raw = client.chat.completions.with_raw_response.create(model="wf/extract", messages=messages, max_tokens=8)
    assert raw.headers["x-pilothouse-request-id"]
    done = raw.parse()
    assert done.model == "org/small" and done.usage is not None and done.usage.completion_tokens == 8
    assert len((done.choices[0].message.content or "").split()) == 8
    chunks = list(client.chat.completions.create(model="wf/extract", messages=messages, max_tokens=8, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8
    assert served.fake.served["/v1/chat/completions"] == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="wf/nope", messages=messages)
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'pilothouse_requests_total{backend="small",outcome="ok",route="wf/extract"} 2.0' in metrics


def test_the_direct_port_serves_the_same_gateway_past_serves_ingress(served: Served) -> None:
    """The replica's own server answers with the same app and state as Serve's ingress: the same keys, the same
    table, the same audit trail and metrics, on the replica's event loop."""

    def served_ok() -> float:
        line = 'pilothouse_requests_total{backend="small",outcome="ok",route="wf/extract"} '
        text = httpx.get(f"{served.url}/metrics").text  # through Serve's ingress
        return next((float(row[len(line):]) for row in text.splitlines() if row.startswith(line)), 0.0)

    before = served_ok()
    client = served.client(direct=True)
    messages = [{"role": "user", "content": "hello over the direct port"}]
    raw = client.chat.completions.with_raw_response.create(model="wf/extract", messages=messages, max_tokens=8,
                                                            extra_headers={"x-pilothouse-run-id": "direct-port"})
    done = raw.parse()
    assert done.usage is not None and done.usage.completion_tokens == 8
    with pytest.raises(openai.AuthenticationError):
        served.client("sk-wrong", direct=True).models.list()
    assert httpx.get(f"{served.direct_url}/readyz").json()["status"] == "ready"

    def recorded() -> AuditRecord | None:
        with AuditLog(served.store_url, create=False) as log:
            return next((r for r in log.tail(50) if r.run_id == "direct-port"), None)

    record = eventually_sync(recorded, timeout=10)
    assert record.id == raw.headers["x-pilothouse-request-id"] and record.status_code == 200
    # one app, one set of counters: Serve's ingress reports the request the direct port served
    assert served_ok() == before + 1


def test_hot_reload_in_the_replica(served: Served) -> None:
    """The refresh task runs in the Serve replica (FastAPI lifespan): a new revision shows without a restart."""
    write(served.routing, table(2, "extract", "summarize", endpoint=served.fake.url))
    deadline = time.monotonic() + 10
    while [m.id for m in served.client().models.list().data] != ["wf/extract", "wf/summarize"]:
        assert time.monotonic() < deadline, "the replica did not pick up revision 2"
        time.sleep(0.1)
    assert httpx.get(f"{served.url}/readyz").json()["revision"] == 2


def test_a_client_that_hangs_up_on_a_non_streamed_request_leaves_a_499_record(served: Served) -> None:
    """Serve cancels the replica's request when its HTTP client disconnects; the gateway records why it gave no
    answer, and serves the next request as before."""
    served.fake.stall(3.0)
    headers = {"Authorization": f"Bearer {KEY}", "x-pilothouse-run-id": "hung-up"}
    body = {"model": "wf/extract", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=0.5)
    finally:
        served.fake.stall(None)

    def recorded() -> AuditRecord | None:
        with AuditLog(served.store_url, create=False) as log:
            return next((r for r in log.tail(50) if r.run_id == "hung-up"), None)

    record = eventually_sync(recorded, timeout=10)
    assert record.status_code == 499 and record.usage is None
    assert [(a.backend, a.error_class) for a in record.routing.attempts] == [("small", "cancelled")]
    again = served.client().chat.completions.create(model="wf/extract", messages=body["messages"], max_tokens=4)
    assert again.usage is not None and again.usage.completion_tokens == 4


def test_a_request_leaves_its_audit_record_and_no_access_line_in_the_replicas_logs(served: Served) -> None:
    """The audit trail is the gateway's request log: Serve's access line per request (a log record and two writes on
    the replica's event loop) is off for the gateway, in its Serve log file and on its stderr alike."""
    headers = {"Authorization": f"Bearer {KEY}", "x-pilothouse-run-id": "no-access-line"}
    body = {"model": "wf/extract", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    assert httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=10).status_code == 200

    def recorded() -> AuditRecord | None:
        with AuditLog(served.store_url, create=False) as log:
            return next((r for r in log.tail(50) if r.run_id == "no-access-line"), None)

    assert eventually_sync(recorded, timeout=10).status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API names the session's folder
    replicas = [p.pid for p in psutil.process_iter(["cmdline"])
                if "ServeReplica:gateway" in " ".join(p.info["cmdline"] or [])]
    serve_logs = list((logs / "serve").glob("replica_gateway_*.log"))
    stderr_logs = [f for pid in replicas for f in logs.glob(f"worker-*-{pid}.err")]
    assert serve_logs and stderr_logs, (serve_logs, stderr_logs)
    access = re.compile(r"POST /v1/chat/completions \d{3} [\d.]+ms")
    assert [line for f in serve_logs + stderr_logs for line in f.read_text().splitlines() if access.search(line)] == []
