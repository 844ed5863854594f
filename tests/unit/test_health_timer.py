"""The health timer starts checks and returns: kopf holds a deleted object's finalizer until its timers return."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pilothouse.operator import kopf_app
from pilothouse.operator.api import VectorIndex
from tests.polling import eventually

RAW = {"apiVersion": "pilothouse.io/v1alpha1", "kind": "VectorIndex", "metadata": {"name": "docs", "namespace": "ml"}}


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``sync`` replaced by one that counts its calls and waits for ``release`` (a dependency that hangs)."""
    state: dict[str, Any] = {"started": 0, "release": asyncio.Event(), "error": None}

    async def stuck_sync(kind: type, body: dict[str, Any], rt: kopf_app.Runtime, *, force_apply: bool) -> None:
        state["started"] += 1
        await state["release"].wait()
        if state["error"] is not None:
            raise state["error"]

    monkeypatch.setattr(kopf_app, "sync", stuck_sync)
    return state


async def test_a_check_stuck_on_a_dependency_neither_holds_the_timer_nor_piles_up(checks: dict[str, Any]) -> None:
    rt = kopf_app.Runtime(kopf_app.OperatorConfig())
    for _ in range(3):  # three ticks while the first check hangs: each returns at once, none starts a second
        kopf_app.start_check(VectorIndex, RAW, rt)
        await asyncio.sleep(0)
    assert checks["started"] == 1 and len(rt.checking) == 1
    checks["release"].set()
    await eventually(lambda: not rt.checking, timeout=2)  # a finished check leaves nothing behind
    kopf_app.start_check(VectorIndex, RAW, rt)
    await eventually(lambda: checks["started"] == 2, timeout=2)


async def test_a_failing_check_is_logged_and_the_next_tick_checks_again(checks: dict[str, Any],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    rt = kopf_app.Runtime(kopf_app.OperatorConfig())
    checks["release"].set()
    checks["error"] = RuntimeError("milvus went away")
    with caplog.at_level(logging.ERROR, logger="pilothouse.operator"):
        kopf_app.start_check(VectorIndex, RAW, rt)
        await eventually(lambda: not rt.checking, timeout=2)
    assert "health check of VectorIndex ml/docs failed" in caplog.text and "milvus went away" in caplog.text
    kopf_app.start_check(VectorIndex, RAW, rt)
    await eventually(lambda: checks["started"] == 2, timeout=2)
