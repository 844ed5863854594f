"""A local vLLM-CPU engine whose model runs inside its EngineCore process (vLLM's ``uni`` executor).

``ray.serve.llm`` starts CPU engines with vLLM's multiprocess executor: the EngineCore process hands
every step to a separate worker process through shared memory, and waits for the answer by spinning
(``sched_yield``) for a second after each read. With one worker there is nothing to parallelise, and
the spin is pure cost: the tiny model's engine took both of this VM's 2 cores at 974 tokens/s (c=1)
and 3,633 (c=4) with the worker process, 1.16 and 1.20 cores at 1,024 and 3,707 tokens/s with the
model in the EngineCore (``AsyncLLM`` alone, 15 s per figure). The core it frees is the one the
gateway, Serve's proxy and the engine replica's frontend share with the engine
(``bench/engine_path.py``).

Only a single-worker engine (tensor and pipeline parallel size 1) changes; the model's thread count is
the engine's CPU share (``engines.vllm.engine_env`` sets ``OMP_NUM_THREADS``), since vLLM binds
threads itself only for the multiprocess executor. Imported by the engine replica alone: it imports
vLLM, which the gateway never does.
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

UNI = "uni"


class InProcessWorkerEngine(VLLMEngine):
    """``ray.serve.llm``'s vLLM engine, run with the ``uni`` executor when it has a single worker."""

    def _prepare_engine_config(self, callback_ctx: Any) -> tuple[Any, Any, Any]:
        engine_args, frontend_args, config = super()._prepare_engine_config(callback_ctx)
        if config.parallel_config.world_size == 1:
            engine_args.distributed_executor_backend = UNI
            config.parallel_config.distributed_executor_backend = UNI
        return engine_args, frontend_args, config
