"""Re-ranking retrieved candidates: a local cross-encoder, or a chat ModelDeployment asked "is this relevant?".

Retrieval (dense + BM25 fused with RRF) ranks by cheap similarity; a re-ranker reads each (query,
passage) pair whole, and the ``topN`` best go into the prompt. Two kinds, as ``retrieve.rerank`` allows:

* ``localPath``: a sentence-transformers ``CrossEncoder`` directory, loaded offline once per process on
  CPU and run in a worker thread (blocking torch code must not stall the event loop). Its scores are
  what the model's head gives (a sigmoid probability for a one-label model); only their order is used.
* ``modelDeploymentRef``: an LLM re-ranker through the gateway. Each candidate is one chat completion,
  "Query … Passage … Is the passage relevant to the query? Answer yes or no.", with ``max_tokens`` 1 and
  ``top_logprobs``; the score is P(yes) at that token (see :func:`yes_probability`). Why this protocol:
  the gateway routes the OpenAI API only (chat, completions, embeddings), so a yes/no chat works with
  any chat ModelDeployment, vLLM or external, over the workflow's own route ``<workflow>/<retrieve
  step>`` (compiled by the operator), with its fallbacks, budget reservation, cache and request audit.
  One request per candidate costs a prompt each, which the ledger charges to the run like any call.

  Not supported yet: vLLM's ``/v1/score`` and ``/rerank`` for cross-encoder ModelDeployments. They are
  cheaper (one forward pass per pair, nothing generated) but no gateway route serves them, so calling
  them would bypass budgets, fallbacks and the audit; a cross-encoder runs today through ``localPath``.

A re-rank never fails the retrieve step: whatever goes wrong (no model client, an unloadable directory,
a gateway error, an answer with neither yes nor no, candidates scored by different backends after a
fallback) gives the fused order cut to ``topN``, flagged degraded with the reason, and the run goes on,
as DESIGN.md §6 asks of every optional dependency. Only a ``localPath`` that does not exist at all is
refused up front (:func:`local_path_problems`): that is a typo in the manifest, not an outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pilothouse.operator.api.workflow import RERANK_MAX_TOKENS, AutonomousWorkflow, Rerank

from .retriever import Hit

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

    from .runtime import Completion, ModelClient

log = logging.getLogger(__name__)

TOP_LOGPROBS = 10
"""Candidates asked for at the answer token: enough to find both "yes" and "no" and their case variants."""
CONCURRENCY = 8
"""Yes/no requests in flight per re-rank: the gateway and the backend batch them; more only queues."""
PASSAGE_CHARS = 2000
"""How much of a candidate the LLM re-ranker reads (cross-encoders truncate to their own max length)."""
SYSTEM = "You judge search results. Answer with exactly one word: yes or no."
QUESTION = "Query:\n{query}\n\nPassage:\n{passage}\n\nIs the passage relevant to the query? Answer yes or no."


class RerankFailed(Exception):
    """The re-ranker could not score the candidates; the message says why, for the step record.
    ``cost_usd``: what was spent on the way (answers that came back but could not be used)."""

    def __init__(self, message: str, *, cost_usd: float = 0.0) -> None:
        super().__init__(message)
        self.cost_usd = cost_usd


@dataclass(frozen=True)
class Scores:
    values: list[float]
    cost_usd: float = 0.0


class Reranker(Protocol):
    """Scores (query, passage) pairs, higher is more relevant; ``name`` says in the step record which ran."""

    @property
    def name(self) -> str: ...

    async def score(self, query: str, passages: Sequence[str], *, run_id: str) -> Scores: ...


# -- local cross-encoder -----------------------------------------------------------------------------

_load_lock = threading.Lock()


@cache
def _cross_encoder(path: str) -> CrossEncoder:
    """One copy per process and directory; a failed load is not cached, so a fixed directory is picked up."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import CrossEncoder

    return CrossEncoder(path, device="cpu", local_files_only=True)


