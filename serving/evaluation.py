"""Score a workflow's extractions against a labelled dataset: precision and recall per field and per slice.

The figures answer the questions an AutonomousWorkflow's SLO asks (DESIGN.md §4): when the workflow
outputs a field, how often is it right (precision = correct / predicted, a prediction being any
non-null value), and how many of the labelled fields does it get right (recall = correct /
labelled). A field labelled ``null`` (the document does not show it) that the run fills in anyway
is a wrong prediction: that is how hallucinated totals show up.

The automation decision is scored too: the right decision is to act on its own exactly when every
field is right and the document shows all of them; acting on a wrong extraction costs money, and
sending a right one to review costs a person's time. Both mistakes are counted apart.

Everything here is a pure function of its inputs. Loading reports problems per line instead of
raising on the first, so the caller decides whether to stop or to skip them (``--skip-invalid``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

Kind = Literal["text", "date", "currency", "number"]
Scalar = str | int | float | bool | None
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_KINDS: dict[str, Kind] = {"date": "date", "currency": "currency", "total": "number"}
SYMBOLS = {"€": "EUR", "$": "USD", "US$": "USD", "£": "GBP", "FR.": "CHF", "SFR": "CHF", "¥": "JPY"}
DATE_FORMATS = ("%Y-%m-%d", "%d.%m.%Y", "%Y/%m/%d", "%d %B %Y", "%B %d, %Y", "%d %b %Y", "%b %d, %Y")
MONEY_NOISE = re.compile(r"[^\d,.\-]")  # currency symbols and codes, spaces, Swiss apostrophes


class EvaluationError(ValueError):
    """Input that cannot be scored; the message names the line or id and the fix."""


# ----------------------------------------------------------------------------------------- normalisation


def field_kinds(schema: Mapping[str, Any] | None, names: Iterable[str] = ()) -> dict[str, Kind]:
    """How to compare each field: from a JSON schema's properties when there is one, else from ``names``."""
    properties: Mapping[str, Any] = (schema or {}).get("properties") or {}
    kinds: dict[str, Kind] = {}
    for name in [*properties, *(n for n in names if n not in properties)]:
        spec = properties.get(name) or {}
        if spec.get("type") in ("number", "integer"):
            kinds[name] = "number"
        elif spec.get("format") == "date":
            kinds[name] = "date"
        else:
            kinds[name] = DEFAULT_KINDS.get(name, "text")
    return kinds


def _text(value: Scalar) -> str:
    return " ".join(str(value).split()).casefold()


def _number(value: Scalar) -> Decimal | None:
    """1234.5, "1.234,50 €", "CHF 1'234.50", "1 234,50" → Decimal; None when it is no amount."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        raw = repr(value)
    else:
        raw = MONEY_NOISE.sub("", str(value))
        if "," in raw and "." in raw:  # the later one is the decimal separator
            raw = raw.replace("." if raw.rfind(",") > raw.rfind(".") else ",", "")
        if raw.count(",") == 1 and re.search(r",\d{1,2}$", raw):
            raw = raw.replace(",", ".")
        raw = raw.replace(",", "")
        if raw.count(".") > 1:  # 1.234.567 (German thousands)
            raw = raw.replace(".", "")
    try:
        number = Decimal(raw)
    except InvalidOperation:
        return None
    return number.quantize(Decimal("0.01"), ROUND_HALF_UP) if number.is_finite() else None


def _date(value: Scalar) -> date | None:
    text = " ".join(str(value).split())
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        pass
    for pattern in DATE_FORMATS:
        try:
            return datetime.strptime(text, pattern).date()
        except ValueError:
            continue
    return None


def normalise(value: Scalar, kind: Kind) -> str | None:
    """The canonical form two values are compared in; None for no value. A value that does not parse
    as its kind stays as folded text: it can still match a label written the same way, never a parsed one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if kind == "number":
        number = _number(value)
        return f"{number:.2f}" if number is not None else _text(value)
    if kind == "date":
        day = _date(value)
        return day.isoformat() if day is not None else _text(value)
    if kind == "currency":
        folded = " ".join(str(value).split()).upper()
        return SYMBOLS.get(folded, folded)
    return _text(value)


