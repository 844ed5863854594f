"""AutonomousWorkflow: a narrow mission with SLOs, run as retrieve → generate → validate → act → review."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from .common import DNS_LABEL, ApiModel, Resource, SecretKeyRef, Status
from .vector_index import Embedding, MilvusConnection


class StepType(StrEnum):
    RETRIEVE = "retrieve"
    GENERATE = "generate"
    VALIDATE = "validate"
    ACT = "act"
    REVIEW = "review"


RERANK_MAX_TOKENS = 1
"""A ModelDeployment re-ranks by answering "yes" or "no": one token, which is also its route's cap."""


class Rerank(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.modelDeploymentRef) != has(self.localPath)",
                 "message": "set exactly one of modelDeploymentRef or localPath"},
            ]
        }
    )

    model_deployment_ref: str | None = Field(
        default=None, pattern=DNS_LABEL,
        description="Chat ModelDeployment that scores candidates by P(yes) for 'is this passage relevant?'.",
    )
    local_path: str | None = Field(
        default=None, min_length=1,
        description="Local sentence-transformers cross-encoder directory, on the machine running the workflow.",
    )
    top_n: int = Field(default=5, ge=1, le=100, description="Candidates kept after re-ranking.")

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.model_deployment_ref is None) == (self.local_path is None):
            raise ValueError("retrieve.rerank needs exactly one of modelDeploymentRef or localPath")
        return self


class RetrieveStep(ApiModel):
    vector_index_ref: str = Field(pattern=DNS_LABEL, description="VectorIndex to search (same namespace).")
    top_k: int = Field(default=5, ge=1, le=100, description="Chunks returned.")
    mode: Literal["hybrid", "dense", "keyword"] = Field(
        default="hybrid", description="hybrid: dense + BM25 fused with RRF; dense; keyword (BM25 only)."
    )
    filter: str | None = Field(default=None, description="Milvus boolean filter on metadata fields.")
    rerank: Rerank | None = Field(default=None, description="Optional re-rank of the fused candidates.")


class GenerateStep(ApiModel):
    model_deployment_ref: str | None = Field(
        default=None, pattern=DNS_LABEL, description="Pin one ModelDeployment (its fallback chain still applies)."
    )
    tier: str | None = Field(
        default=None,
        pattern=DNS_LABEL,
        description="Route to the ModelDeployments of this tier (default: spec.routing.defaultTier).",
    )
    prompt_template: str = Field(
        min_length=1, description="Prompt; {input} and {context} are replaced by the document and retrieval."
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON schema the output must satisfy (guided decoding where the engine supports it).",
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )
    max_tokens: int = Field(default=512, ge=1, le=131_072, description="Completion token cap.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature.")

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if self.model_deployment_ref and self.tier:
            raise ValueError("generate step sets both modelDeploymentRef and tier; keep one")
        return self


class ValidateStep(ApiModel):
    min_confidence: float = Field(default=0.8, ge=0, le=1, description="Below this, the run goes to review.")
    field_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-field confidence thresholds that override minConfidence."
    )
    required_fields: list[str] = Field(default_factory=list, description="Fields that must be present.")

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        bad = {k: v for k, v in self.field_thresholds.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"validate.fieldThresholds must be within [0, 1]: {bad}")
        return self


class Webhook(ApiModel):
    url: str = Field(pattern=r"^https?://\S+$", description="Endpoint called with the validated output.")
    method: Literal["POST", "PUT", "PATCH", "DELETE"] = Field(default="POST", description="HTTP method.")
    timeout_seconds: float = Field(default=10, gt=0, le=300, description="Request timeout.")
    headers_secret_ref: SecretKeyRef | None = Field(default=None, description="Secret with extra headers (JSON).")


