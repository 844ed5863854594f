"""Scoring extractions against labels: the figures a workflow team reads and CI gates on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pilothouse.serving.evaluation import (
    EvalReport,
    EvaluationError,
    Kind,
    Prediction,
    compare,
    field_kinds,
    load_dataset,
    load_predictions,
    normalise,
    score,
)

SCHEMA = {"type": "object", "properties": {"vendor": {"type": "string"}, "invoice_number": {"type": "string"},
                                           "date": {"type": "string"}, "currency": {"type": "string"},
                                           "total": {"type": "number"}}}
KINDS = field_kinds(SCHEMA)
ACME = {"vendor": "Acme Office Supplies Ltd", "invoice_number": "INV-1", "date": "2024-03-05", "currency": "GBP",
        "total": 1234.5}
NORD = {"vendor": "Nordwind Logistik GmbH", "invoice_number": "NW-7", "date": "2024-02-01", "currency": "EUR",
        "total": 5243.14}


def write_dataset(folder: Path, rows: list[dict[str, Any] | str]) -> Path:
    """A dataset file; dict rows get their input file created, string rows are written verbatim."""
    (folder / "invoices").mkdir(exist_ok=True)
    text = []
    for row in rows:
        if isinstance(row, dict):
            (folder / row.get("input", "missing")).parent.mkdir(parents=True, exist_ok=True)
            if "input" in row and not row.pop("_no_file", False):
                (folder / row["input"]).write_text("an invoice")
            text.append(json.dumps(row))
        else:
            text.append(row)
    path = folder / "labels.jsonl"
    path.write_text("\n".join(text) + "\n")
    return path


def item(ident: str, labels: dict[str, Any] | None, **slices: str) -> dict[str, Any]:
    return {"id": ident, "input": f"invoices/{ident}.txt", "labels": labels, "slices": slices}


@pytest.mark.parametrize(("value", "kind", "expected"), [
    ("  Acme   OFFICE Supplies Ltd ", "text", "acme office supplies ltd"),
    ("1.234,50 €", "number", "1234.50"),
    ("CHF 1'234.50", "number", "1234.50"),
    ("1 234,50", "number", "1234.50"),
    ("$1,234.50", "number", "1234.50"),
    (1234.5, "number", "1234.50"),
    (1234.505, "number", "1234.51"),
    ("twelve", "number", "twelve"),
    ("05.03.2024", "date", "2024-03-05"),
    ("March 5, 2024", "date", "2024-03-05"),
    ("2024-03-05T10:00:00Z", "date", "2024-03-05"),
    ("next week", "date", "next week"),
    ("€", "currency", "EUR"),
    (" gbp", "currency", "GBP"),
    ("", "text", None),
    (None, "number", None),
])
def test_values_are_compared_in_canonical_form(value: Any, kind: Kind, expected: str | None) -> None:
    assert normalise(value, kind) == expected


def test_field_kinds_come_from_the_output_schema_then_the_field_names() -> None:
    assert KINDS == {"vendor": "text", "invoice_number": "text", "date": "date", "currency": "currency",
                     "total": "number"}
    schema = {"properties": {"amount": {"type": "integer"}, "issued": {"type": "string", "format": "date"}}}
    assert field_kinds(schema, ["amount", "note"]) == {"amount": "number", "issued": "date", "note": "text"}
    assert field_kinds(None, ["total", "vendor"]) == {"total": "number", "vendor": "text"}


@pytest.fixture
def items(tmp_path: Path) -> list:
    path = write_dataset(tmp_path, [
        item("a", ACME, vendor="acme", layout="table"),
        item("b", NORD, vendor="nordwind", layout="letter"),
        item("c", {**ACME, "invoice_number": "INV-2", "total": None}, vendor="acme", layout="letter"),
        item("d", None, quality="empty"),
    ])
    loaded = load_dataset(path, fields=KINDS)
    assert loaded.problems == []
    return loaded.items


def predictions() -> list[Prediction]:
    return [
        # a: all right, written the way the invoice shows it; acted on its own (right decision)
        Prediction(id="a", fields={**ACME, "vendor": "acme office supplies ltd", "date": "05.03.2024",
                                   "currency": "£", "total": "£1,234.50"}, automated=True, state="completed"),
        # b: wrong total, acted anyway (wrong decision)
        Prediction(id="b", fields={**NORD, "total": 5243.41}, automated=True, state="completed"),
        # c: invented a total the document does not show; sent to review (right decision)
        Prediction(id="c", fields={**ACME, "invoice_number": "INV-2", "total": 99}, automated=False, state="review"),
        # d: produced nothing for an empty file; sent to review (right decision)
        Prediction(id="d", fields=None, automated=False, state="review"),
    ]


def test_precision_and_recall_per_field(items: list) -> None:
    report = score(items, predictions(), KINDS)
    total, vendor = report.fields["total"], report.fields["vendor"]
    assert (total.labelled, total.predicted, total.correct) == (2, 3, 1)
    assert total.precision == pytest.approx(1 / 3) and total.recall == pytest.approx(1 / 2)
    assert (vendor.labelled, vendor.predicted, vendor.correct) == (3, 3, 3)
    assert vendor.precision == 1 and vendor.recall == 1
    assert (report.overall.labelled, report.overall.predicted, report.overall.correct) == (14, 15, 13)
    assert report.items == 4 and report.missing == [] and report.states == {"completed": 2, "review": 2}


def test_decisions_count_both_kinds_of_mistake(items: list) -> None:
    runs = predictions()
    runs[2] = Prediction(id="c", fields=runs[2].fields, automated=True)  # acts on an invented total
    decisions = score(items, runs, KINDS).decisions
    assert decisions is not None
    assert (decisions.runs, decisions.automated, decisions.correct) == (4, 3, 2)
    assert (decisions.wrongly_automated, decisions.needless_reviews) == (2, 0)
    assert decisions.automated_precision == pytest.approx(1 / 3)
    right_but_reviewed = [Prediction(id="a", fields=predictions()[0].fields, automated=False)]
    decisions = score(items, right_but_reviewed, KINDS).decisions
    assert decisions is not None and (decisions.runs, decisions.needless_reviews, decisions.correct) == (1, 1, 0)


def test_items_without_prediction_count_as_no_output(items: list) -> None:
    report = score(items, predictions()[:1], KINDS)
    assert report.missing == ["b", "c", "d"]
    assert report.fields["vendor"].recall == pytest.approx(1 / 3) and report.fields["vendor"].precision == 1
    assert report.decisions is not None and report.decisions.runs == 1
    assert score(items, [], KINDS).decisions is None


def test_figures_per_slice(items: list) -> None:
    slices = score(items, predictions(), KINDS).slices
    assert set(slices) == {"vendor=acme", "vendor=nordwind", "layout=table", "layout=letter", "quality=empty"}
    assert slices["vendor=acme"].items == 2
    assert slices["vendor=acme"].fields["total"].precision == pytest.approx(1 / 2)
    assert slices["vendor=nordwind"].fields["total"].recall == 0
    assert slices["layout=table"].overall.precision == 1
    empty = slices["quality=empty"]
    assert empty.overall.labelled == 0 and empty.overall.recall is None and empty.decisions.accuracy == 1


def test_predictions_must_belong_to_the_dataset(items: list) -> None:
    with pytest.raises(EvaluationError, match="prediction id 'zz' is not in the dataset"):
        score(items, [*predictions(), Prediction(id="zz")], KINDS)
    with pytest.raises(EvaluationError, match="'a' appears more than once"):
        score(items, [*predictions(), Prediction(id="a")], KINDS)


def test_report_round_trips_through_json(items: list) -> None:
    report = score(items, predictions(), KINDS, dataset="labels.jsonl", workflow="invoice-triage")
    data = json.loads(report.to_json())
    assert data["fields"]["total"]["precision"] == pytest.approx(1 / 3)  # readable without pilothouse
    assert data["slices"]["vendor=acme"]["decisions"]["accuracy"] == 1
    again = EvalReport.from_json(report.to_json())
    assert again == report and compare(again, report, 0) == []


def test_compare_names_the_slice_and_metric_that_dropped(items: list) -> None:
    baseline = score(items, predictions(), KINDS)
    worse = predictions()
    worse[0] = Prediction(id="a", fields={**ACME, "date": "2024-03-06"}, automated=True)  # one slice loses a date
    regressions = compare(score(items, worse, KINDS), baseline, tolerance=0.02)
    described = {(r.scope, r.field, r.metric) for r in regressions}
    assert ("layout=table", "date", "recall") in described
    assert ("vendor=acme", "date", "precision") in described
    assert ("all", "date", "recall") in described
    assert ("layout=table", "decisions", "decision accuracy") in described
    assert not any(r.scope in ("vendor=nordwind", "layout=letter", "quality=empty") for r in regressions)
    assert not any(r.field in ("vendor", "total") for r in regressions)
    assert any(str(r).startswith("slice layout=table, date: recall 1.000 → 0.000") for r in regressions)


def test_compare_tolerates_drops_within_tolerance(items: list) -> None:
    baseline = score(items, predictions(), KINDS)
    worse = predictions()
    worse[0] = Prediction(id="a", fields={**ACME, "date": "2024-03-06"}, automated=True)
    assert compare(score(items, worse, KINDS), baseline, tolerance=1) == []
    with pytest.raises(EvaluationError, match="tolerance"):
        compare(baseline, baseline, tolerance=1.5)


def test_bad_dataset_lines_are_named_with_the_fix(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, [
        item("ok", ACME),
        '{"id": "broken", "input": ',
        {"id": "nolabels", "input": "invoices/nolabels.txt"},
        {**item("ghost", ACME), "_no_file": True},
        item("ok", NORD),
        item("typo", {**ACME, "totl": 3}),
        "",
        '["not", "an", "object"]',
        {**item("slices", ACME), "slices": {"vendor": 3}},
    ])
    loaded = load_dataset(path, fields=KINDS)
    assert [i.id for i in loaded.items] == ["ok"]
    problems = {p.line: str(p) for p in loaded.problems}
    assert set(problems) == {2, 3, 4, 5, 6, 8, 9}
    assert "line 2: not valid JSON" in problems[2]
    assert 'line 3: "labels" is missing; add "labels": {...}' in problems[3] and "'nolabels'" in problems[3]
    assert "input invoices/ghost.txt does not exist" in problems[4]
    assert "duplicate id, first on line 1" in problems[5]
    assert "labels.totl is not a field of the workflow's output (vendor, invoice_number" in problems[6]
    assert "not a JSON object" in problems[8]
    assert '"slices.vendor"' in problems[9]


def test_unreadable_dataset_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(EvaluationError, match="cannot read"):
        load_dataset(tmp_path / "bin.jsonl")


def test_bad_prediction_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "fields": ACME, "automated": True, "state": "completed"}),
        json.dumps({"id": "a", "fields": None}),
        json.dumps({"id": "b", "fields": ACME, "automated": "maybe"}),
        json.dumps({"fields": ACME}),
    ]))
    loaded = load_predictions(path)
    assert [p.id for p in loaded.items] == ["a"]
    problems = {p.line: str(p) for p in loaded.problems}
    assert "duplicate id 'a', first on line 1" in problems[2]
    assert '"automated"' in problems[3] and "true (acted on its own)" in problems[3]
    assert '"id" is missing' in problems[4]
