"""Packaging and layering rules from DESIGN.md §3 that a refactor could silently break."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_repo_root_does_not_shadow_stdlib_operator() -> None:
    found = subprocess.run([sys.executable, "-S", "-c", "import operator; print(operator.__file__)"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert not found.startswith(str(ROOT)), found
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_operator_package_imports_as_pilothouse_operator() -> None:
    from pilothouse.operator import api

    assert Path(api.__file__).parent == ROOT / "operator" / "api"


def imports(folder: Path) -> dict[str, set[str]]:
    """Module file → imported top-level names (absolute imports and pilothouse-relative ones)."""
    found: dict[str, set[str]] = {}
    for file in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = file.parent.relative_to(ROOT).parts[: len(file.parent.relative_to(ROOT).parts) - node.level + 1]
                names.add(".".join(("pilothouse", *base, *(node.module.split(".") if node.module else []))))
        found[str(file.relative_to(ROOT))] = names
    return found


# import-linter would express these as contracts, but its graph builder cannot see packages that
# setuptools maps from another folder (pilothouse.operator lives in operator/ with no __init__.py,
# on purpose), so the same contracts are checked on the syntax tree.
CONTRACTS = [
    ("operator/api", ("kopf", "lightkube", "kubernetes", "ray", "pymilvus", "httpx", "pilothouse.serving")),
    ("serving", ("kopf", "lightkube", "kubernetes", "pilothouse.operator.kopf_app", "pilothouse.operator.k8s")),
    ("operator", ("pilothouse.serving", "ray", "vllm")),
]


@pytest.mark.parametrize(("folder", "forbidden"), CONTRACTS, ids=[c[0] for c in CONTRACTS])
def test_layer_contracts(folder: str, forbidden: tuple[str, ...]) -> None:
    violations = [f"{file} imports {name}" for file, names in imports(ROOT / folder).items() for name in names
                  if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert violations == []


def test_serving_shares_only_the_api_with_the_operator() -> None:
    """The RoutingTable and API models (incl. the ledger table) are the whole contract (DESIGN.md §2)."""
    violations = [f"{file} imports {name}" for file, names in imports(ROOT / "serving").items() for name in names
                  if name.startswith("pilothouse.operator") and not name.startswith("pilothouse.operator.api")]
    assert violations == []


def test_layer_check_sees_relative_imports() -> None:
    """The checker itself: it must resolve `from ..x import y` or the contracts prove nothing."""
    names = imports(ROOT / "operator")["operator/api/__init__.py"]
    assert "pilothouse.operator.api.model_deployment" in names


@pytest.mark.parametrize("module", ["pilothouse.operator.kopf_app", "pilothouse.serving.gateway"])
def test_operator_and_gateway_start_without_pymilvus(module: str) -> None:
    """pymilvus brings pandas, pyarrow and gRPC: 100 of an idle operator's 175 MiB, 113 of the gateway module's 196.
    An operator reconciling no VectorIndex, or a gateway whose table has no retrieval and no semantic cache, never
    needs it (or FAISS); one that does imports it with the first."""
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; "
         "print(sorted(m for m in ('pymilvus', 'pandas', 'pyarrow', 'grpc', 'faiss') if m in sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
