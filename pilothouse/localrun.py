"""``pilothouse run DIR``: the whole stack on one machine, then the folder's job, then a summary.

What a cluster spreads over the operator, RayServices, Milvus and PostgreSQL runs here in one
process tree: local Ray with Serve (the gateway and one vLLM engine per ``engine: vllm``
ModelDeployment, reached in-process through Serve handles), the operator's reconcilers on the local
provider (RoutingTables as files), Milvus Lite and SQLite in ``--state-dir``. The driver (this
process) is the only one that opens the Milvus Lite file (Lite allows one process per file), so
ingestion and the workflow runtime's retrieval run here; the runtime calls models through the
gateway's OpenAI API like any client, so routing, fallbacks, budgets and the audit all apply.

The job is a ``LocalJob`` document (``local/job.yaml`` in the example): which workflow to run, on
which input files, which documents to ingest first, and an optional labelled dataset for
precision/recall. Without one, ``pilothouse run`` only reconciles and prints status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from rich.markup import escape
from rich.table import Table

from pilothouse.operator import local, manifests
from pilothouse.operator.api import AutonomousWorkflow, ModelDeployment, Resource, VectorIndex
from pilothouse.operator.api.model_deployment import Engine
from pilothouse.operator.slo import p95

from .console import err, fail, out

if TYPE_CHECKING:  # importing these pulls Ray/vLLM/Milvus, which plain reconciles never need
    from pilothouse.serving.evaluation import DatasetItem, Prediction
    from pilothouse.serving.retrieval import MilvusRetriever
    from pilothouse.serving.runtime import RunResult, WorkflowRuntime

log = logging.getLogger(__name__)

LOCAL_API_VERSION = "pilothouse.io/local"
NOISY_LOGGERS = ("ray", "ray.serve", "ray.llm", "vllm", "pymilvus", "milvus_lite", "pypdf", "httpx", "filelock",
                 "sentence_transformers", "transformers", "faiss", "pilothouse.serving.runtime")
# Milvus Lite's gRPC server logs a traceback for every call it does not implement (AllocTimestamp on upsert).
SILENT_LOGGERS = ("grpc",)


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class IngestItem(_Spec):
    vector_index: str = Field(description="metadata.name of the VectorIndex to fill.")
    path: str = Field(description="File or folder, relative to the folder given to `pilothouse run`.")


class LocalJobSpec(_Spec):
    workflow: str = Field(description="metadata.name of the AutonomousWorkflow to run.")
    tiny_models: list[str] = Field(default_factory=list, description="Generate a tiny random Llama at each path "
                                   "when missing (demo weights; no download).")
    ingest: list[IngestItem] = Field(default_factory=list)
    inputs: str | None = Field(default=None, description="Folder of input documents: one run per file.")
    dataset: str | None = Field(default=None, description="Labelled JSONL (pilothouse eval format).")
    concurrency: int = Field(default=2, ge=1, le=64, description="Runs in flight at once.")


class LocalJob(_Spec):
    api_version: Literal["pilothouse.io/local"]
    kind: Literal["LocalJob"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LocalJobSpec


def find_job(directory: Path) -> tuple[LocalJob | None, Path | None]:
    """The folder's LocalJob (at most one), validated; an invalid one is an error naming the field."""
    found: list[tuple[LocalJob, Path]] = []
    for file in manifests.files(directory):
        with suppress(yaml.YAMLError):  # manifests.load reports unreadable YAML already
            for doc in yaml.safe_load_all(file.read_text()):
                if not (isinstance(doc, dict) and doc.get("kind") == "LocalJob"):
                    continue
                try:
                    found.append((LocalJob.model_validate(doc), file))
                except ValidationError as exc:
                    problems = "; ".join(manifests.describe(exc))
                    raise fail(f"{file} (LocalJob): {problems}", "see examples/invoice-triage/local/job.yaml") from None
    if len(found) > 1:
        raise fail(f"{directory} holds {len(found)} LocalJob documents ({', '.join(str(f) for _, f in found)})",
                   "keep one per folder")
    return found[0] if found else (None, None)


