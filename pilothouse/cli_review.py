"""``pilothouse review``: the human review queue, straight on the run store.

Works without a gateway: ``approve`` and ``edit`` resume the run in this process (its action happens
here, at most once per idempotency key whoever else tries), ``reject`` ends it without acting. The
store is the gateway's (``--store-url`` / ``PILOTHOUSE_STORE_URL``); runs carry a snapshot of their
workflow, so nothing else is needed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from pilothouse.cli_store import DEFAULT_STORE_URL, StoreUrl, open_existing, read
from pilothouse.console import err, fail, out

if TYPE_CHECKING:
    from pilothouse.serving.runs import RunStore
    from pilothouse.serving.runtime import RunResult

T = TypeVar("T")

review_app = typer.Typer(help="The human review queue: runs parked below their confidence thresholds.",
                         no_args_is_help=True)

RunId = Annotated[str, typer.Argument(metavar="RUN", help="Run id (see `pilothouse review list`).")]
Reviewer = Annotated[str, typer.Option(help="Who decides (recorded with the decision).")]
Reason = Annotated[str | None, typer.Option(help="Why (recorded with the decision).")]


def _store(store_url: str) -> RunStore:
    from pilothouse.serving.runs import RunStore

    return open_existing(store_url, lambda url: RunStore(url, create=False), "run store")


def _guard(action: Callable[[], T], store_url: str) -> T:
    """Run ``action``; a run error or an unreadable store is one clear line, never a traceback."""
    from pilothouse.serving.runs import NotWaiting, RunError

    try:
        return read(action, store_url, "run store", "is this the gateway's store? a workflow must have run first")
    except NotWaiting as exc:
        raise fail(str(exc), "`pilothouse review list` shows the runs waiting for a decision") from None
    except RunError as exc:
        raise fail(str(exc)) from None


def _decide(store_url: str, run_id: str, decision: str, reviewer: str, reason: str | None,
            fields: dict[str, Any] | None = None) -> None:
    from pilothouse.serving.audit import AuditLog
    from pilothouse.serving.runtime import WorkflowRuntime

    store = _store(store_url)

    async def go() -> RunResult:
        runtime = WorkflowRuntime(store=store, audit=AuditLog(store_url), tenant="reviewer")
        try:
            return await runtime.decide(run_id, decision, reviewer=reviewer, reason=reason, fields=fields)
        finally:
            await runtime.aclose()
            assert runtime.audit is not None
            runtime.audit.close()

    def run() -> RunResult:
        return asyncio.run(go())

    try:
        result = _guard(run, store_url)
    finally:
        store.close()
    _print_result(result)


def _print_result(result: RunResult) -> None:
    line = f"run {result.run_id}: [bold]{result.state}[/]"
    if result.action is not None:
        line += f"; action {'taken' if result.action.taken else 'not taken'} (key {result.action.key}"
        line += f", {result.action.status})" if result.action.status is not None else ")"
    out.print(line)
    if result.error:
        err.print(f"[yellow]{result.error}[/]")


@review_app.command("list")
def review_list(store_url: StoreUrl = DEFAULT_STORE_URL,
                workflow: Annotated[str | None, typer.Option(help="Only this workflow's runs.")] = None) -> None:
    """Runs waiting for a human decision, newest first."""
    from rich.table import Table

    from pilothouse.operator.api.runs import REVIEW

    store = _store(store_url)
    try:
        runs = _guard(lambda: store.list(states=[REVIEW], workflow=workflow, limit=1000), store_url)
    finally:
        store.close()
    if not runs:
        out.print("no runs waiting for review")
        return
    table = Table("RUN", "WORKFLOW", "CONFIDENCE", "WAITING SINCE", "WHY")
    for run in runs:
        confidence = "-" if run.confidence is None else f"{run.confidence:.2f}"
        table.add_row(run.id, run.workflow, confidence, f"{run.updated_at:%Y-%m-%d %H:%M:%S}",
                      run.review_reason or "")
    out.print(table)


@review_app.command("show")
def review_show(run_id: RunId, store_url: StoreUrl = DEFAULT_STORE_URL) -> None:
    """One run (any state): fields, why it waits, its steps and the decisions taken on it."""
    from pilothouse.serving.reviews import detail

    store = _store(store_url)
    try:
        shown = _guard(lambda: detail(store, store.get(run_id)), store_url)
    finally:
        store.close()
    out.print_json(json.dumps(shown, default=str))


@review_app.command("approve")
def review_approve(run_id: RunId, reviewer: Reviewer, reason: Reason = None,
                   store_url: StoreUrl = DEFAULT_STORE_URL) -> None:
    """Approve the run's fields as they are: the run resumes here and acts."""
    _decide(store_url, run_id, "approve", reviewer, reason)


@review_app.command("reject")
def review_reject(run_id: RunId, reviewer: Reviewer, reason: Reason = None,
                  store_url: StoreUrl = DEFAULT_STORE_URL) -> None:
    """Reject the run: it ends without acting."""
    _decide(store_url, run_id, "reject", reviewer, reason)


@review_app.command("edit")
def review_edit(run_id: RunId, reviewer: Reviewer,
                set_: Annotated[list[str], typer.Option("--set", help="field=value (JSON values are parsed: "
                                                        "total=120.5); repeat for more fields.")],
                reason: Reason = None, store_url: StoreUrl = DEFAULT_STORE_URL) -> None:
    """Correct fields, then approve: the run resumes here and acts with the edited fields."""
    fields: dict[str, Any] = {}
    for item in set_:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise fail(f"--set {item!r} is not field=value", "e.g. --set total=120.50 --set currency=EUR")
        try:
            fields[name.strip()] = json.loads(raw)
        except ValueError:
            fields[name.strip()] = raw
    _decide(store_url, run_id, "edit", reviewer, reason, fields)
