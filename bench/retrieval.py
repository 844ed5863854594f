"""Retrieval on Milvus Lite at 100k chunks x 384-d, against the physical limit measured in the same run.

Issue 5, benchmark 4. Every path a workflow step can take, through ``MilvusRetriever.search`` (the
code users hit, query embedding excluded: the queries' vectors are precomputed):

- **dense**, **hybrid** (dense + BM25, RRF), **keyword** (Milvus BM25) on the Milvus collection;
- **keyword-only**: the degraded path, BM25 over the local SQLite FTS5 copy (Milvus down);
- **hot dense** / **hot hybrid**: the same retriever with ``spec.hotIndex`` on, ranking in-process
  (serving/hot_index.py) and fetching the hits' text from Milvus by primary key;
- **FAISS flat** / **FAISS HNSW**: a plain in-process FAISS index on the same vectors, ids only: the
  floor for an in-process search on this machine.

Cold is the first query of a path after its collection was loaded (or its index built); warm is
every later one. recall@10 is against an exact scan of the same vectors.

Data: synthetic, generated in seconds (embedding 100k texts with MiniLM would take ~8 minutes here).
Vectors are unit 384-d points around ``--topics`` topic centres in a 64-d latent space, plus noise:
real sentence embeddings have a low intrinsic dimension, which is what makes HNSW work, and top-10
cosine similarities land near 0.6-0.7, as MiniLM's do. Texts are ~40 pseudo-words, a third from
their topic's own words and the rest Zipf-drawn from a 20k vocabulary, so BM25 ranks by topic
too. Queries: a point near a topic centre and four words, three of them the topic's.

Run: ``.venv/bin/python bench/retrieval.py`` (100k rows, ~6 min here) or ``--rows 10000`` (~1 min).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import machine
import numpy as np
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from pilothouse.operator import milvus
from pilothouse.operator.api import VectorIndex
from pilothouse.serving.hot_index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M
from pilothouse.serving.keyword_store import KeywordStore, StoredChunk
from pilothouse.serving.retrieval import MilvusRetriever, Mode

RESULTS = Path(__file__).resolve().parent / "results" / "retrieval.json"
LATENT = 64
TOPIC_WORDS = 30
console = Console(highlight=False)


# -- data -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corpus:
    vectors: np.ndarray  # rows x dim, unit length
    texts: list[str]
    topics: np.ndarray
    query_vectors: np.ndarray
    query_texts: list[str]


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: dict[str, None] = {}
    while len(words) < size:
        parts = rng.choice(syllables, size=(size, 3))
        lengths = rng.integers(2, 4, size)
        words.update((("".join(p[:n]), None) for p, n in zip(parts, lengths, strict=True)))
    return list(words)[:size]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate(rows: int, queries: int, dim: int, topics: int, seed: int) -> Corpus:
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((LATENT, dim)).astype(np.float32)
    centres = rng.standard_normal((topics, LATENT)).astype(np.float32)

    def points(topic: np.ndarray, spread: float) -> np.ndarray:
        latent = centres[topic] + spread * rng.standard_normal((len(topic), LATENT)).astype(np.float32)
        return _unit(latent @ projection + 0.5 * rng.standard_normal((len(topic), dim)).astype(np.float32))

    vocab = np.array(_vocabulary(rng, 20_000))
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    own = rng.integers(0, len(vocab), size=(topics, TOPIC_WORDS))  # each topic's words

    topic = rng.integers(0, topics, rows)
    words = np.concatenate([vocab[own[topic[:, None], rng.integers(0, TOPIC_WORDS, (rows, 13))]],
                            vocab[rng.choice(len(vocab), size=(rows, 27), p=zipf)]], axis=1)
    rng.permuted(words, axis=1, out=words)
    texts = [" ".join(w) for w in words]

    query_topic = rng.integers(0, topics, queries)
    seen: set[str] = set()
    query_texts = []
    for t in query_topic:  # unique texts: the bench's embedder maps text -> vector
        text = " ".join([*vocab[own[t, rng.integers(0, TOPIC_WORDS, 3)]], str(rng.choice(vocab, p=zipf))])
        while text in seen:
            text += " " + str(rng.choice(vocab, p=zipf))
        seen.add(text)
        query_texts.append(text)
    return Corpus(points(topic, 1.0), texts, topic, points(query_topic, 0.5), query_texts)


class QueryVectors:
    """The retriever's Embedder for this run: the precomputed vector of each query text."""

    def __init__(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        self._vectors = {t: v.tolist() for t, v in zip(texts, vectors, strict=True)}
        self._dimension = vectors.shape[1]
        self._rng = np.random.default_rng(0)

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unknown texts (the prewarm query) get a random unit vector."""
        return [self._vectors.get(t) or _unit(self._rng.standard_normal((1, self._dimension)))[0].tolist()
                for t in texts]


# -- measuring --------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 300 samples is the 297th)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def figures(name: str, latencies_ms: list[float], *, cold_ms: float | None = None, **extra: Any) -> dict[str, Any]:
    """Cold is the first latency unless given; warm p50/p99 over the rest."""
    warm = latencies_ms if cold_ms is not None else latencies_ms[1:]
    return {"path": name, "cold_ms": round(latencies_ms[0] if cold_ms is None else cold_ms, 3),
            "p50_ms": round(statistics.median(warm), 3), "p99_ms": round(percentile(warm, 99), 3),
            "queries": len(warm), **extra}


def recall(found: Sequence[Sequence[str]], exact: Sequence[Sequence[str]]) -> float:
    return round(float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)])), 4)


def through(retriever: MilvusRetriever, texts: Sequence[str], mode: Mode, top_k: int,
            want_hot: bool | None = None) -> tuple[list[float], list[list[str]]]:
    """Latency (ms) and hit ids of every query; refuses a run where a query took another path."""
    latencies, ids = [], []
    for text in texts:
        result = retriever.search(text, top_k=top_k, mode=mode)
        if result.mode != mode or (want_hot is not None and result.hot != want_hot):
            raise RuntimeError(f"{mode} query answered as {result.mode} (hot={result.hot}): {result.reason}")
        latencies.append(result.latency_ms)
        ids.append([h.id for h in result.hits])
    return latencies, ids


def timed(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> tuple[list[float], list[Any]]:
    latencies, found = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q))
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, found


class Phases:
    """Wall time of each phase, printed as it ends."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        begun = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - begun, 2)
        console.print(f"[dim]{time.perf_counter() - self.started:7.1f}s[/] {name}: {self.seconds[name]} s")


# -- the run ----------------------------------------------------------------------------------------

def manifest(dim: int, rows: int) -> VectorIndex:
    return VectorIndex.model_validate({
        "apiVersion": "pilothouse.io/v1alpha1", "kind": "VectorIndex", "metadata": {"name": "bench"},
        "spec": {"fields": {"dimension": dim, "metadata": [{"name": "topic", "type": "INT64"}]},
                 "index": {"type": "HNSW"}, "hotIndex": {"enabled": True, "maxRows": rows}}})


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    phase = Phases()
    k = args.top_k
    with phase("generate"):
        corpus = generate(args.rows, args.queries, args.dim, args.topics, args.seed)
    vi = manifest(args.dim, args.rows)
    uri = str(tmp / "milvus.db")
    with phase("create collection"):
        milvus.reconcile(vi, uri)
        client = milvus.connect(uri)
    with phase("insert into Milvus"):
        for start in range(0, args.rows, 2_000):
            stop = min(args.rows, start + 2_000)
            client.insert(vi.alias, [{"id": f"c{i:07d}", "text": corpus.texts[i], "topic": int(corpus.topics[i]),
                                      "embedding": corpus.vectors[i].tolist()} for i in range(start, stop)])
        client.flush(vi.alias)
    store = KeywordStore(tmp / "keyword.db")
    with phase("insert into the keyword copy"):
        store.upsert(StoredChunk(f"c{i:07d}", "bench", "", corpus.texts[i], {"topic": int(corpus.topics[i])})
                     for i in range(args.rows))
    with phase("load (Milvus builds its HNSW)"):
        client.release_collection(vi.alias)
        client.load_collection(vi.alias)

    with phase("exact top-10 (flat scan)"):
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(corpus.vectors)
        similarity, positions = flat.search(corpus.query_vectors, k)
        exact = [[f"c{i:07d}" for i in row] for row in positions]

    embedder = QueryVectors(corpus.query_texts, corpus.query_vectors)

    def retriever(hot: bool) -> MilvusRetriever:
        return MilvusRetriever(index="bench", collection=vi.alias, milvus_uri=uri, embedder=embedder,
                               keyword_store=store, output_fields=["topic"], registry=CollectorRegistry(),
                               hot_index=vi.spec.hot_index if hot else None)

    texts = corpus.query_texts
    rows: list[dict[str, Any]] = []
    plain = retriever(hot=False)
    for mode, name in (("dense", "Milvus dense"), ("hybrid", "Milvus hybrid"), ("keyword", "Milvus keyword (BM25)"),
                       ("keyword-only", "keyword-only (FTS5 copy)")):
        with phase(name):
            latencies, ids = through(plain, texts, mode, k, want_hot=False)
        rows.append(figures(name, latencies, **({"recall_at_10": recall(ids, exact)} if mode == "dense" else {})))
    plain.close()

    hot = retriever(hot=True)
    with phase("hot index prewarm (copy + build)"):
        warmup = hot.prewarm()
    snapshot = hot.hot.snapshot if hot.hot is not None else None
    if snapshot is None or not warmup.hot:
        raise RuntimeError(f"hot index not built: {warmup.reason or 'over maxRows'}")
    with phase("hot dense"):
        latencies, ids = through(hot, texts, "dense", k, want_hot=True)
    rows.append(figures("hot dense (in-process + Milvus get)", latencies, cold_ms=warmup.latency_ms,
                        recall_at_10=recall(ids, exact), build_s=round(snapshot.build_s, 2),
                        copy_s=round(snapshot.copy_s, 2), index=snapshot.kind))
    with phase("hot hybrid"):
        latencies, _ = through(hot, texts, "hybrid", k, want_hot=True)
    rows.append(figures("hot hybrid (dense in-process)", latencies))
    with phase("hot index search alone"):
        latencies, found = timed(lambda q: snapshot.search(q, k), corpus.query_vectors)
    rows.append(figures("hot index search alone", latencies, recall_at_10=recall([[i for i, _ in f] for f in found],
                                                                                   exact)))
    hot.close()

    with phase("FAISS flat"):
        latencies, found = timed(lambda q: flat.search(q[None], k)[1][0], corpus.query_vectors)
    rows.append(figures("FAISS flat (exact)", latencies, index="flat"))
    with phase("FAISS HNSW build + search"):
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(args.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw.add(corpus.vectors)
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        build_s = time.perf_counter() - started
        latencies, found = timed(lambda q: hnsw.search(q[None], k)[1][0], corpus.query_vectors)
    rows.append(figures("FAISS HNSW", latencies, index="hnsw", build_s=round(build_s, 2),
                        recall_at_10=recall([[f"c{i:07d}" for i in f] for f in found], exact)))
    store.close()
    client.close()
    return {"rows": rows, "phases_s": phase.seconds, "hot_index_kind": snapshot.kind,
            "exact_cosine": {"top1_mean": round(float(similarity[:, 0].mean()), 3),
                             f"top{k}_mean": round(float(similarity[:, -1].mean()), 3)},
            "load_s": phase.seconds["load (Milvus builds its HNSW)"],
            "insert_rows_per_s": round(args.rows / phase.seconds["insert into Milvus"])}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    by = {r["path"]: r for r in result["rows"]}
    faiss_row = by["FAISS flat (exact)" if result["hot_index_kind"] == "flat" else "FAISS HNSW"]
    named = {"dense": "Milvus dense", "hybrid": "Milvus hybrid", "keyword": "Milvus keyword (BM25)",
             "keyword_only": "keyword-only (FTS5 copy)", "hot": "hot dense (in-process + Milvus get)",
             "hot_hybrid": "hot hybrid (dense in-process)", "hot_search": "hot index search alone"}
    summary: dict[str, Any] = {}
    for key, path in named.items():
        summary[f"{key}_p50_ms"], summary[f"{key}_p99_ms"] = by[path]["p50_ms"], by[path]["p99_ms"]
        summary[f"{key}_cold_ms"] = by[path]["cold_ms"]
    summary.update({
        "faiss_p50_ms": faiss_row["p50_ms"], "faiss_p99_ms": faiss_row["p99_ms"], "faiss_index": faiss_row["index"],
        "hot_vs_milvus_dense": round(by["Milvus dense"]["p50_ms"] / by[named["hot"]]["p50_ms"], 1),
        "hot_hybrid_vs_milvus_hybrid": round(by["Milvus hybrid"]["p50_ms"] / by[named["hot_hybrid"]]["p50_ms"], 1),
        "hot_vs_faiss": round(by[named["hot"]]["p50_ms"] / faiss_row["p50_ms"], 1),
        "dense_recall_at_10": by["Milvus dense"]["recall_at_10"], "hot_recall_at_10": by[named["hot"]]["recall_at_10"],
        "faiss_hnsw_recall_at_10": by["FAISS HNSW"]["recall_at_10"],
        "hot_build_s": by[named["hot"]]["build_s"], "hot_copy_s": by[named["hot"]]["copy_s"],
        "milvus_load_s": result["load_s"],
    })
    return summary


def render(report: dict[str, Any]) -> None:
    config = report["config"]
    table = Table(title=f"retrieval: {config['rows']:,} chunks x {config['dim']}-d, {config['queries']} queries, "
                        f"top {config['top_k']}, {report['machine']['cpus']} CPUs")
    for column, justify in (("path", "left"), ("cold ms", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
                            ("recall@10", "right"), ("build s", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in report["retrieval"]["rows"]:
        table.add_row(row["path"], f"{row['cold_ms']:.2f}", f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
                      str(row.get("recall_at_10", "")), str(row.get("build_s", "")))
    console.print(table)
    s = report["summary"]
    console.print(f"hot index ({report['retrieval']['hot_index_kind']}) vs Milvus dense p50: "
                  f"[bold]{s['hot_vs_milvus_dense']}x[/] faster; hot hybrid vs Milvus hybrid: "
                  f"{s['hot_hybrid_vs_milvus_hybrid']}x; hot vs plain FAISS {s['faiss_index']}: "
                  f"{s['hot_vs_faiss']}x slower (freshness check + text from Milvus)")
    console.print(f"Milvus Lite: insert {report['retrieval']['insert_rows_per_s']:,} rows/s, "
                  f"load {s['milvus_load_s']} s; hot index build {s['hot_build_s']} s (copy {s['hot_copy_s']} s); "
                  f"exact cosine of queries' top 1 / top {config['top_k']}: "
                  + " / ".join(str(v) for v in report["retrieval"]["exact_cosine"].values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="chunks in the collection (quick run: 10000)")
    parser.add_argument("--queries", type=int, default=300, help="queries per path")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension")
    parser.add_argument("--topics", type=int, default=1_000, help="topic clusters the chunks are drawn around")
    parser.add_argument("--top-k", type=int, default=10, help="hits per query")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args()
    machine.sample_speed()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pilothouse-bench-retrieval-") as tmp:
        result = bench(args, Path(tmp))
    report = {
        "benchmark": "retrieval",
        "when": machine.measured_at(),
        "summary": summarise(result),
        "retrieval": result,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine.describe("pymilvus", "milvus-lite", "faiss-cpu", "numpy"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = machine.save(Path(args.out), report)
    render(report)
    console.print(f"wrote {out} (wall {report['wall_s']} s)")


if __name__ == "__main__":
    main()
