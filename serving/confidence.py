"""How sure a run is of each extracted field: token probabilities, field checks, retrieval similarity.

Pure functions, no I/O: the validate step feeds them the generated JSON text, the engine's token
logprobs, the texts the output may be checked against (the input document and the retrieved context)
and the retrieval similarity, and compares the result with its thresholds.

The formula, per top-level field ``f`` of the output object:

* ``p_tok(f)`` — the model's probability of the value it wrote: ``exp(Σ logprob)`` over the tokens that
  overlap the value's characters in the generated JSON (quotes included; they are near-certain). The
  joint probability, not a per-token mean, because a value is wrong when any of its tokens is. Absent
  when the engine returned no logprobs, or the tokens do not spell the text (then they cannot be located).
* ``check(f)`` — 1 when the value appears in the input or the retrieved context (strings compared
  case-insensitively with whitespace collapsed; numbers by value, whatever their thousands separators),
  else 0. Absent for values that cannot be looked up in text (booleans, null, objects, lists).
* ``sim`` — the retrieval similarity, one per run, in [0, 1]; absent without retrieval or when the
  retriever's scores are not similarities (rank-fused scores are not).

``confidence(f) = Σ wᵢ·sᵢ / Σ wᵢ`` over the signals present, with weights ``p_tok`` 0.6, ``check`` 0.3,
``sim`` 0.1: a weighted mean, so it stays in [0, 1] and between the weakest and strongest signal; a
value the model was sure of but that appears nowhere scores at most 0.7, below any sensible threshold.
No signal at all gives 0 (unknown is not confident). A required field that is missing scores 0.
The run's confidence is the minimum over its fields: one doubtful field is enough to ask a human.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WEIGHTS = {"token": 0.6, "check": 0.3, "retrieval": 0.1}
_NUMBER = re.compile(r"-?\d[\d.,' ]*\d|-?\d")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class FieldConfidence:
    value: float
    token: float | None = None
    check: float | None = None
    retrieval: float | None = None


@dataclass(frozen=True)
class Confidence:
    overall: float
    fields: dict[str, FieldConfidence] = field(default_factory=dict)

    def per_field(self) -> dict[str, float]:
        return {name: round(fc.value, 6) for name, fc in self.fields.items()}


def combine(token: float | None, check: float | None, retrieval: float | None) -> float:
    """Weighted mean of the signals present (each in [0, 1]); 0 when none is."""
    present = [(WEIGHTS[name], value) for name, value in (("token", token), ("check", check),
                                                           ("retrieval", retrieval)) if value is not None]
    if not present:
        return 0.0
    weight = sum(w for w, _ in present)
    return min(1.0, max(0.0, sum(w * min(1.0, max(0.0, v)) for w, v in present) / weight))


def value_spans(text: str) -> dict[str, tuple[int, int]]:
    """[start, end) character span of each top-level value of the JSON object ``text``; {} if it is not one."""
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "{":
        return {}
    i = _skip(text, i + 1)
    try:
        while i < len(text) and text[i] != "}":
            key, i = decoder.raw_decode(text, i)
            i = _skip(text, i)
            if text[i] != ":":
                return {}
            start = _skip(text, i + 1)
            _, end = decoder.raw_decode(text, start)
            spans[str(key)] = (start, end)
            i = _skip(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip(text, i + 1)
    except (ValueError, IndexError):
        return spans
    return spans


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def token_probabilities(text: str, tokens: Sequence[tuple[str, float]]) -> dict[str, float]:
    """``p_tok`` of every top-level field of ``text`` from (token, logprob) pairs; {} when they don't spell it."""
    if not tokens or "".join(t for t, _ in tokens) != text:
        return {}
    bounds: list[tuple[int, int, float]] = []
    offset = 0
    for token, logprob in tokens:
        bounds.append((offset, offset + len(token), logprob))
        offset += len(token)
    result: dict[str, float] = {}
    for name, (start, end) in value_spans(text).items():
        total = sum(lp for s, e, lp in bounds if s < end and e > start)
        result[name] = math.exp(min(total, 0.0))
    return result


def _normal(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def _numbers(text: str) -> set[float]:
    found: set[float] = set()
    for match in _NUMBER.findall(text):
        raw = match.replace(" ", "").replace("'", "")
        candidates = {raw.replace(",", ""), raw.replace(".", "").replace(",", ".")}
        for candidate in candidates:
            try:
                found.add(float(candidate))
            except ValueError:
                continue
    return found


def appears(value: Any, sources: Iterable[str]) -> float | None:
    """``check``: 1.0 when ``value`` occurs in one of the texts, 0.0 when not, None when not checkable."""
    texts = [s for s in sources if s]
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, int | float):
        return 1.0 if any(math.isclose(value, n, abs_tol=0.005) for t in texts for n in _numbers(t)) else 0.0
    needle = _normal(str(value))
    if not needle:
        return 0.0
    return 1.0 if any(needle in _normal(t) for t in texts) else 0.0


def score(fields: Mapping[str, Any], *, text: str, tokens: Sequence[tuple[str, float]] | None,
          sources: Sequence[str], retrieval_similarity: float | None,
          required: Iterable[str] = ()) -> Confidence:
    """Per-field and overall confidence of the generated ``fields`` (see the module docstring)."""
    probabilities = token_probabilities(text, tokens or ())
    per_field: dict[str, FieldConfidence] = {}
    for name, value in fields.items():
        token, check = probabilities.get(name), appears(value, sources)
        per_field[name] = FieldConfidence(combine(token, check, retrieval_similarity), token, check,
                                          retrieval_similarity)
    for name in required:
        if fields.get(name) in (None, ""):
            per_field[name] = FieldConfidence(0.0)
    overall = min((fc.value for fc in per_field.values()), default=0.0)
    return Confidence(overall, per_field)
