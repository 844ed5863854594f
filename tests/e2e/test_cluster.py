"""The integration scenarios (tests/integration/test_operator.py) against a real cluster (`make e2e`).

The operator runs in the cluster (charts/pilothouse); these tests only talk to the API server. A
kind cluster has no GPUs and no Milvus, so a vLLM tier never becomes Ready here: what is checked is
that the platform team is told why, and that routing falls back on its own.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import lightkube
import pytest
import yaml
from lightkube import codecs
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import ConfigMap, Event, Service

from pilothouse.operator.k8s import GENERIC, RayService, as_dict
from pilothouse.operator.kopf_app import FINALIZER

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).parents[2] / "examples" / "invoice-triage"
TIMEOUT = 120.0  # the operator's health timer ticks every 10 s; image pulls and watches add to it
UNREACHABLE = "http://127.0.0.1:9/v1"  # nothing listens on the discard port inside the operator's pod
NOT_READY_REASONS = {"InsufficientGPUCapacity", "PodsNotReady"}
MD, BP, WF = GENERIC["ModelDeployment"], GENERIC["BudgetPolicy"], GENERIC["AutonomousWorkflow"]


# ---- helpers -------------------------------------------------------------------------------------


def example(file: str, name: str) -> dict[str, Any]:
    """One document of the example manifests, by metadata.name."""
    for doc in yaml.safe_load_all((EXAMPLE / file).read_text()):
        if doc and doc["metadata"]["name"] == name:
            return doc
    raise LookupError(f"{name} not in {file}")


def unreachable_large() -> dict[str, Any]:
    """The external tier, pointed at an endpoint that refuses connections."""
    doc = example("models.yaml", "invoice-large")
    doc["spec"]["external"]["url"] = UNREACHABLE
    return doc


def secret(name: str, key: str, value: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {key: value}}


def workflow(name: str, generate: dict[str, Any], budget: str | None = None) -> dict[str, Any]:
    """A one-step workflow: no retrieval (no Milvus here)."""
    spec: dict[str, Any] = {"mission": "e2e", "steps": [
        {"name": "extract", "type": "generate", "generate": {"promptTemplate": "{input}", "maxTokens": 64,
                                                             **generate}}]}
    if budget:
        spec["budgetPolicyRef"] = budget
    return {"apiVersion": "pilothouse.io/v1alpha1", "kind": "AutonomousWorkflow", "metadata": {"name": name},
            "spec": spec}


async def create(kube: lightkube.AsyncClient, namespace: str, doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    await kube.create(codecs.from_dict(doc))


async def get(kube: lightkube.AsyncClient, resource: Any, name: str, namespace: str) -> dict[str, Any] | None:
    try:
        return as_dict(await kube.get(resource, name, namespace=namespace))
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise


async def status(kube: lightkube.AsyncClient, resource: Any, name: str, namespace: str) -> dict[str, Any]:
    return ((await get(kube, resource, name, namespace)) or {}).get("status") or {}


async def ready(kube: lightkube.AsyncClient, resource: Any, name: str, namespace: str) -> dict[str, Any] | None:
    conditions = (await status(kube, resource, name, namespace)).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Ready"), None)


async def routing_table(kube: lightkube.AsyncClient, workflow_name: str, namespace: str) -> dict[str, Any] | None:
    cm = await get(kube, ConfigMap, f"{workflow_name}-routing", namespace)
    text = ((cm or {}).get("data") or {}).get("routing.json")
    return json.loads(text) if text else None


async def events(kube: lightkube.AsyncClient, kind: str, name: str, namespace: str) -> list[dict[str, Any]]:
    found = [as_dict(e) async for e in kube.list(Event, namespace=namespace, fields={
        "involvedObject.kind": kind, "involvedObject.name": name})]
    # Filter again: the field selector is only a hint to some servers.
    return [e for e in found if e["involvedObject"].get("kind") == kind and e["involvedObject"].get("name") == name]


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = TIMEOUT,
                     detail: Callable[[], Awaitable[Any]] | None = None) -> Any:
    """Poll until the probe returns something truthy; on timeout say what was awaited and what was seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if loop.time() > deadline:
            seen = f"; last seen: {await detail()}" if detail is not None else ""
            raise AssertionError(f"{what}: not reached within {timeout:.0f}s{seen}")
        await asyncio.sleep(1.0)


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == owner["metadata"]["uid"] and r["kind"] == owner["kind"] and r.get("controller")
               for r in refs)


