"""Fixtures for the e2e suite: a real cluster with Pilothouse installed, or a skip that says what to do.

A cluster is usable when lightkube finds a configuration (in-cluster service account, $KUBECONFIG,
~/.kube/config), ``GET /version`` answers within 5 s and the pilothouse.io CRDs are established.
Each test then gets its own namespace, deleted at teardown.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import lightkube
import pytest
import pytest_asyncio
from lightkube import ALL_NS
from lightkube.config import client_adapter
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Namespace

from pilothouse.operator.api import GROUP, KINDS

NO_CLUSTER = "no Kubernetes cluster: set KUBECONFIG, or install kind and a Docker engine and run `make e2e`"
NO_CRDS = "pilothouse CRDs not installed: run make e2e or helm install charts/pilothouse"
NO_KUBERAY = ("KubeRay CRDs not installed (rayservices.ray.io): kubectl apply --server-side -k "
              "'github.com/ray-project/kuberay/ray-operator/config/crd?ref=v1.3.0'")
NO_OPERATOR = ("pilothouse operator not running: run make e2e or helm install charts/pilothouse "
               "(set PILOTHOUSE_E2E_OPERATOR=external when you run `pilothouse operator` yourself)")
VERSION_TIMEOUT = 5.0
OPERATOR_LABELS = {"app.kubernetes.io/name": "pilothouse", "app.kubernetes.io/component": "operator"}


@dataclass(frozen=True)
class Cluster:
    config: lightkube.KubeConfig
    version: str
    kuberay: bool  # rayservices.ray.io is established
    operator: bool  # an operator Deployment is Available (or PILOTHOUSE_E2E_OPERATOR=external)


def _established(client: lightkube.Client, name: str) -> bool:
    try:
        crd = client.get(CustomResourceDefinition, name)
    except ApiError as exc:
        if exc.status.code == 404:
            return False
        raise
    conditions = (crd.status.conditions if crd.status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _operator_available(client: lightkube.Client) -> bool:
    if os.environ.get("PILOTHOUSE_E2E_OPERATOR") == "external":
        return True
    try:
        deployments = list(client.list(Deployment, namespace=ALL_NS, labels=OPERATOR_LABELS))
    except ApiError as exc:
        if exc.status.code == 403:
            return True  # not allowed to look: assume it runs, the scenarios will tell
        raise
    return any((d.status.availableReplicas or 0) >= 1 for d in deployments if d.status)


def probe_cluster() -> Cluster:
    """The cluster to test against, or ``pytest.skip`` with what to install or set."""
    try:
        config = lightkube.KubeConfig.from_env()
        single = config.get()
    except (ConfigError, OSError) as exc:
        pytest.skip(f"{NO_CLUSTER} ({exc})")
    try:
        params = client_adapter.ConnectionParams(timeout=VERSION_TIMEOUT)
        with client_adapter.Client(single, params) as http:
            response = http.get("/version")
            response.raise_for_status()
            version = response.json().get("gitVersion", "?")
    except Exception as exc:
        pytest.skip(f"{NO_CLUSTER} (GET {single.cluster.server}/version: {type(exc).__name__}: {exc})")

    with lightkube.Client(config=config, field_manager="pilothouse-e2e") as client:
        missing = [f"{kind.PLURAL}.{GROUP}" for kind in KINDS
                   if not _established(client, f"{kind.PLURAL}.{GROUP}")]
        if missing:
            pytest.skip(f"{NO_CRDS} (missing: {', '.join(missing)})")
        return Cluster(config=config, version=version, kuberay=_established(client, "rayservices.ray.io"),
                       operator=_operator_available(client))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """Session-wide: probed once; a skip here skips every e2e test with the same reason."""
    return probe_cluster()


@pytest.fixture
def operator_running(cluster: Cluster) -> Cluster:
    """Scenarios that need the operator to reconcile."""
    if not cluster.operator:
        pytest.skip(NO_OPERATOR)
    return cluster


@pytest.fixture
def kuberay(operator_running: Cluster) -> Cluster:
    """Scenarios whose ModelDeployment becomes a RayService."""
    if not operator_running.kuberay:
        pytest.skip(NO_KUBERAY)
    return operator_running


@pytest_asyncio.fixture()
async def kube(cluster: Cluster) -> AsyncIterator[lightkube.AsyncClient]:
    client = lightkube.AsyncClient(config=cluster.config, field_manager="pilothouse-e2e")
    yield client
    await client.close()


@pytest_asyncio.fixture()
async def namespace(kube: lightkube.AsyncClient) -> AsyncIterator[str]:
    """A fresh namespace per test; deleted (with everything in it) at teardown."""
    name = f"ph-e2e-{uuid.uuid4().hex[:8]}"
    await kube.create(Namespace(metadata=ObjectMeta(
        name=name, labels={"app.kubernetes.io/part-of": "pilothouse-e2e"})))
    yield name
    try:
        await kube.delete(Namespace, name)
    except ApiError as exc:
        if exc.status.code != 404:
            raise
