"""The data plane's Milvus calls: their own connections, a deadline on every call, and what a failure means.

Every call passes a deadline: without one pymilvus waits forever (``MilvusClient(timeout=)`` bounds only
the connection), so a Milvus that stopped answering without closing its socket (paused, partitioned,
overloaded) would hold a user's request instead of degrading it.
"""

from __future__ import annotations

import grpc
from pymilvus import MilvusClient, MilvusException


def open_milvus(uri: str, token: str = "", timeout_s: float = 10.0, db_name: str = "") -> MilvusClient:
    """A Milvus client of the data plane's own, on a connection of its own.

    Dedicated: pymilvus shares connections by address, and a closed Milvus Lite file's local port can be
    handed to the next file opened in the process; a shared entry then "recovers" onto a dead channel
    (seen as connection refused in the semantic cache's tests). Closing a dedicated client also really
    closes its channel, which is what a retriever reconnecting after a Milvus restart wants.
    """
    return MilvusClient(uri=uri, token=token, db_name=db_name, timeout=timeout_s, dedicated=True)


MILVUS_FAILURES = (MilvusException, grpc.RpcError)
"""What a pymilvus call raises when Milvus fails: its own exception for what Milvus answered, gRPC's raw
``RpcError`` for a call that got no answer (its deadline passed, the channel is down)."""


def unreachable(exc: BaseException) -> bool:
    """Connection-level: Lite cannot open its file (code 1), refused (code 2), or no answer (any raw gRPC error)."""
    return isinstance(exc, grpc.RpcError) or (isinstance(exc, MilvusException) and exc.code in (1, 2))


def failure_text(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, MilvusException):
        return exc.message
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout_s:g} s"
    return f"gRPC {code.name if code else type(exc).__name__}"
