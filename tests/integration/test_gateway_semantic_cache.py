"""The semantic cache as a gateway client sees it: a paraphrase of an answered question comes back from
the cache (marked, free, audited, the backend not called), another tenant's paraphrase does not.

Real Milvus Lite (a file in the test's directory) and the offline all-MiniLM-L6-v2, behind the gateway
app of tests/unit/test_gateway_requests.py with its fake backends.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from pilothouse.operator.api.routing import SemanticCacheRule
from tests.unit.test_gateway_requests import B, fakes, gateway, make_table  # noqa: F401  (fakes: a fixture)

pytestmark = pytest.mark.integration


def ask(text: str) -> dict[str, Any]:
    return {"model": "wf/extract", "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}


async def test_a_paraphrase_is_answered_from_the_semantic_cache_per_tenant(tmp_path: Path, fakes: Any) -> None:  # noqa: F811
    primary, fallback = fakes
    rule = SemanticCacheRule(threshold=0.9, ttl_seconds=600, max_entries_per_tenant=100,
                             milvus_uri=str(tmp_path / "semantic.db"))
    table = make_table(primary, fallback).model_copy(update={"semantic_cache": rule})
    async with gateway(tmp_path, table) as gw:
        first = await gw.post(ask("How do I reset my password?"))  # loads the table, starts opening the cache
        assert first.status_code == 200 and "x-pilothouse-cache" not in first.headers
        deadline = time.monotonic() + 120
        while gw.app.state.dataplane.semantic is None:  # the embedding model loads in the background
            assert time.monotonic() < deadline, "semantic cache never opened"
            await asyncio.sleep(0.2)

        answered = await gw.post(ask("How do I reset my password?"))  # exact cache: the first answer
        assert answered.headers["x-pilothouse-cache"] == "hit"
        fresh = await gw.post(ask("What is the procedure for resetting my password?"))
        assert fresh.status_code == 200 and "x-pilothouse-cache" not in fresh.headers
        served = primary.served["/v1/chat/completions"]

        hit = None
        while time.monotonic() < deadline:  # stored after the response went out: poll, never sleep blindly
            hit = await gw.post(ask("How can I reset my password?"))
            if hit.headers.get("x-pilothouse-cache") == "semantic":
                break
            served = primary.served["/v1/chat/completions"]
            await asyncio.sleep(0.2)
        assert hit is not None and hit.headers.get("x-pilothouse-cache") == "semantic", hit and hit.headers
        assert hit.headers["x-pilothouse-cost-usd"] == "0"
        assert primary.served["/v1/chat/completions"] == served  # the backend was not asked again
        record = gw.audit(hit)
        assert record.cache_hit and record.routing.reason.startswith("semantic cache hit (similarity ")

        other = await gw.post(ask("How can I reset my password?"), headers=B)
        assert other.status_code == 200 and other.headers.get("x-pilothouse-cache") is None
        assert primary.served["/v1/chat/completions"] == served + 1  # tenant B got its own answer
