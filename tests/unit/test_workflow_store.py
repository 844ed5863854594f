"""The pieces under the workflow runtime: the run store and SQL actions on SQLite and PostgreSQL, the
operator's SLO figures from known runs, and the confidence formula's bounds."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from pilothouse.operator.api.runs import runs as runs_table
from pilothouse.operator.api.workflow import Action
from pilothouse.operator.slo import SloReader
from pilothouse.serving.actions import ActionFailed, Actions
from pilothouse.serving.confidence import appears, combine, score, token_probabilities
from pilothouse.serving.runs import NotWaiting, RunBusy, RunError, RunStore

AT = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)



@pytest.fixture
def url(store_url: str) -> str:
    """This module's tests call the store URL ``url``."""
    return store_url

@pytest.fixture
def store(url: str) -> Iterator[RunStore]:
    s = RunStore(url)
    yield s
    s.close()


def new_run(store: RunStore, run_id: str = "r1") -> None:
    store.create(run_id, namespace="ns", workflow="wf", spec={"spec": {"steps": []}}, input_text="doc")


def test_one_runtime_at_a_time_and_decisions_only_while_waiting(store: RunStore) -> None:
    new_run(store)
    store.claim("r1", "a", timedelta(minutes=1))
    with pytest.raises(RunBusy, match="being executed by a"):
        store.claim("r1", "b", timedelta(minutes=1))
    assert store.incomplete(owner="b") == [] and store.incomplete(owner="a") == ["r1"]
    with pytest.raises(NotWaiting, match="running"):
        store.decide("r1", reviewer="dana", decision="approve", reason=None)
    store.update("r1", "a", release=True, state="review", reviewed=True, review_reason="low confidence")
    run = store.decide("r1", reviewer="dana", decision="edit", reason="typo", fields={"total": 5})
    assert run.state == "queued" and run.fields == {"total": 5}
    assert [(d.reviewer, d.decision, d.reason) for d in store.decisions("r1")] == [("dana", "edit", "typo")]
    with pytest.raises(NotWaiting, match="queued"):
        store.decide("r1", reviewer="eve", decision="reject", reason=None)
    assert store.claim("r1", "b", timedelta(minutes=1)).state == "running"  # queued again: anyone may take it
    with pytest.raises(RunBusy, match="lost its lease"):
        store.update("r1", "a", state="completed")


def test_sql_action_writes_once_per_key_and_its_compensation_once(url: str, tmp_path: Path) -> None:
    import asyncio

    target = url if url.startswith("postgresql") else f"sqlite:///{tmp_path}/erp.db"
    act = Action.model_validate({"sql": {
        "url": target, "setup": ["CREATE TABLE IF NOT EXISTS invoices (idempotency_key TEXT PRIMARY KEY, "
                                 "vendor TEXT, total NUMERIC)"],
        "statement": "INSERT INTO invoices (idempotency_key, vendor, total) "
                     "VALUES (:idempotency_key, :vendor, :total)"}})
    undo = Action.model_validate({"sql": {
        "url": target, "statement": "DELETE FROM invoices WHERE idempotency_key = :idempotency_key"}})
    fields = {"vendor": "ACME'; DROP TABLE invoices; --", "total": 12.5}

    async def scenario() -> list[str]:
        actions = Actions()
        try:
            first = await actions.perform(act, key="k1", fields=fields, run_id="r", workflow="wf")
            again = await actions.perform(act, key="k1", fields=fields, run_id="r", workflow="wf")
            assert (first.status, again.status) == ("written", "replayed")
            assert count(target) == 1  # bound parameters: the vendor's quote is data, not SQL
            needs_vat = Action.model_validate({"sql": {"url": target, "statement": "INSERT INTO invoices "
                                                       "(idempotency_key, total) VALUES (:idempotency_key, :vat)"}})
            with pytest.raises(ActionFailed, match="vat") as missing:
                await actions.perform(needs_vat, key="k2", fields=fields, run_id="r", workflow="wf")
            assert not missing.value.maybe_applied
            undone = await actions.perform(undo, key="k1", fields=fields, run_id="r", workflow="wf", undo=True)
            replay = await actions.perform(undo, key="k1", fields=fields, run_id="r", workflow="wf", undo=True)
            return [str(undone.status), str(replay.status)]
        finally:
            await actions.aclose()

    assert asyncio.run(scenario()) == ["written", "replayed"]
    assert count(target) == 0
    # k2 failed and rolled back, key included: a retry may still write
    engine = sa.create_engine(target)
    with engine.connect() as conn:
        keys = set(conn.execute(sa.text("SELECT key FROM pilothouse_action_keys")).scalars())
    engine.dispose()
    assert keys == {"k1", "k1#undo"}


def count(target: str) -> int:
    engine = sa.create_engine(target)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM invoices")).scalar()
    engine.dispose()
    return int(n or 0)


