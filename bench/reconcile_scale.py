"""Reconcile at scale: N ModelDeployments + M AutonomousWorkflows against the Kubernetes emulator.

Measures time to all Ready, the operator's peak and steady RSS, and how long the RoutingTables of
every workflow take to switch when one widely used ModelDeployment ("hub") goes down.

This process hosts the emulator (kmock, our CRD kinds registered as in tests/integration/conftest.py)
and two fake OpenAI endpoints; the operator is the real ``pilothouse operator`` in a child process,
logged in through KUBECONFIG. Run: ``make bench`` or ``.venv/bin/python bench/reconcile_scale.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import kmock
import lightkube
import machine
from aiohttp import web
from gateway_overhead import free_port
from lightkube import codecs
from lightkube.config.models import Cluster, User
from rich.console import Console
from rich.table import Table

from pilothouse.operator.api import GROUP, VERSION
from pilothouse.operator.k8s import GENERIC  # noqa: F401 (registers our kinds with lightkube's codecs)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "reconcile_scale.json"
NS = "default"
console = Console(highlight=False)


def _emulator_module() -> Any:
    """The test suite's Emulator (kmock completed where kopf needs real API-server behaviour).

    Loaded by file path: ``tests`` is not an installed package, and importing it as one would need
    the repository root on sys.path (and would run tests/integration/__init__.py for nothing).
    """
    path = ROOT / "tests" / "integration" / "emulator.py"
    spec = importlib.util.spec_from_file_location("pilothouse_bench_emulator", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EMULATOR = _emulator_module()
MD = kmock.resource(f"{GROUP}/{VERSION}/modeldeployments")
WF = kmock.resource(f"{GROUP}/{VERSION}/autonomousworkflows")
CM = kmock.resource("v1/configmaps")


class FakeOpenAI:
    """GET /v1/models answers 200; stop() takes the endpoint down (connections refused)."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.hits = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _models(self, _: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"object": "list", "data": []})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


# --- the operator process: RSS (with descendants) and CPU time from /proc -------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{current}/task/{task}/children") as f:
                    queue.extend(int(c) for c in f.read().split())
    return pids


def _rss_cpu(pid: int) -> tuple[float, float]:
    """(RSS MiB, user+system CPU seconds) of pid and its live descendants (psutil is not a dependency)."""
    rss = cpu = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{p}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE_MB
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            cpu += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return rss, cpu