def status_table(objects: Sequence[Resource], title: str) -> Table:
    table = Table(title=title)
    for column in ("Kind", "Name", "Phase", "Ready", "Reason"):
        table.add_column(column, no_wrap=True)
    table.add_column("Detail", overflow="fold")
    for obj in objects:
        status = obj.status.dump() if obj.status else {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        colour = {"True": "green", "False": "red"}.get(ready.get("status", ""), "yellow")
        table.add_row(obj.KIND, obj.name, status.get("phase", "-"), f"[{colour}]{ready.get('status', '-')}[/]",
                      ready.get("reason", "-"), escape(ready.get("message", "")))
    return table


def store_url(state_dir: Path) -> str:
    """The one SQLite store of local mode: ledger, audit, idempotency keys, runs, review queue."""
    return f"sqlite:///{(state_dir / 'pilothouse.db').resolve()}"


RAY_WORKER_PORTS_END = 19_999  # Ray's workers bind 10002-19999 by default


def serve_port() -> int:
    """A free port for Serve's HTTP proxy that nothing else takes before the proxy binds it.

    Port 0 would hand out one from the kernel's ephemeral range, released again until Serve starts;
    Ray's start-up in between opens dozens of servers and connections from that same range, and
    one CI run lost the port to one of them ("Failed to bind to address"). Ports between Ray's
    worker range and the ephemeral range are only ever taken by someone asking for them by number.
    """
    try:
        ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32_768  # Linux's default; other systems start higher
    low, high = RAY_WORKER_PORTS_END + 1, max(ephemeral_start, RAY_WORKER_PORTS_END + 2)
    start = random.randrange(low, high)  # two runs started together rarely scan from the same place
    for candidate in (*range(start, high), *range(low, start)):
        with socket.socket() as s, suppress(OSError):
            s.bind(("127.0.0.1", candidate))
            return candidate
    raise fail(f"no free TCP port between {low} and {high - 1} for the gateway", "pass --port")


def quiet() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    # Ray and vLLM read these at import / start; set before either starts.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # MiniLM (torch) and the in-process Milvus Lite server share this process: torch's default thread
    # pool starves Lite's gRPC thread on 2 cores (hybrid p50 ~320 ms instead of ~23 ms, measured).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class Stack:
    """The running local stack: what a job needs to ingest documents and run workflows."""

    bundle: manifests.Bundle
    state_dir: Path
    port: int
    env: local.LocalEnv
    objects: list[Resource]
    engine_endpoints: dict[str, str]
    retrievers: dict[str, MilvusRetriever] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def find(self, kind: type[Resource], name: str) -> Any:
        match = [o for o in self.objects if isinstance(o, kind) and o.name == name]
        if not match:
            known = ", ".join(sorted(o.name for o in self.objects if isinstance(o, kind))) or "none"
            raise fail(f"no {kind.KIND} named {name!r} in the manifests", f"known: {known}")
        return match[0]

    def milvus_uri(self, vi: VectorIndex) -> str:
        return vi.spec.milvus.uri or str(self.state_dir / "milvus.db")

    async def reconcile(self) -> list[Resource]:
        self.objects = await local.reconcile_all(self.bundle, self.env)
        return self.objects


@asynccontextmanager
async def local_stack(bundle: manifests.Bundle, state_dir: Path, *, port: int | None = None,
                      tiny_models: Sequence[str] = ()) -> AsyncIterator[Stack]:
    """Ray + Serve, the vLLM engines, a reconcile pass, then the gateway for every workflow; torn down on exit.

    Always ``serve.shutdown()`` then ``ray.shutdown()`` on the way out: a driver that leaves without
    them leaves Ray's processes and vLLM workers behind (DESIGN.md §9).
    """
    from pilothouse.serving.rerank import local_path_problems

    problems = [p for o in bundle.objects if isinstance(o, AutonomousWorkflow) for p in local_path_problems(o)]
    if problems:  # before Ray and minutes of engine start-up: the runtime would refuse these workflows anyway
        raise fail("; ".join(problems), "paths are relative to the folder `pilothouse run` is started from")
    quiet()  # before the imports: vLLM reads its log level when it is first imported
    import ray
    from ray import serve

    from pilothouse.serving import serve as gateway
    from pilothouse.serving.engines import vllm
    from pilothouse.serving.tiny_model import make_tiny_llama

    for path in tiny_models:
        if not (Path(path) / "config.json").exists():
            with out.status(f"generating tiny demo model at {path}"):
                await asyncio.to_thread(make_tiny_llama, Path(path))
    models = [o for o in bundle.objects if isinstance(o, ModelDeployment)]
    port = port or serve_port()
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "ERROR"})
        quiet()  # Serve sets its driver-side logger up again when it starts
        engines = [m for m in models if m.spec.engine is Engine.VLLM]
        endpoints: dict[str, str] = {}
        if engines:
            started = time.perf_counter()
            with out.status(f"starting {len(engines)} vLLM engine(s) on Ray Serve "
                            f"({', '.join(m.name for m in engines)}); about 40 s on 2 cores"):
                try:
                    endpoints = await asyncio.to_thread(vllm.deploy_local_engines, engines, base_dir=Path.cwd())
                except FileNotFoundError as exc:
                    raise fail(str(exc), "generate demo weights with `pilothouse models make-tiny PATH`, or point "
                               "spec.model.name at a local model folder") from None
            out.print(f"vLLM engine(s) ready in {time.perf_counter() - started:.0f} s "
                      f"(vllm:* metrics at {vllm.metrics_url(engines[0], f'http://127.0.0.1:{port}')})")
        env = local.LocalEnv(state_dir, engine_endpoints=endpoints)
        stack = Stack(bundle, state_dir, port, env, [], endpoints)
        try:
            await stack.reconcile()
            for wf in (o for o in stack.objects if isinstance(o, AutonomousWorkflow)):
                table = env.table_path(wf.namespace, wf.name)
                if table.exists():
                    args = gateway.GatewayArgs(routing=str(table.resolve()), store_url=store_url(state_dir))
                    app = f"gateway-{wf.name}"
                    serve.run(gateway.application(args, replicas=wf.spec.gateway.replicas), name=app,
                              route_prefix="/", blocking=False)
                    running = serve.status().applications[app].deployments[gateway.Gateway.name].replica_states
                    out.print(f"gateway of {wf.name}: {running.get('RUNNING', 0)} replica(s) running "
                              f"(spec.gateway.replicas {wf.spec.gateway.replicas}) on {stack.gateway_url}")
                    break  # one gateway owns "/"; local mode runs one workflow per folder
            yield stack
        finally:
            for retriever in stack.retrievers.values():
                retriever.close()
            await env.prober.aclose()
    finally:
        with suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def ingest(stack: Stack, directory: Path, items: Sequence[IngestItem]) -> None:
    """The job's documents into their VectorIndexes, exactly as ``pilothouse ingest`` does."""
    from .cli_ingest import ingest_into

    for item in items:
        vi: VectorIndex = stack.find(VectorIndex, item.vector_index)
        source = directory / item.path
        if not source.exists():
            raise fail(f"LocalJob spec.ingest path {item.path} does not exist under {directory}")
        ingest_into(vi, [source], state_dir=stack.state_dir, uri=stack.milvus_uri(vi))


