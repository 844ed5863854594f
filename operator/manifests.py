"""Read Pilothouse manifests from files and validate them, naming file, object and field on error.

Used by ``pilothouse run`` (local mode) and the tests; a manifest that fails here would fail the
same way at ``kubectl apply`` (CRD schema) or in the operator (``InvalidSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api import API_VERSION, BY_KIND, Resource


@dataclass
class ManifestError:
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass
class Bundle:
    objects: list[Resource] = field(default_factory=list)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def describe(exc: ValidationError) -> list[str]:
    """One line per problem: `spec.engine: Input should be 'vllm' or 'external' (got 'vlm')`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") and not isinstance(
            err.get("input"), dict | list) else ""
        lines.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return lines


def parse(doc: dict[str, Any]) -> Resource:
    kind = BY_KIND[doc["kind"]]
    return kind.model_validate(doc)


def files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load(path: Path) -> Bundle:
    bundle = Bundle()
    for file in files(path):
        try:
            docs = list(yaml.safe_load_all(file.read_text()))
        except yaml.YAMLError as exc:
            bundle.errors.append(ManifestError(str(file), f"not valid YAML: {exc}"))
            continue
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            where = f"{file}#{index}"
            if not isinstance(doc, dict) or "kind" not in doc:
                bundle.errors.append(ManifestError(where, "not a Kubernetes object (no kind)"))
                continue
            name = doc.get("metadata", {}).get("name", "?")
            where = f"{file} ({doc['kind']}/{name})"
            if doc["kind"] == "Secret" and doc.get("apiVersion") == "v1":
                ns = doc.get("metadata", {}).get("namespace", "default")
                bundle.secrets[(ns, name)] = {str(k): str(v) for k, v in (doc.get("stringData") or {}).items()}
                continue
            if doc.get("apiVersion") != API_VERSION or doc["kind"] not in BY_KIND:
                bundle.skipped.append(f"{where}: not a {API_VERSION} kind, ignored")
                continue
            try:
                bundle.objects.append(parse(doc))
            except ValidationError as exc:
                bundle.errors.extend(ManifestError(where, line) for line in describe(exc))
    return bundle
