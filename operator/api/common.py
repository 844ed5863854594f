"""Shared building blocks of the Pilothouse API (group ``pilothouse.io``, version ``v1alpha1``).

Every kind is a pydantic model whose JSON schema *is* the CRD schema (see ``crdgen``), so field
descriptions are written for ``kubectl explain`` and validation lives here, once: the CRD carries
the structural part and CEL rules, the operator and ``pilothouse run`` re-check the same model.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "pilothouse.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, not silently lost."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=False,
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The object as it is written to the API server: camelCase, no unset optionals."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SecretKeyRef(ApiModel):
    """A key in a Secret in the same namespace as the object that refers to it."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253)
    key: str = Field(description="Key inside the Secret whose value is used.", min_length=1)

    @property
    def env_var(self) -> str:
        """The environment variable carrying this value where no Secret API is at hand: the gateway
        (the operator renders it from the Secret) and local mode (the user exports it)."""
        return f"PILOTHOUSE_SECRET_{self.name}_{self.key}".upper().replace("-", "_").replace(".", "_")


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


ConditionType = Literal["Ready", "Progressing", "Degraded", "EphemeralStore"]
"""Every condition type, in the order a status lists them."""


class Condition(ApiModel):
    """A Kubernetes-style condition: the latest observation of one aspect of the object."""

    type: ConditionType = Field(
        description="Aspect observed: Ready, Progressing or Degraded; on an AutonomousWorkflow in a cluster also "
        "EphemeralStore (True: its gateway pods keep their ledger and audit trail in their own /tmp)."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="CamelCase machine-readable cause, e.g. PodsNotReady or MilvusUnreachable.",
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        max_length=1024,
    )
    message: str = Field(default="", description="Human-readable detail: what happened and what to do.")
    last_transition_time: datetime = Field(
        description="When the status last changed (not when it was last checked).",
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


class ObjectMeta(ApiModel):
    """The part of Kubernetes metadata that Pilothouse reads; everything else passes through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)
    namespace: str = Field(default="default", pattern=DNS_LABEL)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


class Status(ApiModel):
    """Fields every Pilothouse status has, in the KubeRay / Kubernetes API conventions."""

    # Status is written by controllers, not users: keys another controller added are not errors.
    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(default=None, description="The metadata.generation this status describes.")
    phase: str | None = Field(default=None, description="One-word summary for `kubectl get`.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded conditions with reasons.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class Resource(ApiModel):
    """Base of the four kinds: apiVersion/kind/metadata/spec/status."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[list[str]]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]]
    CEL_RULES: ClassVar[list[dict[str, str]]] = []

    api_version: Literal["pilothouse.io/v1alpha1"] = Field(default=API_VERSION)
    kind: str
    metadata: ObjectMeta

    @classmethod
    def status_type(cls) -> type[Status]:
        """The kind's status model (the non-None member of its ``status`` annotation)."""
        return next(a for a in get_args(cls.model_fields["status"].annotation) if a is not type(None))

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
