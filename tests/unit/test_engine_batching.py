"""How the local engine replica batches a stream for its Serve handle: the first token is not held back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from pilothouse.serving.engines.vllm import first_token_then_batched

ROLE = 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'


def token(i: int) -> str:
    return f'data: {{"choices":[{{"index":0,"delta":{{"content":"t{i}"}}}}]}}\n\n'


async def engine(items: list[str], gap_s: float, closed: list[bool]) -> AsyncGenerator[str, None]:
    """A vLLM-like stream: ``gap_s`` between items; records whether it was closed."""
    try:
        for item in items:
            await asyncio.sleep(gap_s)
            yield item
    finally:
        closed.append(True)


async def test_role_and_first_token_leave_together_at_once_then_tokens_are_batched() -> None:
    closed: list[bool] = []
    started = time.perf_counter()
    arrivals: list[tuple[float, list[str]]] = []
    async for batch in first_token_then_batched(engine([ROLE] + [token(i) for i in range(20)], 0.005, closed), 50):
        arrivals.append((time.perf_counter() - started, batch))
    assert arrivals[0][1] == [ROLE, token(0)]
    assert arrivals[0][0] < 0.04  # not held for the 50 ms interval (plain Batcher: >= 50 ms)
    rest = [b for _, b in arrivals[1:]]
    assert [item for b in rest for item in b] == [token(i) for i in range(1, 20)]  # nothing lost or reordered
    assert len(rest) < 19  # batched, not one list per token
    assert closed == [True]


async def test_a_completion_stream_without_role_chunk_sends_its_first_item_alone() -> None:
    closed: list[bool] = []
    batches = [b async for b in first_token_then_batched(engine([token(i) for i in range(3)], 0, closed), 50)]
    assert batches[0] == [token(0)] and [i for b in batches for i in b] == [token(i) for i in range(3)]


async def test_closing_early_stops_the_engine_stream() -> None:
    for taken in (1, 2):  # before and after the batcher took over
        closed: list[bool] = []
        stream = first_token_then_batched(engine([ROLE] + [token(i) for i in range(100)], 0.002, closed), 10)
        for _ in range(taken):
            await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.01)  # the batcher's reader task is cancelled, then unwinds
        assert closed == [True], taken


async def test_an_empty_stream_yields_nothing() -> None:
    closed: list[bool] = []
    assert [b async for b in first_token_then_batched(engine([], 0, closed), 50)] == []
    assert closed == [True]