class SqlWrite(ApiModel):
    url_secret_ref: SecretKeyRef | None = Field(default=None, description="Secret holding the database URL.")
    url: str | None = Field(default=None, description="Database URL (SQLAlchemy); prefer urlSecretRef.")
    statement: str = Field(min_length=1, description="Parameterised statement, e.g. INSERT ... VALUES (:vendor).")
    setup: list[str] = Field(
        default_factory=list,
        description="Idempotent DDL run before the first write, e.g. CREATE TABLE IF NOT EXISTS ...",
    )


class Action(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.webhook) != has(self.sql)", "message": "set exactly one of webhook or sql"},
            ]
        }
    )

    webhook: Webhook | None = None
    sql: SqlWrite | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.webhook is None) == (self.sql is None):
            raise ValueError("an action needs exactly one of webhook or sql")
        return self


class ActStep(Action):
    idempotency_key: str = Field(
        default="{run_id}-{step}", description="Template of the key sent with the action; one effect per key."
    )
    risk: Literal["low", "high"] = Field(default="low", description="high: a human approves before acting.")
    compensation: Action | None = Field(default=None, description="Undoes the action if a later step fails.")


class ReviewStep(ApiModel):
    when: Literal["lowConfidence", "highRisk", "always"] = Field(
        default="lowConfidence", description="Which runs park in the human review queue."
    )
    timeout_hours: float = Field(default=72, gt=0, le=8760, description="After this, the run is rejected.")


class Step(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": f"self.type != '{t}' || has(self.{t})", "message": f"a step of type {t} needs a {t} block"}
                for t in ("retrieve", "generate", "act")
            ]
        }
    )

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Step name, unique in the workflow.")
    type: StepType = Field(description="retrieve, generate, validate, act or review.")
    retrieve: RetrieveStep | None = None
    generate: GenerateStep | None = None
    validate_: ValidateStep | None = Field(default=None, alias="validate")
    act: ActStep | None = None
    review: ReviewStep | None = None

    @model_validator(mode="after")
    def _block_matches_type(self) -> Self:
        blocks = {
            "retrieve": self.retrieve,
            "generate": self.generate,
            "validate": self.validate_,
            "act": self.act,
            "review": self.review,
        }
        if self.type in ("retrieve", "generate", "act") and blocks[self.type] is None:
            raise ValueError(f"step {self.name!r} has type {self.type} but no {self.type} block")
        extra = [k for k, v in blocks.items() if v is not None and k != self.type]
        if extra:
            raise ValueError(f"step {self.name!r} of type {self.type} must not set {', '.join(extra)}")
        return self


class Slo(ApiModel):
    automation_rate: float | None = Field(default=None, ge=0, le=1, description="Runs completed without a human.")
    precision: float | None = Field(default=None, ge=0, le=1, description="Field precision target.")
    recall: float | None = Field(default=None, ge=0, le=1, description="Field recall target.")
    p95_latency_seconds: float | None = Field(default=None, gt=0, description="p95 run latency target.")
    max_review_rate: float | None = Field(default=None, ge=0, le=1, description="Upper bound on review rate.")


class Routing(ApiModel):
    default_tier: str = Field(
        default="default",
        pattern=DNS_LABEL,
        description="Tier of generate steps that name neither a ModelDeployment nor a tier.",
    )
    fallback: bool = Field(default=True, description="Follow ModelDeployment fallback chains when unhealthy.")


class DegradedMode(ApiModel):
    model: Literal["fallback", "fail"] = Field(
        default="fallback", description="A model is unhealthy: use its fallback chain, or fail requests."
    )
    retrieval: Literal["keywordOnly", "fail"] = Field(
        default="keywordOnly", description="The vector store is unhealthy: BM25 over the local copy, or fail."
    )


class Audit(ApiModel):
    retention_days: int = Field(default=30, ge=1, le=3650, description="Days audit records are kept.")
    store_prompts: bool = Field(default=False, description="Store prompts verbatim (else only hashes).")
    store_outputs: bool = Field(default=False, description="Store outputs verbatim (else only hashes).")


