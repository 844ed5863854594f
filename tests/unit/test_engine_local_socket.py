"""The same-host fast path to a local engine: the replica's calls served on a Unix socket, the gateway's handle
engine calling it there, and the handle whenever the socket is not there or refuses. A real aiohttp server on a
real socket; the replica is a stand-in with ``PilothouseLLMServer``'s two calls (vLLM itself: tests/integration)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ray
from prometheus_client import CollectorRegistry

from pilothouse.serving.engines import CHAT, BackendError, local_socket
from pilothouse.serving.engines import handle as h
from pilothouse.serving.errors import ErrorClass
from tests.fakes.openai_backend import error_body

from .test_engine_vllm import CONTEXT_MESSAGE, FakeHandle

APP = "engine-small"
ANSWER = json.dumps({"choices": [{"message": {"content": "hi"}}],
                     "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}).encode()
CHUNKS = [b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
          b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}\n\ndata: [DONE]\n\n']


class Replica:
    """``PilothouseLLMServer``'s calls: (status, bytes); a stream's status, then its SSE bytes."""

    def __init__(self, complete: tuple[int, bytes] = (200, ANSWER), stream: list[Any] | None = None,
                 hold: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._complete, self._stream, self._hold = complete, stream or [200, *CHUNKS], hold
        self.closed = asyncio.Event()

    async def complete(self, path: str, body: Mapping[str, Any]) -> tuple[int, bytes]:
        self.bodies.append(dict(body))
        return self._complete

    async def stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[int | bytes]:
        self.bodies.append(dict(body))
        try:
            for item in self._stream:
                yield item
            if self._hold:  # an engine still generating
                await asyncio.sleep(3600)
        finally:
            self.closed.set()


@pytest.fixture
def sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "sockets"
    monkeypatch.setattr(local_socket, "socket_dir", lambda app: folder / app)
    return folder / APP


@pytest.fixture
async def handle(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHandle]:
    """The Serve handle the engine falls back on; ``calls`` says whether it was used."""
    fake = FakeHandle(complete=(200, ANSWER), stream=[200, *CHUNKS])
    monkeypatch.setitem(h._handles, (h.endpoint(APP), asyncio.get_running_loop()), fake)
    yield fake
    await local_socket.close_clients()


def _exists(path: Path) -> bool:
    return path.exists()


def _listing(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def _make_folder(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)


def _dead_socket(path: Path) -> None:
    """What a replica killed hard leaves: its socket file, nothing listening."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()


