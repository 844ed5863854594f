"""Documents → chunks → embeddings → a VectorIndex's Milvus collection and its local keyword copy.

Idempotent by construction: a chunk's id is ``<hash of the source path>-<ordinal>``, where the source
path is relative to the folder given (a file given alone: its name), so the same file always maps to
the same ids wherever the folder is mounted. The keyword copy keeps a content hash per chunk;
ingesting again embeds and writes only chunks whose hash changed or that Milvus lacks (a collection
rebuilt with a new dimension starts empty), and removes the chunks a shorter file no longer has.
New rows are written before stale ones are deleted, so an interrupted run never loses a chunk.

Bad input is data, not an exception: an empty file, bytes that are not UTF-8, a broken PDF or a
JSONL line that is not a JSON object is skipped with its reason in the report, and what was stored
for it before stays. Only a failing Milvus or embedding model stops the run (:class:`IngestError`).
Files that disappeared from the folder are not deleted from the index (an ingest of one file must
not wipe the others).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymilvus import MilvusClient, MilvusException

from pilothouse.operator.api.vector_index import MetadataField

from .embeddings import Embedder, EmbeddingError
from .hot_index import bump_generation
from .keyword_store import KeywordStore, StoredChunk

SUFFIXES = frozenset({".txt", ".md", ".markdown", ".jsonl", ".pdf"})
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_BLANK_LINE = re.compile(r"\n\s*\n")
SEAL_EVERY = 1_000  # rows written between Milvus flushes (see Ingestor._seal)
_MAX_IDS_PER_SOURCE = 16_384  # Milvus' query window; far beyond any one file's chunk count


Progress = Callable[[int, int, Path], None]


class IngestError(RuntimeError):
    """Milvus or the embedding model failed; files finished before it are stored, the rest are not."""


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    metadata: dict[str, Any]
    markdown: bool = False


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str
    source: str
    text: str
    metadata: dict[str, Any]

    @property
    def hash(self) -> str:
        payload = json.dumps({"text": self.text, "metadata": self.metadata}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file (``line`` None) or one JSONL line that was not ingested, and why."""

    path: str
    reason: str
    line: int | None = None


@dataclass
class IngestReport:
    """What one ingest did; counts are per file and per chunk."""

    files_added: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    chunks_written: int = 0
    chunks_unchanged: int = 0
    chunks_removed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files_skipped(self) -> int:
        return sum(1 for s in self.skipped if s.line is None)

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_written / self.seconds if self.seconds else 0.0


class SkipFile(ValueError):
    """This file cannot be ingested; the message is the reason shown to the user."""


# -- chunking ---------------------------------------------------------------------------------------

def chunk_id(source: str, ordinal: int) -> str:
    """Stable id of the ordinal-th chunk of a source; the prefix finds every chunk of one source."""
    return f"{source_prefix(source)}{ordinal:06d}"


def source_prefix(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:20] + "-"


def _windows(text: str, size: int, overlap: int) -> list[str]:
    """Split one over-long paragraph at word boundaries into ≤ size pieces overlapping by ≤ overlap."""
    words = [w[i:i + size] for w in text.split() for i in range(0, len(w), size)]
    pieces, start = [], 0
    while start < len(words):
        end, length = start + 1, len(words[start])
        while end < len(words) and length + 1 + len(words[end]) <= size:
            length += 1 + len(words[end])
            end += 1
        pieces.append(" ".join(words[start:end]))
        if end == len(words):
            break
        back, carried = end, 0
        while back - 1 > start and carried + len(words[back - 1]) + 1 <= overlap:
            back -= 1
            carried += len(words[back]) + 1
        start = back
    return pieces


def _sections(text: str, markdown: bool) -> Iterator[tuple[str, str]]:
    """(heading trail, body) pairs; outside Markdown the whole text is one untitled section."""
    if not markdown:
        yield "", text
        return
    trail: list[tuple[int, str]] = []
    body: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading is None:
            body.append(line)
            continue
        yield " > ".join(t for _, t in trail), "\n".join(body)
        level = len(heading.group(1))
        trail = [(lvl, t) for lvl, t in trail if lvl < level] + [(level, heading.group(2))]
        body = []
    yield " > ".join(t for _, t in trail), "\n".join(body)


