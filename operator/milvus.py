"""VectorIndex ↔ Milvus: versioned collections behind an alias, through pymilvus.

Why versions: Milvus cannot change a built index in place without a read gap, so a new index spec
builds ``<alias>_v<N+1>``, copies the rows, loads it, moves the alias atomically and only then
drops the old version. The fingerprint of the spec a version was built from is stored as a
collection property, so the operator (or a restarted operator) knows what it is looking at
without trusting its own status.

Milvus Lite accepts unknown index types until load (DESIGN.md §9), hence the allow-list per backend.
The pymilvus client is synchronous; callers run these functions in a worker thread.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from pymilvus import DataType, Function, FunctionType, MilvusClient, MilvusException

from .api import VectorIndex
from .api.vector_index import IndexType

log = logging.getLogger(__name__)

FINGERPRINT = "pilothouse.fingerprint"
ALLOWED: dict[str, frozenset[IndexType]] = {
    "milvus-lite": frozenset({IndexType.FLAT, IndexType.IVF_FLAT, IndexType.IVF_SQ8, IndexType.IVF_PQ,
                              IndexType.HNSW, IndexType.AUTOINDEX}),
    "milvus": frozenset(IndexType),
}
_TYPES = {"VARCHAR": DataType.VARCHAR, "INT64": DataType.INT64, "DOUBLE": DataType.DOUBLE,
          "BOOL": DataType.BOOL, "JSON": DataType.JSON}


class MilvusUnreachable(Exception):
    """Milvus did not answer; retry later, report Degraded/MilvusUnreachable meanwhile."""


class IndexSpecInvalid(ValueError):
    """The spec cannot be built on this backend; retrying will not help until the spec changes."""


@dataclass(frozen=True)
class IndexReport:
    backend: str
    active_collection: str
    version: int
    fingerprint: str
    row_count: int
    index_state: str
    loaded: bool
    rebuilt_from: str | None = None
    rows_copied: int = 0


def backend_of(uri: str) -> str:
    """A URI without a network scheme is a Milvus Lite file."""
    return "milvus" if re.match(r"^(https?|tcp|grpc)://", uri) else "milvus-lite"


def check_allowed(vi: VectorIndex, uri: str) -> None:
    backend = backend_of(uri)
    if vi.spec.index.type not in ALLOWED[backend]:
        allowed = ", ".join(sorted(ALLOWED[backend]))
        raise IndexSpecInvalid(f"spec.index.type {vi.spec.index.type} is not supported by {backend}; "
                               f"use one of {allowed}")


@cache
def _client(uri: str, token: str) -> MilvusClient:
    return MilvusClient(uri=uri, token=token, timeout=10)


def connect(uri: str, token: str | None = None) -> MilvusClient:
    try:
        client = _client(uri, token or "")
        client.list_collections()
    except MilvusException as exc:
        _client.cache_clear()
        raise MilvusUnreachable(f"Milvus at {uri} unreachable: {exc.message}") from exc
    return client


def _version_of(name: str, alias: str) -> int | None:
    match = re.fullmatch(re.escape(alias) + r"_v(\d+)", name)
    return int(match.group(1)) if match else None


def _versions(client: MilvusClient, alias: str) -> dict[int, str]:
    found = {}
    for name in client.list_collections():
        version = _version_of(name, alias)
        if version is not None:
            found[version] = name
    return found


def _aliased(client: MilvusClient, alias: str) -> str | None:
    """The collection behind the alias (asking per version: describe_alias logs errors when absent)."""
    for name in _versions(client, alias).values():
        if alias in client.list_aliases(name).get("aliases", []):
            return name
    return None


def _create(client: MilvusClient, vi: VectorIndex, name: str, fingerprint: str) -> None:
    fields = vi.spec.fields
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
    text_kwargs: dict[str, Any] = {}
    if vi.spec.keyword.enabled:
        text_kwargs = {"enable_analyzer": True, "analyzer_params": {"tokenizer": vi.spec.keyword.analyzer}}
        if vi.spec.keyword.analyzer == "english":
            text_kwargs["analyzer_params"] = {"type": "english"}
    schema.add_field("text", DataType.VARCHAR, max_length=fields.text_max_length, **text_kwargs)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=fields.dimension)
    for meta in fields.metadata:
        extra = {"max_length": meta.max_length} if meta.type == "VARCHAR" else {}
        schema.add_field(meta.name, _TYPES[meta.type], nullable=True, **extra)
    index = client.prepare_index_params()
    index.add_index(field_name="embedding", index_type=vi.spec.index.type.value,
                    metric_type=fields.metric.value, params=vi.spec.index.params())
    if vi.spec.keyword.enabled:
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25,
                                     input_field_names=["text"], output_field_names=["sparse"]))
        index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(name, schema=schema, index_params=index, properties={FINGERPRINT: fingerprint})


_INTERRUPTED_CREATE = "File exists"
"""Milvus Lite's answer to creating a collection whose files a killed process left half-made: the name
is taken on disk but Milvus does not list it, so no later version number can come from the listing."""


def _create_next(client: MilvusClient, vi: VectorIndex, alias: str, version: int, fingerprint: str,
                 attempts: int = 5) -> tuple[int, str]:
    """Create ``<alias>_v<version>``, or the next free version after leftovers of interrupted creates.

    An operator killed inside ``create_collection`` (the chaos drill does it) leaves such leftovers on
    Milvus Lite; treating them as an invalid spec would fail the VectorIndex for good. The alias makes
    the version number invisible to readers, so skipping one costs nothing but its orphaned files.
    """
    for _ in range(attempts):
        name = f"{alias}_v{version}"
        try:
            _create(client, vi, name, fingerprint)
            return version, name
        except MilvusException as exc:
            if _INTERRUPTED_CREATE not in str(exc.message):
                raise
            log.warning("collection %s was left half-created by an interrupted reconcile; using the next version",
                        name)
            version += 1
    raise MilvusException(message=f"{attempts} half-created collections after {alias}_v{version - attempts}; "
                          "remove them from the Milvus Lite directory")


def _copy(client: MilvusClient, source: str, target: str, vi: VectorIndex) -> int:
    """Copy rows version to version; vectors are reused when the dimension is unchanged."""
    source_dim = next(f["params"].get("dim") for f in client.describe_collection(source)["fields"]
                      if f["name"] == "embedding")
    if int(source_dim) != vi.spec.fields.dimension:
        return 0  # new dimension: old vectors are meaningless, the collection must be re-ingested
    wanted = {"id", "text", "embedding", *(m.name for m in vi.spec.fields.metadata)}
    present = {f["name"] for f in client.describe_collection(source)["fields"]}
    iterator = client.query_iterator(source, batch_size=1000, output_fields=sorted(wanted & present))
    copied = 0
    while batch := iterator.next():
        client.insert(target, [{k: v for k, v in row.items() if k in wanted} for row in batch])
        copied += len(batch)
    iterator.close()
    return copied


def _report(client: MilvusClient, backend: str, name: str, version: int, fingerprint: str,
            rebuilt_from: str | None = None, copied: int = 0) -> IndexReport:
    rows = int(client.get_collection_stats(name).get("row_count", 0))
    state = client.describe_index(name, "embedding").get("state", "Unknown")
    loaded = str(client.get_load_state(name).get("state")).endswith("Loaded")
    return IndexReport(backend, name, version, fingerprint, rows, str(state), loaded, rebuilt_from, copied)


def reconcile(vi: VectorIndex, uri: str, token: str | None = None) -> IndexReport:
    """Make Milvus match the spec; idempotent, safe to call on every resume or timer tick."""
    check_allowed(vi, uri)
    client = connect(uri, token)
    backend = backend_of(uri)
    alias = vi.alias
    fingerprint = vi.spec.index.fingerprint(vi.spec.fields)
    try:
        current = _aliased(client, alias)
        if current is not None:
            props = client.describe_collection(current).get("properties", {})
            if props.get(FINGERPRINT) == fingerprint:
                if vi.spec.prewarm:
                    client.load_collection(current)
                return _report(client, backend, current, _version_of(current, alias) or 0, fingerprint)
        versions = _versions(client, alias)
        version, name = _create_next(client, vi, alias, max(versions, default=0) + 1, fingerprint)
        copied = _copy(client, current, name, vi) if current else 0
        client.flush(name)
        if vi.spec.prewarm or current is not None:
            client.load_collection(name)  # load before the swap: readers never hit a cold version
        if current is None:
            client.create_alias(name, alias)
        else:
            client.alter_alias(name, alias)
            client.drop_collection(current)
        for stale in set(versions.values()) - {current, name}:
            client.drop_collection(stale)  # leftovers of an interrupted rebuild
        return _report(client, backend, name, version, fingerprint, rebuilt_from=current, copied=copied)
    except MilvusException as exc:
        if exc.code == 2:
            _client.cache_clear()
            raise MilvusUnreachable(f"Milvus at {uri} unreachable: {exc.message}") from exc
        raise IndexSpecInvalid(f"Milvus rejected the index spec: {exc.message}") from exc


def delete(vi: VectorIndex, uri: str, token: str | None = None) -> list[str]:
    """Drop the alias and every version; returns what was dropped."""
    client = connect(uri, token)
    alias = vi.alias
    if _aliased(client, alias) is not None:
        client.drop_alias(alias)
    dropped = sorted(_versions(client, alias).values())
    for name in dropped:
        client.drop_collection(name)
    return dropped
