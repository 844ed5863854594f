"""``pilothouse eval``: a labelled dataset → precision and recall per field and slice, and a regression gate.

Scoring lives in :mod:`pilothouse.serving.evaluation` (pure functions); this module only reads the
workflow's manifests (for its output fields and SLO targets), obtains predictions, prints tables
and turns regressions against a baseline into exit code 1, so CI can gate on it.

Predictions come from a file (``--predictions``) or from running the workflow on every item,
through a :data:`Predictor` the command receives, so the scoring path is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from .console import err, fail, out

if TYPE_CHECKING:
    from pilothouse.operator.api import AutonomousWorkflow
    from pilothouse.serving.evaluation import Counts, DatasetItem, EvalReport, Prediction, Scores

T = TypeVar("T")
Predictor = Callable[[Path, "list[DatasetItem]", Path], "list[Prediction]"]


def run_workflow(workflow_dir: Path, items: list[DatasetItem], state_dir: Path) -> list[Prediction]:
    """Run the workflow locally on every item: the default predictor of ``pilothouse eval``."""
    from .localrun import predict

    return predict(workflow_dir, items, state_dir)


def eval_command(
    workflow_dir: Annotated[Path, typer.Argument(metavar="WORKFLOW_DIR",
                                                 help="Folder (or file) with the AutonomousWorkflow manifest.")],
    dataset: Annotated[Path, typer.Argument(metavar="DATASET.jsonl",
                                            help="One JSON line per item: {id, input, labels, slices}.")],
    predictions: Annotated[Path | None, typer.Option(
        help="Score these predictions (JSONL of {id, fields, automated, state}) instead of running the workflow.")
    ] = None,
    baseline: Annotated[Path | None, typer.Option(
        help="A report saved with --out; exit 1 when a field or slice dropped below it by more than --tolerance.")
    ] = None,
    tolerance: Annotated[float, typer.Option(min=0, max=1, help="Allowed drop of precision or recall.")] = 0.02,
    out_file: Annotated[Path | None, typer.Option("--out", help="Save the report (JSON) here.")] = None,
    save_predictions: Annotated[Path | None, typer.Option(
        help="Save the predictions scored (JSONL) here: re-score them later with --predictions, no model needed.")
    ] = None,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Warn about invalid dataset or prediction lines and score the rest.")] = False,
    state_dir: Annotated[Path, typer.Option(help="Local state of the workflow runs.")] = Path(".pilothouse"),
) -> None:
    """Score a workflow against a labelled dataset: precision/recall per field and per slice."""
    evaluate(workflow_dir, dataset, predictions=predictions, baseline=baseline, tolerance=tolerance,
             out_file=out_file, skip_invalid=skip_invalid, state_dir=state_dir, predictor=run_workflow,
             save_predictions=save_predictions)


def evaluate(workflow_dir: Path, dataset: Path, *, predictions: Path | None, baseline: Path | None,
             tolerance: float, out_file: Path | None, skip_invalid: bool, state_dir: Path,
             predictor: Predictor, save_predictions: Path | None = None) -> EvalReport:
    """The command's body, with the predictor passed in (tests and the local runtime inject their own)."""
    from pilothouse.serving import evaluation

    workflow = _load_workflow(workflow_dir)
    schema = _output_schema(workflow)
    if not dataset.is_file():
        raise fail(f"dataset {dataset} does not exist", "pass a JSONL file, e.g. examples/invoice-triage/labels.jsonl")
    loaded = _checked(lambda: evaluation.load_dataset(dataset, fields=(schema or {}).get("properties")),
                      skip_invalid, "dataset")
    if not loaded.items:
        raise fail(f"{dataset} has no valid items", "each line: {\"id\", \"input\", \"labels\", \"slices\"}")
    names = [name for item in loaded.items for name in (item.labels or {})]
    kinds = evaluation.field_kinds(schema, dict.fromkeys(names))
    if predictions is not None:
        if not predictions.is_file():
            raise fail(f"predictions file {predictions} does not exist", "one JSON line per run: "
                       "{id, fields, automated, state}")
        runs = _checked(lambda: evaluation.load_predictions(predictions), skip_invalid, "predictions").items
    else:
        runs = predictor(workflow_dir, loaded.items, state_dir)
    if save_predictions is not None:
        save_predictions.parent.mkdir(parents=True, exist_ok=True)
        save_predictions.write_text("".join(p.model_dump_json() + "\n" for p in runs), encoding="utf-8")
    report = _checked(lambda: evaluation.score(loaded.items, runs, kinds, dataset=str(dataset),
                                               workflow=workflow.name), skip_invalid, "predictions")
    print_report(report, workflow)
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(report.to_json() + "\n", encoding="utf-8")
        out.print(f"report saved to {escape(str(out_file))}")
    if baseline is not None:
        regressions = evaluation.compare(report, _load_baseline(baseline), tolerance)
        for regression in regressions:
            err.print(f"[red]regressed:[/] {escape(str(regression))}")
        if regressions:
            raise fail(f"{len(regressions)} figure(s) dropped by more than {tolerance} against {baseline}",
                       "fix the regression, or save a new baseline with --out once the drop is intended", code=1)
        out.print(f"[green]no regression[/] against {escape(str(baseline))} (tolerance {tolerance})")
    return report


