"""Group commit from asyncio: one background thread turns many awaited writes into few transactions.

Why a thread of our own and not ``asyncio.to_thread`` per write: on a 2-core replica, a transaction
per request (plus a thread-pool hop and SQLite's busy-handler sleeps when pool threads race for the
write lock) was most of the gateway's CPU (bench/gateway_overhead.py's profile). One writer thread
drains everything queued while the previous batch was committing and applies it in one transaction,
so the per-request cost shrinks as load grows, and each caller still returns only once *its*
write is durable (or raises the batch's error): durability before acknowledgement is unchanged.

No library fits: the batching has to hand each caller its own result from a batch that a single
callback computes, across event loops, with a bounded batch size; this is ~80 lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

_STOP = object()


class GroupCommitter(Generic[Item, Result]):
    """``await submit(item)`` → the result ``apply`` computed for it in the batch that committed it.

    ``apply(items)`` runs in the writer thread and returns one result per item, in order, or
    raises: then every item of that batch fails with the exception (nothing of it was committed).
    Cancelling an awaiting task does not withdraw its item; it is still applied.
    """

    def __init__(self, apply: Callable[[Sequence[Item]], Sequence[Result]], *, name: str,
                 max_batch: int = 1000) -> None:
        self._apply = apply
        self.max_batch = max_batch
        self.batches = 0
        """Batches applied; fewer than ``items`` when group commit works."""
        self.items = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, item: Item) -> Result:
        return await self.put(item)

    def put(self, item: Item) -> asyncio.Future[Result]:
        """``submit`` without the coroutine: the future its result will land in. A caller that needs the write
        as a future of its own (to shield it, to add callbacks) saves wrapping a coroutine in a Task."""
        if self._closed:
            raise RuntimeError(f"{self._thread.name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put((item, loop, future))
        return future

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Stop taking items, apply everything queued, stop the thread. Idempotent."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("%s did not finish within %ss; queued items may be lost", self._thread.name, timeout_s)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[tuple[Item, asyncio.AbstractEventLoop, asyncio.Future[Result]]] = []
            pending = self._queue.get()
            while True:
                if pending is _STOP:
                    stopping = True
                else:
                    batch.append(pending)
                if len(batch) >= self.max_batch:
                    break
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[Item, asyncio.AbstractEventLoop, asyncio.Future[Result]]]) -> None:
        outcome: Sequence[Any] | BaseException
        try:
            outcome = self._apply([item for item, _, _ in batch])
            if len(outcome) != len(batch):
                raise RuntimeError(f"apply returned {len(outcome)} results for {len(batch)} items")
            self.batches += 1
            self.items += len(batch)
        except Exception as exc:  # every waiter must hear about it, or it acknowledges an unwritten item
            log.exception("%s: batch of %d failed", self._thread.name, len(batch))
            outcome = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Result], Any]]] = {}
        for i, (_, loop, future) in enumerate(batch):
            result = outcome if isinstance(outcome, BaseException) else outcome[i]
            by_loop.setdefault(loop, []).append((future, result))
        for loop, settled in by_loop.items():  # one wake-up per event loop, not one per item
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in settled:
        if future.done():  # the waiter was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
