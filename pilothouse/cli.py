"""The ``pilothouse`` command: one clear line per error, a hint, and a non-zero exit; no tracebacks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.markup import escape

from .cli_eval import eval_command
from .cli_ingest import ingest
from .cli_models import models_app
from .cli_review import review_app
from .cli_store import DEFAULT_STORE_URL, StoreUrl, open_existing, parse_store_url, read
from .console import err, fail, out

if TYPE_CHECKING:
    from rich.tree import Tree

    from pilothouse.serving.audit import AuditLog, AuditRecord

T = TypeVar("T")

app = typer.Typer(
    help="Pilothouse: a Kubernetes-native control plane for autonomous AI systems.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def crds(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the CRD YAML to.")] = Path("crds"),
) -> None:
    """Write the CustomResourceDefinitions generated from the API models."""
    from pilothouse.operator import crdgen

    for path in crdgen.write(out_dir):
        out.print(f"wrote {path}")


@app.command()
def run(
    directory: Annotated[Path, typer.Argument(help="Folder of manifests, e.g. examples/invoice-triage/.")],
    state_dir: Annotated[Path, typer.Option(help="Where local state lives.")] = Path(".pilothouse"),
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port of the local gateway (default: a free "
                                             "one).")] = None,
    reconcile_only: Annotated[bool, typer.Option("--reconcile-only", help="Only reconcile and print status; do "
                                                 "not start the stack or run the folder's LocalJob.")] = False,
) -> None:
    """Local mode: reconcile the manifests with no cluster, start the stack, run the folder's job, summarise.

    The job (a LocalJob document, e.g. examples/invoice-triage/local/job.yaml) says which workflow runs on
    which inputs; a folder without one is only reconciled.
    """
    from pilothouse.operator import local, manifests

    from . import localrun

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # Lite logs recoverable RPC misses as errors
    if not directory.exists():
        raise fail(f"{directory} does not exist", "pass a folder of manifests, e.g. examples/invoice-triage/")
    bundle = manifests.load(directory)
    if bundle.errors:
        for error in bundle.errors:
            err.print(f"[red]invalid:[/] {escape(str(error))}")
        raise fail(
            f"{len(bundle.errors)} problem(s) in {directory}; nothing was reconciled",
            "fix the fields named above; `kubectl explain <kind>.spec` documents each field",
        )
    if not bundle.objects:
        raise fail(f"no pilothouse.io/v1alpha1 objects found in {directory}")
    job, job_file = localrun.find_job(directory)
    if job is not None and not reconcile_only:
        out.print(f"job {job_file}: workflow {job.spec.workflow}")
        localrun.run_job(directory, bundle, job, state_dir, port)
        return

    async def go() -> list:
        env = local.LocalEnv(state_dir)
        try:
            return await local.reconcile_all(bundle, env)
        finally:
            await env.prober.aclose()

    out.print(localrun.status_table(asyncio.run(go()), f"Pilothouse local reconcile ({directory})"))
    out.print(f"RoutingTables and status: {state_dir}/routing/, {state_dir}/status.json")


@app.command()
def operator(
    namespaces: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Namespace to watch (repeatable); all namespaces when omitted."),
    ] = None,
    milvus_uri: Annotated[
        str | None, typer.Option(envvar="PILOTHOUSE_MILVUS_URI", help="Milvus URI for VectorIndexes that set none.")
    ] = None,
    store_url: Annotated[
        str,
        typer.Option(envvar="PILOTHOUSE_STORE_URL", help="SQLAlchemy URL of the store the gateway's ledger writes."),
    ] = "sqlite:///pilothouse.db",
    liveness: Annotated[str, typer.Option(help="Liveness endpoint URL.")] = "http://0.0.0.0:8080/healthz",
    verbose: Annotated[bool, typer.Option("--verbose")] = False,
) -> None:
    """Run the in-cluster kopf operator."""
    from pilothouse.operator import kopf_app

    asyncio.run(
        kopf_app.run(
            namespaces=namespaces or [], milvus_uri=milvus_uri, store_url=store_url, liveness=liveness, verbose=verbose
        )
    )



audit_app = typer.Typer(help="Read the audit trail: one record per request and workflow step.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.add_typer(review_app, name="review")



def _open_audit_log(store_url: str) -> AuditLog:
    from pilothouse.serving.audit import AuditLog

    return open_existing(store_url, lambda url: AuditLog(url, create=False), "audit store")


def _read_audit(action: Callable[[], T], store_url: str) -> T:
    return read(action, store_url, "audit store", "is this the gateway's store? it must have served a request first")


@audit_app.command("show")
def audit_show(
    record_id: Annotated[str, typer.Argument(metavar="ID", help="Request (or step) id.")],
    store_url: StoreUrl = DEFAULT_STORE_URL,
) -> None:
    """Print the decision path of one request: routing, fallbacks, budget, cache, usage, latency."""
    log = _open_audit_log(store_url)
    try:
        record = _read_audit(lambda: log.get(record_id), store_url)
    finally:
        log.close()
    if record is None:
        raise fail(f"no audit record with id {record_id!r} in {store_url}",
                   "`pilothouse audit tail` lists recent ids")
    out.print(_audit_tree(record))


@audit_app.command("tail")
def audit_tail(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records until Ctrl-C.")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many recent records to print first.")] = 20,
    interval: Annotated[float, typer.Option(hidden=True, min=0.01, help="Poll interval of --follow (s).")] = 1.0,
    store_url: StoreUrl = DEFAULT_STORE_URL,
) -> None:
    """Print recent audit records, one line each, oldest first."""
    log = _open_audit_log(store_url)
    try:
        if not follow:
            for record in _read_audit(lambda: log.tail(limit), store_url):
                out.print(_audit_line(record), highlight=False)
            return
        records = log.follow(interval_s=interval, backlog=limit)
        while True:
            record = _read_audit(lambda: next(records), store_url)
            out.print(_audit_line(record), highlight=False)
    except KeyboardInterrupt:
        return
    finally:
        log.close()



def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}".rstrip("0").rstrip(".")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _content(label: str, content: object, digest: str | None) -> str:
    """Stored content (shortened) or, under a no-content policy, only its hash."""
    if content is None:
        return f"{label}: [dim]not stored[/] {escape(digest or '-')}"
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    return f"{label}: {escape(text if len(text) <= 240 else text[:240] + '…')} [dim]{escape(digest or '')}[/]"


def _audit_tree(record: AuditRecord) -> Tree:
    """The decision path in the order the gateway took it. Every value is escaped: it is user data."""
    from rich.tree import Tree

    e = escape
    status = record.status_code
    colour = "green" if status is not None and status < 400 else "red"
    tree = Tree(f"[bold]{e(record.id)}[/] {record.kind} at {record.ts.isoformat()} "
                f"[{colour}]status {status if status is not None else '-'}[/] in {_ms(record.latency_ms)}")
    where = "/".join(e(part) for part in (record.workflow, record.route) if part) or "-"
    tree.add(f"request: tenant {e(record.tenant)} · route {where} · model {e(record.model or '-')} · "
             f"trace {e(record.trace_id or '-')}" + (f" · run {e(record.run_id)}" if record.run_id else ""))
    tree.add(_content("inputs", record.inputs, record.inputs_hash))
    if record.retrieval:
        hits = tree.add(f"retrieval ({e(record.retrieval[0].mode)}): {len(record.retrieval)} hit(s)")
        for hit in record.retrieval:
            hits.add(f"{e(hit.id)} score {hit.score:.4f} ({e(hit.mode)})")
    tree.add("cache: [green]hit[/] (no backend called, nothing charged)" if record.cache_hit else "cache: miss")
    if record.routing is not None:
        routing = record.routing
        revision = f"table revision {routing.table_revision}" if routing.table_revision is not None else "table -"
        node = tree.add(f"routing ({revision}): chose {e(routing.backend or 'none')}"
                        + (f" — {e(routing.reason)}" if routing.reason else ""))
        for number, attempt in enumerate(routing.attempts, 1):
            if attempt.error_class is None:
                node.add(f"{number}. {e(attempt.backend)} [green]ok[/] in {_ms(attempt.latency_ms)}")
            else:
                node.add(f"{number}. {e(attempt.backend)} [red]{e(attempt.error_class)}[/]: {e(attempt.message)} "
                         f"({_ms(attempt.latency_ms)})")
    for budget in record.budget:
        if budget.denied:
            tree.add(f"budget {e(budget.policy)}: [red]denied[/] — {e(budget.denied)}")
            continue
        steps = [f"reserved {_usd(budget.reserved_usd)}"]
        if budget.committed_usd is not None:
            steps.append(f"committed {_usd(budget.committed_usd)}")
        if budget.released:
            steps.append("released")
        rid = f" [dim]({e(budget.reservation_id)})[/]" if budget.reservation_id else ""
        tree.add(f"budget {e(budget.policy)}: {' → '.join(steps)}{rid}")
    if record.usage is not None:
        tree.add(f"usage: {record.usage.prompt_tokens} prompt + {record.usage.completion_tokens} completion tokens")
    tree.add(_content("output", record.output, record.output_hash))
    if record.action is not None:
        extra = record.action.model_dump(exclude={"idempotency_key", "kind"}, exclude_none=True)
        tree.add(f"action {e(record.action.kind or '-')}: idempotency key {e(record.action.idempotency_key or '-')}"
                 + (f" {e(json.dumps(extra, default=str))}" if extra else ""))
    if record.human_decision is not None:
        decision = record.human_decision
        tree.add(f"human decision: {e(decision.decision)} by {e(decision.reviewer)}"
                 + (f" — {e(decision.reason)}" if decision.reason else ""))
    return tree


def _audit_line(record: AuditRecord) -> str:
    """One record on one line, for `audit tail`: time, id, who, where, outcome, and any fallbacks."""
    e = escape
    routing = record.routing
    failed = [a for a in routing.attempts if a.error_class] if routing else []
    parts = [record.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"), e(record.id), record.kind,
             e(record.tenant), "/".join(e(p) for p in (record.workflow, record.route) if p) or "-",
             e((routing.backend if routing else None) or "-"),
             str(record.status_code if record.status_code is not None else "-"), _ms(record.latency_ms)]
    if record.cache_hit:
        parts.append("cache-hit")
    if failed:
        parts.append("fallbacks: " + ",".join(f"{e(a.backend)}:{e(a.error_class or '')}" for a in failed))
    if any(b.denied for b in record.budget):
        parts.append("budget-denied")
    return "  ".join(parts)


@app.command()
def serve(
    routing: Annotated[Path, typer.Option("--routing", help="RoutingTable file (JSON) written by the operator.")],
    host: Annotated[str, typer.Option(help="Address the gateway listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the OpenAI-compatible API.")] = 8000,
    api_keys: Annotated[
        Path | None,
        typer.Option("--api-keys", help="YAML/JSON file of API key → tenant, or a mounted Secret directory; "
                     "omitted: no authentication, every caller is tenant 'default'."),
    ] = None,
    store_url: StoreUrl = DEFAULT_STORE_URL,
    throughput_optimized: Annotated[
        bool,
        typer.Option("--throughput-optimized", help="Serve's throughput-optimized mode with HAProxy on --port "
                     "(what the operator's RayService runs): ~3x the requests per second of the default proxy, "
                     "one more process and a few seconds more to start."),
    ] = False,
    direct_port: Annotated[
        int | None,
        typer.Option("--direct-port", min=1, max=65535,
                     help="Also answer on this port from the gateway replica's own server, past Serve's per-request "
                     "ingress (bench/serve_share.py), on --host; Serve's queue, request metrics and autoscaler do "
                     "not see those requests."),
    ] = None,
) -> None:
    """Run the gateway (OpenAI API) on a local Ray Serve, from a RoutingTable file."""
    from pilothouse.serving.auth import ApiKeyError, ApiKeys
    from pilothouse.serving.table_source import TableSource

    quiet = logging.getLogger("pilothouse.serving.table_source")
    quiet.disabled = True  # its warning would repeat the error line below
    try:
        source = TableSource(routing)  # the gateway would start unready; from the command line, say why now
    finally:
        quiet.disabled = False
    if not source.ready:
        raise fail(str(source.last_error), "pass the RoutingTable file `pilothouse run` or the operator wrote, "
                   "e.g. .pilothouse/routing/default/<workflow>.json")
    try:
        ApiKeys(api_keys)
    except ApiKeyError as exc:
        raise fail(str(exc), "a mapping like `sk-...: team-a`, or a directory of one key file per tenant") from None
    if direct_port is not None:
        _check_direct_port(host, port, direct_port)
    from pilothouse.serving import serve as gateway

    gateway.run(str(routing), host=host, port=port, api_keys=str(api_keys) if api_keys else None,
                store_url=_absolute_store_url(store_url), throughput_optimized=throughput_optimized,
                direct_port=direct_port)


def _check_direct_port(host: str, port: int, direct_port: int) -> None:
    """Refuse a direct port that cannot be had, before Ray starts: the replica's own failure would come back from
    Serve as a deployment error after seconds. Unshared: this process's one replica is the first on the port, and a
    gateway still running there would otherwise share it with the new one (both set ``SO_REUSEPORT``)."""
    from pilothouse.serving.direct import listen

    if direct_port == port:
        raise fail(f"--direct-port {direct_port} is --port too", "give the direct port a port of its own")
    try:
        listen(host, direct_port, shared=False).close()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise fail(f"--direct-port {direct_port} on {host}: {reason}",
                   "pick a free port, or stop what listens there, or leave --direct-port out") from None


def _absolute_store_url(store_url: str) -> str:
    """A relative SQLite path made absolute here: Ray runs the gateway replica in another directory."""
    url = parse_store_url(store_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        url = url.set(database=str(Path(url.database).resolve()))
    return url.render_as_string(hide_password=False)


app.command("eval")(eval_command)


app.command()(ingest)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
