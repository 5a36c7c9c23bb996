"""Flags, workloads and the report of the generation routes (--route chat|completions)."""

from __future__ import annotations

import json

import pytest

from neuronserve.deploy.loadtest.cli import build_parser
from neuronserve.deploy.loadtest.config import (LengthRange, UsageError, config_from_args, parse_goodput,
                                                parse_length)
from neuronserve.deploy.loadtest.report import markdown_table, render_report, warnings_for
from neuronserve.deploy.loadtest.workload import generate_prompts, load_generation_workload


def cfg(*argv, tmp_path):
    return config_from_args(build_parser().parse_args(["--url", "http://h:1", *argv, "--out", str(tmp_path)]))


def test_generation_flags(tmp_path):
    c = cfg("--route", "chat", "--model", "llama", "--prompt-tokens", "64-512", "--output-tokens", "128",
            "--ignore-eos", "--goodput", "ttft:500", "tpot:50", tmp_path=tmp_path)
    assert c.generates and c.model == "llama"
    assert c.prompt_tokens == LengthRange(64, 512) and c.output_tokens == LengthRange(128, 128)
    assert c.ignore_eos and c.goodput == {"ttft": 500.0, "tpot": 50.0}
    assert c.timeout_s == 300  # a generation's default
    assert cfg(tmp_path=tmp_path).timeout_s == 30  # an encoder's, unchanged
    assert cfg("--route", "completions", "--timeout-s", "20", tmp_path=tmp_path).timeout_s == 20


@pytest.mark.parametrize("argv, message", [
    (["--route", "embeddings", "--output-tokens", "8"], "only for the generation routes"),
    (["--route", "classify", "--goodput", "ttft:5"], "--goodput: only for the generation routes"),
    (["--route", "chat", "--output-tokens", "0"], "--output-tokens '0'"),
    (["--route", "chat", "--prompt-tokens", "512-64"], "LO <= HI"),
    (["--route", "chat", "--prompt-tokens", "lots"], "is not a length"),
    (["--route", "chat", "--goodput", "ttft=5"], "METRIC:MS"),
    (["--route", "chat", "--goodput", "latency:5"], "METRIC:MS"),
    (["--route", "chat", "--goodput", "ttft:-1"], "MS > 0"),
    (["--route", "chat", "--goodput", "ttft:5", "ttft:6"], "ttft twice"),
    (["--route", "chat", "--inputs-per-request", "4"], "one prompt per request"),
    (["--route", "chat", "--slo-p99-ms", "900"], "--goodput e2el:900"),
])
def test_generation_usage_errors(argv, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        cfg(*argv, tmp_path=tmp_path)


def test_lengths_and_goodput_parse():
    assert parse_length("64:512", name="x") == LengthRange(64, 512) and str(LengthRange(64, 512)) == "64-512"
    assert parse_goodput(["ttft:500,itl:80", "e2el:2000"]) == {"ttft": 500.0, "itl": 80.0, "e2el": 2000.0}
    assert parse_goodput(None) is None


def test_generated_prompts_have_the_asked_lengths():
    w = generate_prompts(LengthRange(10, 300), count=500, seed=2)
    assert [len(t.split()) for t in w.texts] == w.word_counts
    assert min(w.word_counts) >= 10 and max(w.word_counts) <= 300 and len(set(w.word_counts)) > 100
    assert generate_prompts(LengthRange(10, 300), count=500, seed=2).texts == w.texts  # seeded
    assert generate_prompts(LengthRange(10, 300), count=500, seed=3).texts != w.texts


def test_output_lengths_fixed_uniform_and_default():
    fixed = load_generation_workload("short", output_tokens=LengthRange(32, 32))
    assert set(fixed.max_tokens) == {32} and fixed.describe()["max_tokens"] == "32"
    uniform = load_generation_workload("short", output_tokens=LengthRange(8, 64), seed=3)
    assert min(uniform.max_tokens) == 8 and max(uniform.max_tokens) == 64  # 1024 draws reach both ends
    assert uniform.max_tokens == load_generation_workload("short", output_tokens=LengthRange(8, 64), seed=3).max_tokens
    assert set(load_generation_workload("long").max_tokens) == {128}


def test_prompt_file_with_per_line_output_lengths(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"Tell me a story."\n{"prompt": "Two words", "max_tokens": 7}\n{"text": "old style"}\n')
    w = load_generation_workload(str(path))
    assert w.texts == ["Tell me a story.", "Two words", "old style"] and w.max_tokens == [128, 7, 128]
    assert w.output_tokens(4) == 7  # request 4 sends prompt 1
    assert load_generation_workload(str(path), output_tokens=LengthRange(5, 5)).max_tokens == [5, 5, 5]
    path.write_text('{"prompt": "x", "max_tokens": 0}\n')
    with pytest.raises(UsageError, match=r":1: \"max_tokens\" must be a whole number >= 1"):
        load_generation_workload(str(path))
    path.write_text('{"messages": []}\n')
    with pytest.raises(UsageError, match=r":1: expected a non-empty JSON string"):
        load_generation_workload(str(path))


def gen_step(value=8, source="usage", price=None, goodput=None):
    g = {"ttft_ms": {"p50": 80.0, "p90": 90.0, "p99": 99.0, "mean": 82.0, "max": 120.0},
         "itl_ms": {"p50": 20.0, "p90": 21.0, "p99": 25.0, "mean": 20.5, "max": 30.0},
         "tpot_ms": {"p50": 20.5, "p90": 21.0, "p99": 24.0, "mean": 20.6, "max": 24.0},
         "output_tokens": 4000, "output_tokens_mean": 100.0, "output_tokens_source": source,
         "output_tokens_per_s": 400.0, "usd_per_1m_output_tokens": None if price is None else 0.5263,
         "goodput_slo_ms": goodput, "good_requests": None if goodput is None else 30,
         "goodput_rps": None if goodput is None else 3.0}
    return {"mode": "concurrency", "value": value, "arrival": None, "offered_rps": 4.0, "achieved_rps": 4.0,
            "sent": 40, "succeeded": 40, "failed": 0, "throttled": 0, "errors_by_status": {}, "errors_by_kind": {},
            "dropped_by_client": 0, "latency_ms": {"p50": 2100.0, "p90": 2200.0, "p99": 2300.0, "max": 2400.0,
                                                   "mean": 2110.0, "min": 2000.0},
            "tokens_per_s": 50.0, "tokens_source": "server", "slo_p99_ms": None, "goodput_rps": None, "slo_met": None,
            "price_per_hour_usd": price, "usd_per_1m_requests": None, "client_cpu_percent": 5.0,
            "client_saturated": False, "generation": g}


def test_generation_table_columns():
    plain = markdown_table([gen_step()])
    head = plain.splitlines()[0]
    assert "TTFT p50" in head and "ITL p99" in head and "TPOT p50" in head and "out tok/s" in head
    assert "goodput/s" not in head and "$/1M out tok" not in head
    full = markdown_table([gen_step(price=0.7582, goodput={"ttft": 100.0})])
    assert "goodput/s" in full.splitlines()[0] and "$/1M out tok" in full.splitlines()[0]
    assert "| 3.00 | 75% | 0.5263 |" in full.splitlines()[2]
    assert "~400.0" in markdown_table([gen_step(source="chunks")])


def test_generation_report_and_warnings():
    meta = {"url": "http://h:1", "route": "chat", "endpoint": "POST http://h:1/v1/chat/completions", "model": "llama",
            "workload": {"name": "prompts of 64-512 words", "texts": 1024, "words_min": 64, "words_median": 290,
                         "words_max": 512, "max_tokens": "128", "max_tokens_min": 128, "max_tokens_median": 128,
                         "max_tokens_max": 128},
            "seed": 0, "mode": "concurrency", "values": [8], "warmup_s": 1.0, "duration_s": 2.0,
            "started_at": "2026-01-01T00:00:00+0000", "machine": {}, "notes": [],
            "goodput_slo_ms": {"ttft": 100.0, "tpot": 30.0}, "ignore_eos": True,
            "price_per_hour_usd": 0.7582, "price_source": "price table (inf2.xlarge)"}
    text = render_report({"metadata": meta, "steps": [gen_step(source="mixed", goodput={"ttft": 100.0})]})
    assert "ttft <= 100 ms, tpot <= 30 ms" in text and "ignore_eos sent" in text and "TTFT p99" in text
    assert "data: [DONE]" in text and "counted as content events" in text
    assert "$/1M out tok = 1e6 / out tok/s x price / 3600" in text
    assert not any("usage" in n for n in warnings_for([gen_step()]))


def test_generation_step_json_round_trips_through_compare(tmp_path):
    from neuronserve.deploy.loadtest.report import load_result, render_compare

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**gen_step(), "metadata": {}}))
    faster = gen_step()
    faster["generation"] = {**faster["generation"], "output_tokens_per_s": 800.0,
                            "ttft_ms": {**faster["generation"]["ttft_ms"], "p50": 40.0}}
    b.write_text(json.dumps({**faster, "metadata": {}}))
    text = render_compare(load_result(a), load_result(b))
    assert "out tok/s A" in text and "TTFT p50 A" in text and "achieved/s A" not in text
    row = next(line for line in text.splitlines() if line.startswith("| c=8 |"))
    assert "| 400.00 | 800.00 | 2.00x |" in row and "| 80.00 | 40.00 | 0.50x |" in row