def chunk_text(text: str, *, max_chars: int = 1000, overlap: int = 150, markdown: bool = False) -> list[str]:
    """Paragraph-packed chunks of at most ``max_chars``; Markdown chunks start with their heading trail.

    Consecutive chunks share their boundary paragraph when it is at most ``overlap`` characters, and
    a paragraph longer than a chunk is cut at word boundaries with ``overlap`` characters repeated, so
    a sentence split across chunks is still found whole in one of them.
    """
    chunks: list[str] = []
    for trail, body in _sections(text, markdown):
        paragraphs = [p.strip() for p in _BLANK_LINE.split(body) if p.strip()]
        if not paragraphs:
            continue
        prefix = f"{trail[: max_chars // 2]}\n\n" if trail else ""
        budget = max_chars - len(prefix)
        pieces = [piece for p in paragraphs for piece in (_windows(p, budget, overlap) if len(p) > budget else [p])]
        current: list[str] = []
        for piece in pieces:
            if current and len("\n\n".join([*current, piece])) > budget:
                chunks.append(prefix + "\n\n".join(current))
                tail = current[-1]
                carry = len(current) > 1 and len(tail) <= overlap and len(tail) + 2 + len(piece) <= budget
                current = [tail] if carry else []
            current.append(piece)
        chunks.append(prefix + "\n\n".join(current))
    return chunks


# -- reading ----------------------------------------------------------------------------------------

def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SkipFile(f"not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") from None
    if not text.strip():
        raise SkipFile("empty file")
    return text


