"""Validate an object the way a real API server would: structural OpenAPI schema, then CEL rules."""

from __future__ import annotations

from typing import Any

import celpy
import jsonschema

from pilothouse.operator import crdgen
from pilothouse.operator.api import BY_KIND

_CEL = celpy.Environment()


def schema_for(kind: str) -> dict[str, Any]:
    return crdgen.crd(BY_KIND[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _cel_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _CEL.program(_CEL.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += _cel_errors(sub, value[name], f"{path}.{name}" if path else name)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def api_server_errors(doc: dict[str, Any]) -> list[str]:
    """Messages a real API server would answer `kubectl apply` with (schema first, then CEL)."""
    schema = schema_for(doc["kind"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors or _cel_errors(schema, doc, "")
