"""Gateway overhead: added latency and max RPS of Pilothouse vs the backend, bare Ray Serve and LiteLLM.

Every piece runs in its own process, all on loopback:

- ``backend``: the test suite's FakeBackend (aiohttp) with a fixed 20 ms latency and fixed token counts;
- ``ray``: one Ray + Serve holding two applications behind the same HTTP proxy: a bare pass-through
  (FastAPI ingress forwarding the body to the backend with one pooled aiohttp session, the client the
  gateway's external engine uses: the floor of our stack) at ``/pt`` and the Pilothouse gateway
  (``serve.application``, what ``app_builder`` deploys) at ``/`` with API keys, a BudgetPolicy rule with a
  high cap (the ledger reserves and commits), audit and metrics on. Requests use ``temperature 0.7``, so the
  response cache never applies;
- ``litellm``: ``litellm --config`` with one model pointing at the backend, master key on, no database
  (so no budgets, no spend logs), no callbacks, when the ``litellm`` CLI is installed;
- ``load``: the load generator (aiohttp client, one process per measurement).

Concurrency 1 runs a fixed number of requests; concurrency 32 (and 256 with ``--c256``) runs for a fixed
duration after a warm-up. Results: a rich table and ``bench/results/gateway_overhead.json``.
``--throughput-optimized both`` repeats the Ray targets in Serve's throughput-optimized mode with HAProxy on the
Serve port (``serve.ray_env``), the gateway's production configuration. ``--profile`` samples the gateway
replica and the Serve proxy with py-spy during a c=32 run and groups the samples by component. ``--replicas N``
gives the pass-through and the gateway N replicas each (default 1). ``--c256 --pairs N`` adds N alternating
c=256 windows of the pass-through and the gateway in the last Serve mode measured, each with its replicas' CPU
per request on the event-loop thread and on the other threads (from ``/proc``), and the whole machine's CPU per
request and idle share (from ``/proc/stat``, read by the load generator over its window).
With ``--c32-rounds`` in the throughput-optimized mode the gateway replica also answers on its direct port
(``GatewayArgs.direct_port``: how a Deployment's gateway pod is reached, past Serve's ingress), measured as the target
``pilothouse, direct port`` in those rounds (at every replica count), and with ``--pair-direct-port N`` in the
``--pairs`` windows at N replicas too, a third target beside the pass-through and the gateway through Serve's ingress
(``max_rps_judged_direct_port``).
``--pair-replicas 1 2`` runs those windows at each replica count (a Ray instance each), and LiteLLM's c=256 with
as many workers: each target's max RPS is the median of its best count's windows, and their ratio (paired
when both peak at the same count) is the figure the 0.75x goal is judged by (``max_rps_judged``). With
``--c32-rounds``, each other replica count also gets its c=32 rounds (``c32_rounds_by_replicas``).

Run: ``.venv/bin/python bench/gateway_overhead.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gateway_overhead.json"
BACKEND_MODEL = "org/small"
KEY = "sk-bench-0123456789abcdef"
LATENCY_S = 0.020
REPLY_TOKENS = 16
PROMPT = "Summarise the quarterly report for the platform team in three short bullet points please"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": REPLY_TOKENS, "temperature": 0.7}).encode()


# ---- role: backend --------------------------------------------------------------------------------
def role_backend(port: int, model: str = BACKEND_MODEL) -> None:
    spec = importlib.util.spec_from_file_location("bench_fake_backend", ROOT / "tests" / "fakes" / "openai_backend.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        fake = module.FakeBackend(model=model, reply_tokens=REPLY_TOKENS)
        fake.port = port
        async with fake:
            fake.latency(LATENCY_S)
            print("ready", flush=True)
            await stop.wait()

    _run(main())


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---- role: load generator -------------------------------------------------------------------------
def machine_cpu() -> tuple[float, float, float]:
    """(busy, idle, stolen) CPU seconds of the whole machine so far, from /proc/stat's first line."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, stolen = ticks[3] + ticks[4], ticks[7] if len(ticks) > 7 else 0
    return (sum(ticks[:8]) - idle - stolen) / CLK_TCK, idle / CLK_TCK, stolen / CLK_TCK


def role_load(url: str, model: str, concurrency: int, requests: int, duration: float, warmup: int) -> None:
    import aiohttp

    body = chat_body(model)
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        issued = 0
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def one() -> tuple[float, str | None]:
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        payload = await r.read()
                        if r.status != 200:
                            return 0.0, f"{r.status} {payload[:120]!r}"
                        if b'"completion_tokens"' not in payload:
                            return 0.0, "no usage"
                except Exception as exc:
                    return 0.0, type(exc).__name__
                return (time.perf_counter() - start) * 1000, None

            await asyncio.gather(*(one() for _ in range(warmup)))
            t0 = time.perf_counter()
            deadline = t0 + duration
            machine_before, own_before = machine_cpu(), time.process_time()

            async def worker() -> None:
                nonlocal issued
                while issued < requests and time.perf_counter() < deadline:
                    issued += 1
                    ms, err = await one()
                    if err is None:
                        latencies.append(ms)
                    else:
                        errors[err] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0
            busy, idle, stolen = (b - a for a, b in zip(machine_before, machine_cpu(), strict=True))
            own = time.process_time() - own_before
        latencies.sort()
        n = len(latencies)
        return {"ok": n, "errors": sum(errors.values()), "sent": issued + warmup,
                "error_kinds": dict(errors.most_common(3)),
                "elapsed_s": round(elapsed, 3), "rps": round(n / elapsed, 1) if elapsed else 0.0,
                "p50_ms": round(statistics.median(latencies), 2) if n else None,
                "p99_ms": round(latencies[min(n - 1, int(n * 0.99))], 2) if n else None,
                "mean_ms": round(statistics.fmean(latencies), 2) if n else None,
                "machine_busy_us_per_request": round(busy / n * 1e6, 1) if n else None,
                "loadgen_us_per_request": round(own / n * 1e6, 1) if n else None,
                "machine_idle_share": round(idle / (busy + idle + stolen), 3) if busy + idle else None,
                "machine_stolen_share": round(stolen / (busy + idle + stolen), 3) if busy + idle else None}

    print(json.dumps(_run(main())), flush=True)