def retrievers(stack: Stack, wf: AutonomousWorkflow) -> dict[str, MilvusRetriever]:
    """One prewarmed retriever per VectorIndex the workflow's retrieve steps name (cold query timed)."""
    from pilothouse.serving.embeddings import embedder_for
    from pilothouse.serving.keyword_store import KeywordStore, keyword_store_path
    from pilothouse.serving.retrieval import MilvusRetriever

    for _, name in wf.index_refs():
        if name in stack.retrievers:
            continue
        vi: VectorIndex = stack.find(VectorIndex, name)
        retriever = MilvusRetriever(index=vi.name, collection=vi.alias, milvus_uri=stack.milvus_uri(vi),
                                    embedder=embedder_for(vi),
                                    keyword_store=KeywordStore(keyword_store_path(stack.state_dir, vi.namespace,
                                                                                  vi.alias)),
                                    metric=vi.spec.fields.metric.value,
                                    output_fields=[m.name for m in vi.spec.fields.metadata],
                                    hot_index=vi.spec.hot_index, timeout_s=vi.spec.milvus.timeout_seconds)
        cold = retriever.prewarm()
        warm = retriever.search("warm up", top_k=1, mode="hybrid")  # the same query, now against a loaded index
        out.print(f"retrieval {vi.name}: prewarm {cold.latency_ms:.1f} ms (cold, {cold.mode}), "
                  f"{warm.latency_ms:.1f} ms warm ({warm.mode}{', degraded: ' + warm.reason if warm.degraded else ''})")
        stack.retrievers[name] = retriever
    return stack.retrievers


