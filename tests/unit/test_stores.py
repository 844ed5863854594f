"""Opening a store on a SQLite file another process is writing to waits for it instead of failing.

The gateway opens its stores on its first request, while a workflow runtime may be writing to the same
file: a deferred ``create_all`` that read the schema before that writer committed got SQLITE_BUSY at once
(no busy-handler wait) and the gateway answered 500 (found by the Milvus outage drill).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pilothouse.serving.audit import AuditLog
from pilothouse.serving.idempotency import IdempotencyStore
from pilothouse.serving.ledger import Ledger
from pilothouse.serving.runs import RunStore

OPENERS: dict[str, Callable[[str], Any]] = {"ledger": Ledger, "idempotency": IdempotencyStore, "audit": AuditLog,
                                            "runs": RunStore}


@pytest.mark.parametrize("store", sorted(OPENERS))
def test_a_store_opens_while_another_connection_writes(tmp_path: Path, store: str) -> None:
    path = tmp_path / "shared.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode = WAL")
    other.execute("CREATE TABLE elsewhere (n INTEGER)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO elsewhere VALUES (1)")

    def commit_soon() -> None:
        time.sleep(0.5)  # the store has begun reading the schema by now
        other.execute("COMMIT")

    committer = threading.Thread(target=commit_soon)
    committer.start()
    opened = OPENERS[store](f"sqlite:///{path}")
    committer.join()
    opened.close()
    other.close()
