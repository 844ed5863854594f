"""VectorIndex: a Milvus collection, its index and its alias, managed declaratively."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from .common import ApiModel, Resource, SecretKeyRef, Status

FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"


class IndexType(StrEnum):
    FLAT = "FLAT"
    IVF_FLAT = "IVF_FLAT"
    IVF_SQ8 = "IVF_SQ8"
    IVF_PQ = "IVF_PQ"
    HNSW = "HNSW"
    DISKANN = "DISKANN"
    AUTOINDEX = "AUTOINDEX"


class Metric(StrEnum):
    COSINE = "COSINE"
    L2 = "L2"
    IP = "IP"


class MilvusConnection(ApiModel):
    uri: str | None = Field(
        default=None,
        description="Milvus URI (http://milvus:19530). Empty: the operator's default (--milvus-uri); "
        "in local mode (pilothouse run) an embedded Milvus Lite file.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the Milvus token (user:password or API key)."
    )
    database: str = Field(default="default", description="Milvus database.")
    timeout_seconds: float = Field(
        default=10.0, gt=0, le=600,
        description="Deadline of each call to this Milvus. Past it the call counts as Milvus unreachable: the "
        "operator reports MilvusUnreachable and retries, retrieval answers keyword-only, a semantic cache lookup "
        "is a miss; a Milvus that stopped answering would otherwise hold them forever. The operator waits this "
        "long for a collection to load, then reports NotLoaded until it is loaded.",
    )


class MetadataField(ApiModel):
    name: str = Field(pattern=FIELD_NAME, description="Scalar field name, usable in retrieval filters.")
    type: Literal["VARCHAR", "INT64", "DOUBLE", "BOOL", "JSON"] = Field(description="Milvus data type.")
    max_length: int = Field(default=512, ge=1, le=65_535, description="Max length (VARCHAR only).")


class Fields(ApiModel):
    """Collection schema: primary key, dense vector, text (for BM25) and scalar metadata."""

    dimension: int = Field(ge=2, le=32_768, description="Embedding dimension (e.g. 384 for MiniLM).")
    metric: Metric = Field(default=Metric.COSINE, description="Distance metric: COSINE, L2 or IP.")
    text_max_length: int = Field(default=8_192, ge=16, le=65_535, description="Max characters per chunk.")
    metadata: list[MetadataField] = Field(default_factory=list, description="Scalar fields for filtering.")

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [f.name for f in self.metadata]
        reserved = {"id", "text", "embedding", "sparse"} & set(names)
        if reserved:
            raise ValueError(f"spec.fields.metadata uses reserved field name(s) {sorted(reserved)}; rename them")
        if len(set(names)) != len(names):
            raise ValueError("spec.fields.metadata lists a field name twice")
        return self


class IndexSpec(ApiModel):
    """ANN index on the vector field. Changing it re-indexes with no read downtime."""

    type: IndexType = Field(
        default=IndexType.HNSW,
        description="HNSW, IVF_FLAT, IVF_SQ8, IVF_PQ, FLAT, DISKANN (Milvus server only) or AUTOINDEX.",
    )
    m: int | None = Field(default=None, ge=2, le=2048, description="HNSW: max graph degree (default 16).")
    ef_construction: int | None = Field(default=None, ge=8, le=4096, description="HNSW: build beam (default 200).")
    nlist: int | None = Field(default=None, ge=1, le=65_536, description="IVF_*: cluster count (default 128).")
    pq_m: int | None = Field(default=None, ge=1, le=1024, description="IVF_PQ: sub-quantizers (divides dimension).")
    nbits: int | None = Field(default=None, ge=1, le=16, description="IVF_PQ: bits per sub-vector (default 8).")

    @model_validator(mode="after")
    def _params_fit_type(self) -> Self:
        t = self.type
        if t is not IndexType.HNSW and (self.m is not None or self.ef_construction is not None):
            raise ValueError(f"spec.index.m / efConstruction apply to HNSW only, not {t}")
        if not t.startswith("IVF") and self.nlist is not None:
            raise ValueError(f"spec.index.nlist applies to IVF_* indexes only, not {t}")
        if t is not IndexType.IVF_PQ and (self.pq_m is not None or self.nbits is not None):
            raise ValueError(f"spec.index.pqM / nbits apply to IVF_PQ only, not {t}")
        return self

    def params(self) -> dict[str, int]:
        """Milvus build params with the documented defaults filled in."""
        match self.type:
            case IndexType.HNSW:
                return {"M": self.m or 16, "efConstruction": self.ef_construction or 200}
            case IndexType.IVF_FLAT | IndexType.IVF_SQ8:
                return {"nlist": self.nlist or 128}
            case IndexType.IVF_PQ:
                return {"nlist": self.nlist or 128, "m": self.pq_m or 8, "nbits": self.nbits or 8}
            case _:
                return {}

    def fingerprint(self, fields: Fields) -> str:
        """Identity of what a collection version was built with; a change means a new version."""
        payload = {"index": self.model_dump(mode="json"), "fields": fields.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


class Keyword(ApiModel):
    enabled: bool = Field(default=True, description="Add a BM25 full-text index on the text field.")
    analyzer: Literal["standard", "english", "jieba"] = Field(
        default="standard", description="Tokenizer (Milvus Lite supports standard and jieba)."
    )


class Embedding(ApiModel):
    """Which model turns text into vectors (at ingestion and at query time)."""

    model_deployment_ref: str | None = Field(
        default=None, description="ModelDeployment serving /v1/embeddings (same namespace)."
    )
    local_path: str | None = Field(default=None, description="Local sentence-transformers model directory.")

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.model_deployment_ref is None) == (self.local_path is None):
            raise ValueError("spec.embedding needs exactly one of modelDeploymentRef or localPath")
        return self


class HotIndex(ApiModel):
    """An in-process copy of the vectors that answers dense search where the retriever runs.

    Milvus stays the source of truth: the copy is built from the collection at prewarm, is only
    used while it matches the collection (alias target and write generation), and is rebuilt in
    the background after a change, with Milvus answering meanwhile. Filtered queries always go to
    Milvus. Changing this block never rebuilds the Milvus collection.
    """

    enabled: bool = Field(
        default=False,
        description="Serve dense search (and the dense half of hybrid) from an in-process index in the "
        "retriever; worth it for hot collections that fit in the retriever's memory.",
    )
    max_rows: int = Field(
        default=500_000, ge=1, le=20_000_000,
        description="Largest collection copied in-process; above it queries go to Milvus. Memory is about "
        "rows x dimension x 4 bytes (150 MB for 100k 384-d rows), plus ~130 bytes per row of HNSW graph "
        "once the copy is too large for an exact scan (above 8M floats: ~20k 384-d rows).",
    )


class VectorIndexSpec(ApiModel):
    milvus: MilvusConnection = Field(default_factory=MilvusConnection, description="Where Milvus is.")
    collection: str | None = Field(
        default=None,
        pattern=FIELD_NAME,
        description="Alias clients query; versions are <collection>_v<N>. Defaults to metadata.name "
        "with dashes as underscores.",
    )
    fields: Fields = Field(description="Collection schema.")
    index: IndexSpec = Field(default_factory=IndexSpec, description="ANN index.")
    keyword: Keyword = Field(default_factory=Keyword, description="BM25 keyword search.")
    embedding: Embedding | None = Field(default=None, description="Embedding model.")
    prewarm: bool = Field(default=True, description="Load the collection into memory before Ready.")
    hot_index: HotIndex = Field(default_factory=HotIndex, description="In-process dense index for a hot collection.")
    reclaim_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="On delete: Retain keeps the Milvus collections, Delete drops them.",
    )


class VectorIndexStatus(Status):
    phase: Literal["Pending", "Ready", "Degraded", "Failed"] | None = None
    backend: Literal["milvus", "milvus-lite"] | None = Field(default=None, description="Which Milvus served it.")
    active_collection: str | None = Field(default=None, description="Versioned collection the alias points to.")
    version: int | None = Field(default=None, description="Collection version number.")
    index_fingerprint: str | None = Field(default=None, description="Hash of fields + index spec of the version.")
    row_count: int | None = Field(default=None, description="Rows in the active collection.")
    index_state: str | None = Field(default=None, description="Index build state reported by Milvus.")
    loaded: bool | None = Field(default=None, description="Whether the collection is loaded (prewarmed).")


class VectorIndex(Resource):
    """A Milvus collection, index and alias: schema, prewarm, zero-downtime re-index."""

    KIND: ClassVar[str] = "VectorIndex"
    PLURAL: ClassVar[str] = "vectorindexes"
    SHORT_NAMES: ClassVar[list[str]] = ["vi", "vidx"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]] = [
        {"name": "Index", "type": "string", "jsonPath": ".spec.index.type"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Collection", "type": "string", "jsonPath": ".status.activeCollection"},
        {"name": "Rows", "type": "integer", "jsonPath": ".status.rowCount"},
        {"name": "Loaded", "type": "boolean", "jsonPath": ".status.loaded", "priority": 1},
    ]
    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "!has(self.spec.embedding) || "
            "(has(self.spec.embedding.modelDeploymentRef) != has(self.spec.embedding.localPath))",
            "message": "spec.embedding needs exactly one of modelDeploymentRef or localPath",
            "fieldPath": ".spec.embedding",
        },
    ]

    kind: Literal["VectorIndex"] = "VectorIndex"
    spec: VectorIndexSpec
    status: VectorIndexStatus | None = None

    @property
    def alias(self) -> str:
        return self.spec.collection or self.metadata.name.replace("-", "_")