def test_slo_figures_from_a_known_set_of_runs(url: str) -> None:
    store = RunStore(url)
    rows = [  # (state, reviewed, cost, latency)
        *[("completed", False, 0.01, float(i + 1)) for i in range(16)],  # automated, latencies 1..16
        ("completed", True, 0.02, 30.0),  # approved by a human
        ("rejected", True, 0.01, 2.0),
        ("compensated", False, 0.01, 3.0),
        ("review", True, 0.01, 1.0),  # waiting: counted, but not in the latency
        ("running", False, 0.5, 100.0),  # not decided yet: not counted
    ]
    with store.engine.begin() as conn:
        for i, (state, reviewed, cost, latency) in enumerate(rows):
            conn.execute(runs_table.insert().values(
                id=f"r{i}", namespace="ns", workflow="wf", state=state, spec="{}", input="x", meta="{}",
                reviewed=reviewed, cost_usd=cost, latency_s=latency, created_at=AT, updated_at=AT))
        conn.execute(runs_table.insert().values(  # another workflow, and one outside the window
            id="other", namespace="ns", workflow="wf2", state="completed", spec="{}", input="x", meta="{}",
            reviewed=False, cost_usd=9.0, latency_s=9.0, created_at=AT, updated_at=AT))
        conn.execute(runs_table.insert().values(
            id="old", namespace="ns", workflow="wf", state="failed", spec="{}", input="x", meta="{}",
            reviewed=False, cost_usd=9.0, latency_s=9.0, created_at=AT - timedelta(days=30), updated_at=AT))
    store.close()
    reader = SloReader(url)
    figures = reader.figures("ns", "wf", now=AT + timedelta(hours=1))
    reader.close()
    assert figures.runs == 20
    assert figures.automation_rate == 16 / 20 and figures.review_rate == 3 / 20
    assert figures.compensation_rate == 1 / 20
    # 19 finished latencies: 1..16, 30, 2, 3 -> nearest rank ceil(0.95*19)=19th of the sorted = 30
    assert figures.p95_latency_seconds == 30.0
    assert figures.cost_per_run_usd == pytest.approx((16 * 0.01 + 0.02 + 0.01 + 0.01 + 0.01) / 20)
    assert json.loads(figures.model_dump_json(by_alias=True))["costPerRunUSD"] == figures.cost_per_run_usd


unit = st.floats(min_value=0, max_value=1)
maybe = st.one_of(st.none(), unit)


@given(maybe, maybe, maybe)
def test_combined_confidence_stays_between_its_weakest_and_strongest_signal(t: float | None, c: float | None,
                                                                             r: float | None) -> None:
    value = combine(t, c, r)
    present = [v for v in (t, c, r) if v is not None]
    assert 0 <= value <= 1
    if present:
        assert min(present) - 1e-12 <= value <= max(present) + 1e-12
    else:
        assert value == 0


@given(unit, unit, st.floats(min_value=0, max_value=1))
def test_more_evidence_never_lowers_confidence(t: float, c: float, bump: float) -> None:
    assert combine(min(1.0, t + bump), c, None) >= combine(t, c, None) - 1e-12
    assert combine(t, 1.0, None) >= combine(t, 0.0, None)


@given(st.dictionaries(st.sampled_from(["vendor", "total", "date"]),
                       st.one_of(st.text(max_size=12), st.floats(allow_nan=False, allow_infinity=False,
                                                                 width=32)), min_size=1),
       st.floats(min_value=-5, max_value=0))
def test_token_probability_of_each_field_is_its_tokens_joint_probability(fields: dict, logprob: float) -> None:
    text = json.dumps(fields)
    tokens = [(ch, logprob) for ch in text]  # one token per character
    probabilities = token_probabilities(text, tokens)
    assert set(probabilities) == set(fields)
    for name, value in fields.items():
        length = len(json.dumps(value))
        assert probabilities[name] == pytest.approx(math.exp(logprob * length), rel=1e-6, abs=1e-12)


def test_field_checks_and_the_overall_minimum() -> None:
    doc = "Invoice INV-7 from ACME GmbH. Total: 1.234,50 EUR"
    assert appears(1234.5, [doc]) == 1.0 and appears("acme  gmbh", [doc]) == 1.0 and appears("Globex", [doc]) == 0
    assert appears(True, [doc]) is None
    assert token_probabilities('{"a": 1}', [("{", 0.0)]) == {}  # tokens that do not spell the text: no signal
    text = json.dumps({"vendor": "ACME GmbH", "total": 99.0})
    result = score({"vendor": "ACME GmbH", "total": 99.0}, text=text, tokens=None, sources=[doc],
                   retrieval_similarity=None, required=["vendor", "invoice_number"])
    assert result.fields["vendor"].value == 1.0 and result.fields["total"].value == 0.0
    assert result.fields["invoice_number"].value == 0.0 and result.overall == 0.0


def test_a_run_id_is_never_reused_for_another_input(store: RunStore) -> None:
    new_run(store)
    run, created = store.create("r1", namespace="ns", workflow="wf", spec={}, input_text="other")
    assert not created and run.input == "doc"
    with pytest.raises(RunError, match="no run"):
        store.get("nope")
