"""Request texts: built-in generators with realistic length distributions, or a user JSONL file.

Built-in workloads are deterministic for a seed and use only a built-in word list, so two runs
(before and after a change) send exactly the same texts in the same order.

- `short`: single sentences of 5-20 words (search queries, titles, chat turns).
- `mixed`: 80% short sentences, 20% paragraphs with lognormal lengths (median ~70 words)
  clipped to 21-300 words: the long tail that decides bucket choice and padding.
- `long`: paragraphs of 150-400 words (documents chunked for retrieval).

For the generation routes (chat, completions) the texts are prompts, and each request also has an
output length (its `max_tokens`): `load_generation_workload`. `--prompt-tokens N` or `LO-HI`
generates prompts of that many words instead; the words are common English ones, about one token
each for the BPE tokenizers of current LLMs (the report gives the server's own prompt_tokens), or
of that many tokens exactly with `--tokenizer` (the served model's folder).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from neuronserve.deploy.loadtest.config import BUILTIN_WORKLOADS, DEFAULT_OUTPUT_TOKENS, LengthRange, UsageError, parse_length

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
    max_tokens: list[int] | None = None  # generation: each request's output length
    output_spec: str | None = None  # how max_tokens was chosen, for the report
    token_counts: list[int] | None = None  # prompts sized with a tokenizer: their lengths in its tokens

    def text(self, index: int) -> str:
        return self.texts[index % len(self.texts)]

    def output_tokens(self, index: int) -> int | None:
        return None if self.max_tokens is None else self.max_tokens[index % len(self.max_tokens)]

    def estimated_tokens(self, index: int) -> float:
        if self.token_counts is not None:
            return self.token_counts[index % len(self.token_counts)]
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
            **(self._describe_outputs() if self.max_tokens else {}),
            **(self._describe_tokens() if self.token_counts else {}),
        }

    def _describe_tokens(self) -> dict:
        counts = sorted(self.token_counts)
        return {"tokens_min": counts[0], "tokens_median": counts[len(counts) // 2], "tokens_max": counts[-1]}

    def _describe_outputs(self) -> dict:
        out = sorted(self.max_tokens)
        return {"max_tokens": self.output_spec, "max_tokens_min": out[0], "max_tokens_median": out[len(out) // 2],
                "max_tokens_max": out[-1], "max_tokens_mean": round(sum(out) / len(out), 2)}


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


# --- generation -------------------------------------------------------------------------------

def generate_prompts(length: LengthRange, *, count: int = POOL_SIZE, seed: int = 0, tokenizer=None,
                     tokenizer_name: str | None = None) -> Workload:
    """Prompts of `length` words each (fixed, or uniform over the range), deterministic for a seed;
    with a tokenizer (Hugging Face), of `length` tokens of that tokenizer instead (special tokens
    and a chat template, which the server adds, not counted).

    >>> w = generate_prompts(LengthRange(30, 30), count=2)
    >>> w.word_counts, [len(t.split()) for t in w.texts]
    ([30, 30], [30, 30])
    """
    rng = random.Random(f"prompts:{length}:{seed}")
    lengths = [length.sample(rng) for _ in range(count)]
    texts = [_sentence(rng, n) if n <= 20 else _paragraph(rng, n) for n in lengths]
    if tokenizer is None:
        return Workload(name=f"prompts of {length} words", texts=texts, word_counts=lengths)
    fitted = [fit_to_tokens(tokenizer, text, n, rng) for text, n in zip(texts, lengths)]
    return Workload(name=f"prompts of {length} tokens ({tokenizer_name or 'tokenizer'})",
                    texts=[t for t, _ in fitted], word_counts=[len(t.split()) for t, _ in fitted],
                    token_counts=[c for _, c in fitted])


def fit_to_tokens(tokenizer, text: str, n: int, rng: random.Random) -> tuple[str, int]:
    """`text` lengthened or cut to `n` tokens; returns the text and its token count once decoded
    and encoded again (a cut inside a word can re-encode to a token more or less)."""
    def encode(t: str) -> list[int]:
        return tokenizer.encode(t, add_special_tokens=False)

    ids = encode(text)
    for _ in range(n):  # bounded: each round adds at least one token
        if len(ids) >= n:
            break
        text = text + " " + _sentence(rng, 8)
        ids = encode(text)
    text = tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
    return text, len(encode(text))


def load_tokenizer(spec: str):
    """A Hugging Face tokenizer from a local model folder (or a hub id, if the hub is reachable)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the transformers package (pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # transformers raises OSError, ValueError and others for a bad folder or id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--tokenizer {spec!r}: cannot load a tokenizer ({first}); give the served model's "
                         "folder (with tokenizer.json or tokenizer_config.json)") from None


