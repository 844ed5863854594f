"""The gateway's direct port (``serving.direct``): a uvicorn server on the running loop that replicas on one host
share, that refuses what it cannot hold, and that lets the requests in flight finish when the replica stops."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pilothouse.serving.direct import DirectServer, listen


def app(delay_s: float = 0.0, name: str = "a") -> Starlette:
    async def answer(_: Request) -> JSONResponse:
        await asyncio.sleep(delay_s)
        return JSONResponse({"served_by": name})

    return Starlette(routes=[Route("/", answer), Route("/healthz", answer), Route("/metrics", answer)])


async def test_it_serves_the_app_and_a_stopping_replica_finishes_what_it_started() -> None:
    server = await DirectServer.start(app(delay_s=0.5), "127.0.0.1", 0, requests=8, connections=32)
    url = f"http://127.0.0.1:{server.address[1]}/"
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).json() == {"served_by": "a"}
        in_flight = asyncio.create_task(client.get(url))
        await asyncio.sleep(0.2)  # the request is in the app when the stop comes
        await server.close()
        assert (await in_flight).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await client.get(url)


async def test_replicas_on_one_host_share_the_port() -> None:
    first = await DirectServer.start(app(name="first"), "127.0.0.1", 0, requests=8, connections=32)
    port = first.address[1]
    second = await DirectServer.start(app(name="second"), "127.0.0.1", port, requests=8, connections=32)
    try:
        await first.close()  # the port still answers: the other replica holds it too
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).json() == {"served_by": "second"}
    finally:
        await second.close()


async def test_beyond_its_requests_in_flight_it_answers_an_openai_503_at_once_and_then_serves_again() -> None:
    """A refusal an OpenAI SDK can read (its error object, code ``overloaded``) with ``Retry-After``, not uvicorn's
    plain-text page; the requests it took still complete."""
    refusals: list[None] = []
    server = await DirectServer.start(app(delay_s=0.3), "127.0.0.1", 0, requests=2, connections=32,
                                      on_refused=lambda: refusals.append(None))
    url = f"http://127.0.0.1:{server.address[1]}/"
    try:
        async with httpx.AsyncClient() as client:
            answers = await asyncio.gather(*(client.get(url) for _ in range(6)))
            assert sorted(r.status_code for r in answers) == [200, 200, 503, 503, 503, 503]
            assert len(refusals) == 4  # each refusal counted once, for the gateway's /metrics
            refused = next(r for r in answers if r.status_code == 503)
            assert refused.json()["error"]["code"] == "overloaded" and "limit" in refused.json()["error"]["message"]
            assert refused.headers["retry-after"] == "1"
            assert (await client.get(url)).json() == {"served_by": "a"}
    finally:
        await server.close()


async def test_probes_and_scrapes_are_answered_while_the_requests_in_flight_are_at_the_limit() -> None:
    """A liveness probe refused under load would have the kubelet restart a pod that is only busy."""
    server = await DirectServer.start(app(delay_s=0.3), "127.0.0.1", 0, requests=1, connections=32)
    url = f"http://127.0.0.1:{server.address[1]}"
    try:
        async with httpx.AsyncClient() as client:
            busy = asyncio.create_task(client.get(f"{url}/"))
            await asyncio.sleep(0.1)  # the one request the replica takes is in flight
            assert (await client.get(f"{url}/")).status_code == 503
            assert [(await client.get(f"{url}{path}")).status_code for path in ("/healthz", "/metrics")] == [200, 200]
            assert (await busy).status_code == 200
    finally:
        await server.close()


async def test_idle_connections_do_not_count_against_the_requests_in_flight() -> None:
    """A load balancer keeps a pool of idle keep-alive connections open: they must not turn requests away."""
    server = await DirectServer.start(app(), "127.0.0.1", 0, requests=2, connections=32)
    host, port = server.address
    idle = [await asyncio.open_connection(host, port) for _ in range(4)]
    try:
        await asyncio.sleep(0.1)  # the server has accepted them
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://{host}:{port}/")).status_code == 200
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()


async def test_a_port_another_process_holds_fails_the_start_with_the_reason() -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            await DirectServer.start(app(), "127.0.0.1", taken.getsockname()[1], requests=8, connections=32)


def test_the_listening_socket_is_shareable() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        sock.close()
