"""`pilothouse operator` as a real process: login from KUBECONFIG, liveness, bad input, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from lightkube import codecs

from pilothouse.localrun import serve_port
from tests.polling import eventually

from .conftest import FakeOpenAI
from .emulator import write_kubeconfig
from .test_operator import ready

pytestmark = pytest.mark.integration



async def test_operator_process_reconciles_survives_bad_input_and_stops_cleanly(
        emulator, kube, tmp_path: Path, openai_endpoint: FakeOpenAI) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(emulator.url).rstrip("/"))
    port = serve_port()
    log = (tmp_path / "operator.log").open("w")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pilothouse", "operator", "--liveness", f"http://127.0.0.1:{port}/healthz",
        "--store-url", f"sqlite:///{tmp_path}/store.db", "--milvus-uri", str(tmp_path / "milvus.db"),
        env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=log, stderr=log, start_new_session=True)
    try:
        async with httpx.AsyncClient() as http:
            async def alive() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(alive, timeout=60)
            await kube.create(codecs.from_dict({
                "apiVersion": "pilothouse.io/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": "broken", "namespace": "default"},
                "spec": {"model": {"name": "m"}, "engine": "external"}}))
            await kube.create(codecs.from_dict({
                "apiVersion": "pilothouse.io/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": "remote", "namespace": "default"},
                "spec": {"model": {"name": "m"}, "engine": "external", "external": {"url": openai_endpoint.url}}}))
            await eventually(lambda: (ready(emulator, "modeldeployments", "remote") or {}).get("status") == "True",
                             timeout=30)
            cond = await eventually(lambda: ready(emulator, "modeldeployments", "broken"))
            assert cond["reason"] == "InvalidSpec" and "spec.external" in cond["message"]
            assert process.returncode is None and await alive()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "operator.log").read_text()
