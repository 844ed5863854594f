"""A reconcile retried after an API error writes only what the failed attempt did not land."""

from __future__ import annotations

import itertools
from collections.abc import Sized
from typing import Any

import kopf
import pytest
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import Status

from pilothouse.operator import kopf_app
from pilothouse.operator.api import ModelDeployment
from pilothouse.operator.env import Outcome
from tests.unit.factories import model

CHILDREN = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"child-{i}", "namespace": "ml"}}
            for i in range(3)]


class FlakyEnv:
    """Answers 500 to the write of ``child-1`` once, as an overloaded API server does; records every write."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.failed = False

    async def apply(self, obj: dict[str, Any]) -> None:
        self.writes.append(obj["metadata"]["name"])
        if obj["metadata"]["name"] == "child-1" and not self.failed:
            self.failed = True
            raise ApiError(status=Status(code=500, message="etcdserver: request timed out"))

    async def patch_status(self, *_: Any) -> None:
        pass


def reconcile_handler(rt: kopf_app.Runtime) -> Any:
    registry = kopf.OperatorRegistry()
    kopf_app.register(registry, rt)
    return next(h.fn for h in registry._changing.get_all_handlers()
                if h.id == "reconcile" and h.selector is not None and h.selector.any_name == ModelDeployment.PLURAL)


async def test_a_retry_after_an_api_error_applies_only_the_children_that_did_not_land(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def three_children(obj: Any, env: Any) -> Outcome:
        return Outcome(children=[dict(c, metadata=dict(c["metadata"])) for c in CHILDREN])

    monkeypatch.setattr(kopf_app, "_reconciler", lambda kind, config: three_children)
    monkeypatch.setattr(kopf, "append_owner_reference", lambda child, owner: None)
    env = FlakyEnv()
    rt = kopf_app.Runtime(kopf_app.OperatorConfig(), env=env)  # type: ignore[arg-type]
    body = model("m").model_dump(mode="json", by_alias=True, exclude_none=True)
    body["metadata"]["namespace"] = "ml"
    reconcile = reconcile_handler(rt)

    with pytest.raises(kopf.TemporaryError, match="answered 500"):
        await reconcile(body=body, retry=0)
    await reconcile(body=body, retry=1)
    assert env.writes == ["child-0", "child-1", "child-1", "child-2"]  # child-0 landed: not written again

    # A new change (or a resume after a restart) is a first attempt again: every child is re-applied.
    await reconcile(body=body, retry=0)
    assert env.writes[4:] == ["child-0", "child-1", "child-2"]


def test_the_operators_api_requests_are_retried_until_the_server_answers() -> None:
    """A finalizer patch that kopf stops retrying leaves the object hanging on deletion: no event comes again.
    The operator's delays never run out, start short, settle at 30 s, and start over for every request."""
    settings = kopf.OperatorSettings()
    kopf_app.configure(settings)
    backoffs = settings.networking.error_backoffs
    first = list(itertools.islice(backoffs, 50))
    assert len(first) == 50 and first[:4] == [1.0, 2.0, 5.0, 10.0] and set(first[4:]) == {30.0}
    assert list(itertools.islice(backoffs, 50)) == first  # a fresh schedule per request, not a spent iterator
    assert not isinstance(backoffs, Sized)  # kopf bounds the attempts of a sized schedule only
