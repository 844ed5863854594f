"""Ingestion and retrieval on real Milvus Lite (a temp file per test) with the real offline MiniLM."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from prometheus_client import CollectorRegistry
from pymilvus import MilvusClient, MilvusException
from typer.testing import CliRunner

from pilothouse.cli import app
from pilothouse.operator import milvus
from pilothouse.operator.api import VectorIndex
from pilothouse.serving.breaker import BreakerConfig
from pilothouse.serving.embeddings import Embedder, LocalEmbedder
from pilothouse.serving.ingest import Ingestor
from pilothouse.serving.keyword_store import KeywordStore, keyword_store_path
from pilothouse.serving.retrieval import MilvusRetriever

pytestmark = pytest.mark.integration

MANIFEST = """\
apiVersion: pilothouse.io/v1alpha1
kind: VectorIndex
metadata: {name: handbook}
spec:
  fields:
    dimension: 384
    metadata: [{name: source, type: VARCHAR}, {name: category, type: VARCHAR}]
  index: {type: HNSW}
"""

CORPUS = {
    "billing/invoices.md": "# Billing\n\n## Payment terms\n\nInvoices are payable within 30 days of receipt. "
                           "Late payment incurs a fee of two percent per month.\n\n## Disputes\n\n"
                           "A disputed invoice is frozen until the account manager resolves it.",
    "office.txt": "The cafeteria serves lunch from noon until two in the afternoon.\n\n"
                  "Parking permits are issued by the facilities team on the ground floor.",
    "tickets.jsonl": '{"text": "Refunds are credited to the original card within five business days.", '
                     '"category": "billing"}\n'
                     '{"text": "Forgotten passwords are reset by the IT help desk, extension 4242.", '
                     '"category": "it"}\n',
}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return LocalEmbedder()


@pytest.fixture
def index() -> VectorIndex:
    import yaml

    return VectorIndex.model_validate(yaml.safe_load(MANIFEST))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    for name, text in CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


class Setup:
    def __init__(self, tmp_path: Path, vi: VectorIndex, embedder: Embedder) -> None:
        self.uri = str(tmp_path / "milvus.db")
        milvus.reconcile(vi, self.uri)
        self.client: MilvusClient = milvus.connect(self.uri)
        self.store = KeywordStore(keyword_store_path(tmp_path, vi.namespace, vi.alias))
        self.vi = vi
        self.embedder = embedder
        self.ingestor = Ingestor(client=self.client, collection=vi.alias, embedder=embedder, keyword_store=self.store,
                                 metadata_fields=vi.spec.fields.metadata, max_chars=400, overlap=60)
        self.registry = CollectorRegistry()

    def rows(self) -> int:
        return int(self.client.query(self.vi.alias, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def retriever(self, uri: str | None = None, **kwargs: object) -> MilvusRetriever:
        return MilvusRetriever(index=self.vi.name, collection=self.vi.alias, milvus_uri=uri or self.uri,
                               embedder=self.embedder, keyword_store=self.store, output_fields=["source", "category"],
                               registry=self.registry, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path, index: VectorIndex, embedder: Embedder) -> Iterator[Setup]:
    setup = Setup(tmp_path, index, embedder)
    yield setup
    setup.store.close()


def test_each_mode_finds_the_right_chunk_first(env: Setup, corpus: Path) -> None:
    report = env.ingestor.ingest([corpus])
    assert (report.files_added, report.skipped) == (3, [])
    retriever = env.retriever()
    retriever.prewarm()
    hybrid = retriever.search("how many days until invoices must be paid", top_k=3, mode="hybrid")
    assert (hybrid.mode, hybrid.degraded) == ("hybrid", False)
    assert hybrid.hits[0].metadata["source"] == "billing/invoices.md" and "30 days" in hybrid.hits[0].text
    assert hybrid.hits[0].text.startswith("Billing > Payment terms")  # heading trail kept as context
    dense = retriever.search("I cannot log in, my password is lost", top_k=2, mode="dense")  # no shared keyword
    assert "passwords" in dense.hits[0].text
    keyword = retriever.search("cafeteria", top_k=2, mode="keyword")
    assert keyword.mode == "keyword" and keyword.hits[0].metadata["source"] == "office.txt"
    cold = env.registry.get_sample_value("pilothouse_retrieval_duration_seconds_count",
                                         {"index": "handbook", "mode": "dense", "state": "cold"})
    warm = env.registry.get_sample_value("pilothouse_retrieval_duration_seconds_count",
                                         {"index": "handbook", "mode": "hybrid", "state": "warm"})
    assert (cold, warm) == (1.0, 1.0)  # prewarm's query was the cold one


def test_a_filter_restricts_hits_in_milvus_and_in_the_keyword_copy(env: Setup, corpus: Path) -> None:
    env.ingestor.ingest([corpus])
    retriever = env.retriever()
    for mode in ("hybrid", "dense", "keyword", "keyword-only"):
        result = retriever.search("refunds and passwords", top_k=5, mode=mode, filter='category == "it"')
        assert [h.metadata["category"] for h in result.hits] == ["it"], mode


def test_ingesting_again_changes_nothing(env: Setup, corpus: Path) -> None:
    first = env.ingestor.ingest([corpus])
    rows = env.rows()
    again = env.ingestor.ingest([corpus])
    assert (again.files_unchanged, again.files_added, again.files_changed) == (3, 0, 0)
    assert (again.chunks_written, again.chunks_removed, again.chunks_unchanged) == (0, 0, first.chunks_written)
    assert env.rows() == rows == env.store.count() == first.chunks_written


def test_a_changed_file_replaces_its_chunks(env: Setup, corpus: Path) -> None:
    env.ingestor.ingest([corpus])
    before = env.rows()
    (corpus / "billing/invoices.md").write_text("# Billing\n\nInvoices are due on receipt.")
    report = env.ingestor.ingest([corpus])
    assert (report.files_changed, report.files_unchanged) == (1, 2) and report.chunks_removed >= 1
    assert env.rows() == before - report.chunks_removed == env.store.count()
    hits = env.retriever().search("when are invoices due", top_k=5, mode="hybrid").hits
    billing = [h.text for h in hits if h.metadata["source"] == "billing/invoices.md"]
    assert billing == ["Billing\n\nInvoices are due on receipt."]


def test_bad_files_are_skipped_with_reasons_and_stored_chunks_stay(env: Setup, corpus: Path) -> None:
    env.ingestor.ingest([corpus])
    rows = env.rows()
    (corpus / "office.txt").write_bytes(b"\xff\xfe caf\xe9")  # was good, now undecodable
    (corpus / "empty.md").write_text("  \n")
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (corpus / "tickets.jsonl").write_text(CORPUS["tickets.jsonl"] + "{not json\n[1, 2]\n")
    report = env.ingestor.ingest([corpus])
    reasons = {(Path(s.path).name, s.line): s.reason for s in report.skipped}
    assert reasons[("office.txt", None)].startswith("not UTF-8")
    assert reasons[("empty.md", None)] == "empty file"
    assert reasons[("broken.pdf", None)].startswith("unreadable PDF")
    assert reasons[("tickets.jsonl", 3)].startswith("not JSON") and "'text'" in reasons[("tickets.jsonl", 4)]
    assert report.files_skipped == 3 and report.files_unchanged == 2
    assert env.rows() == rows
    assert env.retriever().search("cafeteria lunch", top_k=1, mode="keyword").hits[0].metadata["source"] == "office.txt"


def test_milvus_down_answers_from_the_keyword_copy_flagged_degraded(env: Setup, corpus: Path) -> None:
    from milvus_lite.server_manager import server_manager_instance

    env.ingestor.ingest([corpus])
    retriever = env.retriever(breaker=BreakerConfig(cooldown_s=0.0))
    assert not retriever.search("parking permits", top_k=2, mode="hybrid").degraded

    server_manager_instance.release_server(env.uri)  # Milvus Lite stops under the retriever
    down = retriever.search("parking permits", top_k=2, mode="hybrid")
    assert (down.mode, down.degraded) == ("keyword-only", True)
    assert "Milvus" in down.reason and down.hits[0].metadata["source"] == "office.txt"
    assert env.registry.get_sample_value("pilothouse_retrieval_degraded_total",
                                         {"index": "handbook", "reason": "milvus_unreachable"}) == 1.0

    back = retriever.search("parking permits", top_k=2, mode="hybrid")  # the probe reopens the Lite file
    assert (back.mode, back.degraded) == ("hybrid", False) and back.hits[0].metadata["source"] == "office.txt"


def test_a_call_failed_by_another_calls_outage_counts_as_that_outage(env: Setup, corpus: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent searches share one client; the first to find Milvus down closes it, and a call still in
    flight on it ends in pymilvus' retry wrapper as a MilvusException CANCELLED (seen in the paused-Milvus
    drill): the same outage, counted as unreachable, not as a Milvus error of its own."""
    env.ingestor.ingest([corpus])
    retriever = env.retriever()
    assert not retriever.search("parking permits", top_k=2, mode="dense").degraded

    def cancelled_meanwhile(client: MilvusClient, *_: object) -> NoReturn:
        retriever._client = None  # another call's outage reset the shared client...
        client.close()  # ...and closed it under this call
        raise MilvusException(code=grpc.StatusCode.CANCELLED,
                              message="[search] Retry timeout: 1.0s, StatusCode.CANCELLED, Channel closed!")

    monkeypatch.setattr(retriever, "_milvus_search", cancelled_meanwhile)
    down = retriever.search("parking permits", top_k=2, mode="dense")
    assert (down.mode, down.degraded) == ("keyword-only", True) and down.hits[0].metadata["source"] == "office.txt"
    assert [env.registry.get_sample_value("pilothouse_retrieval_degraded_total",
                                          {"index": "handbook", "reason": reason})
            for reason in ("milvus_unreachable", "milvus_error")] == [1.0, None]


