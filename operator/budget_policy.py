"""Reconcile a BudgetPolicy: limits are validated by the model; state comes from the ledger."""

from __future__ import annotations

import asyncio

from .api import BudgetPolicy
from .api.common import now
from .budget import evaluate
from .env import Env, Outcome


async def reconcile(policy: BudgetPolicy, env: Env) -> Outcome:
    view = await asyncio.to_thread(evaluate, policy, env.spend, now())  # the reader may block on SQL
    tightest = max(view.windows, key=lambda w: w.spent_usd, default=None)
    status = {"state": view.state.value, "windows": [w.dump() for w in view.windows]}
    if tightest is not None:
        status["spentUSD"] = tightest.spent_usd
    return Outcome(status=status, observations=view.observations, phase=view.state.value)