class Sampler(threading.Thread):
    """Samples the operator every `interval` s from a thread, so a busy event loop cannot skew it."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, rss MiB, cpu s)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss, cpu = _rss_cpu(self.pid)
            if rss:
                self.samples.append((time.perf_counter(), rss, cpu))
            self.done.wait(self.interval)

    def window(self, start: float, end: float | None = None) -> list[tuple[float, float, float]]:
        end = end if end is not None else float("inf")
        return [s for s in list(self.samples) if start <= s[0] <= end]

    def peak(self, start: float = 0.0, end: float | None = None) -> float | None:
        window = self.window(start, end)
        return round(max(s[1] for s in window), 1) if window else None

    def cpu(self, start: float, end: float | None = None) -> float | None:
        window = self.window(start, end)
        return round(window[-1][2] - window[0][2], 1) if len(window) > 1 else None

    def latest(self) -> tuple[float, float]:
        return (self.samples[-1][1], self.samples[-1][2]) if self.samples else (0.0, 0.0)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if this process dies without cleaning up (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- manifests -------------------------------------------------------------------------------------

def manifests(models: int, workflows: int, tiers: int, shared: str, hub: str) -> list[dict[str, Any]]:
    """`models` ModelDeployments in all (hub and hub-backup included), then `workflows` workflows."""
    def md(name: str, url: str, tier: str, fallback: list[str]) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"model": {"name": f"served-{name}"}, "engine": "external", "external": {"url": url},
                         "tier": tier, "fallback": fallback,
                         "pricing": {"inputPerMillionUSD": 0.1, "outputPerMillionUSD": 0.4}}}

    others = max(models - 2, 0)
    docs = [md("hub", hub, "hub", ["hub-backup"]), md("hub-backup", shared, "hub", [])]
    for i in range(others):
        # every third model falls back to the next one in its tier: chains, as real fleets have
        fallback = [f"m{(i + tiers) % others:04d}"] if i % 3 == 0 and others > tiers else []
        docs.append(md(f"m{i:04d}", shared, f"t{i % tiers}", fallback))
    for i in range(workflows):
        docs.append({
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "AutonomousWorkflow",
            "metadata": {"name": f"wf{i:04d}", "namespace": NS},
            "spec": {"mission": f"benchmark workflow {i}",
                     "steps": [{"name": "extract", "type": "generate",
                                "generate": {"modelDeploymentRef": "hub", "promptTemplate": "{input}"}}]}})
    return docs


# --- reading the emulator in-process (no HTTP, no copies) ------------------------------------------

def _get(k8s: kmock.KubernetesEmulator, resource: Any, name: str) -> dict[str, Any] | None:
    key = (resource, NS, name)
    if key not in k8s.objects:
        return None
    found = k8s.objects[key]
    return None if found.deleted else found.raw


def ready_status(k8s: kmock.KubernetesEmulator, resource: Any, name: str) -> str | None:
    obj = _get(k8s, resource, name) or {}
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c.get("status") for c in conds if c.get("type") == "Ready"), None)


def not_ready_reasons(k8s: kmock.KubernetesEmulator, resource: Any, names: list[str]) -> dict[str, int]:
    """Why objects are not Ready, counted by condition reason (the status a platform team would see)."""
    counts: dict[str, int] = {}
    for name in names:
        obj = _get(k8s, resource, name) or {}
        conds = (obj.get("status") or {}).get("conditions") or []
        cond = next((c for c in conds if c.get("type") == "Ready"), None)
        if cond is None or cond.get("status") != "True":
            reason = "NoStatus" if cond is None else str(cond.get("reason"))
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def first_backend(k8s: kmock.KubernetesEmulator, workflow: str) -> tuple[str | None, int | None]:
    cm = _get(k8s, CM, f"{workflow}-routing")
    text = ((cm or {}).get("data") or {}).get("routing.json")
    if not text:
        return None, None
    table = json.loads(text)
    routes = table.get("routes") or [{}]
    backends = routes[0].get("backends") or [{}]
    return backends[0].get("modelDeployment"), table.get("revision")


# --- the run ---------------------------------------------------------------------------------------

async def create_all(kube: lightkube.AsyncClient, docs: list[dict[str, Any]], concurrency: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(doc: dict[str, Any]) -> None:
        async with gate:
            try:
                await kube.create(codecs.from_dict(doc))
            except Exception as exc:  # reported, not fatal: the numbers say how many made it
                errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")

    await asyncio.gather(*(one(d) for d in docs))
    return errors


async def wait_alive(port: int, process: asyncio.subprocess.Process, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    async with httpx.AsyncClient() as http:
        while time.perf_counter() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"operator exited with {process.returncode} before its liveness endpoint answered")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"operator liveness endpoint not up within {timeout}s")


def _progress(t: float, label: str, sampler: Sampler, **counts: Any) -> None:
    rss, cpu = sampler.latest()
    parts = " ".join(f"{k}={v}" for k, v in counts.items())
    console.print(f"[dim]{t:7.1f}s[/] {label:<10} {parts}  operator rss={rss:.0f}MiB cpu={cpu:.0f}s", soft_wrap=True)


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"models": args.models, "workflows": args.workflows, "notes": []}
    notes: list[str] = result["notes"]
    shared, hub = FakeOpenAI(), FakeOpenAI()
    await shared.start()
    await hub.start()
    async with EMULATOR.Emulator() as k8s, kmock.Server(k8s):
        k8s.declare_kinds()
        server = str(k8s.url).rstrip("/")
        kubeconfig = EMULATOR.write_kubeconfig(tmp / "kubeconfig", server)
        port = free_port()
        log_path = Path(args.log) if args.log else tmp / "operator.log"
        log = log_path.open("w")
        prefix = [sys.executable]
        if args.profile:
            prefix += ["-m", "cProfile", "-o", args.profile]
        command = [*prefix, "-m", "pilothouse", "operator", "--liveness", f"http://127.0.0.1:{port}/healthz",
                   "--store-url", f"sqlite:///{tmp}/store.db", "--milvus-uri", str(tmp / "milvus.db")]
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PILOTHOUSE_HEALTH_INTERVAL": str(args.health_interval)}
        process = await asyncio.create_subprocess_exec(*command, env=env, stdout=log, stderr=log,
                                                       start_new_session=True, preexec_fn=_die_with_parent)
        sampler = Sampler(process.pid)
        sampler.start()
        kube = lightkube.AsyncClient(
            config=lightkube.KubeConfig.from_one(cluster=Cluster(server=server), user=User(), namespace=NS),
            field_manager="bench", trust_env=False)
        try:
            t_start = time.perf_counter()
            await wait_alive(port, process, 60)
            result["operator_startup_s"] = round(time.perf_counter() - t_start, 2)
            result["operator_idle_rss_mb"] = round(sampler.latest()[0], 1)

            docs = manifests(args.models, args.workflows, args.tiers, shared.url, hub.url)
            md_names = [d["metadata"]["name"] for d in docs if d["kind"] == "ModelDeployment"]
            wf_names = [d["metadata"]["name"] for d in docs if d["kind"] == "AutonomousWorkflow"]
            t0 = time.perf_counter()
            errors = await create_all(kube, docs, args.concurrency)
            result["apply_s"] = round(time.perf_counter() - t0, 2)
            if errors:
                notes.append(f"{len(errors)} creates failed, first: {errors[0]}")
            _progress(time.perf_counter() - t0, "applied", sampler, objects=len(docs) - len(errors))

            # --- all Ready ---
            deadline = t0 + args.ready_timeout
            last_report = 0.0
            t_md_ready = None
            while True:
                now = time.perf_counter()
                md_ok = sum(ready_status(k8s, MD, n) == "True" for n in md_names)
                wf_ok = sum(ready_status(k8s, WF, n) == "True" for n in wf_names)
                if md_ok == len(md_names) and t_md_ready is None:
                    t_md_ready = now
                if md_ok == len(md_names) and wf_ok == len(wf_names):
                    break
                if now > deadline:
                    break
                if now - last_report >= args.report_every:
                    last_report = now
                    _progress(now - t0, "waiting", sampler, md_ready=f"{md_ok}/{len(md_names)}",
                              wf_ready=f"{wf_ok}/{len(wf_names)}")
                await asyncio.sleep(0.25)
            t_ready = time.perf_counter()
            all_ready = md_ok == len(md_names) and wf_ok == len(wf_names)
            result["models_ready"], result["workflows_ready"] = md_ok, wf_ok
            result["models_all_ready_s"] = round(t_md_ready - t0, 2) if t_md_ready else None
            result["all_ready_s"] = round(t_ready - t0, 2) if all_ready else None
            result["operator_cpu_to_ready_s"] = sampler.cpu(t0, t_ready)
            _progress(t_ready - t0, "ready" if all_ready else "TIMEOUT", sampler,
                      md_ready=f"{md_ok}/{len(md_names)}", wf_ready=f"{wf_ok}/{len(wf_names)}")
            result["not_ready_reasons"] = {"models": not_ready_reasons(k8s, MD, md_names),
                                           "workflows": not_ready_reasons(k8s, WF, wf_names)}
            if not all_ready:
                notes.append(f"not all Ready within --ready-timeout {args.ready_timeout}s "
                             f"({md_ok}/{len(md_names)} models, {wf_ok}/{len(wf_names)} workflows)")

            # --- steady state: one full health-timer period with nothing changing ---
            settle = max(args.settle, args.health_interval)
            await asyncio.sleep(settle)
            t_settled = time.perf_counter()
            window = sampler.window(t_settled - settle, t_settled)
            result["operator_steady_rss_mb"] = round(statistics.median(s[1] for s in window), 1) if window else None
            cpu = sampler.cpu(t_settled - settle, t_settled)
            result["operator_steady_cpu_pct"] = round(100 * cpu / settle, 1) if cpu is not None else None

            # --- hub goes down ---
            if all_ready or args.hub_down_anyway:
                await hub_down(args, k8s, hub, wf_names, sampler, result)
            else:
                notes.append("hub-down phase skipped: not all objects were Ready (--hub-down-anyway to force)")
            result["operator_peak_rss_mb"] = sampler.peak()
        finally:
            await kube.close()
            await stop_operator(process, graceful=bool(args.profile))
            sampler.done.set()
            sampler.join()
            log.close()
            await hub.stop()
            await shared.stop()
        text = log_path.read_text(errors="replace")
        result["operator_log_lines"] = text.count("\n")
        result["operator_log_errors"] = text.count(" ERROR ")
        result["operator_log_tracebacks"] = text.count("Traceback")
        result["emulator_requests"] = k8s.served
        result["emulator_cpu_s"] = round(os.times().user + os.times().system, 1)
        result["probe_requests"] = shared.hits + hub.hits
    return result


async def hub_down(args: argparse.Namespace, k8s: kmock.KubernetesEmulator, hub: FakeOpenAI, wf_names: list[str],
                   sampler: Sampler, result: dict[str, Any]) -> None:
    before = {n: first_backend(k8s, n) for n in wf_names}
    wrong = [n for n, (first, _) in before.items() if first != "hub"]
    if wrong:
        result["notes"].append(f"{len(wrong)} routing tables did not start with hub (e.g. {wrong[0]}: "
                               f"{before[wrong[0]][0]})")
    t_stop = time.perf_counter()
    await hub.stop()
    t_detect = t_first = None
    switched: dict[str, float] = {}
    last_report = t_stop
    while time.perf_counter() - t_stop < args.recompile_timeout:
        now = time.perf_counter()
        if t_detect is None and ready_status(k8s, MD, "hub") == "False":
            t_detect = now
        for name in wf_names:
            if name not in switched and first_backend(k8s, name)[0] == "hub-backup":
                switched[name] = now
        if switched and t_first is None:
            t_first = now
        if len(switched) == len(wf_names) and t_detect is not None:
            break
        if now - last_report >= args.report_every:
            last_report = now
            _progress(now - t_stop, "hub down", sampler, hub_ready=ready_status(k8s, MD, "hub"),
                      switched=f"{len(switched)}/{len(wf_names)}")
        await asyncio.sleep(0.1)
    t_end = time.perf_counter()
    done = len(switched) == len(wf_names) and t_detect is not None
    _progress(t_end - t_stop, "switched" if done else "TIMEOUT", sampler, hub_ready=ready_status(k8s, MD, "hub"),
              switched=f"{len(switched)}/{len(wf_names)}")
    result["hub_down_detect_s"] = round(t_detect - t_stop, 2) if t_detect else None
    result["hub_down_first_table_s"] = round(t_first - t_stop, 2) if t_first else None
    result["recompile_all_s"] = round(max(switched.values()) - t_detect, 2) if done and t_detect else None
    result["hub_down_total_s"] = round(max(switched.values()) - t_stop, 2) if done else None
    result["tables_switched"] = len(switched)
    result["operator_cpu_hub_down_s"] = sampler.cpu(t_stop, t_end)
    revisions = [first_backend(k8s, n)[1] for n in wf_names]
    bumped = sum(1 for n, rev in zip(wf_names, revisions, strict=True)
                 if rev is not None and before[n][1] is not None and rev > before[n][1])
    result["tables_revision_bumped"] = bumped
    if not done:
        result["notes"].append(f"hub-down: {len(switched)}/{len(wf_names)} tables switched within "
                               f"--recompile-timeout {args.recompile_timeout}s")


async def stop_operator(process: asyncio.subprocess.Process, *, graceful: bool) -> None:
    """SIGTERM (kopf shuts down cleanly; cProfile then writes its file), then kill the whole group."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), 60 if graceful else 15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


