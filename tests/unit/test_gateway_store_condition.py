"""A cluster workflow says in its status whether its gateway's ledger and audit trail outlive the pods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pilothouse.operator import workflow as workflow_reconciler
from pilothouse.operator.conditions import Observation
from pilothouse.operator.local import LocalEnv

from .factories import model, workflow

SHARED = {"storeUrlSecretRef": {"name": "pilothouse-store", "key": "url"}}


async def store_condition(tmp_path: Path, gateway: dict[str, Any], *, in_cluster: bool) -> Observation | None:
    env = LocalEnv(tmp_path / "state")
    env.objects.update({(o.KIND, o.namespace, o.name): o for o in [model("small")]})
    try:
        outcome = await workflow_reconciler.reconcile(workflow(retrieve=False, gateway=gateway), env,
                                                      in_cluster=in_cluster)
    finally:
        await env.prober.aclose()
    assert outcome.phase == "Ready"  # a warning, never a failure: the gateway serves either way
    return next((o for o in outcome.observations if o.type == "EphemeralStore"), None)


async def test_a_gateway_without_a_shared_store_is_reported_and_the_fix_named(tmp_path: Path) -> None:
    found = await store_condition(tmp_path, {}, in_cluster=True)
    assert found is not None and (found.status, found.reason) == (True, "PodLocalStore")
    assert "spec.gateway.storeUrlSecretRef is not set" in found.message and "audit" in found.message


@pytest.mark.parametrize(("gateway", "in_cluster", "expected"), [
    (SHARED, True, (False, "SharedStore")),
    ({}, False, None),  # pilothouse run: the store is a file on this machine, nothing is applied
], ids=["shared-store", "local"])
async def test_a_shared_store_or_a_local_run_is_not_ephemeral(tmp_path: Path, gateway: dict[str, Any],
                                                              in_cluster: bool,
                                                              expected: tuple[bool, str] | None) -> None:
    found = await store_condition(tmp_path, gateway, in_cluster=in_cluster)
    assert (found and (found.status, found.reason)) == expected
