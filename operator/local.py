"""Local provider: the operator's reconcilers with no cluster (``pilothouse run``).

State lives in one folder (default ``.pilothouse/``): a Milvus Lite database, the SQLite store the
gateway's ledger writes, one RoutingTable file per workflow, and the last status of every object.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from . import budget_policy, model_deployment, vector_index, workflow
from .api import AutonomousWorkflow, BudgetPolicy, ModelDeployment, Resource, RoutingTable, VectorIndex
from .api.common import SecretKeyRef
from .budget import SqlSpendReader
from .env import Outcome, status_doc
from .health import EndpointProber, Health
from .manifests import Bundle
from .slo import SloReader

R = TypeVar("R", bound=Resource)
ORDER: tuple[type[Resource], ...] = (BudgetPolicy, ModelDeployment, VectorIndex, AutonomousWorkflow)
RECONCILERS = {
    BudgetPolicy: budget_policy.reconcile,
    ModelDeployment: model_deployment.reconcile,
    VectorIndex: vector_index.reconcile,
    AutonomousWorkflow: workflow.reconcile,
}


@dataclass
class LocalEnv:
    state_dir: Path
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    objects: dict[tuple[str, str, str], Resource] = field(default_factory=dict)
    prober: EndpointProber = field(default_factory=EndpointProber)
    # ModelDeployment name → endpoint of its engine running in the local Ray Serve (``serve://<app>``),
    # as ``serving.engines.vllm.deploy_local_engines`` returned it; absent = not started (yet).
    engine_endpoints: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.spend = SqlSpendReader(f"sqlite:///{self.state_dir / 'pilothouse.db'}")
        self.slo: SloReader | None = SloReader(f"sqlite:///{self.state_dir / 'pilothouse.db'}")
        self.default_milvus_uri: str | None = str(self.state_dir / "milvus.db")

    async def secret(self, namespace: str, ref: SecretKeyRef) -> str | None:
        """Secret manifests in the run folder first, then PILOTHOUSE_SECRET_<NAME>_<KEY>."""
        value = self.secrets.get((namespace, ref.name), {}).get(ref.key)
        return value if value is not None else os.environ.get(ref.env_var)

    async def list(self, kind: type[R], namespace: str) -> dict[str, R]:
        return {name: obj for (k, ns, name), obj in self.objects.items()  # type: ignore[misc]
                if k == kind.KIND and ns == namespace}

    async def vllm_health(self, md: ModelDeployment) -> Health:
        """Locally, vLLM runs as a Serve application beside the gateway, which calls it through a handle.

        Ready with the engine's ``serve://`` endpoint once it was started; before that, the weights
        are what can be checked (the RoutingTable then carries the cluster URL, which fails over).
        """
        source = md.spec.model.name
        local_endpoint = self.engine_endpoints.get(md.name)
        if local_endpoint is not None:
            return Health(True, "LocalEngine", f"vLLM serving {source} in the local Ray Serve ({local_endpoint})",
                          endpoint=local_endpoint)
        if await asyncio.to_thread(_exists, source):
            return Health(True, "LocalEngine", f"weights at {source}; served in-process by the local gateway")
        if source.startswith(("/", "./", "~", "s3://")):
            return Health(False, "ModelUnavailable", f"spec.model.name {source} does not exist on this machine")
        return Health(False, "ModelUnavailable",
                      f"spec.model.name {source!r} is a Hugging Face id and this machine cannot download "
                      "weights; point it at a local directory or use engine: external")

    def table_path(self, namespace: str, name: str) -> Path:
        return self.state_dir / "routing" / namespace / f"{name}.json"

    async def routing_table(self, namespace: str, workflow: str) -> RoutingTable | None:
        path = self.table_path(namespace, workflow)
        return RoutingTable.model_validate_json(path.read_text()) if path.exists() else None


def _exists(path: str) -> bool:
    return Path(path).expanduser().exists()


def _apply(obj: Resource, outcome: Outcome) -> Resource:
    old = obj.status.dump() if obj.status else None
    doc = status_doc(outcome, old, obj.metadata.generation)
    return obj.model_copy(update={"status": obj.status_type().model_validate(doc)})


async def reconcile_all(bundle: Bundle, env: LocalEnv) -> list[Resource]:
    """One pass in dependency order; returns the objects with their new status."""
    for obj in bundle.objects:
        env.objects[(obj.KIND, obj.namespace, obj.name)] = obj
    env.secrets.update(bundle.secrets)
    for kind in ORDER:
        for key, obj in sorted(env.objects.items()):
            if key[0] != kind.KIND:
                continue
            outcome = await RECONCILERS[kind](obj, env)  # type: ignore[operator]
            env.objects[key] = _apply(obj, outcome)
            if outcome.routing_table is not None:
                path = env.table_path(obj.namespace, obj.name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(outcome.routing_table.model_dump_json(by_alias=True, indent=2))
    status = {f"{k}/{ns}/{n}": o.status.dump() if o.status else {} for (k, ns, n), o in env.objects.items()}
    (env.state_dir / "status.json").write_text(json.dumps(status, indent=2))
    rank = {kind.KIND: i for i, kind in enumerate(ORDER)}
    return sorted(env.objects.values(), key=lambda o: (rank[o.KIND], o.namespace, o.name))