@dataclass
class Outcome:
    """One input document's run, or why it never became one."""

    source: str
    result: RunResult | None
    problem: str | None = None


def read_input(path: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not): an undecodable file is reported, never fed to a model."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start}); convert it or remove it from the inputs"


def runtime_for(stack: Stack, wf: AutonomousWorkflow) -> tuple[WorkflowRuntime, Any, Any, Any]:
    from pilothouse.serving.audit import AuditLog
    from pilothouse.serving.runs import RunStore
    from pilothouse.serving.runtime import GatewayClient, WorkflowRuntime

    url = store_url(stack.state_dir)
    run_store, audit, model = RunStore(url), AuditLog(url), GatewayClient(stack.gateway_url)
    runtime = WorkflowRuntime(wf, store=run_store, model=model, retrievers=retrievers(stack, wf), audit=audit,
                              owner=f"local-{socket.gethostname()}")
    return runtime, run_store, audit, model


async def run_inputs(stack: Stack, wf: AutonomousWorkflow, inputs: Sequence[tuple[str, Path]], *,
                     concurrency: int, batch: str) -> list[Outcome]:
    """One run per input (``(id, path)``), ``concurrency`` at a time; interrupted earlier runs resume first."""
    runtime, run_store, audit, model = runtime_for(stack, wf)
    try:
        resumed = await runtime.resume_incomplete()
        if resumed:
            out.print(f"resumed {len(resumed)} run(s) interrupted by an earlier stop")
        gate = asyncio.Semaphore(concurrency)

        async def one(item_id: str, path: Path) -> Outcome:
            text, problem = read_input(path)
            if text is None:
                return Outcome(path.name, None, problem)
            async with gate:
                result = await runtime.start(text, run_id=f"{batch}-{item_id}", metadata={"file": str(path)})
            return Outcome(path.name, result)

        with out.status(f"running {len(inputs)} document(s) through {wf.name} ({concurrency} at a time)"):
            return list(await asyncio.gather(*(one(i, p) for i, p in inputs)))
    finally:
        await runtime.aclose()
        await model.aclose()
        run_store.close()
        audit.close()


def _fields(fields: dict[str, Any] | None) -> str:
    if not fields:
        return "-"
    return escape(", ".join(f"{k}={v}" for k, v in fields.items()))[:90]


def outcome_label(result: RunResult) -> str:
    if result.state == "completed":
        return "[green]automated[/]"
    if result.state == "review":
        return f"[yellow]review[/]: {escape(result.review_reason or '')}"
    return f"[red]{result.state}[/]: {escape(result.error or '')}"


def action_label(result: RunResult) -> str:
    action = result.action
    if action is None or not (action.taken or action.compensated):
        return "none"
    return "compensated" if action.compensated else f"done ({escape(str(action.key))})"


