"""Generation metrics (serve.metrics.GenerationMetrics) recorded by serve.generation.engine's
`GenerationEngine.generate` over a stand-in for vLLM's AsyncLLM that emits outputs at known times
on a test clock; the expected values are computed here from those times. The cost per 1M output
tokens recording rules are evaluated by promtool on synthetic series."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from neuronserve.serve.generation.engine import GenerationEngine, Sampling
from neuronserve.serve.metrics import (GENERATION_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, GenerationMetrics, Metrics)
from tests.fixtures.prom_samples import samples as _samples
from tests.fixtures.prom_samples import value as _value

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "monitoring" / "prometheus-rules.yaml"
PRICE, CORES_PER_INSTANCE, CORES = 7.2, 4, 2
PER_CORE_S = PRICE / 3600 / CORES_PER_INSTANCE


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakeAsyncLLM:
    """Emits, for each request, the scripted outputs: (seconds after the previous, token ids,
    finished). The clock advances by the given seconds before each output."""

    def __init__(self, clock: Clock, script: list[tuple[float, list[int], bool]]):
        self.clock = clock
        self.script = script
        self.aborted: list[str] = []

    async def generate(self, prompt, params, request_id):
        for dt, ids, finished in self.script:
            self.clock.t += dt
            yield SimpleNamespace(finished=finished, outputs=[SimpleNamespace(
                token_ids=ids, text="x" * len(ids), finish_reason="length" if finished else None)])

    async def abort(self, request_id):
        self.aborted.append(request_id)


def _engine(clock, script, reg):
    e = GenerationEngine(FakeAsyncLLM(clock, script), tokenizer=None, max_model_len=4096, model="m")
    e._params = lambda s: s  # vLLM's SamplingParams are not needed by the stand-in
    e.metrics = GenerationMetrics("tiny", "cpu", CORES, "custom", PRICE, CORES_PER_INSTANCE, clock=clock,
                                  metrics=Metrics(reg))
    return e


async def _drain(agen, stop_after: int | None = None):
    n = 0
    async for _ in agen:
        n += 1
        if stop_after is not None and n >= stop_after:
            break
    await agen.aclose()


def _bucket_counts(values, bounds):
    return {b: sum(1 for v in values if v <= b) for b in bounds}


def test_token_timings_give_ttft_itl_end_to_end_and_token_counts():
    clock, reg = Clock(), CollectorRegistry()
    # First token after 0.35 s, then one token 0.02 s later, two together 0.05 s later, the last 0.01 s later.
    script = [(0.35, [5], False), (0.02, [6], False), (0.05, [7, 8], False), (0.01, [9], True)]
    e = _engine(clock, script, reg)
    prompt = list(range(11))
    asyncio.run(_drain(e.generate("r1", prompt, Sampling(max_tokens=5))))

    s = _samples(reg)
    ttft = 0.35
    itl = [0.02, 0.025, 0.025, 0.01]  # the pair shares its 0.05 s gap
    e2e = 0.35 + 0.02 + 0.05 + 0.01
    assert _value(s, "neuronserve_time_to_first_token_seconds_count", model="tiny") == 1
    assert _value(s, "neuronserve_time_to_first_token_seconds_sum", model="tiny") == pytest.approx(ttft)
    assert _value(s, "neuronserve_inter_token_latency_seconds_count", model="tiny") == len(itl)
    assert _value(s, "neuronserve_inter_token_latency_seconds_sum", model="tiny") == pytest.approx(sum(itl))
    for b, n in _bucket_counts(itl, ITL_BUCKETS).items():
        assert _value(s, "neuronserve_inter_token_latency_seconds_bucket", model="tiny", le=str(b)) == n, b
    for b, n in _bucket_counts([ttft], TTFT_BUCKETS).items():
        assert _value(s, "neuronserve_time_to_first_token_seconds_bucket", model="tiny", le=str(b)) == n, b
    assert _value(s, "neuronserve_generation_duration_seconds_count", model="tiny") == 1
    assert _value(s, "neuronserve_generation_duration_seconds_sum", model="tiny") == pytest.approx(e2e)
    assert _value(s, "neuronserve_prompt_tokens_total", model="tiny") == len(prompt)
    assert _value(s, "neuronserve_output_tokens_total", model="tiny") == 5
    # Busy for the whole sequence: dollars of the replica's cores over that time.
    assert _value(s, "neuronserve_device_busy_seconds_total", model="tiny") == pytest.approx(e2e)
    assert _value(s, "neuronserve_cost_busy_usd_total", model="tiny") == pytest.approx(e2e * CORES * PER_CORE_S)
    assert e._engine.aborted == []


def test_a_first_output_with_several_tokens_counts_them_as_arriving_together():
    clock, reg = Clock(), CollectorRegistry()
    e = _engine(clock, [(0.2, [1, 2, 3], False), (0.03, [4], True)], reg)
    asyncio.run(_drain(e.generate("r", [1, 2], Sampling(max_tokens=4))))
    s = _samples(reg)
    assert _value(s, "neuronserve_time_to_first_token_seconds_sum", model="tiny") == pytest.approx(0.2)
    assert _value(s, "neuronserve_inter_token_latency_seconds_count", model="tiny") == 3
    assert _value(s, "neuronserve_inter_token_latency_seconds_sum", model="tiny") == pytest.approx(0.03)
    assert _value(s, "neuronserve_output_tokens_total", model="tiny") == 4


def test_an_aborted_sequence_counts_its_tokens_but_no_end_to_end_time():
    clock, reg = Clock(), CollectorRegistry()
    e = _engine(clock, [(0.1, [1], False), (0.02, [2], False), (0.02, [3], True)], reg)
    asyncio.run(_drain(e.generate("gone", [7, 7, 7], Sampling(max_tokens=3)), stop_after=2))
    s = _samples(reg)
    assert e._engine.aborted == ["gone"]
    assert _value(s, "neuronserve_generation_duration_seconds_count", model="tiny") == 0
    assert _value(s, "neuronserve_output_tokens_total", model="tiny") == 2
    assert _value(s, "neuronserve_prompt_tokens_total", model="tiny") == 3
    assert _value(s, "neuronserve_device_busy_seconds_total", model="tiny") == pytest.approx(0.12)


def test_busy_time_counts_overlapping_sequences_once_and_allocated_cost_accrues_on_tick():
    clock, reg = Clock(), CollectorRegistry()
    m = GenerationMetrics("tiny", "cpu", CORES, "custom", PRICE, CORES_PER_INSTANCE, clock=clock, metrics=Metrics(reg))
    a = m.sequence_started(4)            # t=0
    clock.t += 1.0
    b = m.sequence_started(6)            # t=1: overlaps a
    clock.t += 2.0
    m.sequence_ended(a, finished=True)   # t=3
    clock.t += 0.5
    m.tick()                             # t=3.5: b still running, its busy time so far is counted
    s = _samples(reg)
    assert _value(s, "neuronserve_device_busy_seconds_total", model="tiny") == pytest.approx(3.5)
    clock.t += 1.5
    m.sequence_ended(b, finished=True)   # t=5
    clock.t += 4.0                       # idle
    m.tick()                             # t=9
    s = _samples(reg)
    assert _value(s, "neuronserve_device_busy_seconds_total", model="tiny") == pytest.approx(5.0)
    assert _value(s, "neuronserve_cost_busy_usd_total", model="tiny") == pytest.approx(5.0 * CORES * PER_CORE_S)
    assert _value(s, "neuronserve_cost_allocated_usd_total", model="tiny") == pytest.approx(9.0 * CORES * PER_CORE_S)
    assert _value(s, "neuronserve_generation_duration_seconds_sum", model="tiny") == pytest.approx(3.0 + 4.0)
    assert _value(s, "neuronserve_prompt_tokens_total", model="tiny") == 10


def test_scheduler_gauges_and_their_reset_when_the_replica_closes():
    clock, reg = Clock(), CollectorRegistry()
    m = GenerationMetrics("tiny", "cpu", CORES, "custom", PRICE, CORES_PER_INSTANCE, clock=clock, metrics=Metrics(reg))
    m.scheduler(running=3, waiting=2, kv_cache_usage=0.375)
    m.answered("/v1/chat/completions", 200)
    m.answered("/v1/chat/completions", 400)
    s = _samples(reg)
    assert _value(s, "neuronserve_sequences_running", model="tiny") == 3
    assert _value(s, "neuronserve_sequences_waiting", model="tiny") == 2
    assert _value(s, "neuronserve_kv_cache_usage_ratio", model="tiny") == 0.375
    for status in ("200", "400"):
        assert _value(s, "neuronserve_requests_total", model="tiny", route="/v1/chat/completions",
                      status=status) == 1
    m.close()
    s = _samples(reg)
    assert (_value(s, "neuronserve_sequences_running", model="tiny"),
            _value(s, "neuronserve_kv_cache_usage_ratio", model="tiny")) == (0, 0)


def test_generation_buckets_cover_llm_latencies():
    assert TTFT_BUCKETS[0] == 5e-3 and TTFT_BUCKETS[-2] < 120 <= TTFT_BUCKETS[-1]
    assert ITL_BUCKETS[0] == 1e-3 and ITL_BUCKETS[-2] < 30 <= ITL_BUCKETS[-1]
    assert GENERATION_BUCKETS[0] == 10e-3 and GENERATION_BUCKETS[-2] < 1200 <= GENERATION_BUCKETS[-1]
    for b in (TTFT_BUCKETS, ITL_BUCKETS, GENERATION_BUCKETS):
        assert all(y / x == pytest.approx(1.5, rel=0.01) for x, y in zip(b, b[1:]))


def test_the_scheduler_logger_reads_vllms_scheduler_stats():
    pytest.importorskip("vllm", reason="vLLM is in the generate environment only")
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.stats import SchedulerStats

    from neuronserve.serve.generation.engine import scheduler_logger

    seen = []
    cls = scheduler_logger(lambda *a: seen.append(a))
    assert issubclass(cls, StatLoggerBase)
    logger = cls(None, 0)
    logger.record(SchedulerStats(num_running_reqs=4, num_waiting_reqs=1, num_skipped_waiting_reqs=2,
                                 kv_cache_usage=0.25), None)
    logger.record(None, None)  # a step without scheduler stats changes nothing
    assert seen == [(4, 3, 0.25)]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_evaluates_cost_per_million_output_tokens(tmp_path):
    # Over 10 minutes: 0.006 USD allocated and 0.0015 USD busy per minute, 1200 output tokens per
    # minute (20/s): 0.006 / 1200 * 1e6 = 5 USD allocated and 1.25 USD busy per 1M output tokens.
    tests = tmp_path / "tests.yaml"
    tests.write_text(textwrap.dedent(f"""\
        rule_files: [{RULES}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'neuronserve_cost_allocated_usd_total{{model="tiny"}}'
                values: '0+0.006x10'
              - series: 'neuronserve_cost_busy_usd_total{{model="tiny"}}'
                values: '0+0.0015x10'
              - series: 'neuronserve_output_tokens_total{{model="tiny"}}'
                values: '0+1200x10'
            promql_expr_test:  # rounded to 1e-6 USD: the rates divide by 60 s in floating point
              - expr: round(neuronserve:cost_per_million_output_tokens_usd, 1e-6)
                eval_time: 10m
                exp_samples: [{{labels: '{{model="tiny"}}', value: 5}}]
              - expr: round(neuronserve:busy_cost_per_million_output_tokens_usd, 1e-6)
                eval_time: 10m
                exp_samples: [{{labels: '{{model="tiny"}}', value: 1.25}}]
              - expr: round(neuronserve:output_tokens:rate5m, 1e-6)
                eval_time: 10m
                exp_samples: [{{labels: '{{model="tiny"}}', value: 20}}]
        """))
    r = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
