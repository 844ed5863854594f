"""Renderers against golden files (reviewed by hand; regenerate with PILOTHOUSE_UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pilothouse.operator import render_gateway, render_model
from pilothouse.operator.api import AutonomousWorkflow, ModelDeployment
from pilothouse.operator.routing import Dependencies, compile_table

from .factories import index, model

ROOT = Path(__file__).parents[2]
GOLDEN = Path(__file__).parent / "golden"


def example(kind: str, name: str) -> dict[str, Any]:
    for path in sorted((ROOT / "examples" / "invoice-triage").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise LookupError(name)


def check_golden(name: str, objects: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(objects, sort_keys=True, width=100)
    path = GOLDEN / name
    if os.environ.get("PILOTHOUSE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed: review the diff, then PILOTHOUSE_UPDATE_GOLDEN=1"


def test_vllm_model_renders_rayservice_and_service() -> None:
    md = ModelDeployment.model_validate(example("ModelDeployment", "invoice-small"))
    check_golden("invoice-small.yaml", render_model.render(md))


def test_gpu_count_tolerations_and_tensor_parallel_shape_the_worker_group() -> None:
    doc = example("ModelDeployment", "invoice-small")
    doc["spec"]["vllm"]["tensorParallelSize"] = 4
    doc["spec"]["nodePool"] = {"gpu": {"count": 2}, "priorityClassName": "gpu-high",
                               "tolerations": [{"key": "pool", "operator": "Equal", "value": "a100",
                                                "effect": "NoSchedule"}]}
    doc["spec"]["replicas"] = {"min": 1, "max": 3}
    rayservice, _ = render_model.render(ModelDeployment.model_validate(doc))
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 6)  # two 2-GPU pods per 4-way replica
    pod = group["template"]["spec"]
    assert pod["tolerations"] == [{"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "gpu-high"
    assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "2"
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["llm_configs"][0]["engine_kwargs"]["tensor_parallel_size"] == 4


def test_external_model_has_no_children() -> None:
    md = ModelDeployment.model_validate(example("ModelDeployment", "invoice-large"))
    assert render_model.render(md) == []
    assert render_model.endpoint(md) == "https://api.openai.com/v1"


@pytest.mark.parametrize("mode", ["deployment", "rayservice"])
def test_workflow_renders_routing_configmap_and_gateway(mode: str) -> None:
    doc = example("AutonomousWorkflow", "invoice-triage")
    doc["spec"]["gateway"] = {"mode": mode, "replicas": 2}
    del doc["spec"]["budgetPolicyRef"]
    wf = AutonomousWorkflow.model_validate(doc)
    deps = Dependencies(models={"small": model("small")}, indexes={"invoice-docs": index("invoice-docs")},
                        budgets={}, default_milvus_uri="http://milvus.pilothouse:19530")
    table = compile_table(wf, deps, None, datetime(2026, 1, 1, tzinfo=UTC))
    objects = render_gateway.render(wf, table)
    check_golden(f"invoice-triage-{mode}.yaml", objects)
    configmap = objects[0]
    assert configmap["metadata"]["labels"]["pilothouse.io/routing-revision"] == "1"


def rendered_objects(gateway: dict[str, Any]) -> list[dict[str, Any]]:
    """ConfigMap, gateway (Deployment or RayService) and Service rendered for the example workflow with this
    ``spec.gateway``."""
    doc = example("AutonomousWorkflow", "invoice-triage")
    del doc["spec"]["budgetPolicyRef"]
    doc["spec"]["gateway"] = gateway
    wf = AutonomousWorkflow.model_validate(doc)
    deps = Dependencies(models={"small": model("small")}, indexes={"invoice-docs": index("invoice-docs")},
                        budgets={})
    return render_gateway.render(wf, compile_table(wf, deps, None, datetime(2026, 1, 1, tzinfo=UTC)))


def rendered_gateway(gateway: dict[str, Any]) -> dict[str, Any]:
    return rendered_objects(gateway)[1]


def test_the_gateway_serves_on_the_pod_address_past_serves_ingress_in_a_deployment() -> None:
    """What makes the rendered gateway reachable and fast: all interfaces (a Service and the kubelet's probes
    come in on the pod's address), and a writable /tmp under the read-only root for Ray. A Deployment's pod (one
    replica, the Service spreading requests over pods) is answered on the replica's direct port, past Serve's
    ingress; a RayService keeps Serve's ingress with HAProxy, as ``pilothouse serve --throughput-optimized``."""
    deployment = rendered_objects({"mode": "deployment"})
    rendered = {"deployment": deployment[1], "rayservice": rendered_gateway({"mode": "rayservice"})}
    pod = rendered["deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0" and "--throughput-optimized" not in args
    direct = int(args[args.index("--direct-port") + 1])
    assert direct != int(args[args.index("--port") + 1])
    assert container["ports"] == [{"name": "http", "containerPort": direct}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = deployment[2]
    assert service["spec"]["ports"] == [{"name": "http", "port": render_gateway.PORT, "targetPort": direct}]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    tmp = next(v["name"] for v in pod["volumes"] if "emptyDir" in v)
    assert {"name": tmp, "mountPath": "/tmp"} in container["volumeMounts"]
    head = rendered["rayservice"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head["env"]}
    # The RayService head runs Serve's preset with HAProxy, as `pilothouse serve --throughput-optimized` does.
    assert {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}.items() <= env.items()


@pytest.mark.parametrize("mode", ["deployment", "rayservice"])
def test_the_gateway_gets_its_api_keys_and_store_from_secrets(mode: str) -> None:
    """Without them a cluster gateway takes every caller as tenant default and keeps its ledger in the pod."""
    app = rendered_gateway({"mode": mode, "apiKeysSecret": "gateway-keys",
                            "storeUrlSecretRef": {"name": "pilothouse-store", "key": "url"}})
    pod = (app["spec"]["template"]["spec"] if mode == "deployment"
           else app["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"])
    container = pod["containers"][0]
    assert {"name": "PILOTHOUSE_STORE_URL",
            "valueFrom": {"secretKeyRef": {"name": "pilothouse-store", "key": "url"}}} in container["env"]
    volume = next(v["name"] for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "gateway-keys")
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)
    if mode == "deployment":
        assert container["args"][container["args"].index("--api-keys") + 1] == mount
    else:
        assert yaml.safe_load(app["spec"]["serveConfigV2"])["applications"][0]["args"]["api_keys"] == mount


def test_gateway_gets_backend_keys_from_their_secrets() -> None:
    doc = example("AutonomousWorkflow", "invoice-triage")
    del doc["spec"]["budgetPolicyRef"]
    wf = AutonomousWorkflow.model_validate(doc)
    large = ModelDeployment.model_validate(example("ModelDeployment", "invoice-large"))
    small = model("small", fallback=["invoice-large"])
    deps = Dependencies(models={"small": small, "invoice-large": large},
                        indexes={"invoice-docs": index("invoice-docs")}, budgets={})
    deployment = render_gateway.render(wf, compile_table(wf, deps, None, datetime(2026, 1, 1, tzinfo=UTC)))[1]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "PILOTHOUSE_SECRET_OPENAI_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key"}}}]
