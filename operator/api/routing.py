"""RoutingTable: the one document the control plane writes and the data plane reads (DESIGN.md §5).

The gateway never asks the Kubernetes API anything: everything it needs to route a request, fall
back, pick the retrieval mode and enforce a budget is in here, with the reason for each choice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .common import ApiModel, SecretKeyRef


class BackendPricing(ApiModel):
    input_per_million_usd: float = Field(alias="inputPerMillionUSD")
    output_per_million_usd: float = Field(alias="outputPerMillionUSD")


class Backend(ApiModel):
    model_deployment: str = Field(description="ModelDeployment name.")
    engine: Literal["vllm", "external"]
    endpoint: str | None = Field(description="OpenAI-compatible base URL; None until the model reports one.")
    model: str = Field(description="Value to send in the OpenAI `model` field.")
    tier: str
    pricing: BackendPricing
    context_window: int | None = None
    api_key_secret_ref: SecretKeyRef | None = None
    healthy: bool
    role: Literal["primary", "fallback", "downgrade"]
    reason: str = Field(description="Why this backend holds this place in the order.")


class Route(ApiModel):
    step: str = Field(description="Generate step the route serves, or retrieve step whose re-rank model it serves; "
                      "clients call model '<workflow>/<step>'.")
    tier: str
    backends: list[Backend] = Field(description="Try in order; healthy first.")
    max_tokens: int


class Retrieval(ApiModel):
    step: str
    vector_index: str
    collection: str | None = Field(description="Milvus alias to query.")
    milvus_uri: str | None
    mode: Literal["hybrid", "dense", "keyword", "keyword-only"]
    top_k: int
    reason: str


class BudgetLimit(ApiModel):
    window: Literal["hour", "day", "month"]
    max_cost_usd: float | None = Field(default=None, alias="maxCostUSD")
    max_tokens: int | None = None


class BudgetRule(ApiModel):
    policy: str
    state: Literal["Ok", "Warning", "Exhausted", "Unknown"]
    action: Literal["none", "downgrade", "queue", "reject"] = Field(
        description="What the gateway does now: none while budget remains, else the policy's onExhausted."
    )
    downgrade_tier: str | None = None
    queue_timeout_seconds: int | None = None
    per_request_max_cost_usd: float | None = Field(default=None, alias="perRequestMaxCostUSD")
    per_request_max_tokens: int | None = None
    limits: list[BudgetLimit] = Field(default_factory=list, description="Window caps the ledger enforces.")


class SemanticCacheRule(ApiModel):
    """The workflow's ``spec.cache.semantic``, resolved to what the gateway needs to open the cache."""

    threshold: float = Field(gt=0, le=1)
    ttl_seconds: int = Field(ge=1)
    max_entries_per_tenant: int = Field(ge=1)
    milvus_uri: str | None = Field(description="None: a Milvus Lite file in the gateway's state directory.")
    milvus_token_secret_ref: SecretKeyRef | None = None
    milvus_database: str = "default"
    milvus_timeout_seconds: float = Field(default=10.0, gt=0, description="Deadline of each Milvus call.")
    embedding_local_path: str | None = Field(
        default=None, description="sentence-transformers directory; None (and no backend): all-MiniLM-L6-v2."
    )
    embedding_backend: Backend | None = Field(default=None, description="ModelDeployment serving /v1/embeddings.")
    dimension: int | None = Field(default=None, description="Vector size of embeddingBackend's model.")


class RoutingTable(ApiModel):
    api_version: Literal["pilothouse.io/v1alpha1"] = "pilothouse.io/v1alpha1"
    kind: Literal["RoutingTable"] = "RoutingTable"
    workflow: str
    namespace: str
    revision: int = Field(ge=1, description="Increases by one whenever routing content changes.")
    generated_at: datetime
    degraded: bool
    active_fallbacks: list[str] = Field(default_factory=list)
    routes: list[Route]
    retrieval: list[Retrieval] = Field(default_factory=list)
    budget: BudgetRule | None = None
    audit_store_prompts: bool = False
    audit_store_outputs: bool = False
    semantic_cache: SemanticCacheRule | None = Field(default=None, description="None: no semantic cache.")

    def content_key(self) -> str:
        """Everything that matters for routing; the revision bumps only when this changes."""
        return self.model_dump_json(exclude={"revision", "generated_at"}, by_alias=True)