class Gateway(ApiModel):
    mode: Literal["deployment", "rayservice"] = Field(
        default="deployment", description="Run the gateway as a Deployment or as a KubeRay RayService. A "
        "Deployment's pods (one gateway replica each, the Service spreading requests over them) answer on the "
        "replica's own port, past Ray Serve's per-request ingress; a RayService answers through Serve's ingress "
        "with HAProxy, which routes across the cluster's replicas."
    )
    replicas: int = Field(
        default=1, ge=1, le=100,
        description="Gateway replicas. A replica runs its request path on one event loop, so it saturates near "
        "one CPU core: give it one replica per core it may use (2 replicas on 2 cores served 22% more requests "
        "per second than 1, bench/README.md).",
    )
    api_keys_secret: str | None = Field(
        default=None, min_length=1, max_length=253,
        description="Secret (this namespace) of the gateway's API keys: one key per tenant, named after the "
        "tenant, holding its keys one per line; rotations apply without a restart. Empty: no authentication, "
        "every caller is tenant default.",
    )
    store_url_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key (this namespace) holding the SQLAlchemy URL of the store the gateway's ledger, "
        "audit and idempotency keys write: the PostgreSQL the operator reads spend from (--store-url), shared "
        "by every replica. Empty: each gateway pod keeps a SQLite file in its /tmp, so budget caps apply per "
        "pod, the operator reports no spend and a replaced pod's audit records are lost (condition "
        "EphemeralStore=True).",
    )