# ---------------------------------------------------------------------------------------- dataset input


class DatasetLine(BaseModel):
    """One line of a dataset (JSONL): ``labels`` is required and may be null (an unparseable input)."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    input: str = Field(min_length=1)
    labels: dict[str, Scalar] | None
    slices: dict[str, str] = Field(default_factory=dict)


class Prediction(BaseModel):
    """What one workflow run produced for one dataset item: ``fields`` null when it produced nothing."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    fields: dict[str, Scalar] | None = None
    automated: bool | None = Field(default=None, description="True: acted without a human; False: sent to review.")
    state: str | None = None


@dataclass(frozen=True)
class DatasetItem:
    id: str
    input: str  # as written in the dataset, relative to its folder
    path: Path  # resolved
    labels: dict[str, Scalar] | None
    slices: dict[str, str]
    line: int


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source} line {self.line}: {self.message}"


@dataclass
class Loaded(Generic[T]):
    items: list[T] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


HINTS = {
    "id": 'give each line a unique "id"',
    "input": 'set "input" to the document path, relative to the dataset file',
    "labels": 'add "labels": {...} with the expected field values, or "labels": null for an input that '
              "cannot be parsed",
    "slices": '"slices" maps a slice name to a string, e.g. {"vendor": "acme", "layout": "table"}',
    "fields": '"fields" maps field names to values, or is null when the run produced nothing',
    "automated": '"automated" is true (acted on its own) or false (sent to review)',
}


