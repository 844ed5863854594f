"""The workflow runtime end to end: the real gateway in-process over a FakeBackend, a real webhook
receiver, real SQLite stores. What a user notices: a confident run acts once; a doubtful one waits for a
human and acts only when approved; failures after partial effects are compensated; nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pilothouse.operator.api import AutonomousWorkflow
from pilothouse.serving.audit import AuditLog
from pilothouse.serving.metrics import Metrics
from pilothouse.serving.runs import NotWaiting, RunStore
from pilothouse.serving.runtime import RunError, WorkflowRuntime
from tests.fakes.openai_backend import FakeBackend
from tests.fakes.workflow_kit import API_KEY, FIELDS, INVOICE, VENDORS, Receiver, answer, gateway, receiver, table
from tests.fakes.workflow_kit import workflow as make_workflow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Kit:
    runtime: WorkflowRuntime
    backend: FakeBackend
    receiver: Receiver
    app: Any
    http: httpx.AsyncClient
    store: RunStore
    audit: AuditLog
    metrics: Metrics
    store_url: str


@contextlib.asynccontextmanager
async def kit(tmp_path: Path, wf: AutonomousWorkflow | None = None, **workflow_args: Any) -> AsyncIterator[Kit]:
    store_url = f"sqlite:///{tmp_path}/store.db"
    with receiver() as r:
        wf = wf or make_workflow(r.url, **workflow_args)
        async with FakeBackend(model="org/small") as fb, gateway(tmp_path, table(wf, fb.url), store_url) as (app, gw):
            store, audit, metrics = RunStore(store_url), AuditLog(store_url), Metrics()
            runtime = WorkflowRuntime(wf, store=store, model=gw, retrievers={"vendors": VENDORS}, audit=audit,
                                      metrics=metrics)
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     headers=AUTH)
            try:
                yield Kit(runtime, fb, r, app, http, store, audit, metrics, store_url)
            finally:
                await http.aclose()
                await runtime.aclose()
                store.close()
                audit.close()


def metric(k: Kit, name: str, **labels: str) -> float:
    return k.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_confident_run_acts_once_and_is_recorded_step_by_step(tmp_path: Path) -> None:
    async with kit(tmp_path) as k:
        k.backend.reply_with(answer())
        result = await k.runtime.start(INVOICE, run_id="run-ok")
        assert result.state == "completed", result
        assert result.fields == FIELDS and result.confidence is not None and result.confidence > 0.95
        assert result.action is not None and result.action.taken and result.action.key == "run-ok-post"
        assert k.receiver.effects == {"run-ok-post": 1}
        assert k.receiver.bodies["run-ok-post"]["fields"] == FIELDS
        assert result.cost_usd > 0 and result.retrieval_mode == "hybrid"
        # the model was asked for structured output with logprobs, through the gateway, tagged with the run
        sent = k.backend.last_body
        assert sent["response_format"]["json_schema"]["schema"]["required"][0] == "vendor" and sent["logprobs"]
        assert "ACME GmbH, Berlin" in sent["messages"][0]["content"]  # the retrieved context is in the prompt
        steps = k.store.steps("run-ok")
        assert [s.state for s in steps.values()] == ["done"] * 5
        assert k.audit.get("run-ok/context").retrieval[0].id == "v1"
        assert k.audit.get("run-ok/post").action.idempotency_key == "run-ok-post"
        request = [r for r in k.audit.tail(50) if r.kind == "request"]
        assert request and request[0].run_id == "run-ok"
        # starting it again is resuming a finished run: no second effect
        again = await k.runtime.start(INVOICE, run_id="run-ok")
        assert again.state == "completed" and k.receiver.calls["run-ok-post"] == 1
        assert metric(k, "pilothouse_workflow_runs_total", workflow="invoices", outcome="automated") == 1
        assert metric(k, "pilothouse_workflow_cost_usd_total", workflow="invoices") == pytest.approx(result.cost_usd)


async def test_low_confidence_parks_without_acting_and_approval_acts_once(tmp_path: Path) -> None:
    async with kit(tmp_path) as k:
        k.backend.reply_with(answer(), logprobs_for={"1234.5": -1.0})
        parked = await k.runtime.start(INVOICE, run_id="run-low")
        assert parked.state == "review" and "total" in (parked.review_reason or "")
        assert parked.field_confidence["total"] < 0.95 <= parked.field_confidence["vendor"]
        assert k.receiver.calls == {}  # nothing acted on
        listed = (await k.http.get("/v1/reviews")).json()["data"]
        assert [r["id"] for r in listed] == ["run-low"] and listed[0]["review_reason"]
        decided = await k.http.post("/v1/reviews/run-low", json={"decision": "approve", "reviewer": "dana",
                                                                  "reason": "total matches the PDF"})
        assert decided.status_code == 200, decided.text
        assert decided.json()["state"] == "completed" and decided.json()["action"]["taken"]
        assert k.receiver.effects == {"run-low-post": 1}
        decision = k.audit.get("run-low/approve#2").human_decision
        assert decision.reviewer == "dana" and decision.reason == "total matches the PDF"
        shown = (await k.http.get("/v1/reviews/run-low")).json()
        assert shown["decisions"][0]["reviewer"] == "dana" and shown["state"] == "completed"
        assert (await k.http.get("/v1/reviews")).json()["data"] == []
        # a second decision: 409 naming the state; still one effect
        again = await k.http.post("/v1/reviews/run-low", json={"decision": "approve", "reviewer": "eve"})
        assert again.status_code == 409 and "completed" in again.json()["error"]["message"]
        assert again.json()["error"]["code"] == "run_not_waiting" and k.receiver.calls["run-low-post"] == 1
        missing = await k.http.post("/v1/reviews/nope", json={"decision": "approve", "reviewer": "eve"})
        assert missing.status_code == 404
        assert metric(k, "pilothouse_workflow_reviews_total", workflow="invoices") == 1
        exported = (await k.http.get("/metrics")).text  # the approval ran in the gateway: its metrics count it
        assert 'pilothouse_workflow_runs_total{outcome="approved",workflow="invoices"} 1.0' in exported


async def test_reject_never_acts_and_edit_acts_with_the_edited_fields(tmp_path: Path) -> None:
    async with kit(tmp_path) as k:
        k.backend.reply_with(answer(), logprobs_for={"1234.5": -1.0})
        await k.runtime.start(INVOICE, run_id="run-a")
        await k.runtime.start(INVOICE, run_id="run-b")
        rejected = await k.runtime.decide("run-a", "reject", reviewer="dana", reason="duplicate invoice")
        assert rejected.state == "rejected" and k.receiver.calls == {}
        assert k.audit.get("run-a/approve#2").human_decision.decision == "reject"
        bad = await k.http.post("/v1/reviews/run-b", json={"decision": "edit", "reviewer": "dana",
                                                            "fields": {"total": "a lot"}})
        assert bad.status_code == 400 and "total" in bad.json()["error"]["message"]
        edited = await k.runtime.decide("run-b", "edit", reviewer="dana", reason="typo", fields={"total": 1234.05})
        assert edited.state == "completed" and edited.fields == {**FIELDS, "total": 1234.05}
        assert k.receiver.bodies["run-b-post"]["fields"]["total"] == 1234.05
        with pytest.raises(NotWaiting, match="rejected"):
            await k.runtime.decide("run-a", "approve", reviewer="eve")
        assert list(k.receiver.effects) == ["run-b-post"]


async def test_high_risk_actions_always_wait_for_a_human(tmp_path: Path) -> None:
    async with kit(tmp_path, risk="high") as k:
        k.backend.reply_with(answer())
        parked = await k.runtime.start(INVOICE, run_id="run-risk")
        assert parked.state == "review" and "high-risk" in (parked.review_reason or "")
        assert k.receiver.calls == {}


@pytest.mark.parametrize("failure", ["500", "timeout"])
async def test_a_webhook_failing_after_partial_effects_is_compensated(tmp_path: Path, failure: str) -> None:
    async with kit(tmp_path, act_timeout_s=0.5) as k:
        k.backend.reply_with(answer())
        if failure == "500":
            k.receiver.fail_status = 500
        else:
            k.receiver.stall(3.0)
        result = await k.runtime.start(INVOICE, run_id="run-x")
        assert result.state == "compensated", result
        assert k.receiver.effects == {"run-x-post": 1} and k.receiver.undone == {"run-x-post": 1}
        assert result.action is not None and result.action.compensated
        assert "500" in (result.error or "") if failure == "500" else "timed out" in (result.error or "")
        assert k.audit.get("run-x/post/compensation").action.compensates == "run-x-post"
        assert metric(k, "pilothouse_workflow_compensations_total", workflow="invoices") == 1


async def test_output_violating_the_schema_is_parked_for_review_not_lost(tmp_path: Path) -> None:
    async with kit(tmp_path) as k:
        k.backend.reply_with(answer(total="twelve"))
        result = await k.runtime.start(INVOICE, run_id="run-bad")
        assert result.state == "review" and "schema" in (result.review_reason or "")
        assert "total" in (result.review_reason or "") and k.receiver.calls == {}
        k.backend.reply_with("this is not JSON at all")
        prose = await k.runtime.start(INVOICE + " Page 2.", run_id="run-prose")  # another prompt: no cache hit
        assert prose.state == "review" and "not JSON" in (prose.review_reason or "")
        with pytest.raises(RunError, match=r"cannot approve: .*total.*review edit"):  # nulls must not be acted on
            await k.runtime.decide("run-bad", "approve", reviewer="dana")
        with pytest.raises(RunError, match="cannot approve"):
            await k.runtime.decide("run-prose", "approve", reviewer="dana")
        assert k.receiver.calls == {} and (await k.runtime.result("run-bad")).state == "review"
        fixed = await k.runtime.decide("run-prose", "edit", reviewer="dana", fields=FIELDS)
        assert fixed.state == "completed" and k.receiver.effects == {"run-prose-post": 1}


async def test_empty_input_and_an_unreachable_gateway_are_recorded_failures(tmp_path: Path) -> None:
    async with kit(tmp_path) as k:
        empty = await k.runtime.start("   \n", run_id="run-empty")
        assert empty.state == "failed" and "empty" in (empty.error or "")
        assert k.store.get("run-empty").input == "   \n"
        k.backend.fail_with(503)
        down = await k.runtime.start(INVOICE, run_id="run-down")
        assert down.state == "failed" and "503" in (down.error or "") and k.receiver.calls == {}
        k.backend.reset()
        k.backend.reply_with(answer())
        retried = await k.runtime.resume("run-down")  # nothing was acted on: a failed run may be retried
        assert retried.state == "completed" and k.receiver.effects == {"run-down-post": 1}
        assert k.store.steps("run-down")["extract"].attempts == 2


def test_a_runtime_killed_while_acting_resumes_and_the_effect_happens_once(tmp_path: Path) -> None:
    """kill -9 between "action sent" and "action recorded": the restarted runtime resumes at the act step
    and sends the same key again; the receiver acts once."""
    store_url = f"sqlite:///{tmp_path}/store.db"
    with receiver() as r:
        r.stall(120)  # hold the first act request: the child is killed while it waits
        child = subprocess.Popen([sys.executable, "-m", "tests.fakes.workflow_child", str(tmp_path), store_url,
                                  r.url], cwd=Path(__file__).parents[2], start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert r.got_request.wait(60), child.communicate(timeout=5)[0] if child.poll() is not None else ""
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(30)
        r.stall(0, times=0)
        store = RunStore(store_url)
        assert store.get("run-crash").state == "running"
        assert store.steps("run-crash")["post"].state == "started"

        async def restart() -> list[Any]:
            runtime = WorkflowRuntime(store=store, owner="runtime-a")  # the same runtime, restarted
            try:
                return await runtime.resume_incomplete()
            finally:
                await runtime.aclose()

        results = asyncio.run(restart())
        assert [x.state for x in results] == ["completed"]
        assert r.calls == {"run-crash-post": 2} and r.effects == {"run-crash-post": 1}
        steps = store.steps("run-crash")
        assert steps["post"].attempts == 2 and steps["extract"].attempts == 1  # generate was not re-run
        store.close()


def test_review_cli_lists_shows_and_decides_and_refuses_runs_not_waiting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pilothouse.cli import app

    async def park(r: Receiver) -> None:
        async with kit(tmp_path, wf=make_workflow(r.url)) as k:
            k.backend.reply_with(answer(), logprobs_for={"1234.5": -1.0})
            for i, run_id in enumerate(("cli-a", "cli-b", "cli-c")):
                assert (await k.runtime.start(f"{INVOICE} Copy {i}.", run_id=run_id)).state == "review"

    store_url = f"sqlite:///{tmp_path}/store.db"
    cli = CliRunner()
    with receiver() as r:
        asyncio.run(park(r))
        listed = cli.invoke(app, ["review", "list", "--store-url", store_url])
        assert listed.exit_code == 0 and all(i in listed.output for i in ("cli-a", "cli-b", "cli-c"))
        shown = cli.invoke(app, ["review", "show", "cli-a", "--store-url", store_url])
        assert shown.exit_code == 0 and '"review_reason"' in shown.output and "low confidence" in shown.output
        approved = cli.invoke(app, ["review", "approve", "cli-a", "--reviewer", "dana", "--reason", "ok",
                                    "--store-url", store_url])
        assert approved.exit_code == 0 and "completed" in approved.output and r.effects == {"cli-a-post": 1}
        rejected = cli.invoke(app, ["review", "reject", "cli-b", "--reviewer", "dana", "--store-url", store_url])
        assert rejected.exit_code == 0 and "rejected" in rejected.output
        edited = cli.invoke(app, ["review", "edit", "cli-c", "--reviewer", "dana", "--set", "total=99.5",
                                  "--set", "currency=USD", "--store-url", store_url])
        assert edited.exit_code == 0, edited.output
        assert r.bodies["cli-c-post"]["fields"] == {**FIELDS, "total": 99.5, "currency": "USD"}
        again = cli.invoke(app, ["review", "approve", "cli-b", "--reviewer", "eve", "--store-url", store_url])
        assert again.exit_code == 2 and "rejected, not waiting for review" in again.output
        assert "Traceback" not in again.output and set(r.effects) == {"cli-a-post", "cli-c-post"}
        nowhere = cli.invoke(app, ["review", "list", "--store-url", f"sqlite:///{tmp_path}/none.db"])
        assert nowhere.exit_code == 2 and "no run store" in nowhere.output
