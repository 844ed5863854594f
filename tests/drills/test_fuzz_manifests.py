"""Fuzz: a few hundred mutated example manifests → the CRD schema and the pydantic models both refuse, naming the path.

tests/unit/test_crds.py checks fifteen hand-picked bad manifests. Here the mutations come from the
CRD schema itself: walking each example manifest beside its kind's OpenAPI schema gives every field
present, and the schema says what breaks it — a value of another JSON type, a number past its
minimum or maximum, a string outside its enum, a required field removed. Each such manifest is
invalid by construction, so a kind whose models accept it, or whose error names another field, is a
disagreement between what ``kubectl apply`` and the operator would say.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pilothouse.operator.api import BY_KIND
from pilothouse.operator.manifests import describe
from tests.unit.crd_check import api_server_errors, schema_for

pytestmark = pytest.mark.drill

ROOT = Path(__file__).parents[2]
DOCS = [doc for path in sorted((ROOT / "examples").rglob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("apiVersion") == "pilothouse.io/v1alpha1"]
# A value of each JSON type that no lax pydantic coercion turns into another type's value.
OTHER_TYPE = {"string": ["not", "a string"], "integer": "forty-two", "number": "forty-two", "boolean": "maybe",
              "object": "not an object", "array": "not an array"}
Mutation = tuple[int, tuple[str | int, ...], str, Any]  # (doc index, path, what, new value or REMOVE)
REMOVE = "<removed>"


def _mutations(node: Any, schema: dict[str, Any], path: tuple[str | int, ...]) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    kind = schema.get("type")
    if path and kind in OTHER_TYPE:
        found.append((path, "type", OTHER_TYPE[kind]))
    if kind == "integer" and path:
        found.append((path, "fraction", 1.5 if not isinstance(node, int) or node != 1 else 2.5))
    if "minimum" in schema:
        found.append((path, "below minimum", schema["minimum"] - 1))
    if "maximum" in schema:
        found.append((path, "above maximum", schema["maximum"] + 1))
    if "enum" in schema:
        found.append((path, "enum", "NotOneOfThem"))
    if isinstance(node, dict):
        for name in schema.get("required", []):
            if name in node and path[:1] != ("metadata",):
                found.append(((*path, name), "required", REMOVE))
        for name, sub in schema.get("properties", {}).items():
            if name in node and name not in ("apiVersion", "kind", "metadata", "status"):
                found += _mutations(node[name], sub, (*path, name))
    if isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(node):
            found += _mutations(item, schema["items"], (*path, i))
    return found


MUTATIONS: list[Mutation] = [(i, path, what, value) for i, doc in enumerate(DOCS)
                             for path, what, value in _mutations(doc, schema_for(doc["kind"]), ())]


def apply(mutations: list[Mutation]) -> dict[str, Any]:
    """The example with every mutation applied (all of one document, none inside another's path)."""
    doc = copy.deepcopy(DOCS[mutations[0][0]])
    for _, path, _, value in mutations:
        node = doc
        for part in path[:-1]:
            node = node[part]
        if value == REMOVE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return doc


def _disjoint(a: Mutation, b: Mutation) -> bool:
    shorter, longer = sorted((a[1], b[1]), key=len)
    return longer[: len(shorter)] != shorter


@st.composite
def mutation_sets(draw: st.DrawFn) -> list[Mutation]:
    """One to three mutations of one example manifest, none inside another."""
    first = draw(st.sampled_from(MUTATIONS))
    same_doc = [m for m in MUTATIONS if m[0] == first[0]]
    more = draw(st.lists(st.sampled_from(same_doc), max_size=2))
    return [first, *[m for m in more if _disjoint(first, m)][:1]]


def dotted(path: tuple[str | int, ...]) -> str:
    """``spec.steps[1].generate`` as ``describe`` writes a location."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def test_mutations_cover_every_kind_and_kind_of_breakage() -> None:
    assert len(MUTATIONS) >= 200
    assert {DOCS[m[0]]["kind"] for m in MUTATIONS} == set(BY_KIND)
    assert {m[2] for m in MUTATIONS} >= {"type", "fraction", "below minimum", "above maximum", "enum", "required"}


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(mutations=mutation_sets())
def test_mutated_manifests_are_refused_by_crd_schema_and_models_naming_each_field(mutations: list[Mutation]) -> None:
    doc = apply(mutations)
    assert api_server_errors(doc), f"the CRD schema accepted {mutations}"
    with pytest.raises(ValidationError) as caught:
        BY_KIND[doc["kind"]].model_validate(doc)
    lines = describe(caught.value)
    for _, path, what, _ in mutations:
        # The field itself or, for a removed one that a rule over its object requires, that object.
        named = {dotted(path), dotted(path[:-1])} - {""} if what == "required" else {dotted(path)}
        pattern = rf"({'|'.join(map(re.escape, named))})[.\[:]"
        assert any(re.match(pattern, line) for line in lines), (dotted(path), what, lines)
