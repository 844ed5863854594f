"""Reconcile a VectorIndex against Milvus; report rows, index state, load state and the active version."""

from __future__ import annotations

import asyncio

from .api import VectorIndex
from .conditions import Observation
from .env import Env, Outcome

RETRY_SECONDS = 15.0


async def _uri_and_token(vi: VectorIndex, env: Env) -> tuple[str | None, str | None]:
    uri = vi.spec.milvus.uri or env.default_milvus_uri
    ref = vi.spec.milvus.token_secret_ref
    token = await env.secret(vi.namespace, ref) if ref else None
    return uri, token


async def reconcile(vi: VectorIndex, env: Env) -> Outcome:
    # pymilvus on the first VectorIndex, not at start-up: it brings pandas, pyarrow and gRPC, most of an idle
    # operator's memory, which a cluster without a VectorIndex never needs.
    from . import milvus

    uri, token = await _uri_and_token(vi, env)
    if uri is None:
        return Outcome(phase="Failed", observations=[Observation(
            "Ready", False, "InvalidSpec",
            "spec.milvus.uri is empty and the operator has no default (--milvus-uri / values.milvus.uri)")])
    try:
        report = await asyncio.to_thread(milvus.reconcile, vi, uri, token)
    except milvus.MilvusUnreachable as exc:
        return Outcome(phase="Degraded", retry_after=RETRY_SECONDS, observations=[
            Observation("Ready", False, exc.reason, str(exc)),
            Observation("Degraded", True, exc.reason, f"{exc}; retrying every {RETRY_SECONDS:.0f}s"),
        ])
    except milvus.IndexSpecInvalid as exc:
        return Outcome(phase="Failed", observations=[
            Observation("Ready", False, "InvalidSpec", str(exc)),
            Observation("Degraded", False, "InvalidSpec", ""),
        ])
    ready = report.loaded or not vi.spec.prewarm
    message = f"alias {vi.alias} -> {report.active_collection} ({report.row_count} rows, index {report.index_state})"
    events = []
    if report.rebuilt_from:
        events.append(("Reindexed", f"built {report.active_collection} from {report.rebuilt_from} "
                                    f"({report.rows_copied} rows copied), swapped alias {vi.alias}, dropped the old"))
    status = {
        "backend": report.backend,
        "activeCollection": report.active_collection,
        "version": report.version,
        "indexFingerprint": report.fingerprint,
        "rowCount": report.row_count,
        "indexState": report.index_state,
        "loaded": report.loaded,
    }
    return Outcome(status=status, phase="Ready" if ready else "Pending", events=events, observations=[
        Observation("Ready", ready, "CollectionReady" if ready else "NotLoaded", message),
        Observation("Degraded", False, "Healthy", ""),
        Observation("Progressing", False, "Stable", ""),
    ])


async def finalize(vi: VectorIndex, env: Env) -> str:
    """Honour reclaimPolicy on delete; raises MilvusUnreachable so the finalizer retries."""
    from . import milvus  # see reconcile

    if vi.spec.reclaim_policy == "Retain":
        return f"reclaimPolicy Retain: kept Milvus collection(s) behind alias {vi.alias}"
    uri, token = await _uri_and_token(vi, env)
    if uri is None:
        return "no Milvus URI: nothing to drop"
    dropped = await asyncio.to_thread(milvus.delete, vi, uri, token)
    return f"reclaimPolicy Delete: dropped {', '.join(dropped) or 'nothing'}"