def summary(outcomes: Sequence[Outcome], wf: AutonomousWorkflow, stack: Stack) -> dict[str, Any]:
    table = Table(title=f"{wf.name}: {len(outcomes)} document(s)")
    for column in ("Input", "Fields", "Confidence", "Outcome", "Action", "Cost", "Latency"):
        table.add_column(column, overflow="fold")
    runs = [o.result for o in outcomes if o.result is not None]
    for o in outcomes:
        r = o.result
        if r is None:
            table.add_row(escape(o.source), "-", "-", f"[red]not run[/]: {escape(o.problem or '')}", "none", "-", "-")
            continue
        table.add_row(escape(o.source), _fields(r.fields), "-" if r.confidence is None else f"{r.confidence:.2f}",
                      outcome_label(r), action_label(r), f"${r.cost_usd:.6f}", f"{r.latency_s:.1f} s")
    out.print(table)
    n = len(runs) or 1
    automated = sum(r.state == "completed" for r in runs)
    review = sum(r.state == "review" for r in runs)
    compensated = sum(r.state == "compensated" for r in runs)
    latencies = [r.latency_s for r in runs]
    spend = sum(r.cost_usd for r in runs)
    totals = {"runs": len(runs), "not_run": len(outcomes) - len(runs), "automation_rate": automated / n,
              "review_rate": review / n, "compensation_rate": compensated / n, "spend_usd": spend,
              "p95_latency_s": p95(latencies) or 0.0}
    budget = _budget_line(stack, wf)
    out.print(f"automation rate {totals['automation_rate']:.0%} · review rate {totals['review_rate']:.0%} · "
              f"compensation rate {totals['compensation_rate']:.0%} · p95 run time (all runs, review wait excluded) "
              f"{totals['p95_latency_s']:.1f} s · "
              f"spend ${spend:.6f}{budget}")
    return totals


def _budget_line(stack: Stack, wf: AutonomousWorkflow) -> str:
    ref = wf.spec.budget_policy_ref
    policy = next((o for o in stack.objects if o.KIND == "BudgetPolicy" and o.name == ref), None) if ref else None
    if policy is None or policy.status is None:
        return ""
    windows = policy.status.dump().get("windows") or []
    parts = [f"{w['window']} ${w.get('spentUSD', 0):.6f} spent, ${w['remainingUSD']:.2f} left" for w in windows
             if w.get("remainingUSD") is not None]
    return f" · budget {ref}: {policy.status.dump().get('state', '-')}" + (f" ({'; '.join(parts)})" if parts else "")


def tiny_model_note(stack: Stack, tiny_models: Sequence[str]) -> None:
    tiny = {str(Path(p)) for p in tiny_models}
    demo = [m for m in stack.objects if isinstance(m, ModelDeployment) and str(Path(m.spec.model.name)) in tiny]
    if not demo:
        return
    names = ", ".join(m.name for m in demo)
    err.print(f"[bold yellow]note:[/] {names} serve(s) a tiny RANDOM model generated for this demo: its extractions "
              "are meaningless, so confidence sends most documents to review. The rates above measure the "
              "plumbing, not extraction quality. For real rates, set spec.model.name of "
              f"{names} to a real model (a local folder here, or an HF id such as Qwen/Qwen2.5-1.5B-Instruct on a "
              "GPU cluster), or use engine: external with any OpenAI-compatible endpoint, and run this again.")


