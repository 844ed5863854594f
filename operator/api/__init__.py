"""The Pilothouse API: pydantic models that are the single source of truth for the CRDs."""

from .budget_policy import BudgetPolicy, BudgetState
from .common import API_VERSION, GROUP, VERSION, Condition, Resource
from .model_deployment import Engine, ModelDeployment
from .routing import RoutingTable
from .vector_index import VectorIndex
from .workflow import AutonomousWorkflow

KINDS: tuple[type[Resource], ...] = (ModelDeployment, VectorIndex, BudgetPolicy, AutonomousWorkflow)
BY_KIND: dict[str, type[Resource]] = {k.KIND: k for k in KINDS}

__all__ = [
    "API_VERSION",
    "BY_KIND",
    "GROUP",
    "KINDS",
    "VERSION",
    "AutonomousWorkflow",
    "BudgetPolicy",
    "BudgetState",
    "Condition",
    "Engine",
    "ModelDeployment",
    "Resource",
    "RoutingTable",
    "VectorIndex",
]
