import asyncio
import json
import py_compile
from pathlib import Path

import aiohttp

from neuronserve.deploy.loadtest.client import Target, error_kind, server_tokens

REPO = Path(__file__).resolve().parents[2]


def test_request_bodies_per_route():
    assert json.loads(Target("http://h", "embeddings", "m").body("hi")) == {"input": "hi", "model": "m"}
    assert Target("http://h", "embeddings", "m").endpoint == "http://h/v1/embeddings"
    assert json.loads(Target("http://h", "classify", None).body("hi")) == {"inputs": "hi"}
    assert Target("http://h", "classify", None).endpoint == "http://h/predict"
    rerank = Target("http://h", "rerank", "ce")
    assert rerank.endpoint == "http://h/v1/rerank"
    assert json.loads(rerank.body(["one two three four five six seven eight nine", "b"])) == {
        "model": "ce", "query": "one two three four five six seven eight", "documents": [
            "one two three four five six seven eight nine", "b"]}
    assert json.loads(Target("http://h", "sparse", None).body("hi")) == {"inputs": "hi"}
    assert Target("http://h", "sparse", None).endpoint == "http://h/embed_sparse"
    v2 = Target("http://h", "v2", "m")
    assert v2.endpoint == "http://h/v2/models/m/infer"
    assert json.loads(v2.body("hi")) == {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}


def test_error_kinds():
    refused = aiohttp.ClientConnectorError(None, ConnectionRefusedError(111, "Connection refused"))
    assert error_kind(refused) == "connect_error"
    assert error_kind(aiohttp.ServerDisconnectedError()) == "server_disconnected"
    assert error_kind(aiohttp.ClientPayloadError("cut short")) == "incomplete_body"
    assert error_kind(aiohttp.ServerTimeoutError("slow")) == "timeout"
    assert error_kind(asyncio.TimeoutError()) == "timeout"
    assert error_kind(aiohttp.ClientResponseError(None, (), status=400)) == "client_response_error"


def test_server_tokens():
    assert server_tokens({"usage": {"prompt_tokens": 7, "total_tokens": 7}}) == 7
    assert server_tokens([{"label": "a", "score": 1.0}]) is None
    assert server_tokens({"usage": {"prompt_tokens": "7"}}) is None
    assert server_tokens({"usage": None}) is None


def test_locustfile_compiles():
    py_compile.compile(str(REPO / "deploy" / "locustfile.py"), doraise=True)


def test_steps_run_on_uvloop_when_it_is_installed_and_on_asyncio_without(monkeypatch):
    import sys

    from neuronserve.deploy.loadtest.client import run

    async def loop_module():
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert run(loop_module()).startswith("uvloop")  # a dependency on Linux
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails: plain asyncio
    assert run(loop_module()).startswith("asyncio")


def test_several_inputs_per_request_go_as_one_list_in_each_protocol():
    import json

    from neuronserve.deploy.loadtest.client import StepRunner, Target
    from neuronserve.deploy.loadtest.workload import Workload

    texts = ["a b", "c", "d e f"]
    for route, read in (("embeddings", lambda p: p["input"]), ("classify", lambda p: p["inputs"]),
                        ("v2", lambda p: p["inputs"][0]["data"]), ("rerank", lambda p: p["documents"]),
                        ("sparse", lambda p: p["inputs"])):
        target = Target(url="http://x", route=route, model="m")
        runner = StepRunner(None, target, Workload(name="t", texts=texts, word_counts=[2, 1, 3]), timeout_s=1,
                            max_requests=10, inputs_per_request=2)
        bodies = [read(json.loads(b)) for b in runner._bodies]
        assert bodies == [["a b", "c"], ["d e f", "a b"], ["c", "d e f"]]
    v2 = json.loads(Target(url="http://x", route="v2", model="m").body(["p", "q"]))
    assert v2["inputs"][0]["shape"] == [2]
    one = json.loads(Target(url="http://x", route="embeddings", model="m").body("p"))
    assert one["input"] == "p"  # one text stays a plain string
