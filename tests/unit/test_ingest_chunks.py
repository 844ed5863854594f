"""Chunking, stable ids and the local keyword copy: what decides which chunk a search can find."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from pilothouse.serving.ingest import chunk_id, chunk_text, source_prefix
from pilothouse.serving.keyword_store import KeywordStore, StoredChunk, UnsupportedFilter, fts_query, parse_filter

# -- chunking -----------------------------------------------------------------------------------------


def test_short_paragraphs_pack_into_one_chunk() -> None:
    assert chunk_text("First paragraph.\n\nSecond paragraph.", max_chars=200) == [
        "First paragraph.\n\nSecond paragraph."]


def test_chunks_respect_the_cap_and_every_word_survives() -> None:
    words = [f"word{i}" for i in range(600)]
    text = "\n\n".join(" ".join(words[i:i + 30]) for i in range(0, 600, 30))
    chunks = chunk_text(text, max_chars=300, overlap=60)
    assert all(len(c) <= 300 for c in chunks)
    assert set(" ".join(chunks).split()) == set(words)


def test_a_long_paragraph_is_cut_with_overlap_so_boundaries_are_found_whole() -> None:
    text = " ".join(f"w{i:03d}" for i in range(200))  # one paragraph, 999 characters
    chunks = chunk_text(text, max_chars=200, overlap=40)
    assert len(chunks) > 5
    for left, right in pairwise(chunks):
        assert left.split()[-1] in right.split()[:10]  # the tail of one chunk opens the next


def test_a_word_longer_than_a_chunk_is_cut_not_dropped() -> None:
    blob = "x" * 450
    chunks = chunk_text(f"start {blob} end", max_chars=200, overlap=20)
    assert all(len(c) <= 200 for c in chunks)
    assert "".join(c.replace(" ", "").replace("start", "").replace("end", "") for c in chunks).count("x") >= 450


def test_markdown_chunks_carry_their_heading_trail() -> None:
    text = "# Guide\n\nIntro.\n\n## Payment\n\nPay in 30 days.\n\n### Late\n\nTwo percent.\n\n## Vendors\n\nACME."
    chunks = chunk_text(text, max_chars=500, markdown=True)
    assert chunks == ["Guide\n\nIntro.", "Guide > Payment\n\nPay in 30 days.",
                      "Guide > Payment > Late\n\nTwo percent.", "Guide > Vendors\n\nACME."]


def test_hash_lines_inside_a_code_fence_are_not_headings() -> None:
    chunks = chunk_text("# Setup\n\n```sh\n# install it\npip install x\n```", max_chars=500, markdown=True)
    assert len(chunks) == 1 and chunks[0].startswith("Setup\n\n") and "# install it" in chunks[0]


def test_whitespace_only_text_has_no_chunks() -> None:
    assert chunk_text("  \n\n \t\n") == []


# -- ids ------------------------------------------------------------------------------------------


def test_chunk_ids_are_stable_and_grouped_by_source() -> None:
    assert chunk_id("docs/a.md", 3) == chunk_id("docs/a.md", 3)
    assert chunk_id("docs/a.md", 3) != chunk_id("docs/a.md", 4) != chunk_id("docs/b.md", 3)
    assert chunk_id("docs/a.md", 7).startswith(source_prefix("docs/a.md"))
    assert not chunk_id("docs/a.md", 7).startswith(source_prefix("docs/a.m"))


# -- keyword copy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ['"unbalanced', "text: refunds", "refunds AND NOT", "ref*", "(a OR", "NEAR(x y)",
                                   "col:val ^ - +", "日本語 テキスト"])
def test_fts_syntax_in_a_user_query_is_searched_as_words(tmp_path: Path, query: str) -> None:
    store = KeywordStore(tmp_path / "k.db")
    store.upsert([StoredChunk("1", "a", "h", "refunds text and val NOT near", {})])
    store.search(query, top_k=3)  # must not raise


def test_a_query_without_words_finds_nothing() -> None:
    assert fts_query("?! -- **") is None


def _store(tmp_path: Path) -> KeywordStore:
    store = KeywordStore(tmp_path / "kw" / "default" / "docs.db")
    store.upsert([
        StoredChunk("a1", "a.md", "h1", "Invoices are payable within 30 days.", {"category": "billing", "year": 2024}),
        StoredChunk("b1", "b.md", "h2", "Refunds take five business days.", {"category": "billing", "year": 2023}),
        StoredChunk("c1", "c.md", "h3", "Password resets: ask the IT desk.", {"category": "it", "year": 2024}),
    ])
    return store


def test_bm25_ranks_the_matching_chunk_first(tmp_path: Path) -> None:
    hits = _store(tmp_path).search("how many days until invoices are payable", top_k=3)
    assert hits[0].id == "a1" and hits[0].score > hits[-1].score
    assert hits[0].metadata == {"category": "billing", "year": 2024}


def test_upsert_replaces_by_id_and_delete_removes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.upsert([StoredChunk("a1", "a.md", "h9", "Invoices are due on receipt.", {})])
    assert store.count() == 3 and store.hashes("a.md") == {"a1": "h9"}
    assert store.search("payable", top_k=3) == []
    store.delete(["a1"])
    assert store.search("invoices", top_k=3) == [] and store.count() == 2


def test_equality_and_in_filters_are_applied(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert [h.id for h in store.search("days", top_k=5, filter='category == "billing" and year == 2023')] == ["b1"]
    assert {h.id for h in store.search("days desk", top_k=5, filter="year in [2024]")} == {"a1", "c1"}


def test_a_filter_it_cannot_evaluate_is_refused_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFilter, match="year > 2020"):
        _store(tmp_path).search("days", top_k=5, filter="year > 2020")


def test_filter_values_with_quotes_and_commas_parse() -> None:
    assert parse_filter('name in ["a, b", "c\\"d"] and ok == true') == [("name", ["a, b", 'c"d']), ("ok", [True])]