def _checked(action: Callable[[], T], skip_invalid: bool, what: str) -> T:
    """Run a load or score; turn its errors into one line each, and per-line problems into a stop or a warning."""
    from pilothouse.serving.evaluation import EvaluationError, Loaded

    try:
        result = action()
    except EvaluationError as exc:
        raise fail(str(exc)) from None
    if isinstance(result, Loaded) and result.problems:
        for problem in result.problems:
            err.print(f"[yellow]skipped:[/] {escape(str(problem))}" if skip_invalid
                      else f"[red]invalid:[/] {escape(str(problem))}")
        if not skip_invalid:
            raise fail(f"{len(result.problems)} invalid {what} line(s); nothing was scored",
                       "fix the lines named above, or pass --skip-invalid to score the rest")
    return result


def _load_workflow(workflow_dir: Path) -> AutonomousWorkflow:
    from pilothouse.operator import manifests
    from pilothouse.operator.api import AutonomousWorkflow

    if not workflow_dir.exists():
        raise fail(f"{workflow_dir} does not exist", "pass the workflow's folder, e.g. examples/invoice-triage/")
    bundle = manifests.load(workflow_dir)
    problems = [e for e in bundle.errors if "AutonomousWorkflow" in e.source]
    for problem in problems:
        err.print(f"[red]invalid:[/] {escape(str(problem))}")
    if problems:
        raise fail(f"the AutonomousWorkflow in {workflow_dir} is invalid", "fix the fields named above")
    workflows = [obj for obj in bundle.objects if isinstance(obj, AutonomousWorkflow)]
    if len(workflows) != 1:
        for problem in bundle.errors if not workflows else ():  # e.g. the workflow's file is not valid YAML
            err.print(f"[red]invalid:[/] {escape(str(problem))}")
        found = ", ".join(w.name for w in workflows) or "none"
        raise fail(f"{workflow_dir} must hold exactly one AutonomousWorkflow (found: {found})",
                   "pass the folder or the manifest file of the workflow to evaluate")
    return workflows[0]


def _output_schema(workflow: AutonomousWorkflow) -> dict | None:
    """The fields scored: the output schema of the workflow's last generate step that declares one."""
    schemas = [s.generate.output_schema for s in workflow.spec.steps if s.generate and s.generate.output_schema]
    return schemas[-1] if schemas else None


def _load_baseline(path: Path) -> EvalReport:
    from pydantic import ValidationError

    from pilothouse.serving.evaluation import EvalReport

    try:
        return EvalReport.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read baseline {path}: {exc}", "pass a report saved with `pilothouse eval --out`") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(f"baseline {path} is not an eval report: {'.'.join(map(str, first['loc']))}: {first['msg']}",
                   "pass a report saved with `pilothouse eval --out`") from None


def _ratio(value: float | None, target: float | None = None) -> str:
    if value is None:
        return "-"
    if target is None:
        return f"{value:.3f}"
    return f"[{'green' if value >= target else 'red'}]{value:.3f}[/]"


def _counts_row(label: str, c: Counts, precision: float | None, recall: float | None) -> list[str]:
    return [label, str(c.labelled), str(c.predicted), str(c.correct), _ratio(c.precision, precision),
            _ratio(c.recall, recall)]


def _decisions_line(scores: Scores) -> str:
    d = scores.decisions
    if d is None or not d.runs:
        return "-"
    return f"{d.correct}/{d.runs}"


def print_report(report: EvalReport, workflow: AutonomousWorkflow) -> None:
    slo = workflow.spec.slo
    fields = Table(title=f"{workflow.name}: {report.items} item(s) from {escape(report.dataset or '-')}")
    for column in ("Field", "Labelled", "Predicted", "Correct", "Precision", "Recall"):
        fields.add_column(column, justify="left" if column == "Field" else "right")
    for name, counts in report.fields.items():
        fields.add_row(*_counts_row(escape(name), counts, slo.precision, slo.recall))
    fields.add_section()
    fields.add_row(*_counts_row("[bold]all fields[/]", report.overall, slo.precision, slo.recall))
    if slo.precision is not None or slo.recall is not None:
        fields.caption = f"SLO: precision ≥ {_ratio(slo.precision)}, recall ≥ {_ratio(slo.recall)}"
    out.print(fields)
    d = report.decisions
    if d is not None and d.runs:
        out.print(f"Decisions: {d.automated}/{d.runs} automated ({_ratio(d.automation_rate, slo.automation_rate)}), "
                  f"{d.correct} right ({_ratio(d.accuracy)}); {d.wrongly_automated} acted on a wrong or incomplete "
                  f"extraction, {d.needless_reviews} sent to review though right")
    if report.missing:
        shown = ", ".join(report.missing[:10]) + (" …" if len(report.missing) > 10 else "")
        err.print(f"[yellow]warning:[/] {len(report.missing)} item(s) had no prediction and count as no output: "
                  f"{escape(shown)}")
    slices = Table(title="Per slice (all fields)")
    for column in ("Slice", "Items", "Labelled", "Predicted", "Correct", "Precision", "Recall", "Decisions right"):
        slices.add_column(column, justify="left" if column == "Slice" else "right")
    for key, scores in report.slices.items():
        row = _counts_row(escape(key), scores.overall, slo.precision, slo.recall)
        slices.add_row(row[0], str(scores.items), *row[1:], _decisions_line(scores))
    out.print(slices)
