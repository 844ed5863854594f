"""Local copy of an index's text fields, searchable with BM25 when Milvus is not (DESIGN.md §6).

Degraded mode must answer while Milvus is down, so the copy cannot live in Milvus: ingestion writes
every chunk's text and metadata here as well as into the collection, and the retriever falls back
to it. It is also where ingestion remembers each chunk's content hash, so re-ingesting an
unchanged file writes nothing.

Why SQLite FTS5 through the stdlib ``sqlite3`` rather than SQLAlchemy: FTS5 virtual tables, ``MATCH``
and ``bm25()`` exist only in SQLite, so a portable layer buys nothing here, and this file is a
per-index cache next to the Milvus Lite data (``<state_dir>/keyword/<namespace>/<alias>.db``), not
the shared state store that may be PostgreSQL. WAL lets the workflow runtime read while an
ingestion writes from another process.

Ranking is BM25 like Milvus' own full-text search, but tokenisation (``unicode61``) and statistics
differ, so scores are comparable within one result, not with Milvus scores.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .retriever import Hit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    hash TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_au AFTER UPDATE OF text ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
END;
"""

_TERM = re.compile(r"\w+", re.UNICODE)
_FIELD = r"[A-Za-z_][A-Za-z0-9_]*"
_VALUE = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|-?\d+(?:\.\d+)?|true|false|True|False'
_EQ = re.compile(rf"^\s*({_FIELD})\s*==\s*({_VALUE})\s*$")
_IN = re.compile(rf"^\s*({_FIELD})\s+in\s+\[\s*((?:{_VALUE})(?:\s*,\s*(?:{_VALUE}))*)\s*\]\s*$")
_AND = re.compile(r"\s+(?:and|AND|&&)\s+")


class UnsupportedFilter(ValueError):
    """A Milvus filter this store cannot evaluate; the caller must not answer unfiltered."""


def keyword_store_path(state_dir: Path, namespace: str, alias: str) -> Path:
    """Where the copy for one VectorIndex lives; ingestion and the retriever must agree on it."""
    return Path(state_dir) / "keyword" / namespace / f"{alias}.db"


def fts_query(text: str) -> str | None:
    """User text as an FTS5 query matching any of its words, like Milvus BM25 does.

    Every word is quoted, so FTS5 syntax in the input (quotes, ``col:``, ``AND``/``NOT``, ``*``,
    parentheses) is searched for as words instead of raising. None when there is no word at all.
    """
    terms = dict.fromkeys(t.lower() for t in _TERM.findall(text))
    return " OR ".join(f'"{t}"' for t in terms) or None


def _literal(token: str) -> Any:
    if token[0] in "\"'":
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    if token in ("true", "True", "false", "False"):
        return token.lower() == "true"
    return float(token) if "." in token else int(token)


def parse_filter(expr: str) -> list[tuple[str, list[Any]]]:
    """The subset of Milvus filters evaluated locally: ``a == v``, ``a in [v, ...]``, joined by ``and``."""
    clauses = []
    for part in _AND.split(expr.strip()):
        if match := _EQ.match(part):
            clauses.append((match.group(1), [_literal(match.group(2))]))
        elif match := _IN.match(part):
            values = re.findall(_VALUE, match.group(2))
            clauses.append((match.group(1), [_literal(v) for v in values]))
        else:
            raise UnsupportedFilter(f"filter {expr!r}: keyword-only mode evaluates only `field == value`, "
                                    "`field in [values]` and `and`")
    return clauses


@dataclass(frozen=True, slots=True)
class StoredChunk:
    id: str
    source: str
    hash: str
    text: str
    metadata: Mapping[str, Any]


class KeywordStore:
    """One SQLite file per index; thread-safe (one connection behind a lock: writes are short)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def upsert(self, chunks: Iterable[StoredChunk]) -> None:
        rows = [(c.id, c.source, c.hash, c.text, json.dumps(dict(c.metadata), sort_keys=True)) for c in chunks]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO chunks(id, source, hash, text, metadata) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET source=excluded.source, hash=excluded.hash, "
                    "text=excluded.text, metadata=excluded.metadata", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, ids: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in ids])

    def hashes(self, source: str) -> dict[str, str]:
        """Chunk id → content hash of what is stored for one source file."""
        with self._lock:
            return dict(self._db.execute("SELECT id, hash FROM chunks WHERE source = ?", (source,)).fetchall())

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def search(self, query: str, *, top_k: int, filter: str | None = None) -> list[Hit]:
        """BM25 over the stored text; higher score is better. Raises UnsupportedFilter (see parse_filter)."""
        clauses = parse_filter(filter) if filter else []
        match = fts_query(query)
        if match is None:
            return []
        where, params = ["chunks_fts MATCH ?"], [match]
        for name, values in clauses:
            where.append(f"json_extract(c.metadata, '$.{name}') IN ({', '.join('?' * len(values))})")
            params.extend(int(v) if isinstance(v, bool) else v for v in values)
        sql = (f"SELECT c.id, c.text, c.metadata, bm25(chunks_fts) AS rank FROM chunks_fts "
               f"JOIN chunks c ON c.rowid = chunks_fts.rowid WHERE {' AND '.join(where)} ORDER BY rank LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, [*params, top_k]).fetchall()
        return [Hit(id=i, text=t, score=-rank, metadata=json.loads(m)) for i, t, m, rank in rows]
