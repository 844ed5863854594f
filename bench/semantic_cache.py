"""Semantic cache lookup latency on Milvus Lite with the offline all-MiniLM-L6-v2 (serving/semantic_cache.py).

One tenant, one route, one parameter set (the worst case: the scalar filters prune nothing) holding
``--entries`` distinct help-desk questions, filled through the cache's own ``store`` path (so the
flush and bound maintenance every 100 stores run as in the gateway). Then ``--lookups`` lookups
through ``SemanticCache.lookup``, half rephrasings of stored questions, half questions never stored,
timed end to end (what a request waits for: embedding + filtered search), then the embedding and
the Milvus search alone for the same texts.

Reported (table + ``bench/results/semantic_cache.json``): lookup p50/p95, embedding p50, search
p50/p95, store p50 (the upsert; every 100th also flushes and trims),
and how many rephrasings hit and unrelated questions missed at the default threshold.

Run under the shared lock: ``flock /tmp/pilothouse-heavy.lock .venv/bin/python bench/semantic_cache.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "semantic_cache.json"
ROUTE = "help-desk/answer"

ACTIONS = ["reset", "renew", "cancel", "transfer", "update", "request", "replace", "report", "approve", "export"]
THINGS = ["my password", "a parking permit", "the VPN certificate", "my laptop", "a travel expense",
          "the team calendar", "a meeting room", "my badge", "the printer quota", "a software licence"]
PLACES = ["in Berlin", "in Lyon", "in Austin", "at headquarters", "for the night shift", "for a contractor",
          "before Friday", "for the new hire", "on the intranet", "from home", "for the finance team",
          "during the audit", "for the Q3 launch", "in the warehouse", "for my manager", "on a weekend",
          "after a reorg", "for an intern", "on the mobile app", "for the sales office", "in the lab",
          "for a visitor", "during leave", "for the data centre", "in the Tokyo office", "for the board meeting",
          "at the Dublin site", "for a remote worker", "on the shared drive", "in the training room"]
UNRELATED = ["Tell me a joke about cats", "What is the boiling point of water?", "Write a haiku about rain",
             "Who painted the Mona Lisa?", "How far away is the Moon?", "Recommend a science fiction novel",
             "What is the capital of Australia?", "Explain photosynthesis briefly", "How many legs has a spider?",
             "What rhymes with orange?"]


def questions(n: int) -> list[str]:
    combos = itertools.product(ACTIONS, THINGS, PLACES)
    return [f"How do I {a} {t} {p}?" for a, t, p in itertools.islice(combos, n)]


def rephrase(question: str) -> str:
    return question.replace("How do I", "How can I", 1)


def body(text: str) -> dict[str, Any]:
    return {"model": ROUTE, "temperature": 0, "max_tokens": 128,
            "messages": [{"role": "system", "content": "You are the help desk."}, {"role": "user", "content": text}]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 2)


async def run(entries: int, lookups: int, folder: Path) -> dict[str, Any]:
    from pilothouse.serving.embeddings import LocalEmbedder
    from pilothouse.serving.engines import Usage
    from pilothouse.serving.metrics import Metrics
    from pilothouse.serving.semantic_cache import Probe, SemanticCache

    embedder = LocalEmbedder()
    metrics = Metrics()
    metrics.allow(routes=[ROUTE])
    cache = SemanticCache(uri=str(folder / "cache.db"), collection="bench", embedder=embedder,
                          embedder_id="minilm", metrics=metrics, max_entries_per_tenant=entries,
                          lookup_timeout_s=30)
    await cache.prewarm()
    stored = questions(entries)
    vectors = embedder.embed(stored)  # batched: filling is not what is measured
    answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "See the intranet."},
                                      "finish_reason": "stop"}]}).encode()
    store_ms: list[float] = []
    fill_started = time.perf_counter()
    for text, vector in zip(stored, vectors, strict=True):
        probe = Probe(route=ROUTE, key=cache.key("bench", ROUTE, body(text)), vector=vector)
        started = time.perf_counter()
        assert await cache.store(probe, answer, Usage(30, 5))
        store_ms.append((time.perf_counter() - started) * 1000)
    fill_s = time.perf_counter() - fill_started

    step = max(len(stored) // (lookups // 2), 1)
    paraphrases = [rephrase(q) for q in stored[::step][: lookups // 2]]
    unrelated = [f"{q} (question {i})" if i >= len(UNRELATED) else q
                 for i, q in enumerate(itertools.islice(itertools.cycle(UNRELATED), lookups - len(paraphrases)))]
    texts = paraphrases + unrelated
    lookup_ms: list[float] = []
    hits: list[bool] = []
    for text in texts:
        started = time.perf_counter()
        probe = await cache.lookup("bench", ROUTE, body(text))
        lookup_ms.append((time.perf_counter() - started) * 1000)
        hits.append(probe.hit is not None)
    embed_ms: list[float] = []
    search_ms: list[float] = []
    client = cache._milvus()  # the cache's own connection: the search alone, as _lookup_sync runs it
    for text in texts:
        started = time.perf_counter()
        vector = embedder.embed([text])[0]
        embed_ms.append((time.perf_counter() - started) * 1000)
        key = cache.key("bench", ROUTE, body(text))
        assert key is not None
        started = time.perf_counter()
        client.search(cache.collection, [vector], anns_field="embedding", limit=1,
                      filter=f"{key.filter} and expires_at > {int(time.time() * 1000)}",
                      output_fields=["body", "stored_at", "expires_at", "prompt_tokens", "completion_tokens"],
                      search_params={"metric_type": "COSINE"})
        search_ms.append((time.perf_counter() - started) * 1000)
    await cache.aclose()
    return {
        "entries": entries, "lookups": len(texts), "threshold": cache.threshold, "fill_s": round(fill_s, 1),
        "summary": {
            "lookup_p50_ms": pct(lookup_ms, 0.5), "lookup_p95_ms": pct(lookup_ms, 0.95),
            "embed_p50_ms": pct(embed_ms, 0.5), "search_p50_ms": pct(search_ms, 0.5),
            "search_p95_ms": pct(search_ms, 0.95),
            "store_p50_ms": pct(store_ms, 0.5), "store_p95_ms": pct(store_ms, 0.95),
        },
        "rephrasings_hit": sum(hits[: len(paraphrases)]), "rephrasings": len(paraphrases),
        "unrelated_missed": len(unrelated) - sum(hits[len(paraphrases):]), "unrelated": len(unrelated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=3000, help="rows in the tenant's cache (max 3000)")
    parser.add_argument("--lookups", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    machine.sample_speed()
    with tempfile.TemporaryDirectory() as folder:
        result = asyncio.run(run(min(args.entries, len(ACTIONS) * len(THINGS) * len(PLACES)), args.lookups,
                                 Path(folder)))
    doc = {"benchmark": "semantic_cache", "when": machine.measured_at(),
           "machine": machine.describe(),
           **result}
    machine.save(args.out, doc)
    print(f"semantic cache, {result['entries']} entries in one tenant/route, {result['lookups']} lookups")
    for name, value in result["summary"].items():
        print(f"  {name:<16} {value:>8}")
    print(f"  rephrasings hit  {result['rephrasings_hit']}/{result['rephrasings']}, "
          f"unrelated missed {result['unrelated_missed']}/{result['unrelated']}")


if __name__ == "__main__":
    main()
