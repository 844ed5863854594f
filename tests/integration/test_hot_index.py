"""The hot in-process index on real Milvus Lite and the real offline MiniLM: same answers as Milvus, never stale."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pilothouse.operator import milvus
from pilothouse.operator.api import VectorIndex
from pilothouse.serving.breaker import BreakerConfig
from pilothouse.serving.embeddings import Embedder, LocalEmbedder
from pilothouse.serving.retrieval import Hit, MilvusRetriever

from .test_retrieval import CORPUS, MANIFEST, Setup

pytestmark = pytest.mark.integration

HOT = MANIFEST + "  hotIndex: {enabled: true}\n"
NOTES = [  # more chunks than the handbook alone, so a top 3 has something to get wrong
    ("The VPN client must be updated before connecting from home.", "it"),
    ("Expense reports over 500 euros need a manager's approval.", "billing"),
    ("Laptops are replaced every four years by the IT department.", "it"),
    ("The fire drill takes place on the first Monday of each quarter.", "facilities"),
    ("Meeting rooms are booked through the shared calendar.", "facilities"),
    ("Travel by train is preferred over flights shorter than four hours.", "billing"),
    ("Printer toner is stocked in the supply room on every floor.", "facilities"),
    ("Two-factor authentication is mandatory for the payroll system.", "it"),
    ("Purchase orders are numbered by the finance team before sending.", "billing"),
    ("Visitors sign in at reception and wear a badge at all times.", "facilities"),
]
QUERIES = ["how do I pay an invoice late", "my password does not work", "where can I park my car",
           "is lunch served in the building", "how often do we get new computers", "booking a room for a meeting"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return LocalEmbedder()


@pytest.fixture
def env(tmp_path: Path, embedder: Embedder) -> Iterator[Setup]:
    root = tmp_path / "docs"
    for name, text in CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "notes.jsonl").write_text("".join(json.dumps({"text": t, "category": c}) + "\n" for t, c in NOTES))
    setup = Setup(tmp_path, VectorIndex.model_validate(yaml.safe_load(HOT)), embedder)
    setup.ingestor.ingest([root])
    yield setup
    setup.store.close()


def hot_retriever(env: Setup, **kwargs: object) -> MilvusRetriever:
    retriever = env.retriever(hot_index=env.vi.spec.hot_index, **kwargs)
    retriever.prewarm()
    return retriever


def outcomes(env: Setup, outcome: str) -> float:
    return env.registry.get_sample_value("pilothouse_retrieval_hot_index_total",
                                         {"index": "handbook", "outcome": outcome}) or 0.0


def ranking(hits: list[Hit]) -> list[tuple[str, str, dict[str, object]]]:
    """Hits best first, equal scores (RRF ties) by id: the two backends order ties differently."""
    return [(h.id, h.text, h.metadata) for h in sorted(hits, key=lambda h: (-round(h.score, 6), h.id))]


def rebuilt(retriever: MilvusRetriever) -> None:
    assert retriever.hot is not None and retriever.hot.wait(timeout=60), "hot index rebuild did not finish"


def test_the_hot_index_answers_what_milvus_answers(env: Setup) -> None:
    hot, plain = hot_retriever(env), env.retriever()
    for query in QUERIES:
        for mode in ("dense", "hybrid"):
            mine, milvus_own = hot.search(query, top_k=3, mode=mode), plain.search(query, top_k=3, mode=mode)
            assert (mine.hot, milvus_own.hot, mine.degraded) == (True, False, False), (query, mode)
            assert ranking(mine.hits) == ranking(milvus_own.hits), (query, mode)
            assert [h.score for h in mine.hits] == pytest.approx([h.score for h in milvus_own.hits], abs=1e-4)
    assert outcomes(env, "served") == 2 * len(QUERIES) + 1  # + prewarm's query


def test_new_and_changed_rows_are_never_ranked_from_the_old_copy(env: Setup) -> None:
    retriever = hot_retriever(env)
    assert retriever.search("bicycle storage", top_k=1, mode="dense").hot
    docs = env.ingestor.ingest([_write(env, "bikes.txt", "Bicycles are stored in the basement cage; ask security.")])
    assert docs.chunks_written == 1

    fresh = retriever.search("bicycle storage", top_k=1, mode="dense")
    assert not fresh.hot and "Bicycles" in fresh.hits[0].text  # Milvus answered while the copy rebuilds
    assert outcomes(env, "rebuilding") == 1
    rebuilt(retriever)
    again = retriever.search("bicycle storage", top_k=1, mode="dense")
    assert again.hot and "Bicycles" in again.hits[0].text

    # same chunk count, new content: a row count would not notice, the write generation does
    _write(env, "bikes.txt", "Scooters are charged in the garage next to the loading dock.")
    env.ingestor.ingest([Path(env.uri).parent / "docs" / "bikes.txt"])
    changed = retriever.search("where do I charge an electric scooter", top_k=1, mode="hybrid")
    assert not changed.hot and "Scooters" in changed.hits[0].text
    rebuilt(retriever)
    assert retriever.search("where do I charge an electric scooter", top_k=1, mode="hybrid").hot


def test_an_alias_swap_to_a_new_collection_version_is_followed(env: Setup) -> None:
    retriever = hot_retriever(env)
    assert retriever.hot is not None and retriever.hot.snapshot is not None
    assert retriever.hot.snapshot.version.collection == "handbook_v1"
    reindexed = VectorIndex.model_validate(yaml.safe_load(HOT.replace("{type: HNSW}", "{type: FLAT}")))
    assert milvus.reconcile(reindexed, env.uri).active_collection == "handbook_v2"  # old version dropped

    assert not retriever.search("parking permits", top_k=1, mode="dense").hot
    rebuilt(retriever)
    result = retriever.search("parking permits", top_k=1, mode="dense")
    assert result.hot and "Parking" in result.hits[0].text
    assert retriever.hot.snapshot.version.collection == "handbook_v2"


def test_filters_and_rows_deleted_behind_its_back_go_to_milvus(env: Setup) -> None:
    retriever = hot_retriever(env)
    filtered = retriever.search("refunds and passwords", top_k=5, mode="dense", filter='category == "it"')
    assert not filtered.hot and filtered.hits and {h.metadata["category"] for h in filtered.hits} == {"it"}
    assert outcomes(env, "filter") == 1

    top = retriever.search("visitors badge reception", top_k=1, mode="dense")
    assert top.hot
    env.client.delete(env.vi.alias, ids=[top.hits[0].id])  # a writer that does not bump the generation
    after = retriever.search("visitors badge reception", top_k=1, mode="dense")
    assert not after.hot and after.hits[0].id != top.hits[0].id
    assert outcomes(env, "missing_row") == 1
    rebuilt(retriever)
    assert retriever.search("visitors badge reception", top_k=1, mode="dense").hot


def test_a_collection_over_max_rows_is_not_copied(env: Setup) -> None:
    spec = env.vi.spec.hot_index.model_copy(update={"max_rows": 3})
    retriever = env.retriever(hot_index=spec)
    retriever.prewarm()
    assert retriever.hot is not None and retriever.hot.snapshot is None
    result = retriever.search("parking permits", top_k=1, mode="dense")
    assert not result.hot and "Parking" in result.hits[0].text and outcomes(env, "over_limit") == 2


def test_milvus_down_still_answers_keyword_only(env: Setup) -> None:
    from milvus_lite.server_manager import server_manager_instance

    retriever = hot_retriever(env, breaker=BreakerConfig(cooldown_s=0.0))
    assert retriever.search("parking permits", top_k=2, mode="dense").hot

    for mode in ("dense", "hybrid"):  # the copy is current, but Milvus is the source of truth
        server_manager_instance.release_server(env.uri)  # Milvus Lite stops under the retriever
        down = retriever.search("parking permits", top_k=2, mode=mode)
        assert (down.mode, down.degraded, down.hot) == ("keyword-only", True, False), mode
        assert "Milvus" in down.reason and down.hits[0].metadata["source"] == "office.txt"
        back = retriever.search("parking permits", top_k=2, mode=mode)  # the probe reopens the Lite file
        assert (back.mode, back.degraded, back.hot) == (mode, False, True)


def _write(env: Setup, name: str, text: str) -> Path:
    path = Path(env.uri).parent / "docs" / name
    path.write_text(text)
    return path
