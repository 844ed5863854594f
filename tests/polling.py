"""Waiting for asynchronous outcomes in tests: the operator, a gateway's background returns, a process's state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def eventually(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll until the predicate (plain or async) holds, and return what it returned; AssertionError past ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        await asyncio.sleep(0.05)


def eventually_sync(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """``eventually`` for a synchronous test (a blocking predicate, such as a ``TestClient`` call)."""
    return asyncio.run(eventually(predicate, timeout))