def load_prompts(path: str | Path) -> tuple[list[str], list[int | None]]:
    """Prompts from a JSONL file, one per non-blank line: a JSON string, or an object with a
    "prompt" (or "text") string and optionally "max_tokens" (that request's output length)."""
    from neuronserve.common.jsonl import json_lines

    expected = 'a JSON string or {"prompt": ..., "max_tokens": N}'
    texts: list[str] = []
    outputs: list[int | None] = []
    try:
        for lineno, item in json_lines(path, expected):
            max_tokens = None
            if isinstance(item, dict):
                max_tokens = item.get("max_tokens")
                item = item.get("prompt", item.get("text"))
                if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                               or max_tokens < 1):
                    raise UsageError(f"workload: {path}:{lineno}: \"max_tokens\" must be a whole number >= 1, "
                                     f"got {max_tokens!r}")
            if not isinstance(item, str) or not item.strip():
                raise UsageError(f"workload: {path}:{lineno}: expected a non-empty JSON string or an object with "
                                 'a "prompt" string')
            texts.append(item)
            outputs.append(max_tokens)
    except ValueError as exc:
        raise UsageError(f"workload: {exc}") from None
    if not texts:
        raise UsageError(f"workload file {str(path)!r} has no prompts; put one JSON string or "
                         '{"prompt": ..., "max_tokens": N} per line')
    return texts, outputs


def load_generation_workload(spec: str, *, seed: int = 0, prompt_tokens: LengthRange | None = None,
                             output_tokens: LengthRange | None = None, tokenizer: str | None = None) -> Workload:
    """Prompts and output lengths for the chat and completions routes.

    Prompts: `prompt_tokens` words each if given, else the built-in workload's texts or the
    file's prompts. Output lengths (`max_tokens`): `output_tokens` if given, else a prompt file's
    per-line "max_tokens" (128 where a line has none), else 128.

    >>> w = load_generation_workload("short", output_tokens=LengthRange(16, 64), seed=1)
    >>> 16 <= min(w.max_tokens) and max(w.max_tokens) <= 64, len(w.max_tokens) == len(w.texts)
    (True, True)
    """
    default = parse_length(DEFAULT_OUTPUT_TOKENS, name="default output tokens")
    file_outputs: list[int | None] = []
    if prompt_tokens is not None:
        base = generate_prompts(prompt_tokens, seed=seed, tokenizer=load_tokenizer(tokenizer) if tokenizer else None,
                                tokenizer_name=tokenizer)
    elif spec in BUILTIN_WORKLOADS:
        base = generate(spec, seed=seed)
    else:
        texts, file_outputs = load_prompts(spec)
        base = Workload(name=str(spec), texts=texts, word_counts=[len(t.split()) for t in texts])
    rng = random.Random(f"outputs:{output_tokens}:{seed}")
    if output_tokens is not None:
        outputs, how = [output_tokens.sample(rng) for _ in base.texts], str(output_tokens)
    elif any(n is not None for n in file_outputs):
        outputs = [default.lo if n is None else n for n in file_outputs]
        how = "from the prompt file"
    else:
        outputs, how = [default.lo] * len(base.texts), str(default)
    return Workload(name=base.name, texts=base.texts, word_counts=base.word_counts, max_tokens=outputs,
                    output_spec=how, token_counts=base.token_counts)
