"""The three OpenAI request bodies the gateway accepts, validated so bad input is the caller's 4xx, never our 500.

Issue 3 ("Bad input") asks that malformed JSON, wrong types, ``max_tokens`` <= 0, empty
``messages`` and the like each get a 4xx naming the field, in OpenAI's error shape, so that every
OpenAI SDK raises its usual ``BadRequestError`` with a message the user can act on. The models are
*strict* (``"10"`` is not an integer, ``1`` is not a boolean) because the backends behind the
gateway are: a request we let through would fail there, later, with a less helpful message and
after a budget reservation. Fields we do not model (new OpenAI parameters, vLLM's extras such as
``structured_outputs``) are kept and forwarded untouched: the gateway must not be the reason a
client cannot use a backend feature.

Only the first problem is reported, like OpenAI does; ``param`` names it as OpenAI would
(``messages[0].role``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError, from_json

from .audit import UNPAIRED_SURROGATE
from .engines import CHAT, COMPLETIONS, EMBEDDINGS

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "error_object",
    "openai_error",
    "parse_body",
    "parse_request",
    "validate_chat",
    "validate_completion",
    "validate_embedding",
]

ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
               409: "invalid_request_error", 429: "rate_limit_exceeded"}


def openai_error(status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in OpenAI's shape, which every OpenAI SDK turns into its typed exception.

    ``type`` defaults by status: ``invalid_request_error`` for 4xx, ``server_error`` for 5xx.
    """
    if type is None:
        type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_object(message, type, param, code), status_code=status, headers=headers)


def error_object(message: str, type: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object, as a response body or as the last event of a stream that cannot go on."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- the request models -------------------------------------------------------------------------------------

Penalty = Annotated[float, Field(ge=-2, le=2)]
Count = Annotated[int, Field(ge=1, le=128)]  # OpenAI's bound on n
Positive = Annotated[int, Field(ge=1)]
Bias = dict[str, Annotated[float, Field(ge=-100, le=100)]]


class _Strict(BaseModel):
    """Strict types, unknown fields kept (and forwarded) rather than rejected."""

    model_config = ConfigDict(strict=True, extra="allow")


class OpenAIRequest(_Strict):
    model: Annotated[str, Field(min_length=1)]
    user: str | None = None


def _kind(value: object) -> str:
    """JSON's name for a value's type, as OpenAI's messages say it ("got a string instead")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong_type(expected: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_type", "expected {expected}", {"expected": expected})


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop(value: object) -> object:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _wrong_type("a string or an array of strings")
    if len(value) > 4:
        raise _invalid(f"at most 4 stop sequences are supported, but got {len(value)}")
    return value


def _text_or_tokens(value: object, *, max_items: int) -> object:
    """``prompt`` / ``input``: a string, strings, token ids, or arrays of token ids; never empty."""
    expected = "a string, an array of strings, an array of tokens or an array of token arrays"
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _wrong_type(expected)
    if not value:
        raise PydanticCustomError("too_short", "empty array", {"min_length": 1, "actual_length": 0})
    if len(value) > max_items:
        raise _invalid(f"at most {max_items} inputs are supported, but got {len(value)}")
    if all(isinstance(v, str) for v in value) or all(_is_int(v) for v in value):
        return value
    if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
        return value
    raise _wrong_type(expected)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None  # a string or an array of content parts; checked below (one clear error, not a union's)
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None

    @field_validator("content", mode="after")
    @classmethod
    def _content(cls, value: object) -> object:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _wrong_type("a string or an array of content parts")
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _wrong_type("a string or an array of content parts (objects with a string 'type')")
        return value

    @model_validator(mode="after")
    def _required_by_role(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError("missing_content", "a message with role '{role}' needs content",
                                      {"role": self.role})
        if self.content is None and not (self.tool_calls or self.function_call):
            raise PydanticCustomError("missing_content", "an assistant message needs content or tool_calls",
                                      {"role": self.role})
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("missing_tool_call_id", "a message with role 'tool' needs tool_call_id",
                                      {"role": self.role})
        return self


class _Sampling(OpenAIRequest):
    max_tokens: Positive | None = None
    n: Count | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Bias | None = None
    seed: int | None = None
    stop: Any = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("stop", mode="after")
    @classmethod
    def _check_stop(cls, value: object) -> object:
        return _stop(value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return self


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Positive | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice", mode="after")
    @classmethod
    def _tool_choice(cls, value: object) -> object:
        if value is None or isinstance(value, dict):
            return value
        if value in ("none", "auto", "required"):
            return value
        if isinstance(value, str):
            raise PydanticCustomError("literal_error", "", {"expected": "'none', 'auto' or 'required'"})
        raise _wrong_type("a string or an object")

    @field_validator("response_format", mode="after")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in ("text", "json_object", "json_schema"):
            raise _invalid("type must be 'text', 'json_object' or 'json_schema'")
        return value

    @property
    def requested_tokens(self) -> int | None:
        """The completion budget the client asked for (``max_completion_tokens`` wins, as in OpenAI)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    """POST /v1/completions (the legacy text completion API that vLLM still serves)."""

    prompt: Any
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt", mode="after")
    @classmethod
    def _check_prompt(cls, value: object) -> object:
        return _text_or_tokens(value, max_items=2048)

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise PydanticCustomError("best_of", "best_of must be greater than or equal to n")
        return self


class EmbeddingRequest(OpenAIRequest):
    """POST /v1/embeddings."""

    input: Any
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Positive | None = None

    @field_validator("input", mode="after")
    @classmethod
    def _check_input(cls, value: object) -> object:
        return _text_or_tokens(value, max_items=2048)


# ---- raw bytes → model or OpenAI-style error -------------------------------------------------------------------

Req = TypeVar("Req", bound=OpenAIRequest)

# Model-level checks that concern one field: the error is reported on that field.
_MODEL_CHECKS = {"missing_content": "content", "missing_tool_call_id": "tool_call_id",
                 "stream_options": "stream_options", "best_of": "best_of"}
_TYPE_NAMES = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
               "bool_type": "a boolean", "list_type": "an array", "dict_type": "an object",
               "model_type": "an object", "model_attributes_type": "an object"}


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _bad_request(message: str, param: str | None, code: str | None) -> JSONResponse:
    return openai_error(400, message, "invalid_request_error", param, code)


