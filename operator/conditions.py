"""Kubernetes-style conditions: set one without losing when it last changed, and list transitions.

Pure functions over plain dicts (the status as stored), so kopf handlers and the local provider
share them and tests need no cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from .api.common import ConditionType, now


@dataclass(frozen=True)
class Observation:
    """What a reconcile concluded about one condition."""

    type: ConditionType
    status: bool | None
    reason: str
    message: str = ""

    @property
    def status_str(self) -> str:
        return {True: "True", False: "False", None: "Unknown"}[self.status]


def merge(old: list[dict[str, Any]], observed: list[Observation], generation: int | None) -> list[dict[str, Any]]:
    """New condition list; lastTransitionTime only moves when the status value changes."""
    by_type = {c["type"]: c for c in old}
    stamp = now().isoformat().replace("+00:00", "Z")
    for obs in observed:
        prev = by_type.get(obs.type)
        changed = prev is None or prev.get("status") != obs.status_str
        by_type[obs.type] = {
            "type": obs.type,
            "status": obs.status_str,
            "reason": obs.reason,
            "message": obs.message,
            "lastTransitionTime": stamp if changed else prev["lastTransitionTime"],
            **({"observedGeneration": generation} if generation is not None else {}),
        }
    order = get_args(ConditionType)
    return sorted(by_type.values(), key=lambda c: order.index(c["type"]) if c["type"] in order else 99)


def transitions(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conditions whose status or reason changed: each deserves a Kubernetes Event."""
    before = {c["type"]: (c.get("status"), c.get("reason")) for c in old}
    return [c for c in new if before.get(c["type"]) != (c["status"], c["reason"])]


def get(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    cond = get(conditions, type_)
    return cond is not None and cond.get("status") == "True"
