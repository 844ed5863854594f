"""Semantic cache, the parts without Milvus: what is embedded, what must match exactly, what may be stored,
the API knobs and their validation, the compiled RoutingTable rule, and the metrics' bounded labels.

The cache itself, on Milvus Lite with the real MiniLM, is tests/integration/test_semantic_cache.py.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from pilothouse.operator.manifests import describe
from pilothouse.operator.routing import Dependencies, check_refs, compile_table
from pilothouse.serving.engines import CHAT, COMPLETIONS, EMBEDDINGS
from pilothouse.serving.metrics import OTHER, Metrics
from pilothouse.serving.semantic_cache import (
    collection_name,
    normalise_text,
    semantic_key,
    split_prompt,
    storable,
)

from .factories import index, model, workflow

ROUTE = "support/answer"
CHAT_BODY: dict[str, Any] = {
    "model": ROUTE, "temperature": 0, "max_tokens": 64,
    "messages": [{"role": "system", "content": "You are the help desk."},
                 {"role": "user", "content": "How do I reset my password?"}],
}


def key(body: dict[str, Any] = CHAT_BODY, **kw: Any) -> Any:
    return semantic_key(kw.pop("tenant", "team-a"), kw.pop("route", ROUTE), body, **kw)


def asked(text: str, body: dict[str, Any] = CHAT_BODY) -> dict[str, Any]:
    return {**body, "messages": [*body["messages"][:-1], {"role": "user", "content": text}]}


# ---- what is compared by meaning ----------------------------------------------------------------------


def test_text_normalisation_ignores_spacing_and_unicode_forms() -> None:
    assert normalise_text("  How  do\tI\n reset ") == "How do I reset"
    assert normalise_text("ﬁle\u00a0name") == "file name"  # NFKC ligature, no-break space
    assert normalise_text("Reset?") != normalise_text("reset?")  # case is the embedding model's business


def test_only_the_last_user_message_is_embedded_the_rest_is_exact() -> None:
    text, rest = split_prompt(CHAT_BODY, CHAT)
    assert text == "How do I reset my password?"
    assert rest["messages"] == [{"role": "system", "content": "You are the help desk."}, {"role": "user"}]
    assert "model" not in rest and rest["temperature"] == 0


def test_text_parts_are_joined_other_parts_are_not_cached() -> None:
    parts = [{"type": "text", "text": "How do I"}, {"type": "text", "text": "reset my password?"}]
    assert split_prompt(asked(parts), CHAT)[0] == "How do I reset my password?"  # type: ignore[arg-type]
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x"}}]
    assert split_prompt(asked(image), CHAT) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("messages", [
    [], [{"role": "assistant", "content": "Hi"}], [{"role": "tool", "content": "42", "tool_call_id": "t"}],
    [{"role": "user", "content": "   "}], [{"role": "user", "content": None}], ["not a message"],
])
def test_requests_without_a_plain_last_user_turn_are_not_cached(messages: list[Any]) -> None:
    assert split_prompt({**CHAT_BODY, "messages": messages}, CHAT) is None


def test_completions_take_one_string_prompt_embeddings_none() -> None:
    body = {"model": ROUTE, "prompt": "Capital of France?", "temperature": 0}
    assert split_prompt(body, COMPLETIONS) == ("Capital of France?", {"temperature": 0})
    assert split_prompt({**body, "prompt": ["Capital of France?"]}, COMPLETIONS)[0] == "Capital of France?"  # type: ignore[index]
    assert split_prompt({**body, "prompt": ["a", "b"]}, COMPLETIONS) is None
    assert split_prompt({**body, "prompt": [1, 2, 3]}, COMPLETIONS) is None  # token ids
    assert key({"model": ROUTE, "input": "x"}, endpoint=EMBEDDINGS) is None


# ---- what must match exactly --------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"user": "alice"}, {"stream": True}, {"model": "other"}, {"n": 1},
                                   {"temperature": 0.0}, {"metadata": {"x": 1}}])
def test_fields_that_do_not_change_the_answer_keep_the_scope(extra: dict[str, Any]) -> None:
    assert key({**CHAT_BODY, **extra}) == key(CHAT_BODY)


@pytest.mark.parametrize("change", [
    {"max_tokens": 65}, {"seed": 1}, {"top_p": 0.5}, {"stop": ["\n"]}, {"response_format": {"type": "json_object"}},
    {"messages": [{"role": "system", "content": "You are a pirate."}, CHAT_BODY["messages"][1]]},
    {"messages": [CHAT_BODY["messages"][1]]},
    {"messages": [CHAT_BODY["messages"][0], {"role": "user", "content": "How do I reset my password?", "name": "b"}]},
])
def test_everything_else_that_changes_the_answer_changes_the_scope(change: dict[str, Any]) -> None:
    changed = key({**CHAT_BODY, **change})
    assert changed.scope != key().scope and changed.id != key().id


def test_route_endpoint_embedder_and_tenant_partition_the_key() -> None:
    base = key()
    assert key(route="support/other").scope != base.scope
    assert key(embedder_id="another-model").scope != base.scope
    completion = key({"prompt": "How do I reset my password?", "temperature": 0, "max_tokens": 64},
                     endpoint=COMPLETIONS)
    assert completion.scope != base.scope
    other = key(tenant="team-b")
    assert other.tenant != base.tenant and other.scope == base.scope and other.id != base.id


def test_a_paraphrase_has_the_same_scope_and_its_own_entry() -> None:
    para = key(asked("How can I reset my password?"))
    assert para.scope == key().scope and para.id != key().id
    assert key(asked("How  do I reset my password? ")) == key()


def test_the_filter_is_built_from_digests_only() -> None:
    hostile = key(tenant='x" or tenant != "', route='" or 1 == 1 or "')
    assert re.fullmatch(r'tenant == "[0-9a-f]{64}" and scope == "[0-9a-f]{64}"', hostile.filter)


def test_sampled_requests_only_when_forced_and_never_when_off() -> None:
    sampled = {**CHAT_BODY, "temperature": 0.7}
    assert key(sampled) is None and key({k: v for k, v in CHAT_BODY.items() if k != "temperature"}) is None
    assert key(sampled, mode="force") is not None
    assert key({**sampled, "seed": 3}) is not None
    assert key(mode="off") is None


def test_long_prompts_are_not_cached() -> None:
    """The embedding model truncates: two long prompts differing at the end would look the same."""
    assert key(asked("x" * 512)) is not None
    assert key(asked("x" * 513)) is None
    assert key(asked("x" * 513), max_prompt_chars=2000) is not None


def test_collection_names_are_milvus_identifiers() -> None:
    assert collection_name("team-a", "invoice-triage") == "pilothouse_semcache_team_a_invoice_triage"


# ---- what may be stored -------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "body", "ok"), [
    (200, b'{"choices": []}', True),
    (500, b'{"choices": []}', False),
    (429, b'{"error": {"message": "slow down"}}', False),
    (200, b'{"error": {"message": "upstream failed"}}', False),
    (200, b"data: {}\n\n", False),  # a stream's raw frames, not an assembled answer
    (200, b"[1, 2]", False),
    (200, b"\xff\xfe", False),
    (200, b'{"x": "' + b"a" * 70_000 + b'"}', False),  # larger than a Milvus VARCHAR
])
def test_only_successful_json_answers_that_fit_are_stored(status: int, body: bytes, ok: bool) -> None:
    assert (storable(status, body) is not None) is ok


# ---- the API ------------------------------------------------------------------------------------------


def semantic(**fields: Any) -> Any:
    return workflow(cache={"semantic": {"enabled": True, **fields}})


def test_defaults() -> None:
    s = semantic().spec.cache.semantic
    assert (s.threshold, s.ttl_seconds, s.max_entries_per_tenant, s.embedding) == (0.95, 3600, 10_000, None)
    assert workflow().spec.cache.semantic.enabled is False


@pytest.mark.parametrize(("fields", "where", "says"), [
    ({"threshold": 0}, "spec.cache.semantic.threshold", "greater than 0"),
    ({"threshold": 1.5}, "spec.cache.semantic.threshold", "less than or equal to 1"),
    ({"ttlSeconds": 0}, "spec.cache.semantic.ttlSeconds", "greater than or equal to 1"),
    ({"maxEntriesPerTenant": 0}, "spec.cache.semantic.maxEntriesPerTenant", "greater than or equal to 1"),
    ({"embedding": {"modelDeploymentRef": "embedder"}}, "spec.cache.semantic", "dimension is required"),
    ({"embedding": {"modelDeploymentRef": "e", "localPath": "/m"}, "dimension": 8}, "spec.cache.semantic.embedding",
     "exactly one"),
    ({"treshold": 0.9}, "spec.cache.semantic.treshold", "Extra inputs"),
])
def test_bad_settings_name_the_field(fields: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        semantic(**fields)
    lines = describe(caught.value)
    assert any(line.startswith(f"{where}:") and says in line for line in lines), lines


def deps(*models: Any, default_milvus_uri: str | None = None) -> Dependencies:
    return Dependencies(models={m.name: m for m in models}, indexes={"docs": index()}, budgets={},
                        default_milvus_uri=default_milvus_uri)


AT = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_table_carries_the_rule_only_when_enabled() -> None:
    assert compile_table(workflow(), deps(model("small")), None, AT).semantic_cache is None
    rule = compile_table(semantic(threshold=0.97, ttlSeconds=60), deps(model("small"), default_milvus_uri="http://m:1"),
                         None, AT).semantic_cache
    assert rule is not None
    assert (rule.threshold, rule.ttl_seconds, rule.milvus_uri, rule.embedding_backend) == (0.97, 60, "http://m:1", None)
    own = compile_table(semantic(milvus={"uri": "http://cache:19530"}), deps(model("small"), default_milvus_uri="x"),
                        None, AT).semantic_cache
    assert own is not None and own.milvus_uri == "http://cache:19530"


def test_an_embedding_model_deployment_is_resolved_to_its_endpoint() -> None:
    wf = semantic(embedding={"modelDeploymentRef": "embedder"}, dimension=768)
    rule = compile_table(wf, deps(model("small"), model("embedder", tier="embed")), None, AT).semantic_cache
    assert rule is not None and rule.dimension == 768 and rule.embedding_backend is not None
    assert rule.embedding_backend.endpoint == "http://embedder.example/v1"
    assert rule.embedding_backend.model == "org/embedder"


def test_a_missing_embedding_model_deployment_names_the_field() -> None:
    problems = check_refs(semantic(embedding={"modelDeploymentRef": "nope"}, dimension=8), deps(model("small")))
    assert [(p.field, p.reason) for p in problems] == [
        ("spec.cache.semantic.embedding.modelDeploymentRef", "DependencyMissing")]


def test_changing_the_cache_settings_bumps_the_revision() -> None:
    d = deps(model("small"))
    first = compile_table(semantic(), d, None, AT)
    assert compile_table(semantic(), d, first, AT).revision == first.revision
    assert compile_table(semantic(threshold=0.9), d, first, AT).revision == first.revision + 1


# ---- metrics ------------------------------------------------------------------------------------------


def test_metric_labels_stay_bounded() -> None:
    m = Metrics()
    m.allow(routes=[ROUTE])
    m.semantic_lookup(ROUTE, "hit", 0.003, similarity=0.97)
    for i in range(20):
        m.semantic_lookup(f"made-up-{i}", f"weird-{i}")
        m.semantic_store(f"made-up-{i}", f"weird-{i}")
        m.semantic_evicted(f"why-{i}", 1)
    m.semantic_evicted("bound", 0)  # nothing evicted: no series
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(m.render()[0].decode()) for s in family.samples}
    assert samples[("pilothouse_semantic_cache_lookups_total", (("result", "hit"), ("route", ROUTE)))] == 1
    assert samples[("pilothouse_semantic_cache_lookups_total", (("result", OTHER), ("route", OTHER)))] == 20
    assert samples[("pilothouse_semantic_cache_stores_total", (("result", OTHER), ("route", OTHER)))] == 20
    assert samples[("pilothouse_semantic_cache_evictions_total", (("reason", OTHER),))] == 20
    assert ("pilothouse_semantic_cache_evictions_total", (("reason", "bound"),)) not in samples
    assert samples[("pilothouse_semantic_cache_similarity_bucket", (("le", "0.97"),))] == 1
    assert samples[("pilothouse_semantic_cache_similarity_bucket", (("le", "0.96"),))] == 0