# ---- a. the API server validates with the CRDs' schema and CEL rules -----------------------------


@pytest.mark.parametrize(("spec", "field", "says"), [
    ({"model": {"name": "m"}, "engine": "external"}, "spec.external", "spec.external is required"),
    ({"model": {"name": "m"}, "engine": "vllm", "replicas": {"min": 3, "max": 1}}, "spec.replicas",
     "spec.replicas.min must be <= spec.replicas.max"),
    ({"model": {"name": "m"}, "engine": "tgi"}, "spec.engine", '"tgi"'),
], ids=["external-block-missing", "replicas-min-above-max", "unknown-engine"])
async def test_api_server_rejects_invalid_model_deployment(kube: lightkube.AsyncClient, namespace: str,
                                                           spec: dict[str, Any], field: str, says: str) -> None:
    doc = {"apiVersion": "pilothouse.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "bad"},
           "spec": spec}
    with pytest.raises(ApiError) as info:
        await create(kube, namespace, doc)
    message = info.value.status.message or ""
    assert info.value.status.code == 422, message
    assert field in message and says in message, message
    assert await get(kube, MD, "bad", namespace) is None


# ---- b. a vLLM tier becomes a RayService and reports why it is not Ready -------------------------


async def test_vllm_model_gets_owned_rayservice_and_reports_why_not_ready(
        kube: lightkube.AsyncClient, namespace: str, kuberay: Any) -> None:
    await create(kube, namespace, example("models.yaml", "invoice-small"))
    rayservice = await eventually(lambda: get(kube, RayService, "invoice-small", namespace),
                                  "RayService invoice-small created")
    md = await get(kube, MD, "invoice-small", namespace)
    assert md is not None
    assert owned_by(rayservice, md), rayservice["metadata"].get("ownerReferences")
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    pod = workers["template"]["spec"]
    assert pod["nodeSelector"]["pilothouse.io/pool"] == "gpu-small"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 4)

    service = await eventually(lambda: get(kube, Service, "invoice-small", namespace), "Service invoice-small created")
    assert owned_by(service, md)

    async def not_ready() -> dict[str, Any] | None:
        cond = await ready(kube, MD, "invoice-small", namespace)
        return cond if cond and cond["status"] == "False" and cond["reason"] in NOT_READY_REASONS else None

    cond = await eventually(not_ready, "invoice-small Ready=False (InsufficientGPUCapacity or PodsNotReady)",
                            detail=lambda: status(kube, MD, "invoice-small", namespace))
    assert cond["message"]
    assert (await status(kube, MD, "invoice-small", namespace))["phase"] in ("Pending", "Degraded")

    async def transition_event() -> list[dict[str, Any]]:
        return [e for e in await events(kube, "ModelDeployment", "invoice-small", namespace)
                if e.get("reason") in NOT_READY_REASONS and e.get("type") == "Warning"
                and (e.get("message") or "").startswith("Ready=False")]

    found = await eventually(transition_event, "a Warning Event for the Ready=False transition",
                             detail=lambda: events(kube, "ModelDeployment", "invoice-small", namespace))
    assert found[0]["involvedObject"]["uid"] == md["metadata"]["uid"]


# ---- c. a BudgetPolicy with no spend is Ok -------------------------------------------------------


async def test_budget_policy_becomes_ok(kube: lightkube.AsyncClient, namespace: str, operator_running: Any) -> None:
    await create(kube, namespace, example("budget.yaml", "invoice-budget"))

    async def ok() -> bool:
        cond = await ready(kube, BP, "invoice-budget", namespace) or {}
        return (await status(kube, BP, "invoice-budget", namespace)).get("state") == "Ok" and cond.get(
            "status") == "True"

    await eventually(ok, "BudgetPolicy invoice-budget state Ok, Ready=True",
                     detail=lambda: status(kube, BP, "invoice-budget", namespace))
    assert (await status(kube, BP, "invoice-budget", namespace))["phase"] == "Ok"


# ---- d. a workflow compiles its RoutingTable and reports that nothing is healthy -----------------


