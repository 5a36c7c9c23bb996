"""serve.tokenizing: requests' texts tokenized on a thread of their own, gathered into one call."""

import asyncio
import threading

import pytest

from neuronserve.serve.errors import InputTooLong
from neuronserve.serve.tokenizing import Tokenizing


class Recording:
    """A tokenizer stand-in: each text becomes [len(text)]; records every call; the first call can
    be held until released (so that later requests queue behind it)."""

    def __init__(self, hold_first: bool = False):
        self.calls: list[tuple[list[str], bool]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.entered = threading.Event()

    def __call__(self, texts, truncate):
        self.calls.append((list(texts), truncate))
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        self.release.wait(5)
        if not truncate and any(t == "too long" for t in texts):
            raise InputTooLong(99, 16, index=texts.index("too long"))
        if "boom" in texts:
            raise RuntimeError("tokenizer failed")
        return [[len(t)] for t in texts]


def run(coro):
    return asyncio.run(coro)


async def queued_behind_a_held_call(tok: Recording, pool: Tokenizing, first: list[str], *later):
    """Submit `first` and hold it in the tokenizer; queue each of `later` (texts, or (texts,
    truncate)) behind it; release. Returns the futures of `first` and of `later`."""
    held = asyncio.ensure_future(pool.submit(first))
    await asyncio.get_running_loop().run_in_executor(None, tok.entered.wait, 5)
    queued = [asyncio.ensure_future(pool.submit(*(job if isinstance(job, tuple) else (job,)))) for job in later]
    await asyncio.sleep(0.05)  # all of them queued behind the held call
    tok.release.set()
    return held, queued


def test_each_request_gets_its_own_rows_and_waiting_requests_share_one_call():
    tok = Recording(hold_first=True)
    pool = Tokenizing(tok)

    async def main():
        first, rest = await queued_behind_a_held_call(tok, pool, ["a", "bb"],
                                                      *(["x" * n, "y" * (n + 1)] for n in range(1, 6)))
        return await first, await asyncio.gather(*rest)

    first, rest = run(main())
    pool.close()
    assert first == [[1], [2]]
    assert rest == [[[n], [n + 1]] for n in range(1, 6)]
    assert len(tok.calls) == 2 and len(tok.calls[1][0]) == 10  # the five waiting requests: one call
    assert tok.threads == {"tokenize"}


def test_groups_stop_at_max_texts():
    tok = Recording(hold_first=True)
    pool = Tokenizing(tok, max_texts=4)

    async def main():
        first, rest = await queued_behind_a_held_call(tok, pool, ["a"], *(["b", "c"] for _ in range(4)))
        await first
        return await asyncio.gather(*rest)

    assert run(main()) == [[[1], [1]]] * 4
    pool.close()
    assert [len(texts) for texts, _ in tok.calls] == [1, 4, 4]


def test_a_request_without_truncation_runs_alone_and_its_error_is_its_own():
    tok = Recording(hold_first=True)
    pool = Tokenizing(tok)

    async def main():
        first, (strict, other) = await queued_behind_a_held_call(tok, pool, ["a"], (["ok", "too long"], False), ["cc"])
        await first
        with pytest.raises(InputTooLong) as e:
            await strict
        return e.value, await other

    error, other = run(main())
    pool.close()
    assert error.index == 1  # the index within its own request, not within a gathered call
    assert other == [[2]]
    assert (["ok", "too long"], False) in tok.calls


def test_a_failing_call_fails_the_requests_it_held_only():
    tok = Recording()
    pool = Tokenizing(tok)

    async def main():
        with pytest.raises(RuntimeError, match="tokenizer failed"):
            await pool.submit(["boom"])
        return await pool.submit(["fine"])

    assert run(main()) == [[4]]
    pool.close()


def test_a_request_that_went_away_is_skipped():
    tok = Recording(hold_first=True)
    pool = Tokenizing(tok)

    async def main():
        gone = asyncio.ensure_future(pool.submit(["a"]))
        await asyncio.get_running_loop().run_in_executor(None, tok.entered.wait, 5)
        gone.cancel()
        tok.release.set()
        return await pool.submit(["later"])

    assert run(main()) == [[5]]
    pool.close()


def test_the_replica_tokenizes_several_texts_on_the_thread_and_answers_the_same(tmp_path):
    from tests.fixtures.inprocess_app import Running, tiny_artifact

    r = Running(tiny_artifact(tmp_path))
    try:
        texts = ["a short one", "a somewhat longer text of several words", "third"]
        calls = r.replica.tokenizing.calls
        together = r.request("POST", "/v1/embeddings", json={"input": texts})
        assert together.status_code == 200 and r.replica.tokenizing.calls == calls + 1
        alone = [r.request("POST", "/v1/embeddings", json={"input": [t]}).json()["data"][0]["embedding"] for t in texts]
        assert r.replica.tokenizing.calls == calls + 1  # one text: on the event loop
        import numpy as np

        np.testing.assert_allclose([d["embedding"] for d in together.json()["data"]], alone, atol=1e-5)
        assert together.json()["usage"]["prompt_tokens"] == sum(len(r.replica.engine.tokenize([t])[0]) for t in texts)
        strict = r.request("POST", "/v1/embeddings", json={"input": ["fine", "word " * 200], "truncate": False})
        assert strict.status_code == 400 and "input 1" in strict.text  # names the index within the request
    finally:
        r.close()
