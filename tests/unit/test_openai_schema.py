"""Request validation: every bad body is a 400 in OpenAI's error shape naming the field, never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.responses import JSONResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from pilothouse.serving.openai_schema import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    openai_error,
    parse_body,
    validate_chat,
    validate_completion,
    validate_embedding,
)

USER = [{"role": "user", "content": "Extract the invoice number."}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "wf/extract", "messages": USER, **fields}).encode()


def error(result: object) -> dict[str, Any]:
    assert isinstance(result, JSONResponse), result
    assert result.status_code == 400
    body = json.loads(bytes(result.body))
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


def test_a_valid_chat_request_keeps_unknown_fields_for_the_backend() -> None:
    raw = chat(max_tokens=64, temperature=0, stop=["\n"], stream=True, stream_options={"include_usage": True},
               structured_outputs={"json": {"type": "object"}}, messages=[
                   {"role": "system", "content": "Be terse."},
                   {"role": "user", "content": [{"type": "text", "text": "hi"}], "cache_control": {"x": 1}},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                   {"role": "tool", "content": "42", "tool_call_id": "c1"},
               ])
    parsed = parse_body(raw, ChatRequest)
    assert isinstance(parsed, tuple)
    request, body = parsed
    assert request.max_tokens == 64 and request.requested_tokens == 64 and request.stream is True
    assert body["structured_outputs"] == {"json": {"type": "object"}}
    assert body["messages"][1]["cache_control"] == {"x": 1}
    assert body == json.loads(raw)  # exactly what the client sent is forwarded: no defaults added


@pytest.mark.parametrize("extra", [
    {"seed": 2**70, "metadata": {"id": -(2**80)}},  # integers beyond 64 bits stay integers, digit for digit
    {"tags": json.loads("[" * 300 + "]" * 300)},  # deeper than the fast parser goes
    {"temperature": 1, "top_p": 1.0},  # an integer where a number is expected is forwarded as sent
])
def test_the_body_forwarded_is_the_json_the_client_sent(extra: dict[str, Any]) -> None:
    raw = chat(**extra)
    parsed = parse_body(raw, ChatRequest)
    assert isinstance(parsed, tuple), parsed
    body = parsed[1]
    assert body == json.loads(raw)
    assert json.dumps(body) == json.dumps(json.loads(raw))  # same types too: 1 is not 1.0, 2**70 is not a float


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    request = validate_chat(chat(max_tokens=10, max_completion_tokens=20))
    assert isinstance(request, ChatRequest) and request.requested_tokens == 20


@pytest.mark.parametrize(("raw", "param", "code", "words"), [
    (b"", None, "invalid_json", "empty"),
    (b'{"model": "m", "messages": [', None, "invalid_json", "parse the JSON"),
    (b'{"model": "m", "messages": [], "x": NaN}', None, "invalid_json", "NaN"),
    (b"[1, 2]", None, "invalid_type", "expected a JSON object, but got an array"),
    (b'"hello"', None, "invalid_type", "got a string"),
    (b"\xff\xfe{}", None, "invalid_encoding", "UTF-8"),
    (b"[" * 100_000, None, "invalid_json", "nested too deeply"),
    # an unpaired surrogate escape is JSON, but not text that UTF-8 (a backend, a tokenizer, the audit hash) can carry
    (chat(user="\ud800"), "user", "invalid_encoding", "unpaired UTF-16 surrogate"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a\udc00b"}]}]),
     "messages[0].content[0].text", "invalid_encoding", "'messages[0].content[0].text'"),
    (chat(metadata={"k\ud83d": "v"}), "metadata", "invalid_encoding", "a key of 'metadata'"),
    (json.dumps({"\ud800": 1}).encode(), None, "invalid_encoding", "a key"),
    (json.dumps({"messages": USER}).encode(), "model", "missing_required_parameter", "'model'"),
    (chat(model=""), "model", "empty_string", "empty string"),
    (chat(model=7), "model", "invalid_type", "expected a string, but got a number"),
    (json.dumps({"model": "m"}).encode(), "messages", "missing_required_parameter", "'messages'"),
    (chat(messages=[]), "messages", "empty_array", "empty array"),
    (chat(messages="hi"), "messages", "invalid_type", "expected an array"),
    (chat(messages=["hi"]), "messages[0]", "invalid_type", "expected an object"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "invalid_value", "'robot'"),
    (chat(messages=[{"content": "x"}]), "messages[0].role", "missing_required_parameter", "role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter", "needs content"),
    (chat(messages=[{"role": "assistant"}]), "messages[0].content", "missing_required_parameter", "tool_calls"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type", "content parts"),
    (chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content", "invalid_type", "type"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id", "missing_required_parameter",
     "tool_call_id"),
    (chat(max_tokens=0), "max_tokens", "integer_below_min_value", ">= 1"),
    (chat(max_tokens=-5), "max_tokens", "integer_below_min_value", "-5"),
    (chat(max_tokens="10"), "max_tokens", "invalid_type", "expected an integer, but got a string"),
    (chat(max_tokens=1.5), "max_tokens", "invalid_type", "expected an integer"),
    (chat(max_tokens=True), "max_tokens", "invalid_type", "got a boolean"),
    (chat(max_completion_tokens=0), "max_completion_tokens", "integer_below_min_value", ">= 1"),
    (chat(n=0), "n", "integer_below_min_value", ">= 1"),
    (chat(n=129), "n", "integer_above_max_value", "<= 128"),
    (chat(temperature=2.5), "temperature", "decimal_above_max_value", "<= 2"),
    (chat(temperature="hot"), "temperature", "invalid_type", "expected a number"),
    (chat(top_p=-0.1), "top_p", "decimal_below_min_value", ">= 0"),
    (chat(presence_penalty=3), "presence_penalty", "integer_above_max_value", "<= 2"),
    (chat(stream="yes"), "stream", "invalid_type", "expected a boolean"),
    (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value", "stream is true"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value", "at most 4"),
    (chat(stop=[1]), "stop", "invalid_type", "a string or an array of strings"),
    (chat(logit_bias={"50256": 101}), "logit_bias.50256", "integer_above_max_value", "<= 100"),
    (chat(top_logprobs=21), "top_logprobs", "integer_above_max_value", "<= 20"),
    (chat(tool_choice="sometimes"), "tool_choice", "invalid_value", "'sometimes'"),
    (chat(tool_choice=3), "tool_choice", "invalid_type", "a string or an object"),
    (chat(response_format={"type": "yaml"}), "response_format", "invalid_value", "json_schema"),
    (chat(tools={"type": "function"}), "tools", "invalid_type", "expected an array"),
    (chat(user=5), "user", "invalid_type", "expected a string"),
])
def test_bad_chat_requests_name_the_field(raw: bytes, param: str | None, code: str, words: str) -> None:
    err = error(validate_chat(raw))
    assert (err["param"], err["code"]) == (param, code), err
    assert words in err["message"]
    if param:
        assert f"'{param}'" in err["message"]


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "m"}, "prompt", "missing_required_parameter"),
    ({"model": "m", "prompt": []}, "prompt", "empty_array"),
    ({"model": "m", "prompt": 5}, "prompt", "invalid_type"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt", "invalid_type"),
    ({"model": "m", "prompt": [[1], []]}, "prompt", "invalid_type"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", "integer_below_min_value"),
    ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs", "integer_above_max_value"),
    ({"model": "m", "prompt": "x", "n": 3, "best_of": 2}, "best_of", "invalid_value"),
    ({"model": "m", "prompt": "x", "echo": "no"}, "echo", "invalid_type"),
])
def test_bad_completion_requests_name_the_field(body: dict[str, Any], param: str, code: str) -> None:
    err = error(validate_completion(json.dumps(body).encode()))
    assert (err["param"], err["code"]) == (param, code), err


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_every_prompt_shape_openai_accepts(prompt: object) -> None:
    request = validate_completion(json.dumps({"model": "m", "prompt": prompt, "max_tokens": 5}).encode())
    assert isinstance(request, CompletionRequest) and request.prompt == prompt


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "m"}, "input", "missing_required_parameter"),
    ({"model": "m", "input": []}, "input", "empty_array"),
    ({"model": "m", "input": {"text": "x"}}, "input", "invalid_type"),
    ({"model": "m", "input": ["x"] * 2049}, "input", "invalid_value"),
    ({"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
    ({"model": "m", "input": "x", "dimensions": 0}, "dimensions", "integer_below_min_value"),
])
def test_bad_embedding_requests_name_the_field(body: dict[str, Any], param: str, code: str) -> None:
    err = error(validate_embedding(json.dumps(body).encode()))
    assert (err["param"], err["code"]) == (param, code), err


def test_a_valid_embedding_request() -> None:
    request = validate_embedding(b'{"model": "m", "input": ["a", "b"], "encoding_format": "float"}')
    assert isinstance(request, EmbeddingRequest) and request.input == ["a", "b"]


def test_openai_error_shape_and_default_types() -> None:
    response = openai_error(503, "no table", code="not_ready")
    assert response.status_code == 503
    assert json.loads(bytes(response.body)) == {
        "error": {"message": "no table", "type": "server_error", "param": None, "code": "not_ready"}}
    assert json.loads(bytes(openai_error(401, "x").body))["error"]["type"] == "invalid_request_error"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
FIELDS = ["model", "messages", "max_tokens", "n", "temperature", "stop", "stream", "stream_options", "tools",
          "tool_choice", "logit_bias", "prompt", "input", "encoding_format", "best_of", "logprobs", "response_format"]


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6),
       messages=st.lists(st.dictionaries(st.sampled_from(["role", "content", "tool_call_id", "tool_calls"]), JSON),
                         max_size=2))
def test_arbitrary_json_is_a_model_or_a_400_never_an_exception(body: dict[str, Any],
                                                                messages: list[dict[str, Any]]) -> None:
    body.setdefault("messages", messages)
    raw = json.dumps(body).encode()
    for validate in (validate_chat, validate_completion, validate_embedding):
        result = validate(raw)
        if isinstance(result, JSONResponse):
            error(result)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    result = validate_chat(raw)
    assert isinstance(result, JSONResponse) and result.status_code == 400
