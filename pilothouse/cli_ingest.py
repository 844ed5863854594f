"""``pilothouse ingest``: documents → a VectorIndex named in a folder of manifests, with a progress bar."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .console import err, fail, out

if TYPE_CHECKING:
    from pilothouse.operator.api import VectorIndex
    from pilothouse.operator.manifests import Bundle
    from pilothouse.serving.ingest import Ingestor, IngestReport


def ingest(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH...", help="Files or folders (.txt .md .jsonl .pdf).")],
    index: Annotated[str, typer.Option("--index", "-i", help="metadata.name of the VectorIndex to fill.")],
    manifests: Annotated[Path, typer.Option("--filename", "-f", help="Manifest file or folder with the VectorIndex.")],
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Its namespace, if the name is "
                                                  "not unique.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Local state: Milvus Lite file, keyword copy.")] = Path(".pilothouse"),
    milvus_uri: Annotated[str | None, typer.Option(envvar="PILOTHOUSE_MILVUS_URI", help="Overrides spec.milvus.uri; "
                                                   "default <state-dir>/milvus.db (Milvus Lite).")] = None,
    embeddings_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL serving spec.embedding."
                                                       "modelDeploymentRef, e.g. the gateway's /v1.")] = None,
    text_key: Annotated[str, typer.Option(help="JSONL: the key holding the text; other keys that are metadata "
                                          "fields of the index are stored with it.")] = "text",
    max_chars: Annotated[int, typer.Option(min=100, help="Chunk size cap in characters.")] = 1000,
    overlap: Annotated[int, typer.Option(min=0, help="Characters repeated between neighbouring chunks.")] = 150,
) -> None:
    """Ingest documents into a VectorIndex: chunks, embeddings, upsert with stable ids (re-runs change nothing)."""
    from pilothouse.operator import manifests as manifest_files

    for noisy in ("pymilvus", "milvus_lite", "pypdf"):  # each logs recoverable problems as tracebacks
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    if not manifests.exists():
        raise fail(f"-f {manifests} does not exist", "pass the manifest file or folder that defines the VectorIndex")
    bundle = manifest_files.load(manifests)
    vi = _find(bundle, index, namespace, manifests)
    ingest_into(vi, paths, state_dir=state_dir, uri=milvus_uri or vi.spec.milvus.uri or str(state_dir / "milvus.db"),
                token=_token(bundle, vi), embeddings_url=embeddings_url, text_key=text_key, max_chars=max_chars,
                overlap=overlap)


def ingest_into(vi: VectorIndex, paths: list[Path], *, state_dir: Path, uri: str, token: str | None = None,
                embeddings_url: str | None = None, text_key: str = "text", max_chars: int = 1000,
                overlap: int = 150) -> None:
    """Make sure the collection exists, ingest with a progress bar, print the summary; errors are one line.

    Shared by ``pilothouse ingest`` and ``pilothouse run`` (which ingests its job's documents the same way).
    """
    from pilothouse.operator import milvus
    from pilothouse.serving.embeddings import EmbeddingError, embedder_for
    from pilothouse.serving.ingest import IngestError, Ingestor
    from pilothouse.serving.keyword_store import KeywordStore, keyword_store_path

    if milvus.backend_of(uri) == "milvus-lite":
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        report = milvus.reconcile(vi, uri, token)
        client = milvus.connect(uri, token)
    except milvus.MilvusUnreachable as exc:
        hint = ("a Milvus Lite file is opened by one process at a time: stop the process holding it, or serve it "
                f"with `python -m milvus_lite server --data-dir {uri} --port 19530` and pass --milvus-uri "
                "http://127.0.0.1:19530") if milvus.backend_of(uri) == "milvus-lite" else "is Milvus running?"
        raise fail(str(exc), hint) from None
    except milvus.IndexSpecInvalid as exc:
        raise fail(f"VectorIndex {vi.name}: {exc}") from None
    try:
        embedder = embedder_for(vi, base_url=embeddings_url)
    except EmbeddingError as exc:
        raise fail(str(exc), "pass --embeddings-url, or fix spec.embedding / spec.fields.dimension") from None
    out.print(f"VectorIndex {vi.namespace}/{vi.name} → {report.active_collection} on {uri} "
              f"({report.row_count} rows before)")
    store = KeywordStore(keyword_store_path(state_dir, vi.namespace, vi.alias))
    ingestor = Ingestor(client=client, collection=vi.alias, embedder=embedder, keyword_store=store,
                        metadata_fields=vi.spec.fields.metadata, text_key=text_key, max_chars=max_chars,
                        overlap=overlap, text_max_length=vi.spec.fields.text_max_length)
    try:
        result = with_progress(ingestor, paths)
    except IngestError as exc:
        raise fail(str(exc), "files finished before this are stored; re-run the same command to resume "
                   "(unchanged files are skipped)") from None
    finally:
        store.close()
    rows = int(client.get_collection_stats(vi.alias).get("row_count", 0))
    summary(result, rows)


def _find(bundle: Bundle, name: str, namespace: str | None, source: Path) -> VectorIndex:
    from pilothouse.operator.api import VectorIndex

    for error in bundle.errors:
        err.print(f"[red]invalid:[/] {escape(str(error))}")
    found = [o for o in bundle.objects if isinstance(o, VectorIndex) and o.name == name
             and namespace in (None, o.namespace)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise fail(f"--index {name} names a VectorIndex in namespaces {', '.join(o.namespace for o in found)}",
                   "pass --namespace")
    known = sorted(o.name for o in bundle.objects if isinstance(o, VectorIndex))
    raise fail(f"--index {name}: no VectorIndex of that name in {source}" + (" (some manifests are invalid, see "
               "above)" if bundle.errors else ""), f"known: {', '.join(known)}" if known else
               "the folder defines no VectorIndex")


def _token(bundle: Bundle, vi: VectorIndex) -> str | None:
    """The Milvus token as local mode finds it: a Secret manifest in the folder, then the environment."""
    ref = vi.spec.milvus.token_secret_ref
    if ref is None:
        return None
    return bundle.secrets.get((vi.namespace, ref.name), {}).get(ref.key) or os.environ.get(ref.env_var)


def with_progress(ingestor: Ingestor, paths: list[Path]) -> IngestReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]ingesting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=out) as bar:
        task = bar.add_task("", total=None)

        def advance(done: int, total: int, path: Path) -> None:
            bar.update(task, completed=done, total=total, description=escape(path.name))

        return ingestor.ingest(paths, progress=advance)


def summary(report: IngestReport, rows: int) -> None:
    table = Table(title="Ingest summary")
    table.add_column("")
    table.add_column("count", justify="right")
    for label, value in (("files added", report.files_added), ("files changed", report.files_changed),
                         ("files unchanged", report.files_unchanged), ("files skipped", report.files_skipped),
                         ("lines skipped (JSONL)", len(report.skipped) - report.files_skipped),
                         ("chunks written", report.chunks_written), ("chunks unchanged", report.chunks_unchanged),
                         ("chunks removed", report.chunks_removed), ("rows in the collection", rows)):
        table.add_row(label, str(value))
    out.print(table)
    out.print(f"{report.chunks_written} chunk(s) written in {report.seconds:.1f} s ({report.chunks_per_second:.0f}/s)")
    for skipped in report.skipped:
        where = f"{skipped.path}:{skipped.line}" if skipped.line is not None else skipped.path
        out.print(f"[yellow]skipped[/] {escape(where)}: {escape(skipped.reason)}", highlight=False)
