"""BudgetPolicy: spend limits per request and per time window, and what happens when they run out."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from .common import DNS_LABEL, ApiModel, Resource, Status


class Window(StrEnum):
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class BudgetState(StrEnum):
    OK = "Ok"
    WARNING = "Warning"
    EXHAUSTED = "Exhausted"


class Scope(ApiModel):
    """Whose spend counts. All set fields must match (AND)."""

    team: str | None = Field(
        default=None, description="Value of the pilothouse.io/team label on workflows and API keys."
    )
    workflow_selector: dict[str, str] | None = Field(
        default=None, description="matchLabels selecting AutonomousWorkflows in the policy's namespace."
    )


class Limit(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.maxCostUSD) || has(self.maxTokens)",
                    "message": "a limit needs maxCostUSD or maxTokens",
                },
            ]
        }
    )

    window: Window = Field(description="hour, day or month (calendar, UTC).")
    max_cost_usd: float | None = Field(
        default=None, gt=0, alias="maxCostUSD", description="Spend cap in USD for the window."
    )
    max_tokens: int | None = Field(default=None, gt=0, description="Token cap (prompt + completion).")

    @model_validator(mode="after")
    def _some_cap(self) -> Self:
        if self.max_cost_usd is None and self.max_tokens is None:
            raise ValueError(f"spec.limits[{self.window}] needs maxCostUSD or maxTokens")
        return self


class PerRequest(ApiModel):
    max_cost_usd: float | None = Field(
        default=None, gt=0, alias="maxCostUSD", description="Worst-case cost cap per request."
    )
    max_tokens: int | None = Field(default=None, gt=0, description="prompt + max_tokens cap per request.")


class OnExhausted(ApiModel):
    action: Literal["downgrade", "queue", "reject"] = Field(
        default="reject",
        description="downgrade: route to downgradeTier; queue: wait up to queueTimeoutSeconds for budget; "
        "reject: HTTP 429 naming this policy, the window and when it resets.",
    )
    downgrade_tier: str | None = Field(
        default=None, pattern=DNS_LABEL, description="Cheaper tier to use (action: downgrade)."
    )
    queue_timeout_seconds: int | None = Field(
        default=None, ge=1, le=3600, description="Longest wait for budget (action: queue)."
    )

    @model_validator(mode="after")
    def _action_fields(self) -> Self:
        if self.action == "downgrade" and not self.downgrade_tier:
            raise ValueError("spec.onExhausted.downgradeTier is required when action is 'downgrade'")
        if self.action == "queue" and self.queue_timeout_seconds is None:
            raise ValueError("spec.onExhausted.queueTimeoutSeconds is required when action is 'queue'")
        return self


class BudgetPolicySpec(ApiModel):
    scope: Scope = Field(default_factory=Scope, description="Whose spend counts (always this namespace).")
    limits: list[Limit] = Field(
        default_factory=list,
        max_length=3,
        description="Caps per window; at most one per window.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["window"]},
    )
    per_request: PerRequest | None = Field(default=None, description="Caps for a single request.")
    on_exhausted: OnExhausted = Field(default_factory=OnExhausted, description="What to do at the cap.")
    warn_at: float = Field(default=0.8, gt=0, lt=1, description="Fraction of a cap that raises Warning.")

    @model_validator(mode="after")
    def _windows_unique(self) -> Self:
        windows = [limit.window for limit in self.limits]
        if len(set(windows)) != len(windows):
            raise ValueError("spec.limits has two entries for the same window; merge them")
        if not self.limits and self.per_request is None:
            raise ValueError("spec needs at least one of limits or perRequest")
        return self


class WindowSpend(ApiModel):
    window: Window
    spent_usd: float = Field(default=0.0, alias="spentUSD")
    spent_tokens: int = 0
    remaining_usd: float | None = Field(default=None, alias="remainingUSD")
    remaining_tokens: int | None = None
    resets_at: str | None = Field(default=None, description="RFC 3339 start of the next window.")


class BudgetPolicyStatus(Status):
    phase: Literal["Ok", "Warning", "Exhausted", "Invalid"] | None = None
    state: BudgetState | None = Field(default=None, description="Ok, Warning or Exhausted.")
    windows: list[WindowSpend] = Field(default_factory=list, description="Spend and remaining per window.")
    spent_usd: float | None = Field(
        default=None, alias="spentUSD", description="Spend in the tightest window, for kubectl get."
    )


class BudgetPolicy(Resource):
    """Money and token limits for a team or workflows, enforced by the gateway's ledger."""

    KIND: ClassVar[str] = "BudgetPolicy"
    PLURAL: ClassVar[str] = "budgetpolicies"
    SHORT_NAMES: ClassVar[list[str]] = ["bp", "budget"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]] = [
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Spend", "type": "number", "jsonPath": ".status.spentUSD"},
        {"name": "OnExhausted", "type": "string", "jsonPath": ".spec.onExhausted.action"},
    ]
    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "!has(self.spec.onExhausted) || self.spec.onExhausted.action != 'downgrade' "
            "|| has(self.spec.onExhausted.downgradeTier)",
            "message": "spec.onExhausted.downgradeTier is required when action is 'downgrade'",
            "fieldPath": ".spec.onExhausted.downgradeTier",
        },
        {
            "rule": "!has(self.spec.onExhausted) || self.spec.onExhausted.action != 'queue' "
            "|| has(self.spec.onExhausted.queueTimeoutSeconds)",
            "message": "spec.onExhausted.queueTimeoutSeconds is required when action is 'queue'",
            "fieldPath": ".spec.onExhausted.queueTimeoutSeconds",
        },
        {
            "rule": "(has(self.spec.limits) && size(self.spec.limits) > 0) || has(self.spec.perRequest)",
            "message": "spec needs at least one of limits or perRequest",
            "fieldPath": ".spec.limits",
        },
    ]

    kind: Literal["BudgetPolicy"] = "BudgetPolicy"
    spec: BudgetPolicySpec
    status: BudgetPolicyStatus | None = None
