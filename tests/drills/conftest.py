"""Shared pieces of the fault drills: the gateway app in the test's loop on any store, and its stores read back."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI

from pilothouse.operator.api import RoutingTable
from pilothouse.serving.gateway import build_app
from tests.unit.test_gateway_requests import KEYS

__all__ = ["KEYS", "in_process_gateway"]



@contextlib.asynccontextmanager
async def in_process_gateway(tmp_path: Path, table: RoutingTable, store_url: str,
                             max_connections: int = 1000) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """``build_app`` with its lifespan entered, behind an httpx client over ASGITransport (no sockets)."""
    routing = tmp_path / "routing.json"
    routing.write_text(table.model_dump_json(by_alias=True))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    app = build_app(str(routing), api_keys=str(keys), store_url=store_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        limits = httpx.Limits(max_connections=max_connections)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=120,
                                     limits=limits) as client:
            yield app, client