def inputs_of(directory: Path, job: LocalJob) -> list[tuple[str, Path]]:
    if job.spec.inputs is None:
        return []
    folder = directory / job.spec.inputs
    if not folder.is_dir():
        raise fail(f"LocalJob spec.inputs {job.spec.inputs} is not a folder under {directory}")
    return [(p.stem, p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


def run_job(directory: Path, bundle: manifests.Bundle, job: LocalJob, state_dir: Path, port: int | None) -> None:
    """The body of ``pilothouse run`` for a folder with a LocalJob."""
    started = time.perf_counter()
    batch = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")

    async def go() -> None:
        async with local_stack(bundle, state_dir, port=port, tiny_models=job.spec.tiny_models) as stack:
            out.print(status_table(stack.objects, f"Pilothouse local reconcile ({directory})"))
            wf: AutonomousWorkflow = stack.find(AutonomousWorkflow, job.spec.workflow)
            ingest(stack, directory, job.spec.ingest)
            outcomes = await run_inputs(stack, wf, inputs_of(directory, job), concurrency=job.spec.concurrency,
                                        batch=batch)
            await stack.reconcile()  # SLO figures and budget spend into the statuses
            summary(outcomes, wf, stack)
            if job.spec.dataset:
                score_against(directory / job.spec.dataset, outcomes, wf, batch)
            tiny_model_note(stack, job.spec.tiny_models)
            url = store_url(state_dir)
            out.print(f"audit trail: pilothouse audit tail --store-url {url}  ·  one decision path: pilothouse audit "
                      f"show <run id>/<step> --store-url {url}")
            out.print(f"review queue: pilothouse review list --store-url {url}  ·  statuses: {state_dir}/status.json")

    asyncio.run(go())
    out.print(f"done in {time.perf_counter() - started:.0f} s")


def predictions(outcomes: Sequence[Outcome], ids: dict[str, str]) -> list[Prediction]:
    """The runs as ``pilothouse eval`` predictions: automated = acted with no human."""
    from pilothouse.serving.evaluation import Prediction

    found = []
    for o in outcomes:
        item_id = ids.get(o.source)
        if item_id is None:
            continue
        r = o.result
        found.append(Prediction(id=item_id, fields=r.fields if r else None,
                                automated=(r.state == "completed") if r else None,
                                state=r.state if r else "not-run"))
    return found


def score_against(dataset: Path, outcomes: Sequence[Outcome], wf: AutonomousWorkflow, batch: str) -> None:
    from pilothouse.serving import evaluation

    from .cli_eval import print_report

    schema = next((s.generate.output_schema for s in wf.spec.steps if s.generate), None)
    loaded = evaluation.load_dataset(dataset, fields=(schema or {}).get("properties"))
    ids = {item.path.name: item.id for item in loaded.items}
    kinds = evaluation.field_kinds(schema, [n for item in loaded.items for n in (item.labels or {})])
    report = evaluation.score(loaded.items, predictions(outcomes, ids), kinds, dataset=str(dataset),
                              workflow=wf.name)
    print_report(report, wf)


def predict(workflow_dir: Path, items: list[DatasetItem], state_dir: Path) -> list[Prediction]:
    """``pilothouse eval``'s predictor: run every dataset item through the workflow on the local stack.

    The folder's LocalJob (if any) supplies demo weights and the documents to ingest first. SQL actions
    are pointed at a scratch database in the state folder: an evaluation must not write to the real target.
    """
    bundle = manifests.load(workflow_dir)
    if bundle.errors:
        raise fail(f"{len(bundle.errors)} problem(s) in {workflow_dir}: {bundle.errors[0]}")
    job, _ = find_job(workflow_dir)
    workflows = [o for o in bundle.objects if isinstance(o, AutonomousWorkflow)]
    if len(workflows) != 1:
        raise fail(f"{workflow_dir} must define exactly one AutonomousWorkflow (found {len(workflows)})")
    wf = scratch_actions(workflows[0], state_dir)
    batch = "eval-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")

    async def go() -> list[Outcome]:
        async with local_stack(bundle, state_dir, tiny_models=job.spec.tiny_models if job else ()) as stack:
            if job:
                ingest(stack, workflow_dir, job.spec.ingest)
            return await run_inputs(stack, wf, [(item.id, item.path) for item in items],
                                    concurrency=job.spec.concurrency if job else 2, batch=batch)

    outcomes = asyncio.run(go())
    return predictions(outcomes, {item.path.name: item.id for item in items})


def scratch_actions(wf: AutonomousWorkflow, state_dir: Path) -> AutonomousWorkflow:
    doc = wf.model_dump(mode="json", by_alias=True, exclude_none=True)
    scratch = f"sqlite:///{(state_dir / 'eval-actions.db').resolve()}"
    for step in doc["spec"]["steps"]:
        for action in (step.get("act"), (step.get("act") or {}).get("compensation")):
            if action and action.get("sql"):
                action["sql"]["url"] = scratch
                action["sql"].pop("urlSecretRef", None)
    return AutonomousWorkflow.model_validate(doc)
