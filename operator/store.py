"""The operator's read-only view of the gateway's store (the budget ledger, the workflow runs)."""

from __future__ import annotations

import sqlalchemy as sa


def open_store(url: str, metadata: sa.MetaData) -> sa.Engine:
    """An engine on the store at ``url`` (SQLite or PostgreSQL), with ``metadata``'s tables created if missing.

    Pooled connections are tested as they are checked out (one round trip): after a PostgreSQL restart, an
    idle timeout or a pooler's reset, a dead connection would otherwise fail the status update that drew it.
    """
    engine = sa.create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    return engine
