"""`pilothouse eval` as a workflow team and a CI job use it: tables, a saved report, a regression gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pilothouse.cli import app
from pilothouse.cli_eval import evaluate
from pilothouse.serving.evaluation import DatasetItem, EvalReport, Prediction

EXAMPLE = Path(__file__).parents[2] / "examples" / "invoice-triage"
DATASET = EXAMPLE / "labels.jsonl"
runner = CliRunner()


def perfect() -> list[dict]:
    """What a flawless workflow would output for the example: every label, acting only on complete ones."""
    rows = []
    for line in DATASET.read_text(encoding="utf-8").splitlines():
        labels = json.loads(line)["labels"]
        complete = labels is not None and None not in labels.values()
        rows.append({"id": json.loads(line)["id"], "fields": labels, "automated": complete,
                     "state": "completed" if complete else "review"})
    return rows


def write_predictions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["eval", str(EXAMPLE), *map(str, args)])
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def test_scores_a_predictions_file_and_saves_the_report(tmp_path: Path) -> None:
    code, stdout, stderr = run(DATASET, "--predictions", write_predictions(tmp_path / "p.jsonl", perfect()),
                               "--out", tmp_path / "report.json")
    assert code == 0, stderr
    for shown in ("invoice_number", "all fields", "Per slice", "vendor=helvetia", "quality=garbage", "1.000",
                  "SLO: precision ≥ 0.980"):
        assert shown in stdout
    report = EvalReport.from_json((tmp_path / "report.json").read_text())
    assert report.overall.precision == 1 and report.overall.recall == 1 and report.items == 24
    assert report.decisions is not None and report.decisions.accuracy == 1


def test_a_regressed_slice_fails_the_gate_and_is_named(tmp_path: Path) -> None:
    good = write_predictions(tmp_path / "good.jsonl", perfect())
    assert run(DATASET, "--predictions", good, "--out", tmp_path / "baseline.json")[0] == 0
    rows = perfect()
    for row in rows:  # the workflow starts misreading Swiss totals
        if row["fields"] and row["fields"]["currency"] == "CHF":
            row["fields"]["total"] += 1
    code, _, stderr = run(DATASET, "--predictions", write_predictions(tmp_path / "bad.jsonl", rows),
                               "--baseline", tmp_path / "baseline.json")
    assert code == 1
    assert "slice currency=CHF, total: precision 1.000 → 0.000" in stderr
    assert "slice vendor=helvetia, total:" in stderr
    assert "slice vendor=acme" not in stderr
    assert "dropped by more than 0.02" in stderr
    code, _, stderr = run(DATASET, "--predictions", tmp_path / "bad.jsonl", "--baseline", tmp_path / "baseline.json",
                          "--tolerance", "1")
    assert code == 0, stderr


def test_a_dataset_line_without_labels_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "invoices").mkdir()
    (tmp_path / "invoices" / "a.txt").write_text("Invoice INV-1")
    (tmp_path / "invoices" / "b.txt").write_text("Invoice INV-2")
    dataset = tmp_path / "labels.jsonl"
    dataset.write_text('{"id": "a", "input": "invoices/a.txt", "labels": null}\n'
                       '{"id": "b", "input": "invoices/b.txt"}\n')
    predictions = write_predictions(tmp_path / "p.jsonl", [{"id": "a", "fields": None, "automated": False}])
    code, _, stderr = run(dataset, "--predictions", predictions)
    assert code == 2
    assert 'line 2: "labels" is missing' in stderr and "(id 'b')" in stderr
    assert "1 invalid dataset line(s); nothing was scored" in stderr and "--skip-invalid" in stderr
    code, stdout, stderr = run(dataset, "--predictions", predictions, "--skip-invalid")
    assert code == 0 and "skipped:" in stderr and "1 item(s)" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--predictions", "nowhere.jsonl"), "predictions file nowhere.jsonl does not exist"),
    (("--baseline", "nowhere.json", "--predictions", "{good}"), "cannot read baseline nowhere.json"),
    (("--baseline", "{good}", "--predictions", "{good}"), "is not an eval report"),
])
def test_bad_inputs_are_one_line_with_a_hint(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    good = write_predictions(tmp_path / "good.jsonl", perfect())
    code, _, stderr = run(DATASET, *(a.format(good=good) for a in args))
    assert code == 2 and message in stderr and "hint:" in stderr


def test_predictions_for_another_dataset_are_refused(tmp_path: Path) -> None:
    rows = [*perfect(), {"id": "inv-9999", "fields": None}]
    code, _, stderr = run(DATASET, "--predictions", write_predictions(tmp_path / "p.jsonl", rows))
    assert code == 2 and "prediction id 'inv-9999' is not in the dataset" in stderr


def test_a_folder_without_a_workflow_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", str(tmp_path), str(DATASET)])
    assert result.exit_code == 2 and "must hold exactly one AutonomousWorkflow (found: none)" in result.stderr


def test_the_injected_predictor_runs_on_every_valid_item(tmp_path: Path) -> None:
    seen: list[tuple[Path, list[str], Path]] = []

    def predictor(workflow_dir: Path, items: list[DatasetItem], state_dir: Path) -> list[Prediction]:
        seen.append((workflow_dir, [item.id for item in items], state_dir))
        return [Prediction.model_validate(row) for row in perfect()]

    report = evaluate(EXAMPLE, DATASET, predictions=None, baseline=None, tolerance=0.02, out_file=None,
                      skip_invalid=False, state_dir=tmp_path, predictor=predictor)
    assert seen == [(EXAMPLE, [row["id"] for row in perfect()], tmp_path)]
    assert report.overall.recall == 1
    with pytest.raises(typer.Exit):
        evaluate(tmp_path / "missing", DATASET, predictions=None, baseline=None, tolerance=0.02, out_file=None,
                 skip_invalid=False, state_dir=tmp_path, predictor=predictor)


def test_a_folder_whose_workflow_does_not_parse_says_why(tmp_path: Path) -> None:
    (tmp_path / "workflow.yaml").write_text("kind: AutonomousWorkflow\n  spec: [\n")
    result = runner.invoke(app, ["eval", str(tmp_path), str(DATASET)])
    assert result.exit_code == 2 and "not valid YAML" in result.stderr and "found: none" in result.stderr