async def test_workflow_routing_falls_back_and_reports_no_healthy_backend(
        kube: lightkube.AsyncClient, namespace: str, operator_running: Any) -> None:
    await create(kube, namespace, secret("openai", "api-key", "sk-e2e"))
    await create(kube, namespace, example("models.yaml", "invoice-small"))
    await create(kube, namespace, unreachable_large())
    await create(kube, namespace, example("budget.yaml", "invoice-budget"))
    await create(kube, namespace, workflow("triage", {"tier": "small"}, budget="invoice-budget"))

    async def large_unreachable() -> bool:
        return ((await ready(kube, MD, "invoice-large", namespace)) or {}).get("reason") == "EndpointUnreachable"

    await eventually(large_unreachable, "invoice-large Ready=False EndpointUnreachable",
                     detail=lambda: status(kube, MD, "invoice-large", namespace))

    async def consistent() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        """Table and status of the same compile: both unhealthy backends known, revisions equal."""
        table = await routing_table(kube, "triage", namespace)
        wf = await status(kube, WF, "triage", namespace)
        cond = next((c for c in wf.get("conditions", []) if c["type"] == "Ready"), None)
        if not table or not cond or wf.get("routingRevision") != table["revision"]:
            return None
        backends = table["routes"][0]["backends"]
        if any(b["healthy"] for b in backends) or not table["activeFallbacks"]:
            return None
        return table, wf, cond

    table, wf, cond = await eventually(
        consistent, "routing table compiled with no healthy backend and status.routingRevision matching it",
        detail=lambda: status(kube, WF, "triage", namespace))

    route = table["routes"][0]
    assert (route["step"], route["tier"]) == ("extract", "small")
    assert [(b["modelDeployment"], b["role"]) for b in route["backends"]] == [
        ("invoice-small", "primary"), ("invoice-large", "fallback")]
    assert table["degraded"] is True and table["activeFallbacks"]
    assert table["budget"]["policy"] == "invoice-budget" and table["budget"]["action"] == "none"
    assert table["workflow"] == "triage" and table["namespace"] == namespace

    assert cond["reason"] in ("NoHealthyBackend", "DegradedMode"), cond
    if cond["reason"] == "NoHealthyBackend":
        assert cond["status"] == "False"
    assert wf["routingRevision"] == table["revision"]
    assert wf["activeFallbacks"] == table["activeFallbacks"]

    cm = await get(kube, ConfigMap, "triage-routing", namespace)
    owner = await get(kube, WF, "triage", namespace)
    assert cm is not None and owner is not None and owned_by(cm, owner)


# ---- e. deleting a ModelDeployment: finalizer released by the operator, children collected ---------


async def test_deleting_model_deployment_collects_its_rayservice(
        kube: lightkube.AsyncClient, namespace: str, kuberay: Any) -> None:
    await create(kube, namespace, example("models.yaml", "invoice-small"))
    await eventually(lambda: get(kube, RayService, "invoice-small", namespace), "RayService invoice-small created")
    await eventually(lambda: get(kube, Service, "invoice-small", namespace), "Service invoice-small created")

    async def finalized() -> bool:
        md = await get(kube, MD, "invoice-small", namespace) or {"metadata": {}}
        return FINALIZER in (md["metadata"].get("finalizers") or [])

    await eventually(finalized, f"finalizer {FINALIZER} on invoice-small")

    await kube.delete(MD, "invoice-small", namespace=namespace)

    async def gone(resource: Any) -> bool:
        return await get(kube, resource, "invoice-small", namespace) is None

    await eventually(lambda: gone(MD), "ModelDeployment invoice-small deleted (operator releases its finalizer)",
                     detail=lambda: get(kube, MD, "invoice-small", namespace))
    await eventually(lambda: gone(RayService), "RayService invoice-small garbage-collected")
    await eventually(lambda: gone(Service), "Service invoice-small garbage-collected")


# ---- f. a workflow naming a missing ModelDeployment names the field -------------------------------


async def test_workflow_with_missing_model_reports_dependency_missing(
        kube: lightkube.AsyncClient, namespace: str, operator_running: Any) -> None:
    await create(kube, namespace, workflow("orphan", {"modelDeploymentRef": "missing"}))

    cond = await eventually(lambda: ready(kube, WF, "orphan", namespace), "Ready condition on workflow orphan",
                            detail=lambda: status(kube, WF, "orphan", namespace))
    assert cond["status"] == "False"
    assert cond["reason"] == "DependencyMissing"
    assert "spec.steps[0].generate.modelDeploymentRef" in cond["message"]
    assert "'missing'" in cond["message"]
    assert await routing_table(kube, "orphan", namespace) is None
