"""Milvus killed and restarted, or paused and resumed, under load: workflow runs keep completing,
keyword-only while it is down.

Milvus Lite runs as its own server process (``tests.milvus_server``) on a data directory holding one
ingested VectorIndex; the retriever and ingestion reach it over gRPC as they would a Milvus Service.
Four users keep starting runs of the invoice workflow on the real ``WorkflowRuntime`` (retrieve →
generate through the in-process gateway over a FakeBackend → validate → act on a webhook receiver),
so every retrieval goes through ``MilvusRetriever`` on the runtime's ``asyncio.to_thread`` path. Two faults:

* **kill**: SIGKILL the server (connections refused), keep the load going until the breaker has probed
  the dead server again, restart it on the same directory and port;
* **pause**: SIGSTOP it (connections stay open, calls are accepted and never answered: a hung server or
  a partition), the same load, then SIGCONT. Only the retriever's per-call deadline ends those calls.

Then it waits for an answer from Milvus and keeps going. Then:

* every run completed with retrieved context, and no audit record (gateway request or workflow
  step) has a 5xx status: nothing escaped the retriever;
* every retrieval that began and ended while the server was down was keyword-only, flagged
  degraded, with a reason naming Milvus; the degraded counter counts exactly the degraded answers;
* every retrieval that began after the first answer from the recovered server was hybrid again,
  and found the same vendor as before the fault (the flushed collection survived the crash).

Phases are recorded around each run (which phase it began and ended in), never timed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pilothouse.operator import milvus
from pilothouse.operator.api import VectorIndex
from pilothouse.serving.audit import AuditLog
from pilothouse.serving.breaker import BreakerConfig
from pilothouse.serving.embeddings import LocalEmbedder
from pilothouse.serving.ingest import Ingestor
from pilothouse.serving.keyword_store import KeywordStore, keyword_store_path
from pilothouse.serving.retrieval import MilvusRetriever
from pilothouse.serving.runs import RunStore
from pilothouse.serving.runtime import WorkflowRuntime
from tests.fakes.openai_backend import FakeBackend
from tests.fakes.workflow_kit import INVOICE, answer, gateway, receiver, table, workflow
from tests.milvus_server import MilvusLiteServer

pytestmark = [pytest.mark.drill, pytest.mark.integration]

USERS = 4
RUNS_PER_PHASE = 20  # runs wholly inside the outage, and after recovery, before the drill moves on
PROBES_WHILE_DOWN = 2  # half-open probes that met the dead server: the breaker kept retrying
DEADLINE_S = 120.0  # generous: a phase that is not reached by then is a failure, not a slow run
CALL_TIMEOUT_S = 1.0  # the retriever's deadline per Milvus call: what ends the calls a paused server never answers
VENDORS = VectorIndex.model_validate(yaml.safe_load("""
metadata: {name: vendors, namespace: finance}
spec: {fields: {dimension: 384}, index: {type: HNSW}}
"""))
CORPUS = {"acme.txt": "ACME GmbH, Berlin, vendor id 881, pays invoices in EUR by bank transfer.",
          "globex.txt": "Globex Ltd, London, vendor id 112, pays in GBP.",
          "initech.txt": "Initech Inc, Austin, vendor id 407, pays in USD by card."}
UP, DOWN, RESTARTING, RECOVERED = "up", "down", "restarting", "recovered"


@dataclass(frozen=True)
class Observed:
    run_id: str
    began: str
    ended: str
    state: str
    error: str | None
    retrieval: dict[str, Any]

    @property
    def degraded(self) -> bool:
        return bool(self.retrieval["degraded"])

    @property
    def probed(self) -> bool:
        """Milvus was asked and failed (not the open breaker answering without asking)."""
        return self.degraded and "failed recently" not in self.retrieval["reason"]


def ingest(folder: Path, uri: str, embedder: LocalEmbedder, store: KeywordStore) -> None:
    docs = folder / "vendors"
    docs.mkdir()
    for name, text in CORPUS.items():
        (docs / name).write_text(text)
    milvus.reconcile(VENDORS, uri)
    ingestor = Ingestor(client=milvus.connect(uri), collection=VENDORS.alias, embedder=embedder, keyword_store=store)
    report = ingestor.ingest([docs])
    assert (report.files_added, report.skipped) == (len(CORPUS), [])


@contextlib.asynccontextmanager
async def workflow_runtime(folder: Path, retriever: MilvusRetriever) -> AsyncIterator[tuple[WorkflowRuntime, RunStore,
                                                                                           AuditLog]]:
    """The invoice workflow on the real runtime and gateway, retrieving through ``retriever``."""
    store_url = f"sqlite:///{folder}/store.db"
    with receiver() as erp:
        wf = workflow(erp.url)
        async with FakeBackend(model="org/small") as backend, gateway(folder, table(wf, backend.url), store_url) as (
                _, client):
            backend.reply_with(answer())
            store, audit = RunStore(store_url), AuditLog(store_url)
            runtime = WorkflowRuntime(wf, store=store, model=client, retrievers={"vendors": retriever}, audit=audit)
            try:
                yield runtime, store, audit
            finally:
                await runtime.aclose()
                store.close()
                audit.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for an outcome of the load; the deadline only turns a hang into a failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, f"{what}: not reached within {DEADLINE_S:.0f} s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_milvus_down_and_back_under_load_keeps_answering(tmp_path: Path, fault: str) -> None:
    down, back = {"kill": ("kill", "start"), "pause": ("pause", "resume")}[fault]
    embedder = LocalEmbedder()
    registry = CollectorRegistry()
    keyword_copy = KeywordStore(keyword_store_path(tmp_path, VENDORS.namespace, VENDORS.alias))
    with contextlib.closing(keyword_copy), MilvusLiteServer(tmp_path / "milvus.db") as server:
        await asyncio.to_thread(ingest, tmp_path, server.uri, embedder, keyword_copy)
        retriever = MilvusRetriever(index="vendors", collection=VENDORS.alias, milvus_uri=server.uri,
                                    embedder=embedder, keyword_store=keyword_copy, registry=registry,
                                    breaker=BreakerConfig(cooldown_s=0.2, max_cooldown_s=0.5),
                                    timeout_s=CALL_TIMEOUT_S)
        await asyncio.to_thread(retriever.prewarm)
        observed: list[Observed] = []
        phase = UP
        stop = asyncio.Event()

        def wholly(name: str) -> list[Observed]:
            return [o for o in observed if o.began == o.ended == name]

        async with workflow_runtime(tmp_path, retriever) as (runtime, store, audit):

            async def user(n: int) -> None:
                i = 0
                while not stop.is_set():
                    run_id, began = f"user{n}-{i}", phase
                    i += 1
                    result = await runtime.start(INVOICE, run_id=run_id)
                    steps = await asyncio.to_thread(store.steps, run_id)
                    observed.append(Observed(run_id, began, phase, result.state, result.error,
                                             steps["context"].output or {}))

            # One run before the load: the baseline answer is hybrid with Milvus up.
            warm = await runtime.start(INVOICE, run_id="warm-up")
            assert (warm.state, warm.retrieval_mode) == ("completed", "hybrid"), warm
            users = [asyncio.create_task(user(n)) for n in range(USERS)]
            try:
                await until(lambda: len(wholly(UP)) >= RUNS_PER_PHASE, "runs before the fault")
                await asyncio.to_thread(getattr(server, down))
                phase = DOWN
                await until(lambda: len(wholly(DOWN)) >= RUNS_PER_PHASE
                            and sum(o.probed for o in wholly(DOWN)) >= PROBES_WHILE_DOWN, "runs during the outage")
                phase = RESTARTING
                await asyncio.to_thread(getattr(server, back))
                await until(lambda: any(o.began == RESTARTING and not o.degraded for o in observed),
                            f"an answer from Milvus after {back}")
                phase = RECOVERED
                await until(lambda: len([o for o in observed if o.began == RECOVERED]) >= RUNS_PER_PHASE,
                            "runs after recovery")
            finally:
                stop.set()
                if fault == "pause":  # a failure mid-pause must not leave the users' calls hanging
                    await asyncio.to_thread(server.resume)
                outcomes = await asyncio.gather(*users, return_exceptions=True)
            records = await asyncio.to_thread(audit.tail, 100 * len(observed))

    assert [o for o in outcomes if o is not None] == []  # no exception escaped a run
    assert [o for o in observed if o.state != "completed"] == []
    assert all(o.retrieval["hits"] for o in observed), "a run went without retrieved context"
    assert [(r.id, r.status_code) for r in records if (r.status_code or 0) >= 500] == []
    assert sum(r.kind == "request" for r in records) >= len(observed)  # the gateway answered every run's call

    for o in wholly(DOWN):
        assert (o.retrieval["mode"], o.degraded) == ("keyword-only", True), o
        assert f"Milvus at {server.uri}" in o.retrieval["reason"], o
        assert "local keyword copy" in o.retrieval["reason"], o
    for o in wholly(UP) + [o for o in observed if o.began == RECOVERED]:
        assert (o.retrieval["mode"], o.degraded) == ("hybrid", False), o
        assert "ACME GmbH" in o.retrieval["hits"][0]["text"], o
    for o in observed:  # runs across a transition: either answer, never anything else
        assert (o.retrieval["mode"], o.degraded) in {("hybrid", False), ("keyword-only", True)}, o

    degraded = sum(o.degraded for o in observed)
    counted = registry.get_sample_value("pilothouse_retrieval_degraded_total",
                                        {"index": "vendors", "reason": "milvus_unreachable"})
    assert degraded >= RUNS_PER_PHASE and counted == degraded
    print(f"milvus outage drill ({fault}): {len(observed)} runs, {degraded} degraded; by the phase they began in "
          "(runs, degraded, failed Milvus calls):",
          {name: (len(began), sum(o.degraded for o in began), sum(o.probed for o in began))
           for name in (UP, DOWN, RESTARTING, RECOVERED) for began in [[o for o in observed if o.began == name]]})