class CrossEncoderReranker:
    def __init__(self, path: str, *, batch_size: int = 32) -> None:
        self.path = str(Path(path).expanduser())
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return f"cross-encoder {self.path}"

    async def score(self, query: str, passages: Sequence[str], *, run_id: str) -> Scores:
        return Scores(await asyncio.to_thread(self._predict, [(query, p) for p in passages]))

    def _predict(self, pairs: list[tuple[str, str]]) -> list[float]:
        if not Path(self.path).is_dir():
            raise RerankFailed(f"{self.path} is not a directory")
        try:
            with _load_lock:  # @cache alone would let two runs load the same model twice
                model = _cross_encoder(self.path)
        except Exception as exc:  # transformers raises OSError, ValueError, JSON and safetensors errors alike
            raise RerankFailed(f"cannot load the cross-encoder at {self.path}: {type(exc).__name__}: {exc}") from None
        scores = model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True)
        if scores.ndim != 1:
            raise RerankFailed(f"the model at {self.path} gives {scores.shape[-1]} labels per pair; a re-ranker "
                               "needs one relevance score (a cross-encoder trained with num_labels=1)")
        return [float(s) for s in scores]


# -- a chat ModelDeployment through the gateway ------------------------------------------------------


def yes_probability(candidates: Sequence[tuple[str, float]]) -> float | None:
    """P(yes) at the answer token from its (token, logprob) candidates; None when neither yes nor no is there.

    Case and spacing variants ("Yes", " yes") add up. Given both answers, P(yes) is renormalised over
    the two (the mass on other tokens says nothing about relevance); given one, the other is taken as
    the rest of the probability, the best guess a truncated candidate list allows.
    """
    mass: dict[str, float] = {}
    for token, logprob in candidates:
        word = token.strip().strip(".,!:").lower()
        if word in ("yes", "no"):
            mass[word] = mass.get(word, 0.0) + math.exp(logprob)
    if not mass:
        return None
    yes = mass.get("yes", max(0.0, 1.0 - mass.get("no", 0.0)))
    no = mass.get("no", max(0.0, 1.0 - yes))
    return yes / (yes + no) if yes + no > 0 else 0.0


class ChatReranker:
    """One yes/no per passage from the gateway's ``route`` (``<workflow>/<retrieve step>``, ``deployment``'s)."""

    def __init__(self, model: ModelClient | None, *, route: str, deployment: str) -> None:
        self.model, self.route, self.deployment = model, route, deployment

    @property
    def name(self) -> str:
        return f"model {self.deployment} (route {self.route})"

    async def score(self, query: str, passages: Sequence[str], *, run_id: str) -> Scores:
        from .runtime import ModelCallFailed  # runtime imports this module

        if self.model is None:
            raise RerankFailed("this runtime has no model client (gateway) to call")
        client, gate = self.model, asyncio.Semaphore(CONCURRENCY)

        async def ask(passage: str) -> Completion:
            content = QUESTION.format(query=query, passage=passage[:PASSAGE_CHARS])
            async with gate:
                return await client.chat(model=self.route, messages=[{"role": "system", "content": SYSTEM},
                                                                     {"role": "user", "content": content}],
                                         schema=None, schema_name="rerank", max_tokens=RERANK_MAX_TOKENS,
                                         temperature=0.0, run_id=run_id, top_logprobs=TOP_LOGPROBS)

        try:  # a TaskGroup cancels the other requests as soon as one fails: no spend on a lost cause
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(ask(p)) for p in passages]
        except* Exception as failed:  # the gateway's answer says what failed; a surprise is named by its type
            first = failed.exceptions[0]
            raise RerankFailed(str(first) if isinstance(first, ModelCallFailed) else
                               f"{type(first).__name__}: {first}") from None
        completions = [t.result() for t in tasks]
        cost = sum(c.cost_usd for c in completions)
        answered_by = sorted({c.model for c in completions if c.model})
        try:
            if len(answered_by) > 1:
                raise RerankFailed(f"candidates were scored by different backends ({', '.join(answered_by)}) after "
                                   "a fallback; their scores are not comparable")
            return Scores([self._probability(c) for c in completions], cost)
        except RerankFailed as exc:
            raise RerankFailed(str(exc), cost_usd=cost) from None

    def _probability(self, completion: Completion) -> float:
        # an engine that ignores top_logprobs still gives the chosen token's logprob
        candidates = (completion.alternatives or [[]])[0] or (completion.tokens or [])[:1]
        if not candidates:
            raise RerankFailed(f"model {self.deployment} returned no logprobs; re-ranking needs an engine that "
                               "returns them (vLLM and OpenAI do)")
        p = yes_probability(candidates)
        if p is None:
            raise RerankFailed(f"model {self.deployment} answered {completion.content[:80]!r}, with neither yes nor no "
                               f"among its top {TOP_LOGPROBS} tokens; use an instruction-tuned chat model")
        return p


