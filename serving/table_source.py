"""Hot reload of the RoutingTable from the file the operator writes (a mounted ConfigMap or a local file).

The table is the gateway's only view of the control plane (DESIGN.md §5), so reloading it must
never make things worse: a half-written or invalid file keeps the last good table (and the error is
kept for health/metrics), a file with an older or equal revision (a stale copy, a ConfigMap volume
that has not caught up) is ignored, and a swap replaces one reference so that requests already in
flight finish on the table object they started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pilothouse.operator.api.routing import RoutingTable

log = logging.getLogger(__name__)


class TableUnavailable(RuntimeError):
    """No valid RoutingTable has been read yet; the gateway is not ready to route."""


@dataclass(frozen=True)
class _Seen:
    stat: tuple[int, int, int]  # (inode, size, mtime_ns): the cheap "did it change" check
    digest: str  # sha256 of the content: the real one (ConfigMap swaps may keep size and mtime)
    error: str | None  # what was wrong with that content, if anything (stale revision, other workflow)


class TableSource:
    """The current RoutingTable of one workflow, re-read from ``path`` on ``refresh()`` or ``watch()``.

    Used from one asyncio loop; ``refresh()`` does a ``stat`` and, only when that changed, a read of
    a small file, so calling it from the loop every second is cheap.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._table: RoutingTable | None = None
        self._seen: _Seen | None = None
        self.last_error: str | None = None  # why the file on disk is not what we serve; None when it is
        self.loads = 0  # tables taken, the first one included
        self.refresh()

    @property
    def ready(self) -> bool:
        return self._table is not None

    @property
    def revision(self) -> int | None:
        return self._table.revision if self._table else None

    def current(self) -> RoutingTable:
        """The table to route this request with; hold on to it for the whole request."""
        if self._table is None:
            raise TableUnavailable(f"no valid RoutingTable at {self.path} yet: {self.last_error}")
        return self._table

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when a newer table was swapped in. Never raises."""
        try:
            st = self.path.stat()
            stat = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._seen is not None and self._seen.stat == stat:
                return False
            content = self.path.read_bytes()
        except OSError as exc:
            return self._reject(f"cannot read {self.path}: {exc.strerror or exc}")
        digest = hashlib.sha256(content).hexdigest()
        if self._seen is not None and self._seen.digest == digest:
            self._seen = _Seen(stat, digest, self._seen.error)
            self.last_error = self._seen.error  # e.g. back to the served content after a bad write
            return False
        try:
            table = RoutingTable.model_validate_json(content)
        except ValidationError as exc:
            # Not remembered as seen: a file caught mid-write is read again on the next refresh.
            return self._reject(f"invalid RoutingTable in {self.path}: {_short(exc)}")
        old = self._table
        error = None
        if old is not None and (table.workflow, table.namespace) != (old.workflow, old.namespace):
            error = (f"{self.path} holds the table of {table.namespace}/{table.workflow}, "
                     f"not {old.namespace}/{old.workflow}")
        elif old is not None and table.revision <= old.revision and table.content_key() != old.content_key():
            # A stale copy (or an operator that lost its previous table): never go back in time.
            error = f"{self.path} holds revision {table.revision}, not newer than revision {old.revision} served"
        self._seen = _Seen(stat, digest, error)
        if error is not None:
            return self._reject(error)
        if old is not None and table.revision <= old.revision:
            self.last_error = None  # same routing content, only re-serialised: nothing to do
            return False
        self._table = table
        self.last_error = None
        self.loads += 1
        log.info("RoutingTable %s/%s: revision %s → %d (degraded=%s)", table.namespace, table.workflow,
                 old.revision if old else "none", table.revision, table.degraded)
        return True

    def _reject(self, error: str) -> bool:
        """Keep the last good table; log an error once per distinct problem, not on every poll."""
        if error != self.last_error:
            log.warning("%s; keeping revision %s", error, self.revision if self.ready else "none")
        self.last_error = error
        return False

    async def watch(self, interval: float = 1.0) -> None:
        """Poll until cancelled. Polling, not inotify: ConfigMap volumes swap a symlink, which inotify misses."""
        while True:
            self.refresh()
            await asyncio.sleep(interval)


def _short(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "document"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"
