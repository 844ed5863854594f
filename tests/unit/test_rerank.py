"""Re-ranking in the retrieve step: a real (tiny, random) cross-encoder built here, and a chat ModelDeployment
answering yes/no through the real gateway. What a user notices: the prompt gets the candidates the re-ranker
prefers, only topN of them, with the scores on record; a re-ranker that fails never fails the run."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pilothouse.operator import workflow as workflow_reconciler
from pilothouse.operator.api import AutonomousWorkflow
from pilothouse.operator.local import LocalEnv
from pilothouse.operator.manifests import describe
from pilothouse.serving.audit import AuditLog
from pilothouse.serving.retrieval import Hit, Mode, RetrievalResult
from pilothouse.serving.runs import RunError, RunStore
from pilothouse.serving.runtime import WorkflowRuntime
from tests.fakes.openai_backend import FakeBackend
from tests.fakes.workflow_kit import INVOICE, Receiver, answer, gateway, receiver, table
from tests.fakes.workflow_kit import workflow as make_workflow

from .crd_check import api_server_errors
from .factories import index, model

PASSAGES = {
    "acme": "ACME GmbH, Berlin, vendor id 881, pays invoices in EUR",
    "globex": "Globex Ltd, London, pays in GBP by bank transfer",
    "initech": "Initech invoices are due within 30 days of the invoice date",
    "terms": "ACME GmbH payment terms: the total is due in EUR within 14 days",
}


class FixedRetriever:
    """A retriever whose fused order the test chooses: the hits in the given order, best first."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    def search(self, query: str, *, top_k: int, mode: Mode, filter: str | None = None) -> RetrievalResult:
        hits = [Hit(doc, PASSAGES[doc], 1 / (60 + rank)) for rank, doc in enumerate(self.order, 1)]
        return RetrievalResult(hits=hits[:top_k], mode=mode)


@dataclass
class Kit:
    runtime: WorkflowRuntime
    backend: FakeBackend
    store: RunStore
    audit: AuditLog
    receiver: Receiver


@contextlib.asynccontextmanager
async def kit(tmp_path: Path, order: list[str], rerank: dict[str, Any]) -> AsyncIterator[Kit]:
    store_url = f"sqlite:///{tmp_path}/store.db"
    with receiver() as r:
        wf = make_workflow(r.url, retrieve={"topK": len(order), "rerank": rerank})
        async with FakeBackend(model="org/small") as fb, gateway(tmp_path, table(wf, fb.url), store_url) as (_, gw):
            fb.reply_with(answer())
            store, audit = RunStore(store_url), AuditLog(store_url)
            runtime = WorkflowRuntime(wf, store=store, model=gw, retrievers={"vendors": FixedRetriever(order)},
                                      audit=audit)
            try:
                yield Kit(runtime, fb, store, audit, r)
            finally:
                await runtime.aclose()
                store.close()
                audit.close()


def retrieved(k: Kit, run_id: str) -> dict[str, Any]:
    return k.store.steps(run_id)["context"].output


def prompt_of_generate(k: Kit) -> str:
    return next(body["messages"][0]["content"] for path, body in reversed(k.backend.log)
                if "Extract the fields" in str(body.get("messages")))


