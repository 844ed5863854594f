"""VectorIndex ↔ Milvus: versioned collections behind an alias, through pymilvus.

Why versions: Milvus cannot change a built index in place without a read gap, so a new index spec
builds ``<alias>_v<N+1>``, copies the rows, loads it, moves the alias atomically and only then
drops the old version. The fingerprint of the spec a version was built from is stored as a
collection property, so the operator (or a restarted operator) knows what it is looking at
without trusting its own status.

Milvus Lite accepts unknown index types until load (DESIGN.md §9), hence the allow-list per backend.
The pymilvus client is synchronous; callers run these functions in a worker thread. Every call carries
``spec.milvus.timeoutSeconds`` as its deadline: pymilvus waits forever without one, and a health check
stuck on a Milvus that stopped answering would hold its object's lock for good.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import grpc
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
REBUILD_LOAD_TIMEOUT_S = 1800.0
"""How long a re-index waits for its new version to load before it gives up on this attempt. It must
wait: the alias moves only to a loaded version, so readers never hit a cold one."""
LOAD_POLL_S = 0.2


class MilvusUnreachable(Exception):
    """Milvus did not answer, or failed a call for a reason other than the spec: retry later, report
    Degraded meanwhile, with ``reason`` (MilvusUnreachable, or MilvusError for a failed call)."""

    def __init__(self, message: str, reason: str = "MilvusUnreachable") -> None:
        super().__init__(message)
        self.reason = reason


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


@contextmanager
def _failures(uri: str, timeout_s: float) -> Iterator[None]:
    """pymilvus' failures as the operator acts on them: retried as MilvusUnreachable, never a traceback.

    A call that got no answer raises gRPC's own RpcError (its deadline passed, the channel is down), not a
    MilvusException; code 2 is a refused connection; anything else Milvus answered is a failed call (a
    collection dropped under us, Milvus busy). Spec errors never get here: :func:`_create_next` raises
    IndexSpecInvalid itself.
    """
    try:
        yield
    except grpc.RpcError as exc:  # the data plane reads these its own way: the layers share only the API
        _client.cache_clear()
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise MilvusUnreachable(f"Milvus at {uri}: no answer within {timeout_s:g} s "
                                    "(spec.milvus.timeoutSeconds)") from exc
        raise MilvusUnreachable(f"Milvus at {uri} unreachable: gRPC {code.name if code else exc}") from exc
    except MilvusException as exc:
        if exc.code != 2:
            raise MilvusUnreachable(f"Milvus at {uri} failed: {exc.message}", reason="MilvusError") from exc
        _client.cache_clear()
        raise MilvusUnreachable(f"Milvus at {uri} unreachable: {exc.message}") from exc


def connect(uri: str, token: str | None = None, timeout_s: float = 10.0) -> MilvusClient:
    with _failures(uri, timeout_s):
        client = _client(uri, token or "")
        client.list_collections(timeout=timeout_s)
    return client


def _version_of(name: str, alias: str) -> int | None:
    match = re.fullmatch(re.escape(alias) + r"_v(\d+)", name)
    return int(match.group(1)) if match else None


def _versions(client: MilvusClient, alias: str, timeout_s: float) -> dict[int, str]:
    found = {}
    for name in client.list_collections(timeout=timeout_s):
        version = _version_of(name, alias)
        if version is not None:
            found[version] = name
    return found


def _aliased(client: MilvusClient, alias: str, timeout_s: float) -> str | None:
    """The collection behind the alias (asking per version: describe_alias logs errors when absent)."""
    for name in _versions(client, alias, timeout_s).values():
        if alias in client.list_aliases(name, timeout=timeout_s).get("aliases", []):
            return name
    return None


def _loaded(client: MilvusClient, name: str, timeout_s: float) -> bool:
    return str(client.get_load_state(name, timeout=timeout_s).get("state")).endswith("Loaded")


def _load(client: MilvusClient, name: str, timeout_s: float, wait_s: float) -> bool:
    """Ask Milvus to load ``name``, wait up to ``wait_s`` for it; False while it is still loading.

    pymilvus' own wait raises at its deadline as it does on a failure, but a large collection loading for
    minutes is not a failure: Milvus keeps loading, the VectorIndex reports NotLoaded, the next check asks again.
    """
    client.load_collection(name, timeout=timeout_s, _async=True)
    deadline = time.monotonic() + wait_s
    while not (loaded := _loaded(client, name, timeout_s)) and time.monotonic() < deadline:
        time.sleep(LOAD_POLL_S)
    return loaded


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
    client.create_collection(name, schema=schema, index_params=index, properties={FINGERPRINT: fingerprint},
                             timeout=vi.spec.milvus.timeout_seconds)


_INTERRUPTED_CREATE = "File exists"
"""Milvus Lite's answer to creating a collection whose files a killed process left half-made: the name
is taken on disk but Milvus does not list it, so no later version number can come from the listing."""


def _create_next(client: MilvusClient, vi: VectorIndex, alias: str, version: int, fingerprint: str,
                 attempts: int = 5) -> tuple[int, str]:
    """Create ``<alias>_v<version>``, or the next free version after leftovers of interrupted creates.

    An operator killed inside ``create_collection`` (the chaos drill does it) leaves such leftovers on
    Milvus Lite; treating them as an invalid spec would fail the VectorIndex for good. The alias makes
    the version number invisible to readers, so skipping one costs nothing but its orphaned files.
    What else Milvus refuses here (code 2, unreachable, aside) is the schema or index it was given.
    """
    for _ in range(attempts):
        name = f"{alias}_v{version}"
        try:
            _create(client, vi, name, fingerprint)
            return version, name
        except MilvusException as exc:
            if exc.code == 2:
                raise
            if _INTERRUPTED_CREATE not in str(exc.message):
                raise IndexSpecInvalid(f"Milvus rejected the index spec: {exc.message}") from exc
            log.warning("collection %s was left half-created by an interrupted reconcile; using the next version",
                        name)
            version += 1
    raise IndexSpecInvalid(f"{attempts} half-created collections after {alias}_v{version - attempts}; "
                           "remove them from the Milvus Lite directory")


def _copy(client: MilvusClient, source: str, target: str, vi: VectorIndex) -> int:
    """Copy rows version to version; vectors are reused when the dimension is unchanged."""
    timeout = vi.spec.milvus.timeout_seconds
    fields = client.describe_collection(source, timeout=timeout)["fields"]
    source_dim = next(f["params"].get("dim") for f in fields if f["name"] == "embedding")
    if int(source_dim) != vi.spec.fields.dimension:
        return 0  # new dimension: old vectors are meaningless, the collection must be re-ingested
    wanted = {"id", "text", "embedding", *(m.name for m in vi.spec.fields.metadata)}
    present = {f["name"] for f in fields}
    iterator = client.query_iterator(source, batch_size=1000, output_fields=sorted(wanted & present),
                                     timeout=timeout)
    copied = 0
    while batch := iterator.next():
        client.insert(target, [{k: v for k, v in row.items() if k in wanted} for row in batch], timeout=timeout)
        copied += len(batch)
    iterator.close()
    return copied


def _report(client: MilvusClient, backend: str, name: str, version: int, fingerprint: str, timeout_s: float,
            rebuilt_from: str | None = None, copied: int = 0) -> IndexReport:
    rows = int(client.get_collection_stats(name, timeout=timeout_s).get("row_count", 0))
    state = client.describe_index(name, "embedding", timeout=timeout_s).get("state", "Unknown")
    return IndexReport(backend, name, version, fingerprint, rows, str(state), _loaded(client, name, timeout_s),
                       rebuilt_from, copied)


def reconcile(vi: VectorIndex, uri: str, token: str | None = None) -> IndexReport:
    """Make Milvus match the spec; idempotent, safe to call on every resume or timer tick."""
    check_allowed(vi, uri)
    timeout = vi.spec.milvus.timeout_seconds
    client = connect(uri, token, timeout)
    backend = backend_of(uri)
    alias = vi.alias
    fingerprint = vi.spec.index.fingerprint(vi.spec.fields)
    with _failures(uri, timeout):
        current = _aliased(client, alias, timeout)
        if current is not None:
            props = client.describe_collection(current, timeout=timeout).get("properties", {})
            if props.get(FINGERPRINT) == fingerprint:
                if vi.spec.prewarm:
                    _load(client, current, timeout, wait_s=timeout)
                return _report(client, backend, current, _version_of(current, alias) or 0, fingerprint, timeout)
        versions = _versions(client, alias, timeout)
        version, name = _create_next(client, vi, alias, max(versions, default=0) + 1, fingerprint)
        copied = _copy(client, current, name, vi) if current else 0
        client.flush(name, timeout=timeout)
        if current is None:
            if vi.spec.prewarm:
                _load(client, name, timeout, wait_s=timeout)
            client.create_alias(name, alias, timeout=timeout)
        else:
            if not _load(client, name, timeout, wait_s=REBUILD_LOAD_TIMEOUT_S):  # readers never hit a cold version
                raise MilvusUnreachable(f"Milvus at {uri} did not load {name} within {REBUILD_LOAD_TIMEOUT_S:.0f} s; "
                                        f"the alias stays on {current}", reason="MilvusError")
            client.alter_alias(name, alias, timeout=timeout)
            client.drop_collection(current, timeout=timeout)
        for stale in set(versions.values()) - {current, name}:
            client.drop_collection(stale, timeout=timeout)  # leftovers of an interrupted rebuild
        return _report(client, backend, name, version, fingerprint, timeout, rebuilt_from=current, copied=copied)


def delete(vi: VectorIndex, uri: str, token: str | None = None) -> list[str]:
    """Drop the alias and every version; returns what was dropped."""
    timeout = vi.spec.milvus.timeout_seconds
    client = connect(uri, token, timeout)
    alias = vi.alias
    with _failures(uri, timeout):
        if _aliased(client, alias, timeout) is not None:
            client.drop_alias(alias, timeout=timeout)
        dropped = sorted(_versions(client, alias, timeout).values())
        for name in dropped:
            client.drop_collection(name, timeout=timeout)
    return dropped
