"""Handle hop: what one call from the gateway to an engine replica costs, by transport.

Locally the gateway reaches a vLLM engine replica through a Serve handle (``engines.handle``). Serve can carry
such a call as a Ray actor task (its default, ``_by_reference=True``) or over the gRPC server every replica
runs (``_by_reference=False``, what ``engines.handle._handle`` asks for). On the replica's own host the gateway
skips the handle: the same calls go as HTTP over the replica's Unix socket (``engines.local_socket``). This
measures the three in one Ray instance, round by round, on the product's own code: the engine replica is a
stand-in with the same two
methods as ``engines.vllm.PilothouseLLMServer`` (``complete`` answers an OpenAI-sized JSON body; ``stream``
yields the status then ``--chunks`` SSE batches, as a 128-token answer arrives in ~5 batches), so what is
timed is the hop alone, not vLLM.

Both replicas run their code on the replica's main event loop, as the gateway's and the engine's do
(``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``). A caller replica makes ``--calls`` calls one after the
other per round and transport; reported per call: latency p50 and mean, and the CPU seconds of the caller's
process and of the engine stand-in's (``time.process_time``, all their threads), the medians over
``--rounds`` rounds that alternate the transports. On 2 cores the CPU is what the hop takes from the engine.
Results: a rich table and ``bench/results/handle_hop.json``; its ``summary`` holds gRPC's figures as
ratios to the actor call's, and the socket's as ratios to gRPC's.

Run: ``.venv/bin/python bench/handle_hop.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "handle_hop.json"
ENDPOINT_APP = "engine-echo"
ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "small",
                     "choices": [{"index": 0, "finish_reason": "length",
                                  "message": {"role": "assistant", "content": "token " * 128}}],
                     "usage": {"prompt_tokens": 40, "completion_tokens": 128, "total_tokens": 168}}).encode()
BODY = {"model": "small", "messages": [{"role": "user", "content": "Extract the vendor and total. " * 4}],
        "max_tokens": 128}
TRANSPORTS = {"actor call": True, "grpc": False, "socket": None}  # name -> _by_reference (None: the socket)


def deployments(chunks: int) -> Any:
    from ray import serve

    @serve.deployment(name="engine", ray_actor_options={"num_cpus": 0})
    class EngineStandIn:
        """``PilothouseLLMServer``'s plain-data calls, answering at once, on the handle and on its socket."""

        async def __init__(self) -> None:
            from pilothouse.serving.engines import local_socket

            self.socket = await local_socket.serve_socket(self, ENDPOINT_APP)

        async def complete(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
            return 200, ANSWER

        async def stream(self, path: str, body: dict[str, Any]) -> Any:
            yield 200
            for i in range(chunks):
                yield b'data: {"choices": [{"delta": {"content": "token token token"}}]}\n\n' + (
                    b"data: [DONE]\n\n" if i == chunks - 1 else b"")

        async def cpu(self) -> float:
            return time.process_time()

    @serve.deployment(name="caller", ray_actor_options={"num_cpus": 0})
    class Caller:
        """Calls the stand-in (its own application, as an engine is) through ``engines.handle``'s own handle,
        as the gateway does."""

        async def run(self, by_reference: bool | None, stream: bool, calls: int) -> dict[str, float]:
            from pilothouse.serving.engines import CHAT, local_socket
            from pilothouse.serving.engines import handle as engine_handle

            handle = engine_handle._handle(engine_handle.endpoint(ENDPOINT_APP)).options(_by_reference=bool(
                by_reference))
            meter = handle.options(_by_reference=True)

            async def over_socket() -> None:
                async def send(engine: Any) -> bool:
                    if stream:
                        async for _ in await engine.stream(CHAT, BODY):
                            pass
                    else:
                        await engine.complete(CHAT, BODY)
                    return True

                if await local_socket.call(ENDPOINT_APP, "small", 60.0, send) is None:
                    raise RuntimeError("the stand-in's socket is not there")

            seconds: list[float] = []
            cpu0, engine0 = time.process_time(), await meter.cpu.remote()
            for _ in range(calls):
                started = time.perf_counter()
                if by_reference is None:
                    await over_socket()
                elif stream:
                    async for _ in handle.options(stream=True).stream.remote(CHAT, BODY):
                        pass
                else:
                    await handle.complete.remote(CHAT, BODY)
                seconds.append(time.perf_counter() - started)
            cpu1, engine1 = time.process_time(), await meter.cpu.remote()
            return {"p50_ms": statistics.median(seconds) * 1000, "mean_ms": statistics.fmean(seconds) * 1000,
                    "caller_cpu_ms": (cpu1 - cpu0) / calls * 1000, "engine_cpu_ms": (engine1 - engine0) / calls * 1000}

    return EngineStandIn, Caller


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[dict[str, float]]]]:
    os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"  # as the gateway's and the engine's replicas
    import ray
    from ray import serve

    stand_in, caller = deployments(args.chunks)
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(logging_config={"log_level": "ERROR"})
        serve.run(stand_in.bind(), name=ENDPOINT_APP, route_prefix=None)
        runner = serve.run(caller.bind(), name="caller", route_prefix=None)
        raw: dict[str, dict[str, list[dict[str, float]]]] = {}
        for stream in (False, True):
            variant = "stream" if stream else "complete"
            for by_reference in TRANSPORTS.values():  # warm both paths: connections, handles, imports
                runner.run.remote(by_reference, stream, args.calls // 5).result()
            for round_ in range(args.rounds):
                order = list(TRANSPORTS.items())
                for name, by_reference in order if round_ % 2 == 0 else order[::-1]:
                    raw.setdefault(variant, {}).setdefault(name, []).append(
                        runner.run.remote(by_reference, stream, args.calls).result())
        return raw
    finally:
        serve.shutdown()
        ray.shutdown()


def report(args: argparse.Namespace, raw: dict[str, dict[str, list[dict[str, float]]]], total_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    fields = ("p50_ms", "mean_ms", "caller_cpu_ms", "engine_cpu_ms")
    medians = {variant: {name: {f: round(statistics.median(r[f] for r in rounds), 3) for f in fields}
                         for name, rounds in by_name.items()} for variant, by_name in raw.items()}
    table = Table(title=f"Handle hop per call, {args.calls} calls x {args.rounds} rounds, {os.cpu_count()} CPUs "
                        "(medians of the rounds)")
    for col in ("variant", "transport", "latency p50", "latency mean", "caller CPU", "engine CPU", "CPU, both ends"):
        table.add_column(col, justify="left" if col in ("variant", "transport") else "right")
    summary: dict[str, float] = {}
    for variant, by_name in medians.items():
        for name, m in by_name.items():
            both = m["caller_cpu_ms"] + m["engine_cpu_ms"]
            table.add_row(variant if name == "actor call" else "", name,
                          *(f"{value:.2f} ms" for value in (*(m[f] for f in fields), both)),
                          end_section=name == list(by_name)[-1])
        for over, base in (("grpc", "actor call"), ("socket", "grpc")):
            faster, slower = by_name[over], by_name[base]
            summary[f"{variant}_{over}_latency_p50_ratio"] = round(faster["p50_ms"] / slower["p50_ms"], 3)
            summary[f"{variant}_{over}_cpu_ratio"] = round((faster["caller_cpu_ms"] + faster["engine_cpu_ms"])
                                                           / (slower["caller_cpu_ms"] + slower["engine_cpu_ms"]), 3)
    console = Console(highlight=False, width=140)
    console.print(table)
    console.print("gRPC / actor call, socket / gRPC: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    payload = {"benchmark": "handle_hop", "when": machine.measured_at(), "machine": machine.describe("ray"),
               "setup": {"calls": args.calls, "rounds": args.rounds, "stream_chunks": args.chunks,
                         "answer_bytes": len(ANSWER)},
               "summary": summary, "medians": medians, "rounds": raw, "total_s": round(total_s, 1)}
    console.print(f"wrote {machine.save(args.output, payload)} in {total_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per round and transport (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the transports (default 3)")
    parser.add_argument("--chunks", type=int, default=5, help="SSE batches per streamed answer (default 5)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    machine.sample_speed()
    started = time.perf_counter()
    report(args, measure(args), time.perf_counter() - started)


if __name__ == "__main__":
    main()