# ---- role: ray (pass-through + Pilothouse gateway on one Serve instance) ----------------------------
def passthrough_app(backend: str) -> Any:
    """The floor of our stack: a FastAPI app that forwards the body to ``backend`` and its answer back, with one
    pooled ``aiohttp`` session (the client the gateway's external engine uses, so the floor is a fair one)."""
    import aiohttp
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    session: list[aiohttp.ClientSession] = []  # created in the serving event loop, on first use
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    async def whoami(_: Request) -> Response:
        return Response(b'{"target": "passthrough"}', media_type="application/json")

    async def chat(request: Request) -> Response:
        if not session:
            session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)))
        async with session[0].post(f"{backend}/chat/completions", data=await request.body(),
                                   headers={"content-type": "application/json"}) as r:
            return Response(await r.read(), status_code=r.status, media_type="application/json")

    # Plain Starlette routes: no signature inspection (under Ray this is pickled by value from __main__, where
    # FastAPI could not resolve the postponed annotations).
    app.add_route("/whoami", whoami, methods=["GET"])
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    return app


def role_ray(config_path: str) -> None:
    import ray
    from fastapi import FastAPI
    from ray import serve

    from pilothouse.serving import serve as gateway

    cfg = json.loads(Path(config_path).read_text())
    os.environ.update(gateway.ray_env(throughput_optimized=cfg["throughput_optimized"]))
    backend = cfg["backend"]

    # Serve's settings as the gateway's (no access log line per request), so the floor is the same stack
    @serve.deployment(name="PassThrough", max_ongoing_requests=gateway.MAX_ONGOING_REQUESTS,
                      logging_config=gateway.LOGGING, ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class PassThrough:
        def __serve_build_asgi_app__(self) -> FastAPI:
            return passthrough_app(backend)

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg["port"]})
        replicas = cfg["replicas"]  # both targets alike: the floor scales as the gateway does
        serve.run(PassThrough.options(num_replicas=replicas).bind(), name="passthrough", route_prefix="/pt",
                  blocking=False)

        args = gateway.GatewayArgs(routing=cfg["routing"], api_keys=cfg["keys"], store_url=cfg["store_url"],
                                   direct_port=cfg.get("direct_port"), direct_host="127.0.0.1")
        serve.run(gateway.application(args, replicas=replicas), name=gateway.APP_NAME, route_prefix="/", blocking=False)
        if cfg.get("routing_nobudget"):  # ablation: the same gateway with no BudgetPolicy rule (no ledger work)
            nb = args.model_copy(update={"routing": cfg["routing_nobudget"], "direct_port": None})
            serve.run(gateway.application(nb, replicas=replicas), name="nobudget", route_prefix="/nb", blocking=False)
        print(json.dumps({"ready": True}), flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


# ---- orchestration ----------------------------------------------------------------------------------
class Proc:
    """A child in its own process group (killed as a group), with its stdout lines readable."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.log = log
        err = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                  env={**os.environ, **(env or {})}, start_new_session=True)

    def readline(self, timeout: float) -> str:
        import select

        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no output from {self.p.args!r} in {timeout} s")
        line = self.p.stdout.readline()
        if not line:
            tail = self.log.read_text()[-2000:] if self.log and self.log.exists() else ""
            raise RuntimeError(f"{self.p.args!r} exited ({self.p.poll()}): {tail}")
        return line

    def stop(self, grace: float = 60.0) -> None:
        # SIGTERM to the leader only: sent to the whole group it also hit Serve's HAProxy mid-shutdown, and the
        # HAProxy that Serve started again in its place outlived the run (seen once, holding its port).
        if self.p.poll() is None:
            self.p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.p.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)  # stragglers of the group (Ray workers, litellm workers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)


def wait_http(url: str, timeout: float, *, method: str = "GET", body: bytes | None = None,
              key: str | None = KEY) -> None:
    """Until ``url`` answers 200 (the first answer of a cold engine may take seconds)."""
    import httpx

    deadline = time.monotonic() + timeout
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.request(method, url, content=body, headers=headers, timeout=30)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout} s: {last}")


def load(url: str, model: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    if concurrency == 1:
        requests, duration, warmup = args.c1_requests, 120.0, 10
    else:
        requests, duration, warmup = 10**9, args.duration, concurrency * 2
    argv = [PY, __file__, "--role", "load", "--url", url, "--model", model, "--concurrency", str(concurrency),
            "--requests", str(requests), "--seconds", str(duration), "--warmup", str(warmup)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120, cwd=ROOT, check=False)
    if out.returncode != 0:
        return {"ok": 0, "errors": -1, "error_kinds": {"loadgen": out.stderr[-300:]}, "rps": 0.0,
                "p50_ms": None, "p99_ms": None}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def proc_tree(root: int) -> dict[int, str]:
    """pid → title for ``root`` and its descendants (from /proc)."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        titles[int(entry)] = cmd.strip()
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return {pid: titles.get(pid, "") for pid in tree}


def _stat_cpu(stat: str) -> float:
    """User + system CPU seconds from a ``/proc`` stat file (a process's or one of its threads'); 0 once gone."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of these processes, by (pid, tid), from /proc."""
    used: dict[tuple[int, int], float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                used[(pid, int(tid))] = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
    return used


def loop_and_rest(before: dict[tuple[int, int], float], after: dict[tuple[int, int], float],
                  pids: list[int]) -> tuple[float, float]:
    """(CPU seconds of each process's busiest thread, summed; of all its other threads) between two readings.

    A replica's busiest thread under load is the one running its event loop: the request path is Python on
    one loop, so that thread's CPU per request bounds the replica's requests per second, whatever the rest do.
    """
    loop = rest = 0.0
    for pid in pids:
        deltas = [after[k] - before.get(k, 0.0) for k in after if k[0] == pid]
        if deltas:
            loop += max(deltas)
            rest += sum(deltas) - max(deltas)
    return loop, rest


REPLICA = {"serve passthrough": "passthrough replica", "pilothouse": "gateway replica"}  # target -> label()
DIRECT = "pilothouse, direct port"
"""The gateway replica on its own server (``GatewayArgs.direct_port``), past Serve's ingress: how a Deployment's gateway
pod is reached (``operator/render_gateway.py``); a RayService's through Serve's ingress (``pilothouse``)."""


def label(title: str) -> str:
    for key, name in (("ServeReplica:gateway", "gateway replica"), ("ServeReplica:nobudget", "no-budget replica"),
                      ("ServeReplica:passthrough", "passthrough replica"),
                      ("ProxyActor", "serve proxy"), ("haproxy", "haproxy"), ("ServeController", "serve controller"),
                      ("raylet", "raylet"), ("gcs_server", "gcs"), ("--role ray", "driver")):
        if key in title:
            return name
    return "other ray"


def measure_cpu(pids: dict[int, str], run: Any) -> tuple[Any, dict[str, float]]:
    before = {pid: cpu_seconds(pid) for pid in pids}
    result = run()
    used: Counter[str] = Counter()
    for pid, title in pids.items():
        used[title] += cpu_seconds(pid) - before[pid]
    return result, {k: round(v, 2) for k, v in used.most_common() if v >= 0.05}


# ---- profile ----------------------------------------------------------------------------------------
CATEGORIES = [  # first match wins, checked on the whole stack (outermost first)
    ("ledger (budget, SQLite)", ("serving/ledger.py",)), ("audit (SQLite)", ("serving/audit.py",)),
    ("group commit thread (ledger, audit)", ("serving/group_commit.py",)),
    ("idempotency/cache", ("serving/idempotency.py", "serving/cache.py")),
    ("metrics (prometheus_client)", ("serving/metrics.py", "prometheus_client")),
    ("sqlalchemy/sqlite (other)", ("sqlalchemy", "sqlite3")),
    ("backend call (engine, aiohttp)", ("serving/engines/", "aiohttp/", "httpx", "httpcore")),
    ("validation/JSON (ours)", ("serving/openai_schema.py",)), ("router/breaker (ours)", ("serving/router.py",
                                                                                          "serving/breaker.py")),
    ("dataplane other (ours)", ("serving/dataplane.py",)),
    ("auth/body middleware (ours)", ("serving/auth.py", "serving/gateway.py")),
    ("fastapi/starlette", ("fastapi", "starlette")),
    ("ray serve internals", ("ray/serve",)), ("ray core (rpc, threads)", ("ray/", "grpc")),
    ("uvicorn/asyncio loop", ("uvicorn", "asyncio", "uvloop")),
]
IDLE = ("epoll_wait", "select (selectors", "_run_once", "wait (threading", "poll (selectors")


def categorize(stack: str) -> str:
    frames = stack.split(";")
    leaf = frames[-1] if frames else ""
    if any(k in leaf for k in IDLE):
        return "idle (waiting)"
    for name, keys in CATEGORIES:
        if any(k in stack for k in keys):
            return name
    return "other"


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"error": "no profile written"}
    by_cat: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        by_cat[categorize(stack)] += n
        leaf = stack.split(";")[-1]
        self_time[re.sub(r"\s*\(.*?([^/]+\.py):\d+\)", r" (\1)", leaf)] += n
    busy = total - by_cat["idle (waiting)"]
    return {"samples": total, "busy_samples": busy,
            "share_of_busy": {k: round(v / busy, 3) for k, v in by_cat.most_common() if k != "idle (waiting)"}
            if busy else {},
            "top_self": [[k, round(v / max(1, busy), 3)] for k, v in self_time.most_common(15)]}


# ---- main -------------------------------------------------------------------------------------------
def write_fixtures(folder: Path, backend_url: str, **backend: Any) -> dict[str, Any]:
    """The gateway's files: one route whose only backend is at ``backend_url`` (with and without a budget
    rule whose cap never binds, so the ledger reserves and commits every request), and the API key.
    ``backend`` overrides the backend's fields (camelCase), e.g. an in-cluster ``engine: vllm``."""
    from pilothouse.operator.api import RoutingTable

    table = RoutingTable.model_validate({
        "workflow": "wf", "namespace": "bench", "revision": 1, "generatedAt": datetime.now(UTC).isoformat(),
        "degraded": False,
        "routes": [{"step": "extract", "tier": "small", "maxTokens": backend.pop("maxTokens", 256), "backends": [{
            "modelDeployment": "small", "model": BACKEND_MODEL, "endpoint": backend_url, "engine": "external",
            "tier": "small", "contextWindow": 8192, "healthy": True, "role": "primary", "reason": "bench",
            "pricing": {"inputPerMillionUSD": 1.0, "outputPerMillionUSD": 2.0}, **backend}]}],
        "budget": {"policy": "bench", "state": "Ok", "action": "none",
                   "limits": [{"window": "day", "maxCostUSD": 1e9}]},
    })
    routing = folder / "routing.json"
    routing.write_text(table.model_dump_json(by_alias=True, indent=2))
    nobudget = folder / "routing-nobudget.json"
    nobudget.write_text(table.model_copy(update={"budget": None}).model_dump_json(by_alias=True, indent=2))
    keys = folder / "keys.yaml"
    keys.write_text(f"{KEY}: team-bench\n")
    return {"routing": str(routing), "routing_nobudget": str(nobudget), "keys": str(keys),
            "store_url": f"sqlite:///{folder}/store.db"}


def start_ray(folder: Path, fixtures: dict[str, Any], backend_url: str, tp: bool,
              ablation: bool, replicas: int = 1, direct_port: int | None = None) -> tuple[Proc, int]:
    port = free_port()
    cfg = folder / f"ray-{'tp' if tp else 'default'}.json"
    if not ablation:
        fixtures = {k: v for k, v in fixtures.items() if k != "routing_nobudget"}
    cfg.write_text(json.dumps({**fixtures, "backend": backend_url, "port": port, "throughput_optimized": tp,
                               "replicas": replicas, "direct_port": direct_port}))
    proc = Proc([PY, __file__, "--role", "ray", "--config", str(cfg)], log=folder / f"ray-{tp}.log")
    proc.readline(180)
    return proc, port


def up(folder: Path, fixtures: dict[str, Any], backend: tuple[str, int], tp: bool, ablation: bool,
       replicas: int, direct_port: int | None = None) -> tuple[Proc, dict[str, str], dict[int, str]]:
    """A Ray instance serving every Ray target, each answering: (its process, target -> URL, pid -> label).
    ``backend``: the backend's URL and pid; ``direct_port``: the gateway replicas' direct port too (the target
    ``pilothouse, direct port``)."""
    ray_proc, port = start_ray(folder, fixtures, backend[0], tp, ablation, replicas, direct_port)
    urls = {"serve passthrough": f"http://127.0.0.1:{port}/pt/v1/chat/completions",
            "pilothouse": f"http://127.0.0.1:{port}/v1/chat/completions"}
    if ablation:
        urls["pilothouse, no budget"] = f"http://127.0.0.1:{port}/nb/v1/chat/completions"
    if direct_port is not None:
        urls[DIRECT] = f"http://127.0.0.1:{direct_port}/v1/chat/completions"
    for target, url in urls.items():
        wait_http(url, 60, method="POST", body=chat_body(model_for(target)))
    pids = {pid: label(title) for pid, title in proc_tree(ray_proc.p.pid).items()}
    pids[backend[1]] = "backend"
    return ray_proc, urls, pids


def start_litellm(folder: Path, backend_url: str, workers: int = 1) -> tuple[Proc, int] | None:
    # LiteLLM lives in its own venv (make bench creates .venv-litellm): its pins downgrade openai and
    # rich, which the project's own venv must not inherit.
    exe = shutil.which("litellm", path=os.pathsep.join([str(ROOT / ".venv-litellm" / "bin"), str(Path(PY).parent)]))
    if exe is None:
        return None
    port = free_port()
    cfg = folder / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: wf-extract
    litellm_params:
      model: openai/{BACKEND_MODEL}
      api_base: {backend_url}
      api_key: sk-backend
general_settings:
  master_key: {KEY}
litellm_settings:
  telemetry: false
  drop_params: true
""")
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
           "DISABLE_SCHEMA_UPDATE": "True"}
    proc = Proc([exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", str(workers)],
                env=env, log=folder / "litellm.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/chat/completions", 120, method="POST", body=chat_body("wf-extract"))
    except TimeoutError:
        proc.stop(5)
        raise
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "backend", "load", "ray"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run at c>1 (default 8)")
    parser.add_argument("--c1-requests", type=int, default=300, help="requests at concurrency 1 (default 300)")
    parser.add_argument("--c256", action="store_true", help="also measure concurrency 256")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy")
    parser.add_argument("--throughput-optimized", choices=["off", "on", "both"], default="off",
                        help="Ray Serve mode for the Ray targets (both: measure each)")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway replica and proxy at c=32")
    parser.add_argument("--ablation", action="store_true",
                        help="also measure the gateway without its BudgetPolicy rule (the ledger's share)")
    parser.add_argument("--pairs", type=int, default=0,
                        help="with --c256: that many more c=256 windows per Ray target, pass-through and pilothouse "
                             "alternating, for a max-RPS ratio this machine's drift does not decide")
    parser.add_argument("--c32-rounds", type=int, default=0,
                        help="that many more c=32 rounds in the last Ray mode measured: the backend directly, the "
                             "pass-through and pilothouse one window each, in an order rotating by round; the added "
                             "latency is each round's difference to direct, median over the rounds; again at each "
                             "other --pair-replicas count")
    parser.add_argument("--pair-direct-port", type=int, nargs="+", default=[], metavar="N",
                        help="with --c32-rounds: at these replica counts the --pairs windows measure the gateway's "
                             "direct port too, a third target in each window (max_rps_judged_direct_port)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--replicas", type=int, default=1,
                        help="replicas of the pass-through and of the gateway alike (default 1)")
    parser.add_argument("--pair-replicas", type=int, nargs="+", default=[], metavar="N",
                        help="run the --pairs windows at each of these replica counts (a Ray instance each; "
                             "LiteLLM's c=256 with as many workers): each target's max RPS is its best count's")
    args = parser.parse_args()
    if args.pair_direct_port and not (args.c32_rounds and args.throughput_optimized != "off"):
        parser.error("--pair-direct-port needs --c32-rounds and --throughput-optimized on or both: the gateway "
                     "answers on its direct port only then")
    if args.role == "backend":
        role_backend(args.port, args.model or BACKEND_MODEL)
    elif args.role == "load":
        role_load(args.url, args.model, args.concurrency, args.requests, args.seconds, args.warmup)
    elif args.role == "ray":
        role_ray(args.config)
    else:
        bench(args)


def bench(args: argparse.Namespace) -> None:
    machine.sample_speed()
    from rich.console import Console

    console = Console(highlight=False, width=120)
    levels = [1, 32] + ([256] if args.c256 else [])
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.throughput_optimized]
    results: dict[str, dict[str, Any]] = {}
    notes: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    profile: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    rotated: dict[int, dict[str, Any]] = {}  # c=32 rounds by replica count
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="pilothouse-gw-bench-"))
    procs: list[Proc] = []
    try:
        bport = free_port()
        backend = Proc([PY, __file__, "--role", "backend", "--port", str(bport)], log=folder / "backend.log")
        procs.append(backend)
        backend.readline(30)
        backend_url = f"http://127.0.0.1:{bport}/v1"
        console.print(f"backend (20 ms) on {backend_url}")
        results["direct"] = {f"c{c}": load(f"{backend_url}/chat/completions", BACKEND_MODEL, c, args) for c in levels}
        fixtures = write_fixtures(folder, backend_url)
        for tp in modes:
            suffix = " (tp)" if tp else ""
            t0 = time.perf_counter()
            # the production mode's gateway replica answers on its direct port too: a Deployment's pod's way in
            direct_port = free_port() if tp and args.c32_rounds else None
            ray_proc, urls, pids = up(folder, fixtures, (backend_url, backend.p.pid), tp, args.ablation,
                                      args.replicas, direct_port)
            procs.append(ray_proc)
            notes[f"ray_start_s{suffix}"] = round(time.perf_counter() - t0, 1)
            console.print(f"Ray Serve{suffix} up in {notes[f'ray_start_s{suffix}']} s: {urls}")
            for target, url in urls.items():
                if target == DIRECT:
                    continue  # measured in the c=32 rounds only, beside the same replica through Serve's ingress
                model = model_for(target)
                row: dict[str, Any] = {}
                for c in levels:
                    if c == 32 and target == "pilothouse" and args.profile:
                        spied = profile.setdefault("throughput-optimized" if tp else "default", {})
                        row[f"c{c}"], cpu[f"{target}{suffix} c32"] = measure_cpu(
                            pids, lambda u=url, m=model, p=pids, o=spied: profiled(u, m, args, p, folder, o))
                    elif c == 32:
                        row[f"c{c}"], cpu[f"{target}{suffix} c32"] = measure_cpu(
                            pids, lambda u=url, m=model, c=c: load(u, m, c, args))
                    else:
                        row[f"c{c}"] = load(url, model, c, args)
                results[target + suffix] = row
            if args.c32_rounds and tp == modes[-1]:
                rotated[args.replicas] = rotated_c32(urls, backend_url, args)
            if args.c256 and args.pairs and tp == modes[-1]:  # the last mode measured: the production one
                running = args.replicas
                for n in args.pair_replicas or [args.replicas]:
                    if n != running:
                        running = n
                        ray_proc.stop()
                        ray_proc, urls, pids = up(folder, fixtures, (backend_url, backend.p.pid), tp, False, n,
                                                  free_port() if tp and args.c32_rounds else None)
                        procs.append(ray_proc)
                        console.print(f"Ray Serve{suffix} up again with {n} replicas of each target")
                        if args.c32_rounds:  # a replica per core (the CRD's advice): is one loop the c=32 wait?
                            rotated[n] = rotated_c32(urls, backend_url, args)
                    replicas = {target: [pid for pid, name in pids.items() if name == REPLICA[target]] for target in
                                ("serve passthrough", "pilothouse")}
                    replicas[DIRECT] = replicas["pilothouse"]  # the same replicas, past Serve's ingress
                    gateways = ("pilothouse", DIRECT) if DIRECT in urls and n in args.pair_direct_port else (
                        "pilothouse",)
                    paired[f"pilothouse{suffix}" + (f", {n} replicas" if n != args.replicas else "")] = {
                        "replicas": n, **alternate(urls, args, replicas, gateways)}
            ray_proc.stop()
        if not args.no_litellm:
            try:
                t0 = time.perf_counter()
                started_litellm = start_litellm(folder, backend_url)
            except Exception as exc:
                notes["litellm"] = f"not measured: {exc}"[:500]
                started_litellm = None
            if started_litellm is None:
                notes.setdefault("litellm", "not measured: the litellm CLI is not installed")
            else:
                lproc, lport = started_litellm
                procs.append(lproc)
                notes["litellm_start_s"] = round(time.perf_counter() - t0, 1)
                notes["litellm"] = ("litellm proxy, 1 worker (c=256 also with each --pair-replicas count above 1), "
                                    "master key on, no database (no budgets, no spend logs), no callbacks, drop_params")
                url = f"http://127.0.0.1:{lport}/v1/chat/completions"
                results["litellm"] = {f"c{c}": load(url, "wf-extract", c, args) for c in levels}
                lproc.stop(10)
                for n in sorted({n for n in args.pair_replicas if n > 1} if args.c256 else ()):
                    # as many workers as the Ray targets' replicas: LiteLLM's max RPS at its best process count too
                    try:
                        started_litellm = start_litellm(folder, backend_url, workers=n)
                    except Exception as exc:
                        notes[f"litellm, {n} workers"] = f"not measured: {exc}"[:500]
                        continue
                    if started_litellm is not None:
                        lproc, lport = started_litellm
                        procs.append(lproc)
                        results[f"litellm, {n} workers"] = {"c256": load(
                            f"http://127.0.0.1:{lport}/v1/chat/completions", "wf-extract", 256, args)}
                        lproc.stop(10)
    finally:
        for p in reversed(procs):
            p.stop()
    report(console, args, levels, results, notes, cpu, profile, paired, rotated, time.perf_counter() - started)
    shutil.rmtree(folder, ignore_errors=True)


def model_for(target: str) -> str:
    """The model a Ray target is asked for: the pass-through forwards the backend's own, the gateways route."""
    return BACKEND_MODEL if target == "serve passthrough" else "wf/extract"


MACHINE_KEYS = ("machine_busy_us_per_request", "loadgen_us_per_request", "machine_idle_share", "machine_stolen_share")
PER_WINDOW = ("event_loop_us_per_request", "other_threads_us_per_request", *MACHINE_KEYS)


def alternate(urls: dict[str, str], args: argparse.Namespace, replicas: dict[str, list[int]],
              gateways: tuple[str, ...] = ("pilothouse",)) -> dict[str, Any]:
    """Max-RPS windows at c=256, the pass-through and each of ``gateways`` taking turns (the order rotates by
    window).

    This machine's speed drifts by tens of percent within minutes, and the sweep above measures each target's
    c=256 once, minutes apart: its ratio says as much about the drift as about the gateway. Here each window
    has the pass-through's beside it; the median of a gateway's ratios is the figure the goal is judged by
    (``median_ratios``; ``median_ratio`` is pilothouse's). Each window also records its replicas' CPU per request,
    event-loop thread and other threads apart (``loop_and_rest``): what stands between the targets' RPS.
    ``replicas``: each target's replica pids (the direct port's are the gateway's).
    """
    targets = ["serve passthrough", *gateways]
    rounds = []
    for i in range(args.pairs):
        window: dict[str, dict[str, float | None]] = {key: {} for key in ("rps", *PER_WINDOW)}
        shift = i % len(targets)
        for target in targets[shift:] + targets[:shift]:
            before = thread_cpu(replicas[target])
            r = load(urls[target], model_for(target), 256, args)
            loop, rest = loop_and_rest(before, thread_cpu(replicas[target]), replicas[target])
            window["rps"][target] = r["rps"] if r.get("errors") == 0 else None  # a window with errors sustains nothing
            sent = r.get("sent")
            window["event_loop_us_per_request"][target] = round(loop / sent * 1e6, 1) if sent else None
            window["other_threads_us_per_request"][target] = round(rest / sent * 1e6, 1) if sent else None
            for key in MACHINE_KEYS:
                window[key][target] = r.get(key)
        base = window["rps"]["serve passthrough"]
        ratios = {g: round(got / base, 3) if base and (got := window["rps"][g]) is not None else None
                  for g in gateways}
        rounds.append({**window, "ratios": ratios, "ratio": ratios.get("pilothouse")})

    def median_of(key: str) -> dict[str, float | None]:
        out = {}
        for target in targets:
            values = [r[key][target] for r in rounds if r[key][target] is not None]
            out[target] = round(statistics.median(values), 3) if values else None
        return out

    medians = {g: round(statistics.median(found), 3) if (found := [r["ratios"][g] for r in rounds
                                                                   if r["ratios"][g] is not None]) else None
               for g in gateways}
    return {"concurrency": 256, "rounds": rounds, "median_ratios": medians, "median_ratio": medians.get("pilothouse"),
            **{f"median_{key}": median_of(key) for key in ("rps", *PER_WINDOW)}}


def rotated_c32(urls: dict[str, str], backend_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Added latency at c=32 over rounds in which the backend directly, the pass-through and pilothouse each run one
    window, in an order that rotates by round.

    The sweep measures direct once, before Ray starts, and each Ray target once, minutes apart: a target's added
    p50 is then its difference to a window of another moment, and which target runs when is fixed. Over
    2026-11-26's runs the same gateway's sweep figure was 5.1-5.8 ms when measured right after the pass-through
    and 2.1-2.6 ms when measured after the gateway without a budget rule. Here every difference is taken within
    one round, and the median over rounds is the figure the <= 5 ms goal is judged by.
    """
    targets = {"direct": (f"{backend_url}/chat/completions", BACKEND_MODEL),
               **{t: (urls[t], model_for(t)) for t in ("serve passthrough", "pilothouse", DIRECT) if t in urls}}
    return rotating_rounds(targets, args.c32_rounds, args)


def rotating_rounds(targets: dict[str, tuple[str, str]], rounds: int, args: argparse.Namespace,
                    cpu_pids: dict[str, int] | None = None) -> dict[str, Any]:
    """``rounds`` c=32 rounds of one window per target (name -> URL and model; the first is the baseline every
    other is compared with), the order rotating by round; each target's median added p50 and p99 over the rounds.
    ``cpu_pids``: targets whose serving process's CPU per answered request is recorded too (``cpu_us_per_request``)."""
    names = list(targets)
    measured_rounds = []
    for i in range(rounds):
        shift = i % len(names)
        measured: dict[str, dict[str, Any]] = {}
        for n in names[shift:] + names[:shift]:
            pid = (cpu_pids or {}).get(n)
            before = cpu_seconds(pid) if pid else 0.0
            window = load(*targets[n], 32, args)
            measured[n] = {k: window.get(k) for k in ("p50_ms", "p99_ms", "rps", "errors")}
            if pid and window.get("ok"):
                measured[n]["cpu_us_per_request"] = round((cpu_seconds(pid) - before) / window["ok"] * 1e6, 1)
        measured_rounds.append({n: measured[n] for n in names})

    def median_added(metric: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for n in names[1:]:
            added = [r[n][metric] - r[names[0]][metric] for r in measured_rounds if r[n]["errors"] == 0
                     and r[n][metric] is not None and r[names[0]][metric] is not None]
            out[n] = round(statistics.median(added), 2) if added else None
        return out

    return {"concurrency": 32, "rounds": measured_rounds, "median_added_p50_ms": median_added("p50_ms"),
            "median_added_p99_ms": median_added("p99_ms")}


def max_rps_without_errors(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each target's best RPS over its error-free windows at c > 1 (0.0 when none): a window with errors sustains
    nothing."""
    return {target: max((window["rps"] for level, window in row.items()
                         if level != "c1" and window.get("errors") == 0), default=0.0)
            for target, row in results.items()}


def judged(paired: dict[str, Any], target: str = "pilothouse") -> dict[str, Any] | None:
    """``target``'s and the pass-through's max RPS, each the best of its replica counts' medians, and their ratio:
    the pairs' median where both peak at one count (the same windows), else the ratio of the two peaks (not
    paired). Only counts whose windows measured ``target`` are compared."""
    def ratio(pairs: dict[str, Any]) -> float | None:
        return (pairs.get("median_ratios") or {}).get(target, pairs.get("median_ratio") if target == "pilothouse"
                                                      else None)

    counts = [v for v in paired.values() if ratio(v) is not None]
    if not counts:
        return None
    best = {t: max(counts, key=lambda v, t=t: v["median_rps"][t] or 0.0) for t in ("serve passthrough", target)}
    rps = {t: v["median_rps"][t] for t, v in best.items()}
    same = best["serve passthrough"] is best[target]
    peak_ratio = ratio(best[target]) if same else round(rps[target] / rps["serve passthrough"], 3)
    return {"replicas": {t: v["replicas"] for t, v in best.items()}, "median_rps": rps, "paired": same,
            "ratio": peak_ratio}


def profiled(url: str, model: str, args: argparse.Namespace, pids: dict[int, str], folder: Path,
             profile: dict[str, Any]) -> dict[str, Any]:
    seconds = max(3, int(args.duration) - 2)
    spies = []
    for pid, name in pids.items():
        if name in ("gateway replica", "serve proxy"):
            out = folder / f"spy-{pid}-{len(profile)}.txt"
            spy = py_spy(pid, seconds, out)
            if spy is not None:
                spies.append((name, spy, out))
    if not spies:
        profile["error"] = "py-spy is not installed"
    time.sleep(0.5)
    result = load(url, model, 32, args)
    for name, spy, out in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
        profile[name] = summarise_profile(out)
    return result


def fmt_ms(value: float | None, digits: int = 1) -> str:
    """A table cell of milliseconds; ``-`` for a figure not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def figure_name(target: str) -> str:
    """A target's name as a summary key part: ``pilothouse, no budget`` -> ``pilothouse_no_budget``."""
    return re.sub(r"\W+", "_", target).strip("_")


def report(console: Any, args: argparse.Namespace, levels: list[int], results: dict[str, dict[str, Any]],
           notes: dict[str, Any], cpu: dict[str, Any], profile: dict[str, Any], paired: dict[str, Any],
           rotated: dict[int, dict[str, Any]], total_s: float) -> None:
    from rich.table import Table

    direct = results.get("direct", {})
    table = Table(title=f"Gateway overhead: 20 ms backend, {REPLY_TOKENS}-token replies, {os.cpu_count()} CPUs")
    for col in ("target", "c", "p50 ms", "p99 ms", "added p50", "added p99", "RPS", "errors"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for target, row in results.items():
        for c in levels:
            if f"c{c}" not in row:  # a variant measured at c=256 only (LiteLLM's other worker counts)
                continue
            r = row[f"c{c}"]
            d = direct.get(f"c{c}", {})
            for q in ("p50", "p99"):
                base, got = d.get(f"{q}_ms"), r.get(f"{q}_ms")
                r[f"added_{q}_ms"] = round(got - base, 2) if got is not None and base is not None else None
            cells = (fmt_ms(r.get(k)) for k in ("p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms"))
            table.add_row(target, str(c), *cells, f"{r.get('rps', 0):.0f}", str(r.get("errors")))
    console.print(table)
    for k, v in cpu.items():
        console.print(f"CPU seconds during {k} ({args.duration:.0f} s): {v}")
    for mode, spied in profile.items():
        for name, summary in spied.items() if isinstance(spied, dict) else ():
            if isinstance(summary, dict) and "share_of_busy" in summary:
                shares = ", ".join(f"{k} {v:.0%}" for k, v in list(summary["share_of_busy"].items())[:10])
                console.print(f"py-spy {name} ({mode}, c=32): {summary['busy_samples']} busy samples: {shares}")
    for target, pairs in paired.items():
        names = list(pairs["median_rps"])  # the pass-through first, then the gateways measured beside it
        rounds = "; ".join(" / ".join(f"{r['rps'][t] or 0:.0f}" for t in names) + " RPS" for r in pairs["rounds"])
        console.print(f"{target}: {' / '.join(names)}, {pairs['replicas']} replica(s) each, rotating c=256 windows: "
                      f"{rounds}; median ratio to the pass-through {pairs['median_ratios']}")
        medians = {key: " / ".join(str(pairs[f"median_{key}"][t]) for t in names) for key in PER_WINDOW}
        console.print(f"  medians, {' / '.join(names)}: replica CPU per request on the event loop "
                      f"{medians['event_loop_us_per_request']} us, on other threads "
                      f"{medians['other_threads_us_per_request']} us; machine CPU per request "
                      f"{medians['machine_busy_us_per_request']} us; machine idle {medians['machine_idle_share']}")
    for n, rounds in rotated.items():
        console.print(f"c=32 in {len(rounds['rounds'])} rotating rounds, {n} replica(s) each "
                      f"({', '.join(rounds['rounds'][0]) if rounds['rounds'] else '-'}), p50 ms: "
                      + "; ".join(" / ".join(fmt_ms(r[t]["p50_ms"]) for t in r) for r in rounds["rounds"])
                      + f"; median added p50 {rounds['median_added_p50_ms']}, p99 {rounds['median_added_p99_ms']}")
    best, direct_best = judged(paired), judged(paired, DIRECT)
    for name, found in (("pilothouse", best), (DIRECT, direct_best)):
        if found is not None:
            rps, counts = found["median_rps"], found["replicas"]
            console.print(f"max RPS (each target's best replica count): pass-through {rps['serve passthrough']} "
                          f"({counts['serve passthrough']}), {name} {rps[name]} ({counts[name]}): "
                          f"ratio {found['ratio']}"
                          + ("" if found["paired"] else " (the two peaks at different counts: not paired)"))
    for k, v in notes.items():
        console.print(f"{k}: {v}")
    payload = {
        "benchmark": "gateway_overhead",
        "when": machine.measured_at(),
        "machine": machine.describe("ray", "litellm"),
        "setup": {"backend_latency_ms": LATENCY_S * 1000, "reply_tokens": REPLY_TOKENS, "duration_s": args.duration,
                  "c1_requests": args.c1_requests, "concurrency": levels,
                  "pilothouse": "API keys, budget rule (day cap 1e9 USD, ledger reserve+commit), audit, metrics on; "
                                "cache off (temperature 0.7); SQLite store",
                  "throughput_optimized": args.throughput_optimized, "replicas": args.replicas},
        "results": results, "max_rps_without_errors": max_rps_without_errors(results), "cpu_seconds": cpu,
        "profile": profile, "paired_max_rps": paired, "max_rps_judged": best,
        "max_rps_judged_direct_port": direct_best,
        "c32_rounds": rotated.get(args.replicas, {}),
        "c32_rounds_by_replicas": {str(n): r for n, r in rotated.items() if n != args.replicas}, "notes": notes,
        "total_s": round(total_s, 1),
    }
    console.print(f"wrote {machine.save(args.output, payload)} in {total_s:.0f} s")


if __name__ == "__main__":
    main()