ROWS = [
    ("models", "ModelDeployments", ""), ("workflows", "AutonomousWorkflows", ""),
    ("apply_s", "apply (all created)", "s"), ("models_all_ready_s", "all models Ready (first time)", "s"),
    ("all_ready_s", "all Ready", "s"), ("operator_cpu_to_ready_s", "operator CPU while waiting for Ready", "s"),
    ("operator_idle_rss_mb", "operator RSS, empty cluster", "MiB"),
    ("operator_peak_rss_mb", "operator peak RSS", "MiB"), ("operator_steady_rss_mb", "operator steady RSS", "MiB"),
    ("operator_steady_cpu_pct", "operator CPU at steady state", "%"),
    ("hub_down_detect_s", "hub down -> hub Ready=False", "s"),
    ("recompile_all_s", "hub Ready=False -> all tables switched", "s"),
    ("hub_down_total_s", "hub down -> all tables switched", "s"),
    ("operator_cpu_hub_down_s", "operator CPU during hub-down", "s"),
    ("emulator_cpu_s", "emulator + bench CPU, whole run", "s"), ("emulator_requests", "API requests served", ""),
]


def render(report: dict[str, Any]) -> None:
    rec = report["reconcile"]
    table = Table(title=f"reconcile_scale (health interval {report['config']['health_interval']} s, "
                        f"{report['machine']['cpus']} CPUs)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, unit in ROWS:
        value = rec.get(key)
        table.add_row(label, "—" if value is None else f"{value} {unit}".strip())
    console.print(table)
    for kind, reasons in (rec.get("not_ready_reasons") or {}).items():
        if reasons:
            console.print(f"not Ready {kind}: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())))
    for note in rec.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


async def _cancellable(coro: Any) -> Any:
    """SIGTERM/SIGINT cancel the run, so its finally blocks stop the operator and the servers."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=1000, help="ModelDeployments in all, hub + hub-backup included")
    parser.add_argument("--workflows", type=int, default=200, help="AutonomousWorkflows, each routed to hub")
    parser.add_argument("--tiers", type=int, default=10, help="tiers t0..t(N-1) the other models spread over")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent creates")
    parser.add_argument("--health-interval", type=float, default=10.0,
                        help="operator health-timer period (PILOTHOUSE_HEALTH_INTERVAL); 10 s is the default")
    parser.add_argument("--ready-timeout", type=float, default=360.0, help="give up waiting for all Ready after")
    parser.add_argument("--recompile-timeout", type=float, default=120.0, help="give up waiting for the switch after")
    parser.add_argument("--settle", type=float, default=5.0, help="steady-state window (at least one interval)")
    parser.add_argument("--hub-down-anyway", action="store_true", help="run the hub-down phase even if not Ready")
    parser.add_argument("--report-every", type=float, default=10.0, help="progress line period (s)")
    parser.add_argument("--profile", help="run the operator under cProfile, write the stats here and print the top")
    parser.add_argument("--log", help="keep the operator's log at this path (default: a temporary file)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args()
    machine.sample_speed()
    if args.profile:
        args.profile = str(Path(args.profile).resolve())

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pilothouse-bench-") as tmp:
        try:
            rec = asyncio.run(_cancellable(bench(args, Path(tmp))))
        except asyncio.CancelledError:
            console.print("[red]interrupted[/]: operator stopped, nothing written")
            sys.exit(130)
    report = {
        "benchmark": "reconcile_scale",
        "when": machine.measured_at(),
        "reconcile": rec,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "log", "profile")},
        "machine": machine.describe("kopf", "kmock", "lightkube", "pydantic"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = machine.save(Path(args.out), report)
    render(report)
    console.print(f"wrote {out} (wall {report['wall_s']} s)")
    if args.profile and Path(args.profile).exists():
        import pstats

        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
