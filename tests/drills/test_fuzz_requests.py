"""Fuzz: 10,000 generated request bodies against the gateway → never a 5xx, every 4xx names its field.

Bodies are valid, near-valid (one field of a valid body swapped for another type, an out-of-range
number, a missing required field, an unknown model, an empty list, deep nesting) or garbage (any JSON
value, any bytes including invalid UTF-8). They go through the whole app — auth, body limit,
validation, routing, FakeBackend, audit — on a SQLite store. The app and the fake live on an event
loop in a background thread for the module, so Hypothesis drives plain synchronous examples.

A 4xx "names the field" when its ``param`` leads to a key of the body or to a required field that
is missing; only a body that is not a JSON object at all (not UTF-8, not JSON, an array) may answer
without one, and then its ``code`` says which of those it was.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.openai_backend import FakeBackend
from tests.unit.test_gateway_requests import A, make_table

from .conftest import in_process_gateway

pytestmark = pytest.mark.drill

EXAMPLES = 10_000
CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
REQUIRED = {CHAT: {"model", "messages"}, COMPLETIONS: {"model", "prompt"}, EMBEDDINGS: {"model", "input"}}
WHOLE_BODY_CODES = {"invalid_json", "invalid_encoding", "invalid_type"}
ERROR_KEYS = {"message", "type", "param", "code"}


class Gateway:
    """The gateway app and a FakeBackend on their own loop; ``post`` is synchronous for Hypothesis."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.loop = asyncio.new_event_loop()
        self.ready: Future[httpx.AsyncClient] = Future()
        self.stop = asyncio.Event()
        self.statuses: Counter[int] = Counter()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),), daemon=True)

    async def _run(self) -> None:
        try:
            async with FakeBackend(model="org/small") as primary, FakeBackend(model="org/large") as fallback:
                table = make_table(primary, fallback)
                async with in_process_gateway(self.folder, table, f"sqlite:///{self.folder}/store.db") as (_, client):
                    self.ready.set_result(client)
                    await self.stop.wait()
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            raise

    def __enter__(self) -> Gateway:
        self.thread.start()
        self.client = self.ready.result(timeout=60)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)

    def post(self, path: str, content: bytes) -> httpx.Response:
        request = self.client.post(path, content=content, headers={**A, "content-type": "application/json"})
        response = asyncio.run_coroutine_threadsafe(request, self.loop).result(timeout=60)
        self.statuses[response.status_code] += 1
        return response


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with Gateway(tmp_path_factory.mktemp("fuzz")) as gw:
        yield gw
    print(f"fuzz requests: {sum(gw.statuses.values())} sent, by status {dict(sorted(gw.statuses.items()))}")


# -- strategies ----------------------------------------------------------------------------------------------

text = st.text(max_size=40)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children,
                                                                                             max_size=4),
                           max_leaves=12)
numbers = st.sampled_from([0, -1, -(2**63), 2**64, 10**30, 1e308, -1e308, 0.5, 3, 1000, 2**31])
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.text(min_size=1, max_size=60)})
sampling = {"max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
            "n": st.integers(1, 2), "seed": st.integers(0, 2**31), "stream": st.booleans(), "user": text,
            "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4), "x_vendor_extra": json_values}
model = st.sampled_from(["wf/extract", "extract"])
valid = {
    CHAT: st.fixed_dictionaries({"model": model, "messages": st.lists(message, min_size=1, max_size=3)},
                                optional=sampling),
    COMPLETIONS: st.fixed_dictionaries({"model": model, "prompt": st.text(min_size=1, max_size=60)},
                                       optional=sampling),
    EMBEDDINGS: st.fixed_dictionaries({"model": model, "input": st.lists(st.text(min_size=1, max_size=20),
                                                                         min_size=1, max_size=3)}),
}


NEST = "\u2063nest\u2063"  # stands for a deep array, written into the encoded body (json.dumps would recurse)


def encoded(value: Any, depth: int = 0) -> bytes:
    raw = json.dumps(value)
    return raw.replace(json.dumps(NEST), "[" * depth + '"deep"' + "]" * depth).encode()


@st.composite
def mutated(draw: st.DrawFn, path: str) -> bytes:
    """A valid body with one field broken: type swap, odd number, removed, emptied, nested or renamed."""
    body = draw(valid[path])
    key = draw(st.sampled_from(sorted(set(body) | set(sampling) | {"messages", "prompt", "input", "model"})))
    how = draw(st.sampled_from(["swap", "number", "remove", "empty", "nest", "unknown_model", "bad_message",
                                "unpaired_surrogate"]))
    if how == "swap":
        body[key] = draw(json_values)
    elif how == "number":
        body[key] = draw(numbers)
    elif how == "remove":
        body.pop(key, None)
    elif how == "empty":
        body[key] = draw(st.sampled_from([[], {}, "", None]))
    elif how == "nest":
        body[key] = NEST
        return encoded(body, draw(st.sampled_from([50, 500, 5000])))
    elif how == "unknown_model":
        body["model"] = draw(text)
    elif how == "unpaired_surrogate":  # "\\udc00" alone: JSON, but no UTF-8 text (hypothesis's text() never has one)
        odd = draw(st.tuples(text, st.characters(categories=["Cs"]), text).map("".join))
        field = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}[path]
        body[field] = [{"role": "user", "content": odd}] if path == CHAT else [odd] if path == EMBEDDINGS else odd
    elif path == CHAT:
        messages = list(body["messages"])
        messages[0] = {**messages[0], draw(st.sampled_from(["role", "content", "name"])): draw(json_values)}
        body["messages"] = messages
    return encoded(body)


bodies = st.sampled_from([CHAT, COMPLETIONS, EMBEDDINGS]).flatmap(lambda path: st.tuples(st.just(path), st.one_of(
    valid[path].map(encoded),
    mutated(path),
    mutated(path),
    mutated(path),
    json_values.map(encoded),
    st.binary(max_size=64),
)))


def not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # Python's json reads NaN and Infinity; RFC 8259 does not


def named_field(error: dict[str, Any], body: Any, path: str) -> bool:
    """Does the error name the offending field (see the module docstring)?"""
    param = error["param"]
    if not isinstance(body, dict):
        return param is None and error["code"] in WHOLE_BODY_CODES
    if not isinstance(param, str) or not param:
        return False
    top = re.split(r"[.\[]", param, maxsplit=1)[0]
    return top in body or (top in REQUIRED[path] and top not in body)


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(case=bodies)
def test_generated_requests_get_no_5xx_and_every_4xx_names_the_field(gateway: Gateway,
                                                                     case: tuple[str, bytes]) -> None:
    path, content = case
    response = gateway.post(path, content)
    assert response.status_code < 500, (response.status_code, response.text, content[:300])
    if response.status_code == 200:
        return
    error = response.json().get("error")
    assert isinstance(error, dict) and set(error) == ERROR_KEYS and isinstance(error["message"], str), response.text
    try:
        body = json.loads(content, parse_constant=not_json)
    except (ValueError, RecursionError):
        body = None
    assert named_field(error, body, path), (response.status_code, error, content[:300])
