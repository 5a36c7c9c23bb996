"""Request texts: built-in generators with realistic length distributions, or a user JSONL file.

Built-in workloads are deterministic for a seed and use only a built-in word list, so two runs
(before and after a change) send exactly the same texts in the same order.

- `short`: single sentences of 5-20 words (search queries, titles, chat turns).
- `mixed`: 80% short sentences, 20% paragraphs with lognormal lengths (median ~70 words)
  clipped to 21-300 words: the long tail that decides bucket choice and padding.
- `long`: paragraphs of 150-400 words (documents chunked for retrieval).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from neuronserve.deploy.loadtest.config import BUILTIN_WORKLOADS, UsageError

POOL_SIZE = 1024
TOKENS_PER_WORD = 1.3

MIXED_SHORT_FRACTION = 0.8
MIXED_TAIL_MEDIAN_WORDS = 70
MIXED_TAIL_SIGMA = 0.6
MIXED_TAIL_MIN, MIXED_TAIL_MAX = 21, 300

_WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but have
an they you were her she there been one all we their has would when if so no will more can out other
time people year way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community
name president team minute idea kid body information back parent face others level office door health
person art war history party result change morning reason research girl guy moment air teacher force
education foot boy age policy process music market sense nation plan college interest death experience
effect use class control care field development role effort rate heart drug show leader light voice
wife police mind price report decision son view relationship town road arm difference value building
action model season society tax director position player record paper space ground form event official
matter center couple site project activity star table need court oil situation cost industry figure
street image phone data picture practice piece land product doctor wall patient worker news test movie
north love support technology step baby computer type attention film tree source organization hair
window evidence population site private simple quick bright quiet early late small large open clear
strong local recent common serious final basic major human whole certain free easy ready short long
build find give tell keep start bring hold write stand learn lead understand watch follow stop create
speak read spend grow offer remember consider appear buy serve send expect build stay fall reach
remain suggest raise pass sell require report decide pull return explain hope develop carry break
receive agree support hit produce eat cover catch draw choose cause point listen realize place close
""".split()


@dataclass(frozen=True)
class Workload:
    """A named pool of texts; request i sends `texts[i % len(texts)]`."""

    name: str
    texts: list[str]
    word_counts: list[int]

    def text(self, index: int) -> str:
        return self.texts[index % len(self.texts)]

    def estimated_tokens(self, index: int) -> float:
        return self.word_counts[index % len(self.word_counts)] * TOKENS_PER_WORD

    def describe(self) -> dict:
        counts = sorted(self.word_counts)
        return {
            "name": self.name,
            "texts": len(counts),
            "words_min": counts[0],
            "words_median": counts[len(counts) // 2],
            "words_max": counts[-1],
            "words_mean": round(sum(counts) / len(counts), 2),
        }


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def _paragraph(rng: random.Random, n_words: int) -> str:
    """Exactly n_words words, cut into sentences of 8-20 words."""
    sentences, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(8, 20))
        # Avoid a dangling one- or two-word sentence at the end of a paragraph.
        if 0 < left - n < 3:
            n = left
        sentences.append(_sentence(rng, n))
        left -= n
    return " ".join(sentences)


def word_lengths(name: str, count: int, seed: int) -> list[int]:
    """The length (in words) of each generated text; the distribution each workload promises."""
    rng = random.Random(f"lengths:{name}:{seed}")
    if name == "short":
        return [rng.randint(5, 20) for _ in range(count)]
    if name == "long":
        return [rng.randint(150, 400) for _ in range(count)]
    if name == "mixed":
        lengths = []
        for _ in range(count):
            if rng.random() < MIXED_SHORT_FRACTION:
                lengths.append(rng.randint(5, 20))
            else:
                n = int(round(rng.lognormvariate(math.log(MIXED_TAIL_MEDIAN_WORDS), MIXED_TAIL_SIGMA)))
                lengths.append(min(MIXED_TAIL_MAX, max(MIXED_TAIL_MIN, n)))
        return lengths
    raise UsageError(f"unknown workload {name!r}; built-ins are {', '.join(BUILTIN_WORKLOADS)}")


def generate(name: str, *, count: int = POOL_SIZE, seed: int = 0) -> Workload:
    """A deterministic built-in workload.

    >>> generate("short", count=3, seed=1).texts == generate("short", count=3, seed=1).texts
    True
    """
    rng = random.Random(f"texts:{name}:{seed}")
    lengths = word_lengths(name, count, seed)
    texts = [_sentence(rng, n) if n <= 20 else _paragraph(rng, n) for n in lengths]
    return Workload(name=name, texts=texts, word_counts=lengths)


def load_jsonl(path: str | Path) -> Workload:
    """Texts from a JSONL file: each non-blank line is a non-empty JSON string or an object with a "text" string."""
    from neuronserve.common.jsonl import read_texts

    try:
        texts = read_texts(path, allow_empty=False)
    except ValueError as exc:
        raise UsageError(f"workload: {exc}") from None
    if not texts:
        raise UsageError(f"workload file {str(path)!r} has no texts; put one JSON string or {{\"text\": ...}} per line")
    return Workload(name=str(path), texts=texts, word_counts=[len(t.split()) for t in texts])


def load_workload(spec: str, *, seed: int = 0) -> Workload:
    if spec in BUILTIN_WORKLOADS:
        return generate(spec, seed=seed)
    return load_jsonl(spec)
