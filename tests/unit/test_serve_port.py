"""`pilothouse run` picks the gateway's port outside the ranges Ray and the kernel hand out on their own."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from pilothouse.localrun import RAY_WORKER_PORTS_END, serve_port


def ephemeral_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_the_port_is_free_and_outside_ray_workers_and_the_ephemeral_range() -> None:
    port = serve_port()
    assert RAY_WORKER_PORTS_END < port < ephemeral_start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free: the proxy can bind it


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        busy = serve_port()
        taken.bind(("127.0.0.1", busy))
        monkeypatch.setattr(random, "randrange", lambda low, high: busy)  # the scan starts on the taken port
        port = serve_port()
        assert port != busy and RAY_WORKER_PORTS_END < port < ephemeral_start()
