"""ModelDeployment (engine: vllm) → KubeRay RayService running vLLM through ``ray.serve.llm`` + Service.

Pure: spec in, Kubernetes objects out. The operator applies them; the golden tests read them.
"""

from __future__ import annotations

import math
from typing import Any

from .api import ModelDeployment
from .api.model_deployment import Engine

RAY_IMAGE = "rayproject/ray-llm:2.60.0-py311-cu128"
SERVE_PORT = 8000
LABELS = {"app.kubernetes.io/managed-by": "pilothouse", "app.kubernetes.io/part-of": "pilothouse"}


def endpoint(md: ModelDeployment) -> str:
    """The OpenAI-compatible base URL the gateway calls."""
    if md.spec.engine is Engine.EXTERNAL:
        assert md.spec.external is not None
        return md.spec.external.url.rstrip("/")
    return f"http://{md.name}.{md.namespace}.svc:{SERVE_PORT}/v1"


def labels(md: ModelDeployment) -> dict[str, str]:
    return {**LABELS, "app.kubernetes.io/name": md.name, "pilothouse.io/model-deployment": md.name,
            "pilothouse.io/tier": md.spec.tier}


def llm_config(md: ModelDeployment) -> dict[str, Any]:
    """One entry of ray.serve.llm's ``llm_configs``: the model, engine args, replica autoscaling."""
    vllm = md.spec.vllm
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "dtype": vllm.dtype,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        **({"max_model_len": vllm.max_model_len} if vllm.max_model_len else {}),
        **({"quantization": vllm.quantization} if vllm.quantization else {}),
        **({"revision": md.spec.model.revision} if md.spec.model.revision else {}),
        **vllm.extra_args,
    }
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": md.served_model_name, "model_source": md.spec.model.name},
        "engine_kwargs": engine_kwargs,
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": md.spec.replicas.min,
                "max_replicas": md.spec.replicas.max,
                "target_ongoing_requests": md.spec.replicas.target_ongoing_requests,
            },
        },
    }
    # GPU type is enforced by the worker group's nodeSelector; Ray's accelerator_type names
    # (L4, A100-80G) differ from the node labels, so it is not repeated here.
    return config


def worker_pods_per_replica(md: ModelDeployment) -> int:
    per_pod = max(md.spec.node_pool.gpu.count, 1)
    return math.ceil(md.spec.vllm.tensor_parallel_size / per_pod)


def worker_group(md: ModelDeployment, image: str) -> dict[str, Any]:
    pool = md.spec.node_pool
    gpus = str(pool.gpu.count)
    node_selector = dict(pool.node_selector)
    if pool.gpu.type:
        node_selector.setdefault("nvidia.com/gpu.product", pool.gpu.type)
    pod_spec: dict[str, Any] = {
        "containers": [{
            "name": "ray-worker",
            "image": image,
            "resources": {
                "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": gpus},
                "limits": {"memory": "32Gi", "nvidia.com/gpu": gpus},
            },
        }],
        "nodeSelector": node_selector,
        "tolerations": [t.dump() for t in pool.tolerations]
        or [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    if pool.priority_class_name:
        pod_spec["priorityClassName"] = pool.priority_class_name
    per_replica = worker_pods_per_replica(md)
    return {
        "groupName": "gpu",
        "replicas": md.spec.replicas.min * per_replica,
        "minReplicas": md.spec.replicas.min * per_replica,
        "maxReplicas": md.spec.replicas.max * per_replica,
        "rayStartParams": {},
        "template": {"metadata": {"labels": labels(md)}, "spec": pod_spec},
    }


def render(md: ModelDeployment, *, image: str = RAY_IMAGE) -> list[dict[str, Any]]:
    """Children of a ModelDeployment: none for external endpoints, RayService + Service for vLLM."""
    if md.spec.engine is Engine.EXTERNAL:
        return []
    meta = {"name": md.name, "namespace": md.namespace, "labels": labels(md)}
    serve_config = {
        "applications": [{
            "name": "llm",
            "route_prefix": "/",
            "import_path": "ray.serve.llm:build_openai_app",
            "args": {"llm_configs": [llm_config(md)]},
        }],
    }
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta,
        "spec": {
            "serveConfigV2": _yaml(serve_config),
            "rayClusterConfig": {
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"metadata": {"labels": labels(md)}, "spec": {"containers": [{
                        "name": "ray-head",
                        "image": image,
                        "ports": [{"containerPort": SERVE_PORT, "name": "serve"}],
                        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
                    }]}},
                },
                "workerGroupSpecs": [worker_group(md, image)],
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            # KubeRay labels serving pods; this Service keeps a stable name across cluster upgrades.
            "selector": {"ray.io/originated-from-cr-name": md.name, "ray.io/serve": "true"},
            "ports": [{"name": "http", "port": SERVE_PORT, "targetPort": SERVE_PORT}],
        },
    }
    return [rayservice, service]


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
