"""Reconcile a ModelDeployment: render its children and report honest health."""

from __future__ import annotations

from .api import ModelDeployment
from .api.model_deployment import Engine
from .conditions import Observation
from .env import Env, Outcome
from .health import PROBE_TIMEOUT_S
from .render_model import endpoint, render


async def reconcile(md: ModelDeployment, env: Env) -> Outcome:
    if md.spec.engine is Engine.EXTERNAL:
        assert md.spec.external is not None
        ref = md.spec.external.api_key_secret_ref
        key = await env.secret(md.namespace, ref) if ref else None
        if ref and key is None:
            return Outcome(
                phase="Failed",
                observations=[Observation(
                    "Ready", False, "SecretMissing",
                    f"spec.external.apiKeySecretRef: Secret {ref.name!r} key {ref.key!r} not found; create it in "
                    f"this namespace (pilothouse run: a Secret manifest beside the others, or the environment "
                    f"variable {ref.env_var})")],
                retry_after=30,
            )
        health = await env.prober.probe(md.spec.external.url, key,
                                        timeout=min(md.spec.external.timeout_seconds, PROBE_TIMEOUT_S))
    else:
        health = await env.vllm_health(md)
    progressing = Observation("Progressing", not health.ready and health.reason == "PodsNotReady",
                              "Rollout" if not health.ready else "Stable",
                              health.message if not health.ready else "")
    status = {"endpoint": health.endpoint or endpoint(md)}
    if health.ready_replicas is not None:
        status["readyReplicas"] = health.ready_replicas
    phase = "Ready" if health.ready else ("Pending" if health.reason == "PodsNotReady" else "Degraded")
    return Outcome(status=status, observations=[*health.observations(), progressing],
                   children=render(md), phase=phase)
