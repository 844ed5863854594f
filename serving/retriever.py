"""What a retriever answers, apart from how: the contract the workflow runtime, the reranker and the keyword store
share with :mod:`.retrieval`'s Milvus implementation.

Its own module so that a gateway whose workflow retrieves nothing never imports pymilvus (and with it pandas,
pyarrow and gRPC, ~100 MiB of a replica's memory): :mod:`.retrieval` is imported by what builds retrievers.
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
    """``hot``: the dense ranking came from the in-process hot index (Milvus supplied the hits' content)."""

    hits: list[Hit]
    mode: Mode
    degraded: bool = False
    reason: str = ""
    latency_ms: float = 0.0
    hot: bool = False


class Retriever(Protocol):
    """Search one VectorIndex. Synchronous (pymilvus is); async callers use ``asyncio.to_thread``."""

    def search(self, query: str, *, top_k: int, mode: Mode, filter: str | None = None) -> RetrievalResult: ...
