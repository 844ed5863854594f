"""ModelDeployment: one model behind an OpenAI-compatible endpoint, its price and its fallbacks."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from .common import DNS_LABEL, ApiModel, Resource, SecretKeyRef, Status


class Engine(StrEnum):
    VLLM = "vllm"
    EXTERNAL = "external"


class ModelSource(ApiModel):
    """Where the weights come from."""

    name: str = Field(
        min_length=1,
        max_length=512,
        description=(
            "Hugging Face model id (e.g. Qwen/Qwen2.5-7B-Instruct), a local or PVC path "
            "(/models/llama), or an s3:// URI. For engine: external, the model name the endpoint serves."
        ),
    )
    revision: str | None = Field(default=None, description="Model revision (branch, tag or commit).")
    served_model_name: str | None = Field(
        default=None,
        description="Name clients use in the OpenAI `model` field. Defaults to metadata.name.",
    )


class VllmArgs(ApiModel):
    """vLLM engine arguments (engine: vllm)."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs one replica shards over.")
    max_model_len: int | None = Field(
        default=None, ge=128, le=10_000_000, description="Context window in tokens; model default if unset."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="Weight and activation dtype."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Fraction of GPU memory vLLM may use."
    )
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes"] | None = Field(
        default=None, description="Quantization method, if the weights are quantized."
    )
    extra_args: dict[str, str] = Field(
        default_factory=dict, description="Further vLLM engine arguments, passed through verbatim."
    )


class ExternalEndpoint(ApiModel):
    """An OpenAI-compatible endpoint Pilothouse does not run (engine: external)."""

    url: str = Field(
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="Base URL of the OpenAI-compatible API, including /v1 (e.g. https://api.example.com/v1).",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key, sent as a Bearer token."
    )
    context_window: int | None = Field(default=None, ge=128, description="Context window in tokens.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="Request timeout.")


class Toleration(ApiModel):
    """A Kubernetes toleration, copied onto the GPU worker pods."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Gpu(ApiModel):
    type: str | None = Field(
        default=None,
        description="GPU product (e.g. NVIDIA-A100-SXM4-80GB); becomes a nodeSelector on nvidia.com/gpu.product.",
    )
    count: int = Field(default=1, ge=0, le=16, description="GPUs per replica (nvidia.com/gpu requests).")


class NodePool(ApiModel):
    """Where vLLM replicas are scheduled."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pods tolerate.")
    gpu: Gpu = Field(default_factory=Gpu, description="GPU type and count per replica.")
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the worker pods.")


class Replicas(ApiModel):
    min: int = Field(default=1, ge=0, le=1000, description="Replicas kept running (0 scales to zero).")
    max: int = Field(default=1, ge=1, le=1000, description="Upper bound for autoscaling.")
    target_ongoing_requests: int = Field(
        default=16, ge=1, le=10_000, description="Autoscaling target: in-flight requests per replica."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must be <= replicas.max ({self.max})")
        return self


class Pricing(ApiModel):
    """What one token costs, for budgets and cost-aware routing."""

    input_per_million_usd: float = Field(
        default=0.0, ge=0, alias="inputPerMillionUSD", description="USD per 1M prompt tokens."
    )
    output_per_million_usd: float = Field(
        default=0.0, ge=0, alias="outputPerMillionUSD", description="USD per 1M completion tokens."
    )
    gpu_hour_usd: float | None = Field(
        default=None,
        ge=0,
        alias="gpuHourUSD",
        description="USD per GPU-hour, for reporting the cost of self-hosted replicas.",
    )


class Rollout(ApiModel):
    canary_weight: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Percent of its tier's traffic the gateway sends here while it is a canary (0 = off).",
    )