# -- a local cross-encoder ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT cross-encoder (random weights, a word-level vocabulary of this test's words), saved as a folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("cross-encoder")
    words = sorted({w for text in [INVOICE, *PASSAGES.values()] for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(7)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def own_scores(cross_encoder: Path) -> dict[str, float]:
    """The cross-encoder's own scores for (the invoice, each passage), straight from sentence-transformers."""
    from sentence_transformers import CrossEncoder

    scores = CrossEncoder(str(cross_encoder), device="cpu").predict([(INVOICE, p) for p in PASSAGES.values()])
    found = dict(zip(PASSAGES, (float(s) for s in scores), strict=True))
    assert len(set(found.values())) == len(found), f"random weights gave tied scores, pick another seed: {found}"
    return found


async def test_a_cross_encoder_puts_its_best_candidates_into_the_prompt_and_keeps_top_n(
        tmp_path: Path, cross_encoder: Path, own_scores: dict[str, float]) -> None:
    fused = sorted(PASSAGES, key=own_scores.__getitem__)  # fused order = the cross-encoder's worst first
    best = sorted(PASSAGES, key=own_scores.__getitem__, reverse=True)[:2]
    async with kit(tmp_path, fused, {"localPath": str(cross_encoder), "topN": 2}) as k:
        result = await k.runtime.start(INVOICE, run_id="run-ce")
        assert result.state == "completed", result
        out = retrieved(k, "run-ce")
        assert [h["id"] for h in out["hits"]] == best
        assert [h["rerank_score"] for h in out["hits"]] == pytest.approx([own_scores[d] for d in best], abs=1e-5)
        assert out["rerank"] == {"reranker": f"cross-encoder {cross_encoder}", "state": "ok", "reason": "",
                                 "candidates": 4, "kept": 2}
        prompt = prompt_of_generate(k)
        assert all(PASSAGES[d] in prompt for d in best) and not any(PASSAGES[d] in prompt for d in fused[:2])
        assert [h.id for h in k.audit.get("run-ce/context").retrieval] == best
        assert "re-ranked by cross-encoder" in (k.store.steps("run-ce")["context"].decision or "")


async def test_a_cross_encoder_folder_that_does_not_load_degrades_to_the_fused_order(tmp_path: Path) -> None:
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"this": "is not a model config"}')
    fused = ["globex", "acme", "terms", "initech"]
    async with kit(tmp_path, fused, {"localPath": str(broken), "topN": 3}) as k:
        result = await k.runtime.start(INVOICE, run_id="run-broken")
        assert result.state == "completed", result  # the run went on, and acted
        out = retrieved(k, "run-broken")
        assert [h["id"] for h in out["hits"]] == fused[:3] and all("rerank_score" not in h for h in out["hits"])
        assert out["rerank"]["state"] == "degraded" and "cannot load the cross-encoder" in out["rerank"]["reason"]
        assert str(broken) in out["rerank"]["reason"]
        assert "re-rank degraded, fused order kept" in (k.store.steps("run-broken")["context"].decision or "")
        assert k.receiver.effects == {"run-broken-post": 1}


def test_a_missing_local_path_is_refused_naming_the_field(tmp_path: Path) -> None:
    wf = make_workflow("http://erp.example", retrieve={"rerank": {"localPath": str(tmp_path / "nope")}})
    store = RunStore(f"sqlite:///{tmp_path}/store.db")
    try:
        with pytest.raises(RunError, match=r"spec\.steps\[0\]\.retrieve\.rerank\.localPath: .*nope is not a directory"):
            WorkflowRuntime(wf, store=store)
    finally:
        store.close()


def test_pilothouse_run_refuses_a_missing_local_path_before_starting_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pilothouse.cli import app

    folder = tmp_path / "job"
    folder.mkdir()
    wf = make_workflow("http://erp.example", retrieve={"rerank": {"localPath": "./models/ce"}})
    docs = [{"apiVersion": "pilothouse.io/v1alpha1", "kind": "AutonomousWorkflow",
             **wf.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})},
            {"apiVersion": "pilothouse.io/local", "kind": "LocalJob", "spec": {"workflow": wf.name}}]
    (folder / "all.yaml").write_text(yaml.safe_dump_all(docs))
    result = CliRunner().invoke(app, ["run", str(folder), "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 2, result.output
    assert "spec.steps[0].retrieve.rerank.localPath: ./models/ce is not a directory" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "state").exists()


@pytest.mark.parametrize(("rerank", "named"), [
    ({"topN": 3}, "exactly one of modelDeploymentRef or localPath"),
    ({"localPath": "/m", "modelDeploymentRef": "judge"}, "exactly one of modelDeploymentRef or localPath"),
    ({"modelDeploymentRef": "Not A Name"}, "modelDeploymentRef"),
])
def test_a_rerank_block_must_name_one_scorer(rerank: dict[str, Any], named: str) -> None:
    doc = make_workflow("http://erp.example").model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["steps"][0]["retrieve"]["rerank"] = rerank
    server = api_server_errors({"apiVersion": "pilothouse.io/v1alpha1", **doc})
    assert any("rerank" in line for line in server), server  # the CRD refuses it too, on kubectl apply
    with pytest.raises(ValidationError) as caught:
        AutonomousWorkflow.model_validate(doc)
    lines = describe(caught.value)
    assert any(line.startswith("spec.steps[0].retrieve.rerank") and named in line for line in lines), lines


# -- a chat ModelDeployment through the gateway ------------------------------------------------------

RELEVANCE = {"acme": 0.9, "globex": 0.05, "initech": 0.3, "terms": 0.7}


def judge(prompt: str) -> tuple[str, dict[str, float]] | None:
    """A model asked "is this passage relevant?": yes or no, with P(yes) = RELEVANCE of the passage."""
    if "Is the passage relevant to the query?" not in prompt:
        return None  # the generate step's prompt: the invoice answer
    p = next(RELEVANCE[doc] for doc, text in PASSAGES.items() if text in prompt)
    return ("Yes" if p >= 0.5 else "No"), {"Yes": math.log(p), "No": math.log(1 - p), "Maybe": math.log(1e-3)}


async def test_a_model_deployment_reranks_by_p_yes_through_the_gateway_and_its_cost_counts(tmp_path: Path) -> None:
    fused = ["globex", "initech", "terms", "acme"]
    async with kit(tmp_path, fused, {"modelDeploymentRef": "small", "topN": 2}) as k:
        k.backend.reply_by(judge)
        result = await k.runtime.start(INVOICE, run_id="run-llm")
        assert result.state == "completed", result
        out = retrieved(k, "run-llm")
        assert [h["id"] for h in out["hits"]] == ["acme", "terms"]
        assert [h["rerank_score"] for h in out["hits"]] == pytest.approx([0.9, 0.7])
        assert out["rerank"]["state"] == "ok" and out["rerank"]["reranker"] == "model small (route invoices/context)"
        asked = [body for path, body in k.backend.log if "Is the passage relevant" in str(body["messages"])]
        assert len(asked) == 4 and {(b["model"], b["max_tokens"], b["top_logprobs"]) for b in asked} == {
            ("org/small", 1, 10)}
        requests = [r for r in k.audit.tail(50) if r.kind == "request" and r.route == "context"]
        assert len(requests) == 4 and {r.run_id for r in requests} == {"run-llm"}
        generate_cost = k.store.steps("run-llm")["extract"].output["cost_usd"]
        assert result.cost_usd > generate_cost > 0  # the four yes/no calls are charged to the run


@pytest.mark.parametrize("failure", ["gateway error", "neither yes nor no"])
async def test_a_model_reranker_that_fails_keeps_the_fused_order_and_the_run_goes_on(
        tmp_path: Path, failure: str) -> None:
    fused = ["globex", "initech", "terms", "acme"]
    async with kit(tmp_path, fused, {"modelDeploymentRef": "small", "topN": 2}) as k:
        if failure == "gateway error":
            k.backend.fail_with(500, times=1)  # the first yes/no request: the retrieve step runs first
        result = await k.runtime.start(INVOICE, run_id="run-bad-judge")
        assert result.state == "completed", result
        out = retrieved(k, "run-bad-judge")
        assert [h["id"] for h in out["hits"]] == fused[:2]
        assert out["rerank"]["state"] == "degraded"
        expected = "injected failure 500" if failure == "gateway error" else "neither yes nor no"
        assert expected in out["rerank"]["reason"], out["rerank"]
        assert all(PASSAGES[d] in prompt_of_generate(k) for d in fused[:2])
        if failure == "neither yes nor no":  # answers came back and were paid for, if unusable
            assert result.cost_usd > k.store.steps("run-bad-judge")["extract"].output["cost_usd"]


# -- the operator ------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_env(tmp_path: Path, *objects: Any) -> Iterator[LocalEnv]:
    env = LocalEnv(tmp_path / "state")
    env.objects.update({(o.KIND, o.namespace, o.name): o for o in objects})
    yield env


async def test_the_rerank_model_gets_a_route_and_being_down_degrades_the_workflow_not_fails_it(
        tmp_path: Path) -> None:
    wf = AutonomousWorkflow.model_validate({"metadata": {"name": "wf"}, "spec": {"mission": "m", "steps": [
        {"name": "context", "type": "retrieve", "retrieve": {"vectorIndexRef": "docs",
                                                             "rerank": {"modelDeploymentRef": "judge"}}},
        {"name": "extract", "type": "generate", "generate": {"tier": "small", "promptTemplate": "{input}"}}]}})
    with local_env(tmp_path, model("small"), model("judge", tier="judges", healthy=False), index()) as env:
        try:
            outcome = await workflow_reconciler.reconcile(wf, env)
        finally:
            await env.prober.aclose()
    assert outcome.routing_table is not None
    route = next(r for r in outcome.routing_table.routes if r.step == "context")
    assert route.max_tokens == 1 and [b.model_deployment for b in route.backends] == ["judge"]
    ready = next(o for o in outcome.observations if o.type == "Ready")
    assert outcome.phase == "Degraded" and ready.status, ready  # re-rank falls back to the fused order at run time
    assert "context: no healthy backend" in "; ".join(outcome.routing_table.active_fallbacks)
