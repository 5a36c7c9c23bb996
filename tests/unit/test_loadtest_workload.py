import json
import statistics

import pytest

from neuronserve.deploy.loadtest.config import UsageError
from neuronserve.deploy.loadtest.workload import (MIXED_TAIL_MAX, POOL_SIZE, TOKENS_PER_WORD, generate, load_jsonl,
                                      load_workload)


@pytest.mark.parametrize("name", ["short", "mixed", "long"])
def test_deterministic_for_a_seed(name):
    a, b = generate(name, seed=7), generate(name, seed=7)
    assert a.texts == b.texts and len(a.texts) == POOL_SIZE
    assert generate(name, seed=8).texts != a.texts


@pytest.mark.parametrize("name", ["short", "mixed", "long"])
def test_word_counts_match_texts(name):
    w = generate(name, count=200, seed=1)
    assert [len(t.split()) for t in w.texts] == w.word_counts
    assert all(t[0].isupper() and t.endswith(".") for t in w.texts)


def test_short_lengths():
    counts = generate("short", seed=0).word_counts
    assert min(counts) >= 5 and max(counts) <= 20
    assert 11 <= statistics.mean(counts) <= 14  # uniform 5..20 has mean 12.5


def test_long_lengths():
    counts = generate("long", seed=0).word_counts
    assert min(counts) >= 150 and max(counts) <= 400
    assert 250 <= statistics.mean(counts) <= 300


def test_mixed_is_mostly_short_with_a_long_tail():
    counts = generate("mixed", count=4000, seed=0).word_counts
    short = sum(1 for c in counts if c <= 20) / len(counts)
    assert 0.75 <= short <= 0.85
    assert max(counts) <= MIXED_TAIL_MAX
    assert sum(1 for c in counts if c >= 150) >= 20  # a visible tail of paragraphs
    assert statistics.median(counts) <= 20


def test_index_cycles_and_estimates_tokens():
    w = generate("short", count=3, seed=0)
    assert w.text(4) == w.texts[1]
    assert w.estimated_tokens(0) == pytest.approx(w.word_counts[0] * TOKENS_PER_WORD)
    assert w.describe()["texts"] == 3


def test_jsonl_strings_and_objects(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps("hello world") + "\n\n" + json.dumps({"text": "a b c", "id": 3}) + "\n")
    w = load_workload(str(path))
    assert w.texts == ["hello world", "a b c"] and w.word_counts == [2, 3]


@pytest.mark.parametrize("lines, where", [
    (['"ok"', "{not json"], ":2:"),
    (['"ok"', '{"txt": "x"}'], ":2:"),
    (['42'], ":1:"),
    (['""'], ":1:"),
])
def test_bad_jsonl_names_the_line(tmp_path, lines, where):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=where):
        load_jsonl(path)


def test_empty_or_missing_jsonl(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(UsageError, match="no texts"):
        load_jsonl(empty)
    with pytest.raises(UsageError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_infer_and_loadtest_read_jsonl_alike_except_empty_texts(tmp_path):
    from neuronserve.serve.infer_cli import read_items

    def read_texts(path):  # what infer reads for a task of single texts
        return [text for text, _ in read_items(path, pairs=False)]

    path = tmp_path / "texts.jsonl"
    path.write_text('"a b"\n\n{"text": "c"}\n""\n')
    assert read_texts(path) == ["a b", "c", ""]  # infer embeds an empty text
    with pytest.raises(UsageError, match=":4:"):
        load_jsonl(path)  # a load test cannot send one
    path.write_text('"a b"\n{"text": "c"}\n')
    assert read_texts(path) == load_jsonl(path).texts == ["a b", "c"]
    with pytest.raises(ValueError, match="does not exist"):
        read_texts(tmp_path / "missing.jsonl")
