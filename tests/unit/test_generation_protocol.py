"""The OpenAI generation protocol (serve.generation.openai_api) over a stand-in engine: requests
parsed and checked at the edge (model, context, max_tokens, messages), responses and SSE frames in
OpenAI's shapes, the usage counted from the engine's deltas. No vLLM needed: the engine is a test
double that replays deltas; tests/integration/test_generation.py runs the real one."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from neuronserve.serve.errors import BadRequest, NotFound
from neuronserve.serve.generation.engine import Delta, Sampling
from neuronserve.serve.generation.openai_api import OpenAIGeneration

REPO = Path(__file__).resolve().parents[2]
CONTEXT = 64


class _Tokenizer:
    """Words to ids (1 + position in a growing table), with a chat template like a real one's."""

    bos_token_id = 1

    def __init__(self):
        self.table: dict[str, int] = {}

    def __len__(self):
        return 1000

    def __call__(self, text, add_special_tokens=True):
        ids = [self.table.setdefault(w, 10 + len(self.table)) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        if messages[-1]["role"] == "assistant" and add_generation_prompt:
            raise ValueError("the last message is the assistant's")
        text = "<s> " + " ".join(f"<|{m['role']}|> {m['content']} </s>" for m in messages)
        return text + (" <|assistant|>" if add_generation_prompt else "")


class _Engine:
    """Replays the deltas of one sequence ("a", "b", "c", ... one token each) and records calls."""

    max_model_len = CONTEXT

    def __init__(self):
        self.tokenizer = _Tokenizer()
        self.calls: list[tuple[str, list[int], Sampling]] = []

    def check_prompt(self, prompt_tokens, max_tokens):
        from neuronserve.serve.errors import InputError

        if prompt_tokens + max_tokens > self.max_model_len:
            raise InputError(f"{prompt_tokens} + {max_tokens} > {self.max_model_len}",
                             param="max_tokens" if prompt_tokens < self.max_model_len else "prompt")

    async def generate(self, request_id, ids, sampling):
        self.calls.append((request_id, ids, sampling))
        for i in range(sampling.max_tokens):
            last = i == sampling.max_tokens - 1
            yield Delta(text=f" {chr(97 + i)}", token_ids=[100 + i], finish_reason="length" if last else None,
                        prompt_tokens=len(ids), output_tokens=i + 1)


@pytest.fixture
def api():
    return OpenAIGeneration(_Engine(), "tiny")


def _body(**kw) -> bytes:
    return json.dumps(kw).encode()


def _run(agen):
    async def collect():
        return [f async for f in agen]
    return asyncio.run(collect())


def test_a_completion_counts_its_usage_and_returns_the_ids_when_asked(api):
    r, ids, s = api.prepare_completion(_body(model="tiny", prompt="hello world", max_tokens=3, temperature=0,
                                             return_token_ids=True, stop="x"))
    assert ids == [1, 10, 11] and s.max_tokens == 3 and s.temperature == 0 and s.stop == ["x"]
    out = asyncio.run(api.complete("completion", r, ids, s))
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["choices"] == [{"index": 0, "finish_reason": "length", "logprobs": None, "text": " a b c",
                               "token_ids": [100, 101, 102]}]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_token_id_prompts_pass_as_given_and_must_lie_in_the_vocabulary(api):
    _, ids, _ = api.prepare_completion(_body(model="tiny", prompt=[5, 6, 7]))
    assert ids == [5, 6, 7]
    with pytest.raises(BadRequest, match="token id 1000 is outside the vocabulary"):
        api.prepare_completion(_body(model="tiny", prompt=[5, 1000]))


def test_chat_applies_the_template_and_defaults_max_tokens_to_what_the_context_leaves(api):
    r, ids, s = api.prepare_chat(_body(model="tiny", messages=[{"role": "user", "content": "hi there"}]))
    assert len(ids) == 6  # <s> <|user|> hi there </s> <|assistant|>: the template's BOS only, none added
    assert s.max_tokens == CONTEXT - 6
    _, _, s = api.prepare_chat(_body(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                     max_completion_tokens=2))
    assert s.max_tokens == 2  # max_completion_tokens wins, as in OpenAI's API


def test_chat_content_parts_are_joined(api):
    _, ids, _ = api.prepare_chat(_body(model="tiny", messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]))
    assert [w for w, i in api.engine.tokenizer.table.items() if i in ids] == ["<s>", "<|user|>", "ab", "</s>",
                                                                                "<|assistant|>"]