def _explain(err: ErrorDetails) -> JSONResponse:
    """One pydantic error → OpenAI's wording and code for the same problem."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    loc = err["loc"] + ((_MODEL_CHECKS[kind],) if kind in _MODEL_CHECKS else ())
    param = _param(loc) or None
    where = f"'{param}'"
    if kind == "missing" or kind.startswith("missing_"):
        why = f" ({err['msg']})" if kind != "missing" else ""
        return _bad_request(f"Missing required parameter: {where}{why}.", param, "missing_required_parameter")
    if kind in _TYPE_NAMES or kind == "invalid_type":
        expected = ctx.get("expected") or _TYPE_NAMES[kind]
        return _bad_request(f"Invalid type for {where}: expected {expected}, but got {_kind(value)} instead.",
                            param, "invalid_type")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        below = kind.startswith("greater")
        bound = ctx.get("ge", ctx.get("gt", ctx.get("le", ctx.get("lt"))))
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        number = "integer" if _is_int(value) else "decimal"
        side, code = ("below minimum", "below_min") if below else ("above maximum", "above_max")
        return _bad_request(f"Invalid {where}: {number} {side} value. Expected a value {op} {bound}, "
                            f"but got {value} instead.", param, f"{number}_{code}_value")
    if kind == "too_short" and ctx.get("actual_length") == 0:
        return _bad_request(f"Invalid {where}: empty array. Expected an array with minimum length "
                            f"{ctx.get('min_length', 1)}, but got an empty array instead.", param, "empty_array")
    if kind == "too_short":
        return _bad_request(f"Invalid {where}: array too short. Expected at least {ctx.get('min_length')} items, "
                            f"but got {ctx.get('actual_length')}.", param, "array_below_min_length")
    if kind == "string_too_short":
        return _bad_request(f"Invalid {where}: empty string. Expected a non-empty string.", param, "empty_string")
    if kind == "literal_error":
        return _bad_request(f"Invalid value for {where}: {value!r}. Supported values are: {ctx.get('expected')}.",
                            param, "invalid_value")
    return _bad_request(f"Invalid {where}: {err['msg']}.", param, "invalid_value")


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


OPENAI_PATHS = {"/v1" + kind: kind for kind in (CHAT, COMPLETIONS, EMBEDDINGS)}
"""The OpenAI endpoints' paths (below the app's mount point), each with its ``engines`` name."""


def route_path(scope: Mapping[str, Any]) -> str:
    """An ASGI request's path below the app's mount point: Ray Serve (like uvicorn's ``--root-path``) keeps
    the route prefix in ``path`` and names it in ``root_path``, so ``/team/v1/models`` is ``/v1/models``
    for an app served at ``/team``. Every guard that matches paths must match this one. (Starlette's router
    does the same in ``starlette._utils.get_route_path``, which is private.)"""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        return path[len(root):]
    return path


def openai_endpoint(scope: Mapping[str, Any]) -> str | None:
    """The OpenAI endpoint an ASGI HTTP request is for (``engines.CHAT`` / ``COMPLETIONS`` / ``EMBEDDINGS``),
    or None."""
    return OPENAI_PATHS.get(route_path(scope)) if scope["type"] == "http" else None


def parse_body(raw: bytes, model: type[Req]) -> tuple[Req, dict[str, Any]] | JSONResponse:
    """Bytes of a request body → the validated model and the JSON object it was validated from, or the 400 response
    to send instead. The object is the request as the client sent it (unknown fields included), to forward to a
    backend: strict validation changes no value, and it saves dumping the model again (2 us)."""
    data = _decode(raw)
    if isinstance(data, JSONResponse):
        return data
    if not isinstance(data, dict):
        return _bad_request(f"Invalid body: expected a JSON object, but got {_kind(data)} instead.", None,
                            "invalid_type")
    try:
        return model.model_validate(data), data
    except ValidationError as exc:
        return _explain(exc.errors(include_url=False)[0])
    except RecursionError:  # a pathologically nested body: still the caller's problem, not a 500
        return _bad_request("Invalid body: nested too deeply.", None, "invalid_value")


def parse_request(raw: bytes, model: type[Req]) -> Req | JSONResponse:
    """Bytes of a request body → the validated model, or the 400 response to send instead."""
    parsed = parse_body(raw, model)
    return parsed if isinstance(parsed, JSONResponse) else parsed[0]


def _decode(raw: bytes) -> Any | JSONResponse:
    """The body's JSON value, or the 400 explaining why it is none. NaN and Infinity are not JSON.

    pydantic's parser first (2.5 -> 0.5 us for a short chat request; unlike orjson it keeps an integer beyond 64
    bits an integer). The standard library reads what it refuses but is JSON (nesting deeper than its limit of
    200; an unpaired surrogate escape, which is then refused by name), and explains what neither reads.
    """
    try:
        return from_json(raw, allow_inf_nan=False)
    except ValueError:
        pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad_request(f"The request body is not valid UTF-8 (invalid byte at position {exc.start}).",
                            None, "invalid_encoding")
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:  # JSONDecodeError included
        reason = "the body is empty" if not text.strip() else str(exc)
        return _bad_request(f"We could not parse the JSON body of your request: {reason}. The API expects a "
                            "JSON object with Content-Type: application/json.", None, "invalid_json")
    except RecursionError:
        return _bad_request("We could not parse the JSON body of your request: nested too deeply.", None,
                            "invalid_json")
    found = _unpaired_surrogate(data)
    if found is None:
        return data
    loc, in_key = found
    param = _param(loc)
    where = f"a key of '{param}'" if in_key and param else "a key" if in_key else f"'{param}'"
    return _bad_request(f"Invalid text in {where}: an unpaired UTF-16 surrogate escape (such as \\ud800) is JSON, but "
                        "not Unicode text. Send valid Unicode; a character beyond U+FFFF is escaped as a surrogate "
                        "pair or sent as UTF-8.", param or None, "invalid_encoding")


def _unpaired_surrogate(value: Any) -> tuple[tuple[int | str, ...], bool] | None:
    """Where the first string holding an unpaired surrogate is, and whether it is a key (then the location is its
    object's): such text cannot be encoded as UTF-8, so neither forwarded as sent, tokenized nor hashed for the
    audit record. Only bodies pydantic's parser refused get here. Iterative: the body may be nested deeper than
    recursion goes."""
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), value)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, str):
            if UNPAIRED_SURROGATE.search(item):
                return loc, False
        elif isinstance(item, dict):
            for key in item:
                if UNPAIRED_SURROGATE.search(key):
                    return loc, True
            stack.extend(((*loc, key), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((*loc, i), child) for i, child in reversed(list(enumerate(item))))
    return None


def validate_chat(raw: bytes) -> ChatRequest | JSONResponse:
    return parse_request(raw, ChatRequest)


def validate_completion(raw: bytes) -> CompletionRequest | JSONResponse:
    return parse_request(raw, CompletionRequest)


def validate_embedding(raw: bytes) -> EmbeddingRequest | JSONResponse:
    return parse_request(raw, EmbeddingRequest)
