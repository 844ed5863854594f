"""Retrieval for workflow steps: dense + BM25 on the VectorIndex's Milvus collection, fused with RRF.

What a caller (the workflow runtime) relies on is only :class:`Retriever` and :class:`RetrievalResult`:
the result always says which mode actually answered and whether that was a degraded choice, so
the run's audit record and the response can flag it (DESIGN.md §6: vector store down → keyword-only,
never a 5xx).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Mode = Literal["hybrid", "dense", "keyword", "keyword-only"]


@dataclass(frozen=True, slots=True)
class Hit:
    """One retrieved chunk; ``score`` is the fused (or single-path) score, higher is better."""

    id: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RetrievalResult:
    hits: list[Hit]
    mode: Mode
    degraded: bool = False
    reason: str = ""
    latency_ms: float = 0.0


class Retriever(Protocol):
    """Search one VectorIndex. Synchronous (pymilvus is); async callers use ``asyncio.to_thread``."""

    def search(self, query: str, *, top_k: int, mode: Mode, filter: str | None = None) -> RetrievalResult: ...
