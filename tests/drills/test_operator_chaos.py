"""Operator chaos: flaky API writes, dropped watches and a kill -9 mid-reconcile → the same children, once each.

``pilothouse operator`` runs as a real process against the emulator. ``ChaosEmulator`` answers a
seeded fraction of the writes with 500 InternalError, or with 409 Conflict where a real server can
(create, put; never a merge patch), before touching anything, as an overloaded or racing API server
would, drops the connection of the first single-object read and of a seeded fraction of the rest
without an answer (a keep-alive connection the server closed, a reset under load; the first one for
sure, as a fast run makes only a handful of such reads), and ends every watch stream after a
seeded 0.3 to 1.5 seconds, as load balancers and API-server restarts do. The example manifests
are applied (by a client that retries like kubectl), the operator is killed with SIGKILL as soon as
its first child exists and started again, and then everything must converge under the same chaos:
each object Ready, each expected child present exactly once with one owner reference to its live
owner, and deleted objects gone — their finalizers removed, not stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kmock
import lightkube
import pytest
from lightkube import codecs
from lightkube.core.exceptions import ApiError

from pilothouse.operator.k8s import GENERIC, RayService
from tests.integration.conftest import FakeOpenAI
from tests.integration.emulator import Emulator, write_kubeconfig
from tests.integration.test_operator import example_docs, obj, ready, status, table
from tests.polling import eventually

pytestmark = pytest.mark.drill

ROOT = Path(__file__).parents[2]
SEEDS = [20260315, 7, 1234]
FAILURE_RATE = 0.3
DROP_RATE = 0.2
WATCH_LIFETIME_S = (0.3, 1.5)
OWNERS = [("modeldeployments", "invoice-small"), ("modeldeployments", "invoice-large"),
          ("vectorindexes", "invoice-docs"), ("budgetpolicies", "invoice-budget"),
          ("autonomousworkflows", "invoice-triage")]


class ChaosEmulator(Emulator):
    """The emulator with seeded write failures and watch streams that end on their own."""

    def __init__(self, seed: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.chaos = True
        self.injected: dict[int, int] = {409: 0, 500: 0}
        self.dropped_reads = 0
        self.dropped_watches = 0

    async def _handle(self, request: kmock.Request) -> Any:
        if (self.chaos and request.resource is not None and request.action in (kmock.action.CREATE,
                                                                               kmock.action.UPDATE)
                and (status := self._injected_status(request)) is not None):
            self.injected[status] += 1
            raise kmock.KubernetesError(status=status, reason="Conflict" if status == 409 else "InternalError",
                                        message=f"injected {status} (chaos drill)")
        if (self.chaos and request.resource is not None and request.action == kmock.action.FETCH
                and request._raw_request is not None and (not self.dropped_reads or self.rng.random() < DROP_RATE)):
            transport = request._raw_request.transport
            if transport is not None:
                self.dropped_reads += 1
                transport.close()  # the client reads EOF where it expected a status line
        return await super()._handle(request)

    def _injected_status(self, request: kmock.Request) -> int | None:
        """The error a write meets, or None. A real API server answers a merge PATCH with 409 only under a
        resourceVersion precondition, which neither kopf nor the operator sends; creates and PUTs do meet
        conflicts. The first of those always does, as the first read is always dropped: a fast run makes
        few of either."""
        can_conflict = request.method.value != "PATCH"
        if can_conflict and not self.injected[409]:
            return 409
        if self.rng.random() >= FAILURE_RATE:
            return None
        return self.rng.choice([409, 500]) if can_conflict else 500

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.rng.uniform(*WATCH_LIFETIME_S)
        events = super()._serve_watch(request)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), max(deadline - loop.time(), 0))
                except (StopAsyncIteration, TimeoutError):
                    break
                yield event
        finally:
            await events.aclose()
            if loop.time() >= deadline:
                self.dropped_watches += 1


async def retrying(call: Callable[[], Awaitable[Any]], attempts: int = 50) -> Any:
    """What kubectl and controllers do on 409 / 5xx: try again."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except ApiError as exc:
            if exc.status.code not in (409, 500):
                raise
            await asyncio.sleep(0.05)
    return await call()


class OperatorProcess:
    def __init__(self, folder: Path, kubeconfig: Path) -> None:
        self.folder, self.kubeconfig = folder, kubeconfig
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        log = (self.folder / f"operator-{self.starts}.log").open("w")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pilothouse", "operator", "--store-url", f"sqlite:///{self.folder}/store.db",
            "--milvus-uri", str(self.folder / "milvus.db"), cwd=ROOT, stdout=log, stderr=log,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig), "PILOTHOUSE_HEALTH_INTERVAL": "0.5"},
            start_new_session=True)
        log.close()

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.returncode is None:
            os.killpg(self.process.pid, sig)
            await asyncio.wait_for(self.process.wait(), 30)


def operator_log(folder: Path, keep: Callable[[str], bool]) -> list[str]:
    """The operator processes' log lines (every start's, in order) that ``keep`` selects."""
    return [line for log in sorted(folder.glob("operator-*.log")) for line in log.read_text().splitlines()
            if keep(line)]