class ModelDeploymentSpec(ApiModel):
    model: ModelSource = Field(description="The model to serve.")
    engine: Engine = Field(
        default=Engine.VLLM,
        description="vllm: Pilothouse runs vLLM on Ray Serve (KubeRay RayService). "
        "external: an OpenAI-compatible endpoint run elsewhere; no pods.",
    )
    vllm: VllmArgs = Field(default_factory=VllmArgs, description="vLLM engine arguments (engine: vllm).")
    external: ExternalEndpoint | None = Field(
        default=None, description="The endpoint to call (required for engine: external)."
    )
    node_pool: NodePool = Field(default_factory=NodePool, description="GPU node pool (engine: vllm).")
    replicas: Replicas = Field(default_factory=Replicas, description="Replica bounds and autoscaling target.")
    tier: str = Field(
        default="default",
        pattern=DNS_LABEL,
        max_length=63,
        description="Routing tier (e.g. small, large); workflows route steps to tiers.",
    )
    pricing: Pricing = Field(default_factory=Pricing, description="Cost per token.")
    fallback: list[Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]] = Field(
        default_factory=list,
        max_length=8,
        description="Ordered ModelDeployment names (same namespace) to use when this one is unhealthy.",
    )
    rollout: Rollout = Field(default_factory=Rollout, description="Canary settings.")

    @model_validator(mode="after")
    def _engine_blocks(self) -> Self:
        if self.engine is Engine.EXTERNAL and self.external is None:
            raise ValueError("spec.external is required when spec.engine is 'external' (set spec.external.url)")
        if self.engine is Engine.VLLM and self.external is not None:
            raise ValueError("spec.external is only valid with spec.engine: external; remove it or change engine")
        if len(set(self.fallback)) != len(self.fallback):
            raise ValueError("spec.fallback lists a ModelDeployment twice; each name may appear once")
        return self

    @property
    def context_window(self) -> int | None:
        if self.engine is Engine.EXTERNAL:
            assert self.external is not None
            return self.external.context_window
        return self.vllm.max_model_len


class ModelDeploymentStatus(Status):
    phase: Literal["Pending", "Ready", "Degraded", "Failed"] | None = Field(
        default=None, description="Pending, Ready, Degraded or Failed."
    )
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL of the model.")
    ready_replicas: int | None = Field(default=None, description="Replicas serving traffic.")


class ModelDeployment(Resource):
    """A model served by vLLM on a GPU node pool, or an external OpenAI-compatible endpoint."""

    KIND: ClassVar[str] = "ModelDeployment"
    PLURAL: ClassVar[str] = "modeldeployments"
    SHORT_NAMES: ClassVar[list[str]] = ["md", "mdep"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]] = [
        {"name": "Engine", "type": "string", "jsonPath": ".spec.engine"},
        {"name": "Tier", "type": "string", "jsonPath": ".spec.tier"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        {"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].reason"},
    ]
    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "self.spec.engine != 'external' || has(self.spec.external)",
            "message": "spec.external is required when spec.engine is 'external'",
            "fieldPath": ".spec.external",
        },
        {
            "rule": "self.spec.engine != 'vllm' || !has(self.spec.external)",
            "message": "spec.external is only valid with spec.engine: external",
            "fieldPath": ".spec.external",
        },
        {
            "rule": "!has(self.spec.replicas) || self.spec.replicas.min <= self.spec.replicas.max",
            "message": "spec.replicas.min must be <= spec.replicas.max",
            "fieldPath": ".spec.replicas",
        },
        {
            "rule": "!has(self.spec.fallback) || !(self.metadata.name in self.spec.fallback)",
            "message": "spec.fallback must not name the ModelDeployment itself",
            "fieldPath": ".spec.fallback",
        },
    ]

    kind: Literal["ModelDeployment"] = "ModelDeployment"
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None

    @model_validator(mode="after")
    def _no_self_fallback(self) -> Self:
        if self.metadata.name in self.spec.fallback:
            raise ValueError(f"spec.fallback names this ModelDeployment ({self.metadata.name}) itself; remove it")
        return self

    @property
    def served_model_name(self) -> str:
        return self.spec.model.served_model_name or self.metadata.name