def _pdf_pages(path: Path) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path, strict=False)
        return [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise SkipFile(f"unreadable PDF: {exc or type(exc).__name__}") from None


def _coerce(spec: MetadataField, value: Any) -> Any:
    """A JSONL value checked against its Milvus field type; ValueError names the mismatch."""
    ok = {
        "VARCHAR": isinstance(value, str) and len(value.encode()) <= spec.max_length,
        "INT64": isinstance(value, int) and not isinstance(value, bool),
        "DOUBLE": isinstance(value, int | float) and not isinstance(value, bool),
        "BOOL": isinstance(value, bool),
        "JSON": True,
    }[spec.type]
    if value is not None and not ok:
        limit = f" of at most {spec.max_length} bytes" if spec.type == "VARCHAR" else ""
        raise ValueError(f"key {spec.name!r} must be {spec.type}{limit}, got {value!r:.60}")
    return float(value) if spec.type == "DOUBLE" and value is not None else value


# -- ingestion --------------------------------------------------------------------------------------

@dataclass
class _Pending:
    """Planned writes of one file, flushed with others so the embedder sees full batches."""

    source: str
    added: bool
    write: list[Chunk]
    stale: set[str]
    unchanged: int


class Ingestor:
    """Ingest files into one collection (an alias) and its keyword copy. Not thread-safe; one per run."""

    def __init__(self, *, client: MilvusClient, collection: str, embedder: Embedder, keyword_store: KeywordStore,
                 metadata_fields: Sequence[MetadataField] = (), text_key: str = "text", max_chars: int = 1000,
                 overlap: int = 150, text_max_length: int = 8192, batch_size: int = 128) -> None:
        self.client = client
        self.collection = collection
        self.embedder = embedder
        self.store = keyword_store
        self.fields = {f.name: f for f in metadata_fields}
        self.text_key = text_key
        self.max_chars = min(max_chars, text_max_length // 4)  # VARCHAR limits bytes; UTF-8 is ≤ 4 per char
        self.overlap = overlap
        self.batch_size = batch_size
        self._unsealed = 0  # rows written since the last flush

    @staticmethod
    def discover(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[Skipped]]:
        """(file, source key) to ingest, and what was named explicitly but cannot be."""
        found: list[tuple[Path, str]] = []
        skipped: list[Skipped] = []
        for path in paths:
            if path.is_dir():
                found.extend((f, f.relative_to(path).as_posix()) for f in sorted(path.rglob("*"))
                             if f.is_file() and f.suffix.lower() in SUFFIXES
                             and not any(part.startswith(".") for part in f.relative_to(path).parts))
            elif not path.exists():
                skipped.append(Skipped(str(path), "no such file or folder"))
            elif path.suffix.lower() not in SUFFIXES:
                skipped.append(Skipped(str(path), f"unsupported type {path.suffix or '(none)'}; "
                                                  f"use {', '.join(sorted(SUFFIXES))}"))
            else:
                found.append((path, path.name))
        return found, skipped

    def ingest(self, paths: Sequence[Path], *, progress: Progress | None = None) -> IngestReport:
        """Ingest files and folders (walked recursively); ``progress(done, total, path)`` after each file."""
        started = time.perf_counter()
        report = IngestReport()
        files, report.skipped = self.discover(paths)
        pending: list[_Pending] = []
        for done, (path, source) in enumerate(files, 1):
            planned = self._plan(path, source, report)
            if planned is not None:
                pending.append(planned)
            if sum(len(p.write) for p in pending) >= self.batch_size:
                self._flush(pending, report)
                pending = []
            if progress is not None:
                progress(done, len(files), path)
        self._flush(pending, report)
        if self._unsealed:
            self._seal()
        report.seconds = time.perf_counter() - started
        return report

    def _seal(self) -> None:
        """Milvus Lite searches unflushed rows slowly (BM25 p50 2 ms → 45 ms after 1,200 upserted rows
        on 2 cores); a flush (≈0.25 s) brings queries, including ingestion's own lookups, back to speed."""
        try:
            self.client.flush(self.collection)
            self._unsealed = 0
        except MilvusException as exc:
            raise IngestError(f"Milvus flush of {self.collection} failed: {exc.message}") from exc

    def _documents(self, path: Path, report: IngestReport) -> list[Document]:
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            pages = _pdf_pages(path)
            docs = [Document(text, {"page": number} if "page" in self.fields else {})
                    for number, text in enumerate(pages, 1) if text.strip()]
            if not docs:
                raise SkipFile("no extractable text (a scanned PDF needs OCR first)")
            return docs
        text = _decode(path)
        if suffix != ".jsonl":
            return [Document(text, {}, markdown=suffix in (".md", ".markdown"))]
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(self._json_document(line))
            except ValueError as exc:
                report.skipped.append(Skipped(str(path), str(exc), line=number))
        if not docs:
            raise SkipFile(f"no usable line (each needs a JSON object with a string {self.text_key!r})")
        return docs

    def _json_document(self, line: str) -> Document:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
            raise ValueError(f"not a JSON object with a string {self.text_key!r} key (use --text-key)")
        metadata = {k: _coerce(self.fields[k], v) for k, v in record.items() if k in self.fields and k != "source"}
        return Document(record[self.text_key], metadata)

    def _chunks(self, source: str, docs: list[Document]) -> list[Chunk]:
        base = {"source": source} if "source" in self.fields else {}
        texts = [(text, {**base, **doc.metadata}) for doc in docs
                 for text in chunk_text(doc.text, max_chars=self.max_chars, overlap=self.overlap,
                                        markdown=doc.markdown)]
        return [Chunk(chunk_id(source, n), source, text, meta) for n, (text, meta) in enumerate(texts)]

    def _plan(self, path: Path, source: str, report: IngestReport) -> _Pending | None:
        try:
            chunks = self._chunks(source, self._documents(path, report))
        except SkipFile as exc:
            report.skipped.append(Skipped(str(path), str(exc)))
            return None
        except OSError as exc:
            report.skipped.append(Skipped(str(path), f"cannot read: {exc.strerror or exc}"))
            return None
        if not chunks:
            report.skipped.append(Skipped(str(path), "no text"))
            return None
        stored = self.store.hashes(source)
        in_milvus = self._milvus_ids(source)
        write = [c for c in chunks if stored.get(c.id) != c.hash or c.id not in in_milvus]
        stale = (set(stored) | in_milvus) - {c.id for c in chunks}
        unchanged = len(chunks) - len(write)
        if not write and not stale:
            report.files_unchanged += 1
            report.chunks_unchanged += unchanged
            return None
        return _Pending(source, not stored and not in_milvus, write, stale, unchanged)

    def _milvus_ids(self, source: str) -> set[str]:
        try:
            rows = self.client.query(self.collection, filter=f'id like "{source_prefix(source)}%"',
                                     output_fields=["id"], limit=_MAX_IDS_PER_SOURCE)
        except MilvusException as exc:
            raise IngestError(f"Milvus query on {self.collection} failed: {exc.message}") from exc
        return {row["id"] for row in rows}

    def _flush(self, pending: list[_Pending], report: IngestReport) -> None:
        chunks = [c for p in pending for c in p.write]
        stale = sorted({i for p in pending for i in p.stale})
        try:
            vectors = self.embedder.embed([c.text for c in chunks])
        except EmbeddingError as exc:
            raise IngestError(str(exc)) from exc
        try:
            if chunks:
                rows = [{"id": c.id, "text": c.text, "embedding": v, **c.metadata} for c, v in zip(chunks, vectors,
                                                                                                   strict=True)]
                self.client.upsert(self.collection, rows)
            self.store.upsert(StoredChunk(c.id, c.source, c.hash, c.text, c.metadata) for c in chunks)
            if stale:  # only after the new rows are in: an interruption leaves extra chunks, never missing ones
                self.client.delete(self.collection, ids=stale)
                self.store.delete(stale)
            if chunks or stale:  # retrievers' hot index copies stop answering until rebuilt
                bump_generation(self.client, self.collection)
        except MilvusException as exc:
            raise IngestError(f"Milvus write to {self.collection} failed: {exc.message}") from exc
        for p in pending:
            if p.added:
                report.files_added += 1
            else:
                report.files_changed += 1
            report.chunks_unchanged += p.unchanged
        report.chunks_written += len(chunks)
        report.chunks_removed += len(stale)
        self._unsealed += len(chunks) + len(stale)
        if self._unsealed >= SEAL_EVERY:
            self._seal()
