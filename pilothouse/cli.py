"""The ``pilothouse`` command: one clear line per error, a hint, and a non-zero exit; no tracebacks."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Pilothouse: a Kubernetes-native control plane for autonomous AI systems.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped output (CI logs, `| less`) gets a readable width instead of rich's 80-column default.
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole: grep-able, copy-able
out = Console(width=None if sys.stdout.isatty() else 160)


def fail(message: str, hint: str | None = None, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    return typer.Exit(code)


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
) -> None:
    """Local mode: validate the manifests, reconcile them with no cluster, print their status."""
    from pilothouse.operator import local, manifests

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # Lite logs recoverable RPC misses as errors
    if not directory.exists():
        raise fail(f"{directory} does not exist", "pass a folder of manifests, e.g. examples/invoice-triage/")
    bundle = manifests.load(directory)
    if bundle.errors:
        for error in bundle.errors:
            err.print(f"[red]invalid:[/] {error}")
        raise fail(
            f"{len(bundle.errors)} problem(s) in {directory}; nothing was reconciled",
            "fix the fields named above; `kubectl explain <kind>.spec` documents each field",
        )
    if not bundle.objects:
        raise fail(f"no pilothouse.io/v1alpha1 objects found in {directory}")

    async def go() -> list:
        env = local.LocalEnv(state_dir)
        try:
            return await local.reconcile_all(bundle, env)
        finally:
            await env.http.aclose()

    objects = asyncio.run(go())
    table = Table(title=f"Pilothouse local reconcile ({directory})")
    for column in ("Kind", "Name", "Phase", "Ready", "Reason"):
        table.add_column(column, no_wrap=True)
    table.add_column("Detail", overflow="fold")
    for obj in objects:
        status = obj.status.dump() if obj.status else {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        colour = {"True": "green", "False": "red"}.get(ready.get("status", ""), "yellow")
        table.add_row(
            obj.KIND,
            obj.name,
            status.get("phase", "-"),
            f"[{colour}]{ready.get('status', '-')}[/]",
            ready.get("reason", "-"),
            ready.get("message", ""),
        )
    out.print(table)
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
