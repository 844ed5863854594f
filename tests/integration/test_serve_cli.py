"""`pilothouse serve` as the operator's rendered gateway pod runs it: all interfaces, the Service's port on the
gateway replica's own server (its direct port).

Its own process, started and stopped the way a pod is (SIGTERM); the request comes in on this
machine's own non-loopback address, as a Service's would on the pod's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest

from pilothouse.localrun import serve_port
from pilothouse.operator import render_gateway
from pilothouse.serving.audit import AuditLog
from tests.fakes.openai_backend import ThreadedFake
from tests.polling import eventually_sync
from tests.unit.factories import workflow

from .test_serve import KEY, table, write

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START_TIMEOUT_S = 180.0  # Ray, Serve and the replica on 2 busy cores


def own_address() -> str:
    """This machine's address on its default route (no packet is sent: UDP connect only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        return str(probe.getsockname()[0])


def listener(port: int) -> psutil.Process | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(conn.pid)
    return None


def started(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for the gateway's ready line; fail with the output when it exits or takes too long first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while b"pilothouse gateway on" not in (seen := log.read_bytes()):
        tail = seen[-3000:].decode(errors="replace")
        assert proc.poll() is None, f"pilothouse serve exited with {proc.returncode}:\n{tail}"
        assert time.monotonic() < deadline, f"pilothouse serve not up in {START_TIMEOUT_S:.0f} s:\n{tail}"
        time.sleep(0.2)


def rendered_pod(routing: Path, port: int, secrets: dict[tuple[str, str], str],
                 mounts: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """The gateway Deployment's command and environment as the operator renders them: this test's routing
    file and port (the Service's, the direct port) instead of the ConfigMap's and 8000, a free port for Serve's
    own ingress, Secret keys resolved from ``secrets``, mount paths replaced by ``mounts`` (mount path -> local
    directory)."""
    wf = workflow(retrieve=False, gateway={"mode": "deployment", "apiKeysSecret": "gateway-keys",
                                           "storeUrlSecretRef": {"name": "gateway-store", "key": "url"}})
    container = render_gateway.render(wf, table(1, "extract"))[1]["spec"]["template"]["spec"]["containers"][0]
    args = [str(mounts.get(a, a)) for a in container["args"]]
    args[args.index("--routing") + 1] = str(routing)
    args[args.index("--direct-port") + 1] = str(port)
    args[args.index("--port") + 1] = str(serve_port())
    env = {e["name"]: secrets[(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])]
           for e in container["env"]}
    return [sys.executable, "-m", "pilothouse", *args], env


def test_the_rendered_gateway_command_serves_the_pod_address_from_the_gateway_replica(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys"  # as Kubernetes mounts the Secret: one file per tenant
    keys.mkdir()
    (keys / "team-a").write_text(f"{KEY}\n")
    store = tmp_path / "store.db"
    port = serve_port()
    with ThreadedFake("org/small") as fake:
        routing = tmp_path / "routing.json"
        write(routing, table(1, "extract", endpoint=fake.url))
        command, env = rendered_pod(routing, port, {("gateway-store", "url"): f"sqlite:///{store}"},
                                    {render_gateway.KEYS_MOUNT: keys})
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=tmp_path)
        try:
            started(proc, log)
            # The gateway replica itself listens on the Service's port: no proxy between the pod's address and it
            front = eventually_sync(lambda: listener(port))
            assert "ServeReplica:gateway" in " ".join(front.cmdline()), front.cmdline()
            client = openai.OpenAI(base_url=f"http://{own_address()}:{port}/v1", api_key=KEY, max_retries=0,
                                   timeout=30)
            reply = client.chat.completions.create(model="wf/extract", max_tokens=8,
                                                   messages=[{"role": "user", "content": "hello there"}])
            assert reply.model == "org/small" and len((reply.choices[0].message.content or "").split()) == 8
            assert fake.served["/v1/chat/completions"] == 1
            with pytest.raises(openai.AuthenticationError):  # the Secret's keys are in force
                openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0).models.list()
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends
            assert proc.wait(timeout=90) == 0
            # Nothing it started outlives it: the port is free for the next start.
            eventually_sync(lambda: listener(port) is None, timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    records = AuditLog(f"sqlite:///{store}")  # the store the Secret named, not a file in the pod
    try:
        requests = [(r.tenant, r.status_code) for r in records.tail(10) if r.kind == "request"]
    finally:
        records.close()
    assert requests == [("team-a", 200)], requests