def test_an_unreachable_milvus_or_a_keyword_only_table_still_answers(env: Setup, corpus: Path) -> None:
    env.ingestor.ingest([corpus])
    for uri in ("http://127.0.0.1:1", str(Path(env.uri).parent / "gone" / "milvus.db")):
        result = env.retriever(uri).search('refunds "card" AND*', top_k=2, mode="dense")
        assert (result.mode, result.degraded) == ("keyword-only", True) and "Refunds" in result.hits[0].text
    routed = env.retriever().search("refunds", top_k=2, mode="keyword-only")
    assert routed.degraded and "RoutingTable" in routed.reason and "Refunds" in routed.hits[0].text
    unsupported = env.retriever("http://127.0.0.1:1").search("refunds", top_k=2, mode="hybrid", filter="len > 3")
    assert unsupported.hits == [] and "len > 3" in unsupported.reason  # never answers unfiltered


def test_cli_ingests_and_reports(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "index.yaml").write_text(MANIFEST)
    args = ["ingest", "--index", "handbook", "-f", str(tmp_path / "manifests"), str(corpus),
            "--state-dir", str(tmp_path / "state")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "files added" in first.stdout and "rows in the collection" in first.stdout
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "0 chunk(s) written" in second.stdout
    wrong = CliRunner().invoke(app, [*args[:2], "handbok", *args[3:]])
    assert wrong.exit_code == 2 and "--index handbok: no VectorIndex" in wrong.stderr and "known: handbook" in \
        wrong.stderr and "Traceback" not in wrong.output


def test_a_lite_file_held_by_another_process_is_one_clear_error(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "index.yaml").write_text(MANIFEST)
    db = tmp_path / "state" / "milvus.db"
    db.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"from pymilvus import MilvusClient; MilvusClient({str(db)!r})"
                               "; print('ready', flush=True); input()"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = CliRunner().invoke(app, ["ingest", "--index", "handbook", "-f", str(tmp_path / "index.yaml"),
                                          str(corpus), "--milvus-uri", str(db)])
    finally:
        holder.communicate("\n", timeout=30)
    assert result.exit_code == 2 and "one process at a time" in result.stderr and "Traceback" not in result.output


def test_a_collection_left_half_created_by_a_killed_operator_is_skipped(tmp_path: Path, index: VectorIndex) -> None:
    """An operator SIGKILLed inside create_collection leaves Milvus Lite files Milvus does not list (found by the
    operator chaos drill): the next reconcile takes the next version instead of failing the index as invalid."""
    uri = str(tmp_path / "milvus.db")
    milvus.connect(uri)
    (tmp_path / "milvus.db" / "collections" / f"{index.alias}_v1").mkdir(parents=True)
    report = milvus.reconcile(index, uri)
    assert (report.active_collection, report.version) == (f"{index.alias}_v2", 2)
    assert milvus.reconcile(index, uri).active_collection == f"{index.alias}_v2"  # settled: nothing more to do
