"""The kopf operator against the Kubernetes emulator: what a platform team sees after kubectl apply."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import kmock
import lightkube
import pytest
import yaml
from lightkube import codecs
from lightkube.resources.core_v1 import Pod

from pilothouse.operator.k8s import GENERIC, RayService
from tests.polling import eventually

from .conftest import FakeOpenAI

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "invoice-triage"


def example_docs(endpoint: str) -> list[dict[str, Any]]:
    """The example manifests, with the external model pointed at a local endpoint."""
    docs = []
    for file in sorted(EXAMPLE.glob("*.yaml")):
        for doc in yaml.safe_load_all(file.read_text()):
            if doc and doc.get("kind") == "ModelDeployment" and doc["spec"]["engine"] == "external":
                doc["spec"]["external"]["url"] = endpoint
            if doc:
                docs.append(doc)
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai", "namespace": "default"},
                 "stringData": {"api-key": "sk-test"}})
    return docs


async def apply(kube: lightkube.AsyncClient, doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(doc)
    doc.setdefault("metadata", {}).setdefault("namespace", "default")
    await kube.create(codecs.from_dict(doc))


def obj(emulator: kmock.KubernetesEmulator, resource: str, name: str) -> dict[str, Any] | None:
    key = (kmock.resource(resource), "default", name)
    if key not in emulator.objects or emulator.objects[key].deleted:
        return None
    return json.loads(json.dumps(emulator.objects[key].raw))


def status(emulator: kmock.KubernetesEmulator, plural: str, name: str) -> dict[str, Any]:
    found = obj(emulator, f"pilothouse.io/v1alpha1/{plural}", name)
    return (found or {}).get("status") or {}


def ready(emulator: kmock.KubernetesEmulator, plural: str, name: str) -> dict[str, Any] | None:
    return next((c for c in status(emulator, plural, name).get("conditions", []) if c["type"] == "Ready"), None)


def table(emulator: kmock.KubernetesEmulator, workflow: str) -> dict[str, Any] | None:
    cm = obj(emulator, "v1/configmaps", f"{workflow}-routing")
    return json.loads(cm["data"]["routing.json"]) if cm else None


async def serve_running(kube: lightkube.AsyncClient, name: str) -> None:
    """What KubeRay reports once the Serve application runs."""
    await kube.patch(RayService.Status, name, {"status": {"serviceStatus": "Running"}}, namespace="default",
                     patch_type=lightkube.types.PatchType.MERGE)


async def test_example_manifests_reconcile_to_ready(emulator, kube, operator, openai_endpoint: FakeOpenAI):
    await operator()
    started = time.perf_counter()
    for doc in example_docs(openai_endpoint.url):
        await apply(kube, doc)
    rayservice = await eventually(lambda: obj(emulator, "ray.io/v1/rayservices", "invoice-small"))
    await serve_running(kube, "invoice-small")

    def all_ready() -> bool:
        return all((ready(emulator, plural, name) or {}).get("status") == "True" for plural, name in [
            ("modeldeployments", "invoice-small"), ("modeldeployments", "invoice-large"),
            ("vectorindexes", "invoice-docs"), ("budgetpolicies", "invoice-budget"),
            ("autonomousworkflows", "invoice-triage")])

    await eventually(all_ready)
    print(f"example manifests: all Ready in {time.perf_counter() - started:.2f}s")

    # The vLLM tier became a RayService on the GPU pool, owned by its ModelDeployment.
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    pod = workers["template"]["spec"]
    assert pod["nodeSelector"]["pilothouse.io/pool"] == "gpu-small"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 4)
    assert "invoice-small" in rayservice["spec"]["serveConfigV2"]
    assert rayservice["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    assert obj(emulator, "v1/services", "invoice-small") is not None

    # The external tier has no pods and reports the probe.
    large = status(emulator, "modeldeployments", "invoice-large")
    assert large["phase"] == "Ready" and large["endpoint"] == openai_endpoint.url
    assert obj(emulator, "ray.io/v1/rayservices", "invoice-large") is None

    vi = status(emulator, "vectorindexes", "invoice-docs")
    assert vi["activeCollection"] == "invoice_docs_v1" and vi["loaded"] is True and vi["backend"] == "milvus-lite"
    assert status(emulator, "budgetpolicies", "invoice-budget")["state"] == "Ok"

    routing = await eventually(lambda: (t := table(emulator, "invoice-triage")) and not t["degraded"] and t)
    await asyncio.sleep(1.5)  # three health ticks: an unchanged world must not bump the revision
    assert table(emulator, "invoice-triage")["revision"] == routing["revision"]
    assert [b["modelDeployment"] for b in routing["routes"][0]["backends"]] == ["invoice-small", "invoice-large"]
    assert routing["retrieval"][0]["mode"] == "hybrid"
    wf = await eventually(lambda: (w := status(emulator, "autonomousworkflows", "invoice-triage"))
                          and w.get("routingRevision") == routing["revision"] and w)
    assert wf["endpoint"].endswith(":8000/v1") and wf["phase"] == "Ready"
    assert obj(emulator, "apps/v1/deployments", "invoice-triage-gateway") is not None
    # The example sets no shared store: its gateway pods keep their own ledgers and audit trails, and say so.
    ephemeral = next(c for c in wf["conditions"] if c["type"] == "EphemeralStore")
    assert (ephemeral["status"], ephemeral["reason"]) == ("True", "PodLocalStore")

    events = [emulator.objects[e].raw for e in emulator.objects if e[0] == kmock.resource("v1/events")]
    reasons = {e.get("reason") for e in events}
    assert {"ServeRunning", "EndpointHealthy", "CollectionReady"} <= reasons
    assert "PodLocalStore" in {e["reason"] for e in events if e.get("type") == "Warning"
                               and e["involvedObject"]["kind"] == "AutonomousWorkflow"}


async def test_unhealthy_model_switches_routing_to_fallback_and_back(emulator, kube, operator,
                                                                    openai_endpoint: FakeOpenAI):
    await operator()
    for doc in example_docs(openai_endpoint.url):
        await apply(kube, doc)
    await eventually(lambda: obj(emulator, "ray.io/v1/rayservices", "invoice-small"))
    await serve_running(kube, "invoice-small")
    await eventually(lambda: (table(emulator, "invoice-triage") or {}).get("degraded") is False
                     and table(emulator, "invoice-triage")["routes"][0]["backends"][0]["healthy"])
    before = table(emulator, "invoice-triage")["revision"]

    # A worker pod of the small tier cannot be scheduled: no GPU left in the pool.
    await kube.create(codecs.from_dict({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "invoice-small-gpu-0", "namespace": "default",
                     "labels": {"ray.io/originated-from-cr-name": "invoice-small"}},
        "spec": {"containers": [{"name": "w", "image": "x"}]},
    }))
    await kube.patch(RayService.Status, "invoice-small", {"status": {"serviceStatus": "WaitForServeDeploymentReady"}},
                     namespace="default", patch_type=lightkube.types.PatchType.MERGE)
    await kube.patch(Pod.Status, "invoice-small-gpu-0", {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}},
        namespace="default", patch_type=lightkube.types.PatchType.MERGE)

    await eventually(lambda: (ready(emulator, "modeldeployments", "invoice-small") or {}).get("reason")
                     == "InsufficientGPUCapacity")
    degraded = await eventually(lambda: (t := table(emulator, "invoice-triage")) and t["degraded"] and t)
    assert degraded["revision"] == before + 1
    assert degraded["routes"][0]["backends"][0]["modelDeployment"] == "invoice-large"
    assert "invoice-small -> invoice-large" in degraded["activeFallbacks"][0]
    wf = await eventually(lambda: (w := status(emulator, "autonomousworkflows", "invoice-triage"))
                          and w["phase"] == "Degraded" and w)
    assert wf["activeFallbacks"] == degraded["activeFallbacks"]

    # Capacity arrives: back to the primary, new revision again.
    await kube.delete(Pod, "invoice-small-gpu-0", namespace="default")
    await serve_running(kube, "invoice-small")
    recovered = await eventually(lambda: (t := table(emulator, "invoice-triage")) and not t["degraded"] and t)
    assert recovered["revision"] == before + 2
    assert recovered["routes"][0]["backends"][0]["modelDeployment"] == "invoice-small"

    # The external endpoint goes away: EndpointUnreachable, but the primary still leads the route.
    await openai_endpoint.stop()
    await eventually(lambda: (ready(emulator, "modeldeployments", "invoice-large") or {}).get("reason")
                     == "EndpointUnreachable")
    assert table(emulator, "invoice-triage")["routes"][0]["backends"][0]["modelDeployment"] == "invoice-small"


@pytest.mark.parametrize(("policy", "kept"), [("Delete", False), ("Retain", True)])
async def test_vector_index_reclaim_policy_on_delete(emulator, kube, operator, tmp_path: Path, policy: str,
                                                     kept: bool):
    from pymilvus import MilvusClient

    await operator()
    uri = str(tmp_path / "milvus.db")
    await apply(kube, {"apiVersion": "pilothouse.io/v1alpha1", "kind": "VectorIndex",
                       "metadata": {"name": "docs"},
                       "spec": {"milvus": {"uri": uri}, "fields": {"dimension": 8}, "reclaimPolicy": policy}})
    await eventually(lambda: status(emulator, "vectorindexes", "docs").get("phase") == "Ready")
    assert "docs_v1" in MilvusClient(uri=uri).list_collections()
    await kube.delete(GENERIC["VectorIndex"], "docs", namespace="default")
    await eventually(lambda: obj(emulator, "pilothouse.io/v1alpha1/vectorindexes", "docs") is None)
    assert ("docs_v1" in MilvusClient(uri=uri).list_collections()) is kept


async def test_a_milvus_that_stops_answering_degrades_the_index_and_holds_its_deletion(emulator, kube, operator,
                                                                                       tmp_path: Path):
    """A paused Milvus (SIGSTOP: connections open, no answers) is found out by the call deadline: the index
    reports MilvusUnreachable instead of a check hanging on it, and a deletion waits for Milvus, then drops."""
    from pymilvus import MilvusClient

    from tests.milvus_server import MilvusLiteServer

    await operator()
    with MilvusLiteServer(tmp_path / "milvus.db") as server:
        await apply(kube, {"apiVersion": "pilothouse.io/v1alpha1", "kind": "VectorIndex", "metadata": {"name": "docs"},
                           "spec": {"milvus": {"uri": server.uri, "timeoutSeconds": 1}, "fields": {"dimension": 8},
                                    "reclaimPolicy": "Delete"}})
        await eventually(lambda: status(emulator, "vectorindexes", "docs").get("phase") == "Ready")
        server.pause()
        try:
            cond = await eventually(lambda: (c := ready(emulator, "vectorindexes", "docs")) and
                                    c["reason"] == "MilvusUnreachable" and c)
            assert "no answer within 1 s" in cond["message"] and "spec.milvus.timeoutSeconds" in cond["message"]
            assert status(emulator, "vectorindexes", "docs")["phase"] == "Degraded"
            await kube.delete(GENERIC["VectorIndex"], "docs", namespace="default")
            await asyncio.sleep(3)  # several deadlines: the finalizer keeps waiting for Milvus
            assert obj(emulator, "pilothouse.io/v1alpha1/vectorindexes", "docs") is not None
        finally:
            server.resume()
        await eventually(lambda: obj(emulator, "pilothouse.io/v1alpha1/vectorindexes", "docs") is None)
        assert "docs_v1" not in MilvusClient(uri=server.uri).list_collections()


async def test_bad_manifest_reports_invalid_spec_and_operator_keeps_running(emulator, kube, operator,
                                                                           openai_endpoint: FakeOpenAI):
    await operator()
    await apply(kube, {"apiVersion": "pilothouse.io/v1alpha1", "kind": "ModelDeployment",
                       "metadata": {"name": "broken"}, "spec": {"model": {"name": "m"}, "engine": "external"}})
    cond = await eventually(lambda: ready(emulator, "modeldeployments", "broken"))
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "spec.external" in cond["message"]

    await apply(kube, {"apiVersion": "pilothouse.io/v1alpha1", "kind": "ModelDeployment",
                       "metadata": {"name": "fine"},
                       "spec": {"model": {"name": "m"}, "engine": "external",
                                "external": {"url": openai_endpoint.url}}})
    await eventually(lambda: (ready(emulator, "modeldeployments", "fine") or {}).get("status") == "True")

    # A workflow naming a ModelDeployment that does not exist names the field.
    await apply(kube, {"apiVersion": "pilothouse.io/v1alpha1", "kind": "AutonomousWorkflow",
                       "metadata": {"name": "orphan"},
                       "spec": {"mission": "m", "steps": [{"name": "gen", "type": "generate", "generate": {
                           "modelDeploymentRef": "missing", "promptTemplate": "{input}"}}]}})
    cond = await eventually(lambda: ready(emulator, "autonomousworkflows", "orphan"))
    assert cond["reason"] == "DependencyMissing"
    assert "spec.steps[0].generate.modelDeploymentRef" in cond["message"]


async def test_milvus_unreachable_degrades_retrieval_and_recovery_restores_it(emulator, kube, operator,
                                                                              openai_endpoint: FakeOpenAI,
                                                                              tmp_path: Path):
    await operator()
    for doc in example_docs(openai_endpoint.url):
        if doc["kind"] == "VectorIndex":
            doc["spec"]["milvus"] = {"uri": "http://127.0.0.1:9"}
        await apply(kube, doc)
    cond = await eventually(lambda: (c := ready(emulator, "vectorindexes", "invoice-docs")) and
                            c["reason"] == "MilvusUnreachable" and c)
    assert "127.0.0.1:9" in cond["message"]
    assert status(emulator, "vectorindexes", "invoice-docs")["phase"] == "Degraded"
    routing = await eventually(lambda: table(emulator, "invoice-triage"))
    assert routing["retrieval"][0]["mode"] == "keyword-only"
    await eventually(lambda: status(emulator, "autonomousworkflows", "invoice-triage").get("retrievalMode")
                     == "keyword-only")

    # Milvus answers again (here: the spec points at a reachable one) -> hybrid, with the new URI.
    await kube.patch(GENERIC["VectorIndex"], "invoice-docs", {"spec": {"milvus": {"uri": str(tmp_path / "m.db")}}},
                     namespace="default", patch_type=lightkube.types.PatchType.MERGE)
    routing = await eventually(lambda: (t := table(emulator, "invoice-triage")) and t["retrieval"][0]["mode"]
                               == "hybrid" and t)
    assert routing["retrieval"][0]["milvusUri"] == str(tmp_path / "m.db")


async def test_budget_exhausted_downgrades_routing(emulator, kube, operator, openai_endpoint: FakeOpenAI,
                                                   tmp_path: Path):
    import sqlalchemy as sa

    from pilothouse.operator.api.common import now
    from pilothouse.operator.api.ledger import ledger, metadata

    runtime = await operator()
    docs = example_docs(openai_endpoint.url)
    for doc in docs:
        if doc["kind"] == "AutonomousWorkflow":
            doc["spec"]["steps"][1]["generate"]["tier"] = "large"  # route to large, downgrade goes to small
        await apply(kube, doc)
    await eventually(lambda: obj(emulator, "ray.io/v1/rayservices", "invoice-small"))
    await serve_running(kube, "invoice-small")
    await eventually(lambda: (table(emulator, "invoice-triage") or {}).get("routes", [{}])[0].get("tier") == "large")

    engine = sa.create_engine(runtime.config.store_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(ledger.insert(), [{"id": "r1", "namespace": "default", "policy": "invoice-budget",
                                        "state": "committed", "cost_usd": 5.5, "tokens": 1000,
                                        "created_at": now()}])
    await eventually(lambda: status(emulator, "budgetpolicies", "invoice-budget").get("state") == "Exhausted")
    routing = await eventually(lambda: (t := table(emulator, "invoice-triage")) and t.get("budget", {}).get(
        "action") == "downgrade" and t)
    assert routing["routes"][0]["backends"][0]["modelDeployment"] == "invoice-small"
    assert routing["routes"][0]["backends"][0]["role"] == "downgrade"
    await eventually(lambda: status(emulator, "autonomousworkflows", "invoice-triage").get("budgetState")
                     == "Exhausted")




async def test_index_spec_change_reindexes_behind_the_alias(emulator, kube, operator, tmp_path: Path):
    from pymilvus import MilvusClient

    await operator()
    uri = str(tmp_path / "reindex.db")
    await apply(kube, {"apiVersion": "pilothouse.io/v1alpha1", "kind": "VectorIndex", "metadata": {"name": "docs"},
                       "spec": {"milvus": {"uri": uri}, "fields": {"dimension": 4}, "index": {"type": "HNSW"}}})
    await eventually(lambda: status(emulator, "vectorindexes", "docs").get("activeCollection") == "docs_v1")
    client = MilvusClient(uri=uri)
    client.insert("docs", [{"id": f"d{i}", "text": f"invoice {i}", "embedding": [0.1, 0.2, 0.3, float(i)]}
                           for i in range(20)])
    client.flush("docs_v1")

    await kube.patch(GENERIC["VectorIndex"], "docs", {"spec": {"index": {"type": "IVF_FLAT", "nlist": 8}}},
                     namespace="default", patch_type=lightkube.types.PatchType.MERGE)
    vi = await eventually(lambda: (s := status(emulator, "vectorindexes", "docs")).get("activeCollection")
                          == "docs_v2" and s)
    assert vi["rowCount"] == 20 and vi["loaded"] is True and vi["version"] == 2
    assert client.list_collections() == ["docs_v2"]
    assert client.describe_alias("docs")["collection_name"] == "docs_v2"
    assert len(client.query("docs", filter="id != ''", output_fields=["id"], limit=100)) == 20

    def reindexed() -> bool:  # kopf posts the event after the status patch: wait for it, do not race it
        return any("built docs_v2 from docs_v1 (20 rows copied)" in emulator.objects[e].raw.get("message", "")
                   for e in emulator.objects
                   if e[0] == kmock.resource("v1/events") and emulator.objects[e].raw.get("reason") == "Reindexed")

    await eventually(reindexed)


async def test_reconciles_that_find_the_dependency_cache_empty_together_list_it_once(
        emulator: kmock.KubernetesEmulator, kube: lightkube.AsyncClient) -> None:
    """Workflow reconciles read their namespace's ModelDeployments from a cache the watch keeps fresh. At start-up
    many find it empty at once; one listing (and one validation of each model) must serve them all."""
    from pilothouse.operator.api import ModelDeployment
    from pilothouse.operator.health import EndpointProber
    from pilothouse.operator.k8s import ClusterEnv

    for i in range(20):
        await apply(kube, {"apiVersion": "pilothouse.io/v1alpha1", "kind": "ModelDeployment",
                           "metadata": {"name": f"m{i}"},
                           "spec": {"model": {"name": "m"}, "engine": "external",
                                    "external": {"url": "http://127.0.0.1:9/v1"}}})
    env = ClusterEnv(kube, EndpointProber(), spend=None, default_milvus_uri=None)  # type: ignore[arg-type]
    served = emulator.served  # type: ignore[attr-defined]
    listings = await asyncio.gather(*(env.list(ModelDeployment, "default") for _ in range(16)))
    assert emulator.served - served == 1  # type: ignore[attr-defined]
    assert all(sorted(found) == sorted(f"m{i}" for i in range(20)) for found in listings)
    assert await env.list(ModelDeployment, "default") == listings[0] and emulator.served - served == 1  # type: ignore[attr-defined]