def test_streamed_chat_frames_and_the_usage_chunk(api):
    r, ids, s = api.prepare_chat(_body(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       stream=True, stream_options={"include_usage": True}))
    frames = _run(api.stream("chat", r, ids, s))
    assert frames[-1] == b"data: [DONE]\n\n"
    chunks = [orjson.loads(f[len(b"data: "):]) for f in frames[:-1]]
    assert all(f.startswith(b"data: ") and f.endswith(b"\n\n") for f in frames)
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": ""}, {"content": " a"}, {"content": " b"}, None]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, "length"]
    assert [c["usage"] for c in chunks] == [None, None, None, {"prompt_tokens": 5, "completion_tokens": 2,
                                                               "total_tokens": 7}]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_streams_carry_no_usage_unless_asked(api):
    r, ids, s = api.prepare_completion(_body(model="tiny", prompt="hi", max_tokens=2, stream=True))
    chunks = [orjson.loads(f[6:]) for f in _run(api.stream("completion", r, ids, s))[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [" a", " b"] and all("usage" not in c for c in chunks)


def test_an_unknown_model_is_404_naming_the_served_one(api):
    with pytest.raises(NotFound) as e:
        api.prepare_completion(_body(model="gpt-4", prompt="hi"))
    assert e.value.status == 404 and e.value.code == "model_not_found" and "'tiny'" in e.value.message


@pytest.mark.parametrize("body, param, fragment", [
    (dict(prompt="hi", max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (dict(prompt="hi", max_tokens=63), "max_tokens", "63 > 64"),  # 2 prompt tokens + 63 > 64
    (dict(prompt="w " * 70, max_tokens=1), "prompt", "71 + 1 > 64"),
    (dict(prompt="hi", temperature=3), "temperature", "less than or equal to 2"),
    (dict(prompt="hi", n=2), "n", "Input should be 1"),
    (dict(prompt=[]), "prompt", "prompt"),
    (dict(max_tokens=3), "prompt", "Field required"),
    (dict(prompt="hi", stream_options={"include_usage": "maybe"}), "stream_options", "boolean"),
])
def test_bad_completion_requests_are_400_naming_the_field(api, body, param, fragment):
    with pytest.raises(BadRequest) as e:
        api.prepare_completion(_body(model="tiny", **body))
    assert e.value.status == 400 and e.value.param == param and fragment in e.value.message, e.value.message


@pytest.mark.parametrize("messages, fragment", [
    ([], "at least 1 item"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "content"),
    ([{"role": "assistant", "content": "hi"}], "chat template rejects them"),
])
def test_malformed_messages_are_400(api, messages, fragment):
    with pytest.raises(BadRequest) as e:
        api.prepare_chat(_body(model="tiny", messages=messages))
    assert e.value.param == "messages" and fragment in e.value.message, e.value.message


def test_a_body_that_is_not_json_is_400(api):
    with pytest.raises(BadRequest, match="Invalid JSON"):
        api.prepare_completion(b"{nope")


def test_the_served_model_is_listed(api):
    listing = api.models()
    assert [m["id"] for m in listing["data"]] == ["tiny"] and listing["data"][0]["max_model_len"] == CONTEXT


def test_neither_the_encoder_server_nor_the_generation_modules_import_vllm(tmp_path):
    # A `vllm` that fails on import, first on the path: serving encoders, and even building the
    # generation application, must not touch it (vLLM is imported when an engine starts).
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('vllm was imported')\n")
    code = ("import sys\n"
            "import neuronserve.serve.app, neuronserve.serve.serve_cli, neuronserve.cli\n"
            "import neuronserve.serve.generation.deployment, neuronserve.serve.generation.openai_api\n"
            "import neuronserve.serve.generation.engine\n"
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_engine_without_vllm_names_the_extra_to_install(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('no vllm here')\n")
    code = ("from neuronserve.serve.generation.engine import GenerationEngine, EngineUnavailable\n"
            "try:\n    GenerationEngine.start({'model': '/m'})\n"
            "except EngineUnavailable as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "pip install -c constraints-generate.txt" in out.stdout and "no vllm here" in out.stdout, out.stderr


@pytest.fixture(scope="module")
def generative_artifact(tmp_path_factory):
    from tests.fixtures.tiny_models import make_tiny_causal_lm

    model = make_tiny_causal_lm(tmp_path_factory.mktemp("lm"))
    out = tmp_path_factory.mktemp("art") / "a"
    subprocess.run([sys.executable, "-m", "neuronserve", "compile", "--model", str(model), "--task", "generate",
                    "--target", "cpu", "--out", str(out)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    return out


def test_serve_builds_the_generation_app_for_a_generative_artifact(generative_artifact):
    from neuronserve.serve.app import build_app
    from neuronserve.serve.generation.deployment import DEPLOYMENT_NAME
    from neuronserve.serve.settings import AppArgs

    app = build_app(AppArgs(artifacts=str(generative_artifact), model_name="llm", instance_type="c7i.xlarge",
                            price_per_hour_usd=0.5, metrics_dir="/tmp/m"))
    deployment = app._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    engine_args, env, name, metrics, key_digests, key_file, artifact = deployment.init_args
    assert key_digests == () and key_file is None  # no keys: authentication off
    assert artifact is None  # a local folder: nothing to pull
    # The replica's metrics: cost over the CPUs it reserves, into the node exporter's directory.
    assert metrics == {"backend": "cpu", "cores": os.cpu_count(), "instance_type": "c7i.xlarge",
                       "price_per_hour_usd": 0.5, "metrics_dir": "/tmp/m"}
    assert name == "llm" and engine_args["model"] == str(generative_artifact / "model")
    assert engine_args["max_model_len"] == 256
    actor = deployment.ray_actor_options
    cpus = os.cpu_count()
    assert actor["num_cpus"] == cpus
    threads = min(cpus, len(os.sched_getaffinity(0)))  # the CPUs this process may use, as many as reserved
    assert env["OMP_NUM_THREADS"] == str(threads) and actor["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"]


def test_api_keys_reach_the_generation_replica_as_digests_only(generative_artifact, tmp_path):
    from neuronserve.serve.app import build_app
    from neuronserve.serve.auth import digest
    from neuronserve.serve.settings import AppArgs

    key_file = tmp_path / "keys"
    key_file.write_text("file-key-000000000000\n")
    keys = "k" * 32 + ",second-key-0000000000"
    app = build_app(AppArgs(artifacts=str(generative_artifact), api_key=keys, api_key_file=str(key_file)))
    deployment = app._bound_deployment
    *_, key_digests, key_file_arg, _ = deployment.init_args
    assert set(key_digests) == {digest("k" * 32), digest("second-key-0000000000")}
    assert key_file_arg == str(key_file)  # each replica reads the file itself
    bound = repr((deployment.init_args, deployment.init_kwargs, deployment.ray_actor_options))
    assert "k" * 32 not in bound and "second-key" not in bound and "file-key" not in bound
