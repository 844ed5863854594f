"""The ports a reconciler talks through, and what it returns.

Reconcilers decide; an ``Env`` does the I/O. The kopf operator implements Env over the Kubernetes
API (``k8s.ClusterEnv``), ``pilothouse run`` over files and Milvus Lite (``local.LocalEnv``), and
both therefore run the very same reconcile code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .api import ModelDeployment, Resource, RoutingTable
from .api.common import SecretKeyRef
from .budget import SpendReader
from .conditions import Observation, merge
from .health import EndpointProber, Health
from .slo import SloReader

R = TypeVar("R", bound=Resource)


class Env(Protocol):
    prober: EndpointProber
    spend: SpendReader
    slo: SloReader | None  # workflow run figures for AutonomousWorkflow status; None: not reported
    default_milvus_uri: str | None

    async def secret(self, namespace: str, ref: SecretKeyRef) -> str | None:
        """The Secret value, or None when the Secret or key is missing."""

    async def list(self, kind: type[R], namespace: str) -> dict[str, R]:
        """Objects of one Pilothouse kind in a namespace, by name (invalid ones left out)."""

    async def vllm_health(self, md: ModelDeployment) -> Health:
        """Health of a vLLM deployment in this environment."""

    async def routing_table(self, namespace: str, workflow: str) -> RoutingTable | None:
        """The RoutingTable last written for a workflow."""


@dataclass
class Outcome:
    """What one reconcile concluded: status fields, conditions, children to apply, retry wish."""

    status: dict[str, Any] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)
    children: list[dict[str, Any]] = field(default_factory=list)
    routing_table: RoutingTable | None = None
    retry_after: float | None = None
    phase: str | None = None
    events: list[tuple[str, str]] = field(default_factory=list)  # (reason, message) worth an Event of their own


def status_doc(outcome: Outcome, old: dict[str, Any] | None, generation: int | None) -> dict[str, Any]:
    """The full status to write: outcome fields, merged conditions, phase, observedGeneration."""
    old = old or {}
    doc = {
        **outcome.status,
        "phase": outcome.phase,
        "observedGeneration": generation,
        "conditions": merge(old.get("conditions", []), outcome.observations, generation),
    }
    return {k: v for k, v in doc.items() if v is not None}