async def _drain(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def test_a_replica_on_this_host_is_called_on_its_socket_not_through_the_handle(
        sockets: Path, handle: FakeHandle) -> None:
    replica, registry = Replica(), CollectorRegistry()
    server = await local_socket.serve_socket(replica, APP, registry)
    assert server is not None and server.path.parent == sockets and server.path.is_socket()
    engine = h.HandleEngine(h.endpoint(APP), "small")
    try:
        result = await engine.complete(CHAT, {"model": "wf/extract", "messages": [], "seed": 2**70})
        assert result.body == ANSWER and (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 3)
        stream = await engine.stream(CHAT, {"model": "wf/extract", "messages": []})
        assert await _drain(stream) == b"".join(CHUNKS) and stream.usage.completion_tokens == 1
    finally:
        await server.close()
    assert handle.calls == []
    assert [(b["model"], b.get("stream"), b.get("seed")) for b in replica.bodies] == [("small", None, 2**70),
                                                                                      ("small", True, None)]
    assert replica.bodies[1]["stream_options"] == {"include_usage": True}  # the budget needs the engine's count
    assert registry.get_sample_value("pilothouse_engine_socket_requests_total", {"path": CHAT}) == 2
    assert not _exists(server.path) and not _exists(sockets)  # the last replica leaves nothing behind


async def test_a_body_only_the_standard_json_reader_takes_reaches_the_replica_as_over_the_handle(
        sockets: Path, handle: FakeHandle) -> None:
    """What a client may send and the gateway forwards as sent (a lone surrogate; nesting deeper than pydantic's
    parser goes) arrives at the replica on the socket as it would over the handle, not as a 400."""
    replica = Replica()
    server = await local_socket.serve_socket(replica, APP, CollectorRegistry())
    assert server is not None
    deep = json.loads("[" * 300 + "]" * 300)
    try:
        result = await h.HandleEngine(h.endpoint(APP), "small").complete(
            CHAT, {"messages": [], "user": "\ud800", "metadata": {"tags": deep}})
    finally:
        await server.close()
    assert result.body == ANSWER and handle.calls == []
    assert replica.bodies[0]["user"] == "\ud800" and replica.bodies[0]["metadata"]["tags"] == deep


async def test_an_engine_error_on_the_socket_is_the_engines_answer_not_a_reason_to_use_the_handle(
        sockets: Path, handle: FakeHandle) -> None:
    context = json.dumps(error_body(400, CONTEXT_MESSAGE)).encode()
    server = await local_socket.serve_socket(Replica(complete=(400, context), stream=[400, context]), APP,
                                             CollectorRegistry())
    assert server is not None
    engine = h.HandleEngine(h.endpoint(APP), "small")
    try:
        for call in (engine.complete, engine.stream):
            with pytest.raises(BackendError) as caught:
                await call(CHAT, {"messages": []})
            assert caught.value.error_class is ErrorClass.CONTEXT_LENGTH and not caught.value.first_token_sent
    finally:
        await server.close()
    assert handle.calls == []


async def test_a_gateway_that_leaves_mid_stream_stops_the_replicas_generation(sockets: Path,
                                                                              handle: FakeHandle) -> None:
    replica = Replica(stream=[200, CHUNKS[0]], hold=True)
    server = await local_socket.serve_socket(replica, APP, CollectorRegistry())
    assert server is not None
    try:
        stream = await h.HandleEngine(h.endpoint(APP), "small").stream(CHAT, {"messages": []})
        assert await stream.__anext__() == CHUNKS[0]
        await stream.aclose()
        await asyncio.wait_for(replica.closed.wait(), 5.0)
    finally:
        await server.close()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_a_dead_replicas_socket_is_dropped_removed_and_the_call_goes_through_the_handle(
        sockets: Path, handle: FakeHandle, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica killed hard leaves its socket file behind with nothing listening: refused once, not an error, and
    removed, so that the folder's next listing does not offer it again."""
    monkeypatch.setattr(local_socket, "RESCAN_S", 0.0)  # every call lists the folder again
    caplog.set_level(logging.INFO, local_socket.__name__)
    dead = sockets / f"{_dead_pid()}.sock"
    _dead_socket(dead)
    engine = h.HandleEngine(h.endpoint(APP), "small")
    assert (await engine.complete(CHAT, {"messages": []})).body == ANSWER
    assert not dead.exists()
    assert await _drain(await engine.stream(CHAT, {"messages": []})) == b"".join(CHUNKS)
    assert len(handle.calls) == 2
    assert sum("refused the connection" in r.getMessage() for r in caplog.records) == 1


async def test_a_refusing_socket_whose_pid_a_live_process_has_is_dropped_but_kept(
        sockets: Path, handle: FakeHandle) -> None:
    """The pid was taken again since by another process: whose socket it is cannot be told, so it stays."""
    taken = sockets / f"{os.getppid()}.sock"
    _dead_socket(taken)
    assert (await h.HandleEngine(h.endpoint(APP), "small").complete(CHAT, {"messages": []})).body == ANSWER
    assert taken.exists() and len(handle.calls) == 1


async def test_a_starting_replica_removes_the_sockets_of_dead_replicas_and_keeps_the_others(sockets: Path) -> None:
    dead, alive = sockets / f"{_dead_pid()}.sock", sockets / f"{os.getppid()}.sock"
    _dead_socket(dead)
    _dead_socket(alive)
    server = await local_socket.serve_socket(Replica(), APP, CollectorRegistry())
    assert server is not None
    try:
        assert _listing(sockets) == sorted([alive, server.path])
    finally:
        await server.close()


async def test_the_handle_is_the_path_without_a_socket_or_for_a_named_deployment(sockets: Path,
                                                                               handle: FakeHandle) -> None:
    engine = h.HandleEngine(h.endpoint(APP), "small")
    assert (await engine.complete(CHAT, {"messages": []})).body == ANSWER  # no engine socket on this host
    server = await local_socket.serve_socket(Replica(), APP, CollectorRegistry())
    assert server is not None
    try:
        named = FakeHandle(complete=(200, ANSWER))
        endpoint = h.endpoint(APP, "engine")
        h._handles[(endpoint, asyncio.get_running_loop())] = named
        try:
            assert (await h.HandleEngine(endpoint, "small").complete(CHAT, {"messages": []})).body == ANSWER
        finally:
            h.forget(endpoint)
        assert len(handle.calls) == 1 and len(named.calls) == 1
    finally:
        await server.close()


async def test_a_socket_in_a_folder_others_may_write_to_is_neither_served_nor_trusted(
        sockets: Path, handle: FakeHandle) -> None:
    """On a shared /tmp another user could plant a socket: the engine refuses to serve from such a folder, and the
    gateway will not call a socket there (the handle carries the call)."""
    _make_folder(sockets.parent, 0o777)
    assert await local_socket.serve_socket(Replica(), APP, CollectorRegistry()) is None
    _make_folder(sockets.parent, 0o700)
    server = await local_socket.serve_socket(Replica(), APP, CollectorRegistry())
    assert server is not None
    try:
        _make_folder(sockets, 0o770)  # group-writable after the engine made it
        assert (await h.HandleEngine(h.endpoint(APP), "small").complete(CHAT, {"messages": []})).body == ANSWER
        assert len(handle.calls) == 1
    finally:
        await server.close()


def test_each_cluster_and_engine_has_its_own_folder_and_the_fast_path_can_be_off(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cluster = {"address": "10.0.0.1:6379"}

    class Context:
        @property
        def gcs_address(self) -> str:
            return cluster["address"]

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    monkeypatch.setenv(local_socket.ENV, str(tmp_path))
    first = local_socket.socket_dir(APP)
    assert first is not None and first.parent == tmp_path
    assert local_socket.socket_dir("engine-large") not in (first, None)
    cluster["address"] = "10.0.0.2:6379"  # another Ray on this host, or this process's next one
    assert local_socket.socket_dir(APP) not in (first, None)
    monkeypatch.setenv(local_socket.ENV, "off")
    assert local_socket.socket_dir(APP) is None
    monkeypatch.delenv(local_socket.ENV)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert local_socket.socket_dir(APP) is None


@pytest.mark.parametrize(("body", "message"), [(b"{not json", "not JSON"), (b"[1]", "not a JSON object")])
async def test_a_body_the_face_cannot_read_is_a_400_naming_why(sockets: Path, body: bytes, message: str) -> None:
    server = await local_socket.serve_socket(Replica(), APP, CollectorRegistry())
    assert server is not None
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(server.path))) as client, \
                client.post(f"{local_socket.BASE_URL}{CHAT}", data=body) as response:
            assert response.status == 400 and message in (await response.json())["error"]["message"]
    finally:
        await server.close()
