"""AutonomousWorkflow → its RoutingTable ConfigMap and the gateway application that serves it.

The gateway watches the mounted ConfigMap file and hot-reloads on a new revision, so a routing
change never restarts pods: the Deployment template deliberately does not hash the table.
"""

from __future__ import annotations

from typing import Any

import yaml

from .api import AutonomousWorkflow, RoutingTable
from .api.gateway import STORE_URL_ENV, THROUGHPUT_OPTIMIZED_ENV
from .render_model import LABELS

GATEWAY_IMAGE = "ghcr.io/pilothouse/pilothouse:0.1.0"
PORT = 8000
SERVE_PORT = 8001
"""Serve's own ingress in a Deployment's gateway pod. The pod's traffic (the Service, the probes) comes in on
``PORT``, the gateway replica's direct port (``serving/direct.py``): with one replica a pod and the Service
spreading requests over pods, Serve's ingress would add its per-request wrapper and a proxy hop and route nowhere
else (``bench/serve_share.py``). A RayService keeps Serve's ingress, which routes across the cluster's replicas."""
ROUTING_FILE = "routing.json"
MOUNT = "/etc/pilothouse/routing"
KEYS_MOUNT = "/etc/pilothouse/api-keys"


def routing_configmap(workflow: str) -> str:
    return f"{workflow}-routing"


def names(wf: AutonomousWorkflow) -> dict[str, str]:
    return {"configmap": routing_configmap(wf.name), "gateway": f"{wf.name}-gateway"}


def endpoint(wf: AutonomousWorkflow) -> str:
    return f"http://{names(wf)['gateway']}.{wf.namespace}.svc:{PORT}/v1"


def _labels(wf: AutonomousWorkflow) -> dict[str, str]:
    return {**LABELS, "app.kubernetes.io/name": "pilothouse-gateway", "pilothouse.io/workflow": wf.name}


def configmap(wf: AutonomousWorkflow, table: RoutingTable) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": names(wf)["configmap"], "namespace": wf.namespace,
                     "labels": {**_labels(wf), "pilothouse.io/routing-revision": str(table.revision)}},
        "data": {ROUTING_FILE: table.model_dump_json(by_alias=True, indent=2)},
    }


def _secret_env(wf: AutonomousWorkflow, table: RoutingTable) -> list[dict[str, Any]]:
    """Backend API keys and the store's URL, from their Secrets into the variables the gateway reads."""
    refs = {b.api_key_secret_ref.env_var: b.api_key_secret_ref for r in table.routes for b in r.backends
            if b.api_key_secret_ref is not None}
    if wf.spec.gateway.store_url_secret_ref is not None:
        refs[STORE_URL_ENV] = wf.spec.gateway.store_url_secret_ref
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            for name, ref in sorted(refs.items())]


def _keys_file(wf: AutonomousWorkflow) -> str | None:
    """Where the gateway reads its API keys: the ``apiKeysSecret`` mounted, or None (no authentication)."""
    return KEYS_MOUNT if wf.spec.gateway.api_keys_secret else None


def _mounts(wf: AutonomousWorkflow) -> list[dict[str, Any]]:
    keys = [{"name": "api-keys", "mountPath": path, "readOnly": True}] if (path := _keys_file(wf)) else []
    return [{"name": "routing", "mountPath": MOUNT, "readOnly": True}, *keys]


def _container(wf: AutonomousWorkflow, table: RoutingTable, image: str) -> dict[str, Any]:
    return {
        "name": "gateway",
        "image": image,
        # All interfaces: the Service and the kubelet's probes come in on the pod's address.
        "args": ["serve", "--routing", f"{MOUNT}/{ROUTING_FILE}", "--host", "0.0.0.0", "--port", str(SERVE_PORT),
                 "--direct-port", str(PORT), *(["--api-keys", path] if (path := _keys_file(wf)) else [])],
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": _secret_env(wf, table),
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        # The root filesystem is read-only; Ray's session, HAProxy's config and the SQLite store live in /tmp.
        "volumeMounts": [*_mounts(wf), {"name": "tmp", "mountPath": "/tmp"}],
    }


def _volumes(wf: AutonomousWorkflow) -> list[dict[str, Any]]:
    secret = wf.spec.gateway.api_keys_secret
    keys = [{"name": "api-keys", "secret": {"secretName": secret}}] if secret else []
    return [{"name": "routing", "configMap": {"name": names(wf)["configmap"]}}, *keys]


def render(wf: AutonomousWorkflow, table: RoutingTable, *, image: str = GATEWAY_IMAGE) -> list[dict[str, Any]]:
    """ConfigMap + (Deployment | RayService) + Service for one workflow."""
    n = names(wf)
    meta = {"name": n["gateway"], "namespace": wf.namespace, "labels": _labels(wf)}
    selector = {"app.kubernetes.io/name": "pilothouse-gateway", "pilothouse.io/workflow": wf.name}
    if wf.spec.gateway.mode == "deployment":
        app: dict[str, Any] = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": wf.spec.gateway.replicas,
                "selector": {"matchLabels": selector},
                "template": {"metadata": {"labels": _labels(wf)}, "spec": {
                    "containers": [_container(wf, table, image)],
                    "volumes": [*_volumes(wf), {"name": "tmp", "emptyDir": {}}],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                }},
            },
        }
        service_selector = selector
    else:
        serve = {"applications": [{
            "name": "gateway", "route_prefix": "/", "import_path": "pilothouse.serving.serve:app_builder",
            "args": {"routing": f"{MOUNT}/{ROUTING_FILE}", **({"api_keys": path} if (path := _keys_file(wf)) else {})},
            "deployments": [{"name": "Gateway", "num_replicas": wf.spec.gateway.replicas}],
        }]}
        env = [{"name": k, "value": v} for k, v in THROUGHPUT_OPTIMIZED_ENV.items()] + _secret_env(wf, table)
        head = {"name": "ray-head", "image": image,  # the Pilothouse image carries Ray Serve
                "ports": [{"containerPort": PORT, "name": "serve"}], "env": env, "volumeMounts": _mounts(wf)}
        app = {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": meta,
            "spec": {
                "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
                "rayClusterConfig": {"headGroupSpec": {"rayStartParams": {}, "template": {
                    "metadata": {"labels": _labels(wf)}, "spec": {"containers": [head], "volumes": _volumes(wf)},
                }}},
            },
        }
        service_selector = {"ray.io/originated-from-cr-name": n["gateway"], "ray.io/serve": "true"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"selector": service_selector, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]},
    }
    return [configmap(wf, table), app, service]
