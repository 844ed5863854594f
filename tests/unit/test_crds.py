"""Generated CRDs: in sync with the models, structural, and agreeing with the models on what is valid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pilothouse.operator import crdgen
from pilothouse.operator.api import BY_KIND, KINDS
from pilothouse.operator.manifests import describe

from .crd_check import api_server_errors, schema_for

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def test_crds_folder_matches_models() -> None:
    rendered = crdgen.render_all()
    on_disk = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert on_disk == rendered, "crds/ is stale: run `make crds` and commit"


def test_cli_writes_the_same_crds(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pilothouse.cli import app

    result = CliRunner().invoke(app, ["crds", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == crdgen.render_all()


def _walk(node: dict[str, Any], path: str = "") -> list[str]:
    problems = []
    for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "const"):
        if banned in node:
            problems.append(f"{path}: {banned}")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties with additionalProperties")
    for name, sub in node.get("properties", {}).items():
        problems += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += _walk(node[key], f"{path}[]")
    return problems


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.KIND)
def test_crd_is_structural_and_complete(kind) -> None:
    crd = crdgen.crd(kind)
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    assert version["subresources"] == {"status": {}}
    assert "status" in schema["properties"] and "conditions" in schema["properties"]["status"]["properties"]
    assert "observedGeneration" in schema["properties"]["status"]["properties"]
    assert "pilothouse" in crd["spec"]["names"]["categories"] and crd["spec"]["names"]["shortNames"]
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Age"} <= columns or {"State", "Age"} <= columns
    assert kind.KIND in schema["properties"]["spec"]["description"]


def test_spec_fields_carry_descriptions_for_kubectl_explain() -> None:
    undocumented = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            if "description" not in sub and not path.startswith("status"):
                undocumented.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    for kind in KINDS:
        walk(schema_for(kind.KIND)["properties"]["spec"], f"{kind.KIND}.spec")
    # Leaves of small nested shapes (toleration keys) may go without; top spec fields may not.
    top = [u for u in undocumented if u.count(".") == 2]
    assert top == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_validate_against_crd_schema_and_models(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("apiVersion") != "pilothouse.io/v1alpha1":
            continue
        assert api_server_errors(doc) == []
        BY_KIND[doc["kind"]].model_validate(doc)


def _example(kind: str) -> dict[str, Any]:
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind:
                return copy.deepcopy(doc)
    raise LookupError(kind)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


_DELETE = object()
BAD = [
    ("ModelDeployment", "spec.engine", "vlm", "spec.engine"),
    ("ModelDeployment", "spec.replicas.min", 9, "spec.replicas"),
    ("ModelDeployment", "spec.fallback", ["invoice-small"], "spec.fallback"),
    ("ModelDeployment", "spec.vllm.gpuMemoryUtilization", 1.5, "spec.vllm.gpuMemoryUtilization"),
    ("ModelDeployment", "spec.tier", "Big Tier", "spec.tier"),
    ("VectorIndex", "spec.fields.dimension", 1, "spec.fields.dimension"),
    ("VectorIndex", "spec.reclaimPolicy", "Keep", "spec.reclaimPolicy"),
    ("VectorIndex", "spec.embedding", {"localPath": "/m", "modelDeploymentRef": "x"}, "spec.embedding"),
    ("BudgetPolicy", "spec.onExhausted", {"action": "downgrade"}, "spec.onExhausted"),
    ("BudgetPolicy", "spec.onExhausted", {"action": "queue"}, "spec.onExhausted"),
    ("BudgetPolicy", "spec.limits", [{"window": "day"}], "spec.limits"),
    ("BudgetPolicy", "spec.warnAt", 1.5, "spec.warnAt"),
    ("AutonomousWorkflow", "spec.steps.1.generate", _DELETE, "spec.steps"),
    ("AutonomousWorkflow", "spec.steps.3.act.webhook", {"url": "http://erp.example/x"}, "spec.steps"),
    ("AutonomousWorkflow", "spec.slo.precision", 1.2, "spec.slo.precision"),
]


@pytest.mark.parametrize(("kind", "field", "value", "named"), BAD, ids=[f"{b[0]}:{b[1]}" for b in BAD])
def test_bad_manifests_rejected_by_api_server_and_models_naming_the_field(kind, field, value, named) -> None:
    doc = _set(_example(kind), field, value)
    if kind == "ModelDeployment" and field == "spec.fallback":
        doc["metadata"]["name"] = "invoice-small"
    server = api_server_errors(doc)
    assert server, "the CRD schema / CEL rules accepted an invalid manifest"
    with pytest.raises(ValidationError) as caught:
        BY_KIND[kind].model_validate(doc)
    lines = describe(caught.value)
    assert any(named in line for line in lines), lines
