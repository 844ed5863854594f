"""Small builders for API objects in unit tests: valid by default, one field changed per test."""

from __future__ import annotations

from typing import Any

from pilothouse.operator.api import AutonomousWorkflow, BudgetPolicy, ModelDeployment, VectorIndex
from pilothouse.operator.api.common import now


def ready(status: bool = True, reason: str = "EndpointHealthy") -> dict[str, Any]:
    return {"conditions": [{"type": "Ready", "status": "True" if status else "False", "reason": reason,
                            "lastTransitionTime": now().isoformat()}]}


def model(name: str, tier: str = "small", fallback: list[str] | None = None, healthy: bool | None = True,
          **spec: Any) -> ModelDeployment:
    status = None if healthy is None else ready(healthy, "EndpointHealthy" if healthy else "EndpointUnreachable")
    return ModelDeployment.model_validate({
        "metadata": {"name": name},
        "spec": {"model": {"name": f"org/{name}"}, "engine": "external",
                 "external": {"url": f"http://{name}.example/v1"}, "tier": tier, "fallback": fallback or [],
                 "pricing": {"inputPerMillionUSD": 1, "outputPerMillionUSD": 2}, **spec},
        "status": status,
    })


def index(name: str = "docs", healthy: bool = True) -> VectorIndex:
    return VectorIndex.model_validate({
        "metadata": {"name": name}, "spec": {"fields": {"dimension": 8}},
        "status": ready(healthy, "CollectionReady" if healthy else "MilvusUnreachable"),
    })


def budget(name: str = "budget", state: str = "Ok", action: str = "downgrade", **on: Any) -> BudgetPolicy:
    on_exhausted = {"action": action, **({"downgradeTier": "small"} if action == "downgrade" else {}),
                    **({"queueTimeoutSeconds": 30} if action == "queue" else {}), **on}
    return BudgetPolicy.model_validate({
        "metadata": {"name": name},
        "spec": {"limits": [{"window": "day", "maxCostUSD": 10}], "onExhausted": on_exhausted},
        "status": {"state": state},
    })


def workflow(tier: str = "small", retrieve: bool = True, budget_ref: str | None = None,
             **spec: Any) -> AutonomousWorkflow:
    steps: list[dict[str, Any]] = []
    if retrieve:
        steps.append({"name": "context", "type": "retrieve", "retrieve": {"vectorIndexRef": "docs"}})
    steps.append({"name": "extract", "type": "generate", "generate": {"tier": tier, "promptTemplate": "{input}"}})
    return AutonomousWorkflow.model_validate({
        "metadata": {"name": "wf"},
        "spec": {"mission": "m", "steps": steps, **({"budgetPolicyRef": budget_ref} if budget_ref else {}), **spec},
    })
