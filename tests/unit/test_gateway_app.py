"""The gateway app without Ray: probes, /v1/models from the RoutingTable, API keys, body guards, hot reload."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from pilothouse.operator.api import RoutingTable
from pilothouse.operator.routing import Dependencies, compile_table
from pilothouse.serving.auth import ANONYMOUS, ApiKeyError, tenant_of
from pilothouse.serving.direct import listen
from pilothouse.serving.gateway import build_app, validate_chat
from tests.polling import eventually_sync

from .factories import model, workflow

AT = datetime(2026, 1, 1, tzinfo=UTC)
KEYS = {"sk-team-a-0123456789": "team-a", "sk-team-b-0123456789": "team-b"}
A = {"Authorization": "Bearer sk-team-a-0123456789"}


def generate(name: str, tier: str) -> dict[str, Any]:
    return {"name": name, "type": "generate", "generate": {"tier": tier, "promptTemplate": "{input}"}}


def table(revision: int = 1, *, summarize: bool = False, small_healthy: bool = True) -> RoutingTable:
    """Workflow ``wf``: step ``extract`` on tier small (falls back to large); optionally ``summarize`` on large."""
    steps = [generate("extract", "small")] + ([generate("summarize", "large")] if summarize else [])
    deps = Dependencies(models={"small": model("small", fallback=["large"], healthy=small_healthy),
                                "large": model("large", tier="large")}, indexes={}, budgets={})
    compiled = compile_table(workflow(retrieve=False, steps=steps), deps, None, AT)
    return compiled.model_copy(update={"revision": revision})


def write(path: Path, content: RoutingTable | str) -> None:
    """Write as the operator does: a new file renamed over the old one (a new inode, so a change is seen)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content if isinstance(content, str) else content.model_dump_json(by_alias=True, indent=2))
    os.replace(tmp, path)


def error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert an OpenAI-style error and return its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def add_test_routes(app: FastAPI) -> None:
    """What the request path will do: read the (guarded) body, validate it, know the tenant."""

    @app.post("/v1/echo")
    async def echo(request: Request) -> JSONResponse:
        parsed = validate_chat(await request.body())
        if isinstance(parsed, JSONResponse):
            return parsed
        return JSONResponse({"model": parsed.model, "tenant": tenant_of(request)})

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("bug")


@pytest.fixture
def routing(tmp_path: Path) -> Path:
    path = tmp_path / "routing.json"
    write(path, table(1))
    return path


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"{k}: {t}\n" for k, t in KEYS.items()))
    return path


@pytest.fixture
def gateway(routing: Path) -> Iterator[Callable[..., TestClient]]:
    """``gateway(**build_app kwargs)`` → a started TestClient (lifespan on: the refresh task runs)."""
    clients: list[TestClient] = []

    def start(path: Path = routing, **kwargs: Any) -> TestClient:
        app = build_app(str(path), refresh_interval=0.05, **kwargs)
        add_test_routes(app)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


# ---- probes ---------------------------------------------------------------------------------------------------

def test_healthz_answers_even_without_a_table(gateway: Callable[..., TestClient], tmp_path: Path) -> None:
    client = gateway(tmp_path / "absent.json")
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_turns_ready_when_the_table_file_appears(gateway: Callable[..., TestClient], tmp_path: Path) -> None:
    path = tmp_path / "later.json"
    client = gateway(path)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "not ready" and "later.json" in response.json()["reason"]
    err = error(client.get("/v1/models"), 503, "not_ready")
    assert "No RoutingTable" in err["message"] and err["type"] == "server_error"

    write(path, table(3))
    eventually_sync(lambda: client.get("/readyz").status_code == 200)  # the background refresh, not a request
    assert client.get("/readyz").json() == {"status": "ready", "workflow": "wf", "namespace": "default",
                                            "revision": 3, "degraded": False}
    assert client.get("/v1/models").status_code == 200