class SemanticCache(ApiModel):
    """Answer a request with the stored answer to a paraphrase of it: same tenant, route and sampling
    parameters (exact), last user message alike by embedding. Only deterministic requests (temperature 0
    or a seed), only successful answers."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!has(self.embedding) || !has(self.embedding.modelDeploymentRef) || has(self.dimension)",
                 "message": "dimension is required with embedding.modelDeploymentRef"},
                {"rule": "!has(self.embedding) || "
                         "has(self.embedding.modelDeploymentRef) != has(self.embedding.localPath)",
                 "message": "embedding needs exactly one of modelDeploymentRef or localPath"},
            ]
        }
    )

    enabled: bool = Field(default=False, description="Look requests the exact-match cache missed up by meaning.")
    threshold: float = Field(
        default=0.95, gt=0, le=1,
        description="Cosine similarity from which a cached answer is served. With all-MiniLM-L6-v2 paraphrases "
        "score 0.94-0.99, but 'What is 2+2?' vs 'What is 2+3?' 0.89: lower it with care.",
    )
    ttl_seconds: int = Field(
        default=3600, ge=1, le=2_592_000, description="How long an answer is served (at most 30 days)."
    )
    max_entries_per_tenant: int = Field(
        default=10_000, ge=1, le=1_000_000, description="Oldest entries of a tenant beyond this are evicted."
    )
    milvus: MilvusConnection = Field(
        default_factory=MilvusConnection,
        description="Where the cache collection lives. Empty uri: the operator's default Milvus, else a Milvus "
        "Lite file in the gateway's state directory (one replica only).",
    )
    embedding: Embedding | None = Field(
        default=None, description="Model that embeds prompts. Default: the offline all-MiniLM-L6-v2 (384-d)."
    )
    dimension: int | None = Field(
        default=None, ge=2, le=32_768,
        description="Vector size of the embedding model; required with embedding.modelDeploymentRef.",
    )

    @model_validator(mode="after")
    def _dimension_known(self) -> Self:
        if self.embedding and self.embedding.model_deployment_ref and self.dimension is None:
            raise ValueError("dimension is required with embedding.modelDeploymentRef: set it to the vector size "
                             "that model returns")
        return self


class Cache(ApiModel):
    semantic: SemanticCache = Field(default_factory=SemanticCache, description="Semantic cache on Milvus.")


class AutonomousWorkflowSpec(ApiModel):
    mission: str = Field(min_length=1, max_length=4096, description="What the workflow is for, in one sentence.")
    slo: Slo = Field(default_factory=Slo, description="Targets the status reports against.")
    steps: list[Step] = Field(min_length=1, max_length=32, description="Steps, run in order.")
    routing: Routing = Field(default_factory=Routing, description="Tier defaults and fallback.")
    budget_policy_ref: str | None = Field(default=None, pattern=DNS_LABEL, description="BudgetPolicy to enforce.")
    degraded_mode: DegradedMode = Field(default_factory=DegradedMode, description="Behaviour per failed dependency.")
    audit: Audit = Field(default_factory=Audit, description="Audit retention and content policy.")
    gateway: Gateway = Field(default_factory=Gateway, description="How the gateway serving it runs.")
    cache: Cache = Field(
        default_factory=Cache,
        description="Response caching beyond the gateway's exact-match cache (always on for deterministic requests).",
    )

    @model_validator(mode="after")
    def _steps(self) -> Self:
        names = [s.name for s in self.steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"spec.steps has duplicate step names {dupes}; names must be unique")
        if not any(s.type is StepType.GENERATE for s in self.steps):
            raise ValueError("spec.steps needs at least one step of type generate")
        return self


class SloStatus(ApiModel):
    automation_rate: float | None = None
    review_rate: float | None = None
    compensation_rate: float | None = None
    p95_latency_seconds: float | None = None
    cost_per_run_usd: float | None = Field(default=None, alias="costPerRunUSD")
    runs: int | None = None


class AutonomousWorkflowStatus(Status):
    phase: Literal["Pending", "Ready", "Degraded", "Failed"] | None = None
    endpoint: str | None = Field(default=None, description="Gateway base URL serving this workflow.")
    routing_revision: int | None = Field(default=None, description="Revision of the compiled RoutingTable.")
    retrieval_mode: Literal["hybrid", "keyword-only", "none"] | None = Field(default=None)
    budget_state: str | None = Field(default=None, description="State of the referenced BudgetPolicy.")
    active_fallbacks: list[str] = Field(default_factory=list, description="Degraded-mode decisions in force.")
    slo: SloStatus | None = Field(default=None, description="Measured SLO figures.")


class AutonomousWorkflow(Resource):
    """A narrow mission with SLOs; compiled into a RoutingTable served by the gateway."""

    KIND: ClassVar[str] = "AutonomousWorkflow"
    PLURAL: ClassVar[str] = "autonomousworkflows"
    SHORT_NAMES: ClassVar[list[str]] = ["awf", "workflow"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]] = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Revision", "type": "integer", "jsonPath": ".status.routingRevision"},
        {"name": "Retrieval", "type": "string", "jsonPath": ".status.retrievalMode"},
        {"name": "Budget", "type": "string", "jsonPath": ".status.budgetState"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    ]

    kind: Literal["AutonomousWorkflow"] = "AutonomousWorkflow"
    spec: AutonomousWorkflowSpec
    status: AutonomousWorkflowStatus | None = None

    def model_refs(self) -> list[tuple[str, str]]:
        """(field path, ModelDeployment name) for every direct model reference."""
        refs: list[tuple[str, str]] = []
        for i, step in enumerate(self.spec.steps):
            if step.generate and step.generate.model_deployment_ref:
                refs.append((f"spec.steps[{i}].generate.modelDeploymentRef", step.generate.model_deployment_ref))
            if step.retrieve and step.retrieve.rerank and step.retrieve.rerank.model_deployment_ref:
                refs.append(
                    (f"spec.steps[{i}].retrieve.rerank.modelDeploymentRef", step.retrieve.rerank.model_deployment_ref)
                )
        embedding = self.spec.cache.semantic.embedding
        if embedding and embedding.model_deployment_ref:
            refs.append(("spec.cache.semantic.embedding.modelDeploymentRef", embedding.model_deployment_ref))
        return refs

    def index_refs(self) -> list[tuple[str, str]]:
        return [
            (f"spec.steps[{i}].retrieve.vectorIndexRef", s.retrieve.vector_index_ref)
            for i, s in enumerate(self.spec.steps)
            if s.retrieve
        ]