def owned(emulator: Emulator) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Live objects with owner references: (kind, name) → their owner references."""
    children = {}
    for key in list(emulator.objects):
        found = emulator.objects[key]
        raw = found.raw
        if not found.deleted and raw.get("metadata", {}).get("ownerReferences") and raw.get("kind") != "Event":
            children[(raw["kind"], raw["metadata"]["name"])] = raw["metadata"]["ownerReferences"]
    return children


@contextlib.asynccontextmanager
async def chaos_cluster(seed: int) -> AsyncIterator[ChaosEmulator]:
    async with ChaosEmulator(seed) as k8s, kmock.Server(k8s):
        k8s.declare_kinds()
        yield k8s


@pytest.mark.parametrize("seed", SEEDS)
async def test_operator_converges_through_api_errors_dropped_watches_and_a_kill(tmp_path: Path, seed: int) -> None:
    async with chaos_cluster(seed) as emulator:
        server = str(emulator.url).rstrip("/")
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server)
        config = lightkube.KubeConfig.from_file(kubeconfig)
        kube = lightkube.AsyncClient(config=config, field_manager="tests", trust_env=False)
        endpoint = FakeOpenAI()
        await endpoint.start()
        operator = OperatorProcess(tmp_path, kubeconfig)
        try:
            await operator.start()
            for doc in example_docs(endpoint.url):
                if doc["apiVersion"] == "pilothouse.io/local":
                    continue  # local-mode only (job.yaml), not a cluster object
                doc = copy.deepcopy(doc)
                doc["metadata"].setdefault("namespace", "default")
                await retrying(lambda doc=doc: kube.create(codecs.from_dict(doc)))

            # Mid-reconcile: the first child exists, the rest of the pass is still to come.
            await eventually(lambda: owned(emulator), timeout=60)
            await operator.kill()
            await operator.start()

            await eventually(lambda: obj(emulator, "ray.io/v1/rayservices", "invoice-small"), timeout=60)
            await retrying(lambda: kube.patch(RayService.Status, "invoice-small",
                                              {"status": {"serviceStatus": "Running"}}, namespace="default",
                                              patch_type=lightkube.types.PatchType.MERGE))
            await eventually(lambda: all((ready(emulator, plural, name) or {}).get("status") == "True"
                                         for plural, name in OWNERS), timeout=120)

            # The routing table the workflow reports is the one in its ConfigMap: no recompile was lost.
            routing = await eventually(lambda: (t := table(emulator, "invoice-triage")) and not t["degraded"] and t
                                       and status(emulator, "autonomousworkflows", "invoice-triage")
                                       .get("routingRevision") == t["revision"] and t, timeout=60)
            assert [b["modelDeployment"] for b in routing["routes"][0]["backends"]] == ["invoice-small",
                                                                                       "invoice-large"]
            children = owned(emulator)
            print(f"operator chaos (seed {seed}): injected {emulator.injected}, dropped {emulator.dropped_watches} "
                  f"watches and {emulator.dropped_reads} reads, {operator.starts} operator starts; "
                  f"children {sorted(children)}")
            assert {("RayService", "invoice-small"), ("Service", "invoice-small"),
                    ("ConfigMap", "invoice-triage-routing"), ("Deployment", "invoice-triage-gateway")} <= set(children)
            uids = {(o["kind"], o["metadata"]["name"]): o["metadata"]["uid"]
                    for plural, name in OWNERS if (o := obj(emulator, f"pilothouse.io/v1alpha1/{plural}", name))}
            for child, refs in children.items():
                assert len(refs) == 1, (child, refs)  # applied again and again, owned once
                assert uids.get((refs[0]["kind"], refs[0]["name"])) == refs[0]["uid"], (child, refs)
            assert emulator.injected[409] and emulator.injected[500] and emulator.dropped_watches
            assert emulator.dropped_reads

            # Deletes under the same chaos: finalizers come off, nothing is left hanging.
            await retrying(lambda: kube.delete(GENERIC["AutonomousWorkflow"], "invoice-triage", namespace="default"))
            await retrying(lambda: kube.delete(GENERIC["VectorIndex"], "invoice-docs", namespace="default"))
            await eventually(lambda: obj(emulator, "pilothouse.io/v1alpha1/autonomousworkflows", "invoice-triage")
                             is None and obj(emulator, "pilothouse.io/v1alpha1/vectorindexes", "invoice-docs") is None,
                             timeout=120)
            assert not [key for key in list(emulator.objects) if not emulator.objects[key].deleted
                        and emulator.objects[key].raw.get("metadata", {}).get("deletionTimestamp")]
            assert operator.process is not None and operator.process.returncode is None
            # Every injected fault was classified as transient and retried in seconds: none reached kopf's
            # unexpected-error path, whose 60 s backoff stalls a handler (and its health timer) for a minute.
            unexpected = operator_log(tmp_path, lambda line: "failed with an exception" in line)
            assert not unexpected, unexpected
        except AssertionError:
            for plural, name in OWNERS:
                found = obj(emulator, f"pilothouse.io/v1alpha1/{plural}", name) or {}
                print("state at failure:", plural, name, found.get("metadata"), found.get("status"))
            print("state at failure: routing table", table(emulator, "invoice-triage"))
            errors = operator_log(tmp_path, lambda line: " ERROR " in line)  # what it retried, and how long
            print("state at failure: operator errors", *errors[-20:], sep="\n  ")
            raise
        finally:
            emulator.chaos = False
            await operator.kill(signal.SIGTERM)
            await endpoint.stop()
            await kube.close()