def test_readyz_stays_ready_on_the_last_good_table_and_says_what_is_wrong(
        gateway: Callable[..., TestClient], routing: Path) -> None:
    client = gateway()
    write(routing, "{not json")
    eventually_sync(lambda: "warning" in client.get("/readyz").json())
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["revision"] == 1
    assert "invalid RoutingTable" in ready.json()["warning"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["wf/extract"]


# ---- /v1/models -----------------------------------------------------------------------------------------------

def test_models_lists_one_model_per_route_with_its_backends(gateway: Callable[..., TestClient],
                                                            routing: Path) -> None:
    write(routing, table(1, summarize=True))
    body = gateway().get("/v1/models").json()
    assert body["object"] == "list"
    created = int(AT.timestamp())
    assert body["data"] == [
        {"id": "wf/extract", "object": "model", "created": created, "owned_by": "default", "tier": "small",
         "backends": ["org/small", "org/large"], "revision": 1},
        {"id": "wf/summarize", "object": "model", "created": created, "owned_by": "default", "tier": "large",
         "backends": ["org/large"], "revision": 1},
    ]


def test_hot_reload_changes_models_without_a_restart(gateway: Callable[..., TestClient], routing: Path) -> None:
    client = gateway()
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["wf/extract"]

    write(routing, table(2, summarize=True, small_healthy=False))
    eventually_sync(lambda: client.get("/readyz").json()["revision"] == 2)
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["wf/extract", "wf/summarize"]
    assert data[0]["backends"] == ["org/large", "org/small"]  # small is down: the operator reordered

    write(routing, table(1))  # a stale copy never takes the gateway back in time
    eventually_sync(lambda: "warning" in client.get("/readyz").json())
    assert client.get("/readyz").json()["revision"] == 2


# ---- API keys -------------------------------------------------------------------------------------------------

def test_keys_required_when_configured(gateway: Callable[..., TestClient], keys_file: Path) -> None:
    client = gateway(api_keys=str(keys_file))
    missing = client.get("/v1/models")
    assert "didn't provide an API key" in error(missing, 401)["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    error(client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401, "invalid_api_key")
    error(client.get("/v1/models", headers={"Authorization": "Basic sk-team-a-0123456789"}), 401)
    error(client.get("/v1/models", headers={"Authorization": "Bearer "}), 401)
    error(client.get("/v1/models", headers={"Authorization": "Bearer sk-team-a-012345678"}), 401)  # a prefix
    error(client.post("/v1/echo", content=b"x" * 10, headers={"Authorization": "Bearer nope"}), 401)
    assert client.get("/v1/models", headers=A).status_code == 200
    assert client.get("/v1/models", headers={"authorization": "bearer sk-team-b-0123456789"}).status_code == 200
    error(client.get("/v1/unknown"), 401)  # no key: nothing under /v1 is revealed, not even what exists
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200  # probes: no key


def test_the_key_decides_the_tenant(gateway: Callable[..., TestClient], keys_file: Path) -> None:
    client = gateway(api_keys=str(keys_file))
    body = json.dumps({"model": "wf/extract", "messages": [{"role": "user", "content": "hi"}]})
    assert client.post("/v1/echo", content=body, headers=A).json() == {"model": "wf/extract", "tenant": "team-a"}
    b = {"Authorization": "Bearer sk-team-b-0123456789"}
    assert client.post("/v1/echo", content=body, headers=b).json()["tenant"] == "team-b"


def test_without_keys_everyone_is_the_default_tenant(gateway: Callable[..., TestClient]) -> None:
    client = gateway()
    body = json.dumps({"model": "wf/extract", "messages": [{"role": "user", "content": "hi"}]})
    assert client.post("/v1/echo", content=body).json()["tenant"] == ANONYMOUS == "default"
    assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_keys_from_a_mounted_secret_directory_and_rotation(gateway: Callable[..., TestClient], tmp_path: Path) -> None:
    """A Secret volume: ``..data -> ..<timestamp>/`` plus one symlink per key; an update swaps ``..data``."""
    secret = tmp_path / "secret"
    secret.mkdir()

    def publish(version: str, files: dict[str, str]) -> None:
        folder = secret / f"..{version}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        link = secret / "..data_tmp"
        link.symlink_to(folder.name)
        os.replace(link, secret / "..data")
        for name in files:
            if not (secret / name).is_symlink():
                (secret / name).symlink_to(f"..data/{name}")

    publish("v1", {"team-a": "# rotated monthly\nsk-a-old-0000000000\n\nsk-a-new-0000000000\n",
                   "team-b": "sk-b-0000000000"})
    client = gateway(api_keys=str(secret))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    for key, tenant in [("sk-a-old-0000000000", "team-a"), ("sk-a-new-0000000000", "team-a"),
                        ("sk-b-0000000000", "team-b")]:
        response = client.post("/v1/echo", content=body, headers={"Authorization": f"Bearer {key}"})
        assert response.json()["tenant"] == tenant

    publish("v2", {"team-a": "sk-a-new-0000000000\n", "team-b": "sk-b-0000000000"})  # the old key is revoked
    eventually_sync(lambda: client.get("/v1/models", headers={"Authorization": "Bearer sk-a-old-0000000000"})
               .status_code == 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-a-new-0000000000"}).status_code == 200


@pytest.mark.parametrize(("content", "words"), [
    ("", "holds no API key"),
    ("- sk-1\n- sk-2\n", "expected a mapping"),
    ("sk-1: a\nsk-1: b\n", "listed twice at line 2"),
    ("'sk 1': a\n", "without whitespace"),
    ("sk-1: ''\n", "non-empty string"),
    ("sk-1: [\n", "not valid YAML"),
])
def test_bad_key_files_refuse_to_start(tmp_path: Path, routing: Path, content: str, words: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(ApiKeyError, match=words):
        build_app(str(routing), api_keys=str(path))


def test_json_key_file_and_missing_key_file(tmp_path: Path, routing: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    app = build_app(str(routing), api_keys=str(path))
    assert len(app.state.api_keys) == 2 and app.state.api_keys.tenant("sk-team-b-0123456789") == "team-b"
    with pytest.raises(ApiKeyError, match="cannot read API keys"):
        build_app(str(routing), api_keys=str(tmp_path / "absent.yaml"))


# ---- body guards and errors -----------------------------------------------------------------------------------

CHAT = json.dumps({"model": "wf/extract", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_oversized_body_is_413_before_it_is_read(gateway: Callable[..., TestClient]) -> None:
    client = gateway(max_body_bytes=1000)
    err = error(client.post("/v1/chat/completions", content=b"{" + b" " * 1000 + b"}"), 413, "request_too_large")
    assert "1002 bytes" in err["message"] and "1000 bytes" in err["message"]
    assert client.post("/v1/echo", content=CHAT).status_code == 200  # under the limit: through


def test_chunked_oversized_body_is_413(gateway: Callable[..., TestClient]) -> None:
    client = gateway(max_body_bytes=1000)
    response = client.post("/v1/echo", content=(b" " * 300 for _ in range(100)))
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers  # nothing to refuse on up front
    error(response, 413, "request_too_large")
    small = client.post("/v1/echo", content=iter([CHAT[:10], CHAT[10:]]))  # chunked, under the limit
    assert small.status_code == 200 and small.json()["model"] == "wf/extract"


def test_invalid_utf8_is_400_for_any_body(gateway: Callable[..., TestClient]) -> None:
    client = gateway()
    err = error(client.post("/v1/chat/completions", content=b'{"model": "\xff"}'), 400, "invalid_encoding")
    assert "UTF-8" in err["message"]


def test_validation_errors_reach_the_client_in_openai_shape(gateway: Callable[..., TestClient]) -> None:
    client = gateway()
    err = error(client.post("/v1/echo", content=b'{"model": "m", "messages": []}'), 400, "empty_array")
    assert err["param"] == "messages"
    error(client.post("/v1/echo", content=b"{"), 400, "invalid_json")


def test_unknown_urls_wrong_methods_and_bugs_are_openai_errors(gateway: Callable[..., TestClient]) -> None:
    client = gateway()
    assert "GET /v1/nothing" in error(client.get("/v1/nothing"), 404, "unknown_url")["message"]
    error(client.post("/v1/models", content=b"{}"), 405, "method_not_allowed")
    err = error(client.get("/v1/boom"), 500)
    assert err["type"] == "server_error" and "bug" not in err["message"]  # no internals leak


def test_ray_serve_names_the_openai_endpoints_routes_for_its_metrics(routing: Path) -> None:
    """Serve labels its request metrics with the route it finds in the app's route table (else the route prefix)."""
    from ray.serve._private.thirdparty.get_asgi_route_name import get_asgi_route_name

    app = build_app(str(routing))
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    for path in paths:
        assert get_asgi_route_name(app, {"type": "http", "method": "POST", "path": path, "root_path": ""}) == path
    assert [route.path for route in app.routes[:3]] == paths  # first: found without a walk over the others


def test_validate_chat_is_the_function_the_request_path_uses() -> None:
    parsed = validate_chat(CHAT)
    assert not isinstance(parsed, JSONResponse) and parsed.messages[0].content == "hi"


# ---- how the app is started -----------------------------------------------------------------------------------

def test_app_builder_is_importable_as_a_serve_config_import_path(routing: Path) -> None:
    from ray._common.utils import import_attr
    from ray.serve import Application

    builder = import_attr("pilothouse.serving.serve:app_builder")
    assert isinstance(builder({"routing": str(routing)}), Application)
    with pytest.raises(ValueError, match="routing_file"):
        builder({"routing": str(routing), "routing_file": "typo"})  # unknown args are config errors
    with pytest.raises(ValueError, match="direct_port"):
        builder({"routing": str(routing), "direct_port": 70000})


def test_cli_serve_refuses_a_direct_port_it_cannot_have_before_starting_ray(routing: Path) -> None:
    def refusal(*argv: str) -> str:
        result = subprocess.run([sys.executable, "-m", "pilothouse", "serve", "--routing", str(routing), *argv],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        first, *rest = result.stderr.splitlines()
        assert first.startswith("error: --direct-port") and "Traceback" not in result.stderr
        assert rest and all(line.startswith("hint: ") for line in rest)
        return first

    assert "is --port too" in refusal("--port", "8123", "--direct-port", "8123")
    with socket.socket() as taken:  # held by another process's socket, not shared
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert "in use" in refusal("--direct-port", str(taken.getsockname()[1]))
    # a gateway replica still running there: its socket would share the port with the new gateway's
    running = listen("127.0.0.1", 0)
    try:
        assert "in use" in refusal("--direct-port", str(running.getsockname()[1]))
    finally:
        running.close()


@pytest.mark.parametrize("content", [None, "{}"])
def test_cli_serve_refuses_a_missing_or_invalid_routing_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "routing.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "pilothouse", "serve", "--routing", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first.startswith("error: ") and str(path) in first and "Traceback" not in result.stderr
    assert all(line.startswith("hint: ") for line in rest)
