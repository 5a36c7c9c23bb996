"""vLLM's V1 async engine (`AsyncLLM`) behind a small interface: token ids in, deltas out.

The engine is configured by a plain dict of vLLM engine arguments (`AsyncEngineArgs` fields) and a
dict of environment variables for vLLM's process (the CPU backend reads its KV-cache size and thread
binding from the environment). Building those per target from an artifact's manifest is
`neuronserve.models.generation.vllm_engine_config`'s business, not this module's.

vLLM is imported when an engine starts, never at import time: `neuronserve serve` for an encoder
must not pay for (or depend on) it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from neuronserve.serve.errors import InputError


class EngineUnavailable(RuntimeError):
    """vLLM is not installed, or its engine could not start; the message says which and the fix."""


@dataclass(slots=True)
class Sampling:
    """What a request asks of the sampler, in OpenAI's terms (validated by the protocol layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(slots=True)
class Delta:
    """New output of one sequence since the last delta; `finish_reason` set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    output_tokens: int  # so far, this delta included


def _vllm():
    try:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EngineUnavailable(
            f"generation needs vLLM, which is not importable here ({e}); install the generate extra: "
            "pip install -c constraints-generate.txt -e '.[generate]'") from e
    return AsyncLLM, AsyncEngineArgs, SamplingParams, RequestOutputKind


def scheduler_logger(on_step: Callable[[int, int, float], None]):
    """A vLLM stat logger (a per-engine factory: the class) that hands each step's scheduler stats
    to `on_step(running, waiting, kv_cache_usage)`. Waiting counts what vLLM's own
    `vllm:num_requests_waiting` counts: waiting sequences, deferred ones included."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                on_step(scheduler_stats.num_running_reqs,
                        scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                        scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self):
            pass

    return SchedulerStatsLogger


class GenerationEngine:
    """One vLLM engine: continuous batching over every sequence it is given.

    `start` builds it (vLLM runs its engine core in a process of its own); `generate` streams one
    sequence's deltas and aborts the sequence in the engine if the caller stops listening (a
    cancelled task: the client went away); `shutdown` stops the engine core.
    """

    def __init__(self, engine, tokenizer, max_model_len: int, model: str):
        self._engine = engine
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model = model
        self.aborted = 0
        # `GenerationMetrics` of the replica, set once the engine runs (None: nothing recorded).
        self.metrics = None

    @classmethod
    def start(cls, engine_args: dict[str, Any], env: dict[str, str] | None = None, *,
              on_step: Callable[[int, int, float], None] | None = None) -> "GenerationEngine":
        """`on_step(running, waiting, kv_cache_usage)` is called with the scheduler's stats after
        each engine step (vLLM's stat-logger interface, in this process's event loop)."""
        # vLLM reads its environment when its engine core starts (and the core inherits it).
        os.environ.update(env or {})
        AsyncLLM, AsyncEngineArgs, _, _ = _vllm()
        args = AsyncEngineArgs(**engine_args)
        engine = AsyncLLM.from_engine_args(args, stat_loggers=[scheduler_logger(on_step)] if on_step else None)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(engine_args.get("tokenizer") or engine_args["model"])
        max_model_len = engine.model_config.max_model_len
        return cls(engine, tokenizer, max_model_len, engine_args["model"])

    def running(self) -> int:
        """Sequences the engine holds (running or waiting): vLLM's own count."""
        return self._engine.output_processor.get_num_unfinished_requests()

    def check_prompt(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens >= self.max_model_len:
            raise InputError(
                f"the prompt has {prompt_tokens} tokens; the model's context is {self.max_model_len} tokens "
                "(prompt and output together); send a shorter prompt", param="messages")
        if prompt_tokens + max_tokens > self.max_model_len:
            raise InputError(
                f"max_tokens is {max_tokens} and the prompt has {prompt_tokens} tokens; together they exceed "
                f"the model's context of {self.max_model_len} tokens; ask for at most "
                f"{self.max_model_len - prompt_tokens} tokens", param="max_tokens")

    def _params(self, s: Sampling):
        _, _, SamplingParams, RequestOutputKind = _vllm()
        return SamplingParams(
            n=1, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            stop=s.stop or None, ignore_eos=s.ignore_eos, min_tokens=s.min_tokens,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            output_kind=RequestOutputKind.DELTA, detokenize=True,
        )

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: Sampling) -> AsyncIterator[Delta]:
        self.check_prompt(len(prompt_token_ids), sampling.max_tokens)
        produced = 0
        finished = False
        m = self.metrics
        started = last = m.sequence_started(len(prompt_token_ids)) if m is not None else 0.0
        try:
            async for out in self._engine.generate({"prompt_token_ids": prompt_token_ids}, self._params(sampling),
                                                   request_id):
                c = out.outputs[0]
                n = len(c.token_ids)
                produced += n
                finished = out.finished
                if m is not None and n:
                    now = m.now()
                    if produced == n:
                        m.first_tokens(now - started, n)
                    else:
                        m.next_tokens(now - last, n)
                    last = now
                yield Delta(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason if out.finished else None,
                            prompt_tokens=len(prompt_token_ids), output_tokens=produced)
        finally:
            if m is not None:
                m.sequence_ended(started, finished)
            # A consumer that stops early (a disconnected client: its task is cancelled, or the
            # generator closed) leaves the sequence running in the engine unless it is aborted.
            if not finished:
                self.aborted += 1
                await self._engine.abort(request_id)

    def check_health(self) -> None:
        """Raise if the engine core died (Serve then replaces the replica)."""
        if self._engine.errored:
            raise RuntimeError(f"the vLLM engine is dead: {self._engine.dead_error}")

    def shutdown(self) -> None:
        self._engine.shutdown()