# -- the step's use ----------------------------------------------------------------------------------


def reranker_for(spec: Rerank, *, route: str, model: ModelClient | None) -> Reranker:
    if spec.local_path is not None:
        return CrossEncoderReranker(spec.local_path)
    assert spec.model_deployment_ref is not None  # the API model requires exactly one of the two
    return ChatReranker(model, route=route, deployment=spec.model_deployment_ref)


def local_path_problems(wf: AutonomousWorkflow) -> list[str]:
    """One line per ``retrieve.rerank.localPath`` that is not a directory here, naming the field.

    Checked where the workflow runs (the runtime, ``pilothouse run``), not by the operator: in a
    cluster the directory lives in the runtime's pods, not the operator's.
    """
    problems = []
    for i, step in enumerate(wf.spec.steps):
        path = step.retrieve.rerank.local_path if step.retrieve and step.retrieve.rerank else None
        if path is not None and not Path(path).expanduser().is_dir():
            problems.append(f"spec.steps[{i}].retrieve.rerank.localPath: {path} is not a directory on this machine; "
                            "point it at a sentence-transformers cross-encoder folder, or re-rank with "
                            "modelDeploymentRef")
    return problems


@dataclass(frozen=True)
class Reranked:
    """The candidates kept, best first, with their scores; the fused order when the re-rank degraded."""

    hits: list[Hit]
    scores: list[float] | None
    reranker: str
    candidates: int
    cost_usd: float = 0.0
    reason: str = ""

    @property
    def degraded(self) -> bool:
        return self.scores is None

    def record(self) -> dict[str, Any]:
        """What the step output says about the re-rank."""
        return {"reranker": self.reranker, "state": "degraded" if self.degraded else "ok", "reason": self.reason,
                "candidates": self.candidates, "kept": len(self.hits)}


async def rerank(reranker: Reranker, query: str, hits: Sequence[Hit], *, top_n: int, run_id: str) -> Reranked:
    """The ``top_n`` best of ``hits`` by ``reranker``; on any failure the first ``top_n`` in fused order."""
    if not hits:
        return Reranked([], [], reranker.name, 0)
    try:
        scored = await reranker.score(query, [h.text for h in hits], run_id=run_id)
        if len(scored.values) != len(hits) or not all(math.isfinite(v) for v in scored.values):
            raise RerankFailed(f"{len(scored.values)} scores for {len(hits)} candidates, or a non-finite one")
    except Exception as exc:  # an optional step's failure must not fail the run: degrade and say why
        failed = exc if isinstance(exc, RerankFailed) else RerankFailed(f"{type(exc).__name__}: {exc}")
        log.warning("re-rank by %s degraded to the fused order: %s", reranker.name, failed)
        return Reranked(list(hits[:top_n]), None, reranker.name, len(hits), failed.cost_usd, str(failed))
    best = sorted(range(len(hits)), key=lambda i: -scored.values[i])[:top_n]  # stable: ties keep the fused order
    return Reranked([hits[i] for i in best], [scored.values[i] for i in best], reranker.name, len(hits),
                    scored.cost_usd)