def bpe_tokenizer(folder):
    """A small byte-level BPE tokenizer (the kind Llama-family models use), trained offline on the
    workload's own words and saved like a model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from neuronserve.deploy.loadtest.workload import generate

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(generate("long", count=50, seed=9).texts,
                            trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(str(folder))
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_prompt_lengths_in_a_tokenizers_tokens(tmp_path):
    counter = bpe_tokenizer(tmp_path / "tok")
    w = load_generation_workload("short", prompt_tokens=LengthRange(20, 200), tokenizer=str(tmp_path / "tok"), seed=4)
    # Counted again here with the tokenizers library directly, not through the workload.
    counts = [len(counter.encode(t, add_special_tokens=False).ids) for t in w.texts[:200]]
    targets = [n for n in w.token_counts[:200]]
    assert counts == targets
    rng_lengths = generate_prompts(LengthRange(20, 200), count=len(w.texts), seed=4).word_counts
    off = [abs(c - n) for c, n in zip(counts, rng_lengths)]
    assert max(off) <= 2 and sum(1 for d in off if d == 0) >= 150  # a cut inside a word may re-encode +-1
    assert w.describe()["tokens_min"] >= 18 and "tokens" in w.name
    assert w.estimated_tokens(0) == counts[0]  # without usage, prompt tokens are the tokenizer's count


def test_a_bad_tokenizer_or_one_without_prompt_tokens_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--tokenizer .*cannot load a tokenizer"):
        load_generation_workload("short", prompt_tokens=LengthRange(5, 5), tokenizer=str(tmp_path / "none"))
    with pytest.raises(UsageError, match="give --prompt-tokens"):
        cfg("--route", "chat", "--tokenizer", str(tmp_path), tmp_path=tmp_path)