def _describe(exc: ValidationError) -> str:
    """The first problem of a line, naming the field and how to fix it."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    where = ".".join(str(p) for p in error["loc"])
    what = "is missing" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ").lower()
    hint = HINTS.get(name)
    return f'"{where}" {what}' + (f"; {hint}" if hint else "")


def _jsonl(path: Path, model: type[M]) -> Iterator[tuple[int, M | Problem]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, Problem(str(path), number, f"not valid JSON ({exc.msg} at column {exc.colno}); "
                                                     "each line must be one JSON object")
            continue
        if not isinstance(obj, dict):
            yield number, Problem(str(path), number, "not a JSON object; each line must be {...}")
            continue
        try:
            yield number, model.model_validate(obj)
        except ValidationError as exc:
            ident = f" (id {obj['id']!r})" if isinstance(obj.get("id"), str) else ""
            yield number, Problem(str(path), number, f"{_describe(exc).rstrip()}{ident}")


def load_dataset(path: Path, fields: Collection[str] | None = None) -> Loaded[DatasetItem]:
    """Items and the problems of the lines that are not; ``fields`` (the workflow's) catches label typos."""
    loaded: Loaded[DatasetItem] = Loaded()
    seen: dict[str, int] = {}
    for number, parsed in _jsonl(path, DatasetLine):
        if isinstance(parsed, Problem):
            loaded.problems.append(parsed)
            continue
        problem = _item_problem(parsed, path, seen, fields)
        if problem:
            loaded.problems.append(Problem(str(path), number, f"{problem} (id {parsed.id!r})"))
            continue
        seen[parsed.id] = number
        loaded.items.append(DatasetItem(parsed.id, parsed.input, path.parent / parsed.input, parsed.labels,
                                        parsed.slices, number))
    return loaded


def _item_problem(line: DatasetLine, path: Path, seen: Mapping[str, int], fields: Collection[str] | None) -> str:
    if line.id in seen:
        return f"duplicate id, first on line {seen[line.id]}; ids must be unique"
    if not (path.parent / line.input).is_file():
        return f"input {line.input} does not exist (paths are relative to {path.parent}); fix the path or the file"
    unknown = sorted(set(line.labels or ()) - set(fields or line.labels or ()))
    if unknown:
        return (f"labels.{unknown[0]} is not a field of the workflow's output ({', '.join(fields or ())}); "
                "fix the name or drop it")
    return ""


def load_predictions(path: Path) -> Loaded[Prediction]:
    loaded: Loaded[Prediction] = Loaded()
    seen: dict[str, int] = {}
    for number, parsed in _jsonl(path, Prediction):
        if isinstance(parsed, Prediction) and parsed.id in seen:
            parsed = Problem(str(path), number, f"duplicate id {parsed.id!r}, first on line {seen[parsed.id]}")
        if isinstance(parsed, Problem):
            loaded.problems.append(parsed)
            continue
        seen[parsed.id] = number
        loaded.items.append(parsed)
    return loaded


# ------------------------------------------------------------------------------------------------ scores


class Counts(BaseModel):
    labelled: int = 0
    predicted: int = 0
    correct: int = 0

    @computed_field
    @property
    def precision(self) -> float | None:
        return self.correct / self.predicted if self.predicted else None

    @computed_field
    @property
    def recall(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def add(self, other: Counts) -> None:
        self.labelled += other.labelled
        self.predicted += other.predicted
        self.correct += other.correct


class Decisions(BaseModel):
    runs: int = 0  # runs that reported a decision
    automated: int = 0
    correct: int = 0
    wrongly_automated: int = 0  # acted although a field was wrong or missing
    needless_reviews: int = 0  # sent to review although every field was right

    @computed_field
    @property
    def accuracy(self) -> float | None:
        return self.correct / self.runs if self.runs else None

    @computed_field
    @property
    def automation_rate(self) -> float | None:
        return self.automated / self.runs if self.runs else None

    @computed_field
    @property
    def automated_precision(self) -> float | None:
        """Of the runs that acted on their own, the share that were right in every field."""
        return (self.automated - self.wrongly_automated) / self.automated if self.automated else None


class Scores(BaseModel):
    items: int = 0
    fields: dict[str, Counts] = Field(default_factory=dict)
    overall: Counts = Field(default_factory=Counts)  # summed over fields (micro average)
    decisions: Decisions | None = None


class EvalReport(Scores):
    """The whole evaluation, JSON-serialisable; a saved one is the ``--baseline`` of the next run."""

    version: Literal[1] = 1
    dataset: str | None = None
    workflow: str | None = None
    missing: list[str] = Field(default_factory=list, description="Dataset ids no prediction was given for.")
    states: dict[str, int] = Field(default_factory=dict, description="Runs per final state.")
    slices: dict[str, Scores] = Field(default_factory=dict, description="Keyed 'name=value', e.g. 'vendor=acme'.")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        return cls.model_validate_json(text)


def _item_counts(item: DatasetItem, prediction: Prediction | None,
                 kinds: Mapping[str, Kind]) -> tuple[dict[str, Counts], bool]:
    """Per-field counts of one item, and whether the run got the whole document right."""
    labels, fields = item.labels or {}, (prediction.fields if prediction else None) or {}
    counts, all_right = {}, item.labels is not None
    for name, kind in kinds.items():
        truth, guess = normalise(labels.get(name), kind), normalise(fields.get(name), kind)
        right = truth is not None and truth == guess
        counts[name] = Counts(labelled=truth is not None, predicted=guess is not None, correct=right)
        all_right = all_right and right
    return counts, all_right


class _Tally:
    """Accumulates one Scores (the whole set or one slice)."""

    def __init__(self, kinds: Mapping[str, Kind]) -> None:
        self.scores = Scores(fields={name: Counts() for name in kinds})

    def add(self, counts: Mapping[str, Counts], automated: bool | None, all_right: bool) -> None:
        self.scores.items += 1
        for name, c in counts.items():
            self.scores.fields[name].add(c)
            self.scores.overall.add(c)
        if automated is None:
            return
        d = self.scores.decisions = self.scores.decisions or Decisions()
        d.runs += 1
        d.automated += automated
        d.correct += automated == all_right
        d.wrongly_automated += automated and not all_right
        d.needless_reviews += not automated and all_right


def score(items: list[DatasetItem], predictions: list[Prediction], kinds: Mapping[str, Kind], *,
          dataset: str | None = None, workflow: str | None = None) -> EvalReport:
    """Pair predictions with items by id and score them; an item without a prediction counts as no output."""
    by_id = {p.id: p for p in predictions}
    if len(by_id) != len(predictions):
        dupes = sorted(i for i, n in Counter(p.id for p in predictions).items() if n > 1)
        raise EvaluationError(f"prediction id {dupes[0]!r} appears more than once; keep one prediction per item")
    unknown = sorted(set(by_id) - {item.id for item in items})
    if unknown:
        raise EvaluationError(f"prediction id {unknown[0]!r} is not in the dataset ({len(unknown)} such id(s)); "
                              "predictions must come from the same dataset")
    total = _Tally(kinds)
    slices: dict[str, _Tally] = {}
    for item in items:
        prediction = by_id.get(item.id)
        counts, all_right = _item_counts(item, prediction, kinds)
        automated = prediction.automated if prediction else None
        total.add(counts, automated, all_right)
        for name, value in sorted(item.slices.items()):
            slices.setdefault(f"{name}={value}", _Tally(kinds)).add(counts, automated, all_right)
    states = Counter((p.state or "unknown") for p in predictions)
    whole = total.scores
    return EvalReport(items=whole.items, fields=whole.fields, overall=whole.overall, decisions=whole.decisions,
                      dataset=dataset, workflow=workflow,
                      missing=[item.id for item in items if item.id not in by_id], states=dict(sorted(states.items())),
                      slices={key: tally.scores for key, tally in sorted(slices.items())})


# --------------------------------------------------------------------------------------------- compare

Metric = Literal["precision", "recall", "decision accuracy"]


@dataclass(frozen=True)
class Regression:
    scope: str  # "all" or a slice such as "vendor=acme"
    field: str  # a field name, "all fields" or "decisions"
    metric: Metric
    baseline: float
    current: float

    def __str__(self) -> str:
        where = "whole dataset" if self.scope == "all" else f"slice {self.scope}"
        return (f"{where}, {self.field}: {self.metric} {self.baseline:.3f} → {self.current:.3f} "
                f"(-{self.baseline - self.current:.3f})")


def _metrics(scores: Scores) -> Iterator[tuple[str, Metric, float | None]]:
    for name, counts in [*scores.fields.items(), ("all fields", scores.overall)]:
        yield name, "precision", counts.precision
        yield name, "recall", counts.recall
    if scores.decisions is not None:
        yield "decisions", "decision accuracy", scores.decisions.accuracy


def compare(current: EvalReport, baseline: EvalReport, tolerance: float) -> list[Regression]:
    """Every figure that dropped by more than ``tolerance`` from the baseline, whole set and per slice.
    Figures undefined on either side (nothing labelled, nothing predicted, a slice that is gone) are skipped."""
    if not 0 <= tolerance <= 1:
        raise EvaluationError(f"tolerance must be within [0, 1], got {tolerance}")
    pairs = [("all", current, baseline)] + [(key, current.slices[key], scores) for key, scores in
                                            baseline.slices.items() if key in current.slices]
    found = []
    for scope, now, before in pairs:
        old = {(name, metric): value for name, metric, value in _metrics(before)}
        for name, metric, value in _metrics(now):
            previous = old.get((name, metric))
            if value is not None and previous is not None and previous - value > tolerance + 1e-9:
                found.append(Regression(scope, name, metric, previous, value))
    return found
