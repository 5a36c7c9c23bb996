"""Engine: texts (or text pairs) in, vectors, labels or scores out, through one backend.
Synchronous; no Ray, no HTTP.

The serving layer uses the pieces (tokenize, run_bucket, postprocess) so it can batch rows from
many requests; offline tools use `embed` / `classify`, which plan their batches with the same
planner (`serve.planner.plan`) over `timings`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from neuronserve.models.artifact import Bucket, Manifest, load_manifest, task_info
from neuronserve.models.families import graph_inputs
from neuronserve.models.tasks import activate, normalize_rows, softmax, sparse_rows
from neuronserve.serve.backends.base import Backend, load_backend
from neuronserve.models.packing import pad_packed
from neuronserve.serve.buckets import BucketSet, Row, pad_rows, pad_types, unpad
from neuronserve.serve.errors import InputError, InputTooLong
from neuronserve.serve.planner import Batch, BatchRecord, TimingTable, plan

__all__ = ["Engine", "InputError", "InputTooLong"]


class Engine:
    def __init__(self, artifact_dir: str | Path, backend: str = "auto", *, backend_options: dict | None = None):
        from tokenizers import Tokenizer

        self.artifact_dir = Path(artifact_dir)
        self.manifest: Manifest = load_manifest(self.artifact_dir)
        self.backend: Backend = load_backend(self.artifact_dir, backend, **(backend_options or {}))
        self.buckets = BucketSet(self.manifest.bucket_list())
        # Device seconds per bucket for planning offline batches: nominal until a caller gives
        # measured ones (e.g. `TimingTable(engine.buckets, backend warm-up timings)`).
        self.timings = TimingTable(self.buckets)
        # Truncate as sentence-transformers does, at the model's max_seq_length, unless the largest
        # compiled bucket is shorter.
        self.max_len = min(self.buckets.max_seq_len, self.manifest.model.max_seq_length)
        tok_file = self.artifact_dir / self.manifest.tokenizer_dir / "tokenizer.json"
        self._tok = Tokenizer.from_file(str(tok_file))
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_len)
        self._tok_full = Tokenizer.from_file(str(tok_file))
        self._tok_full.no_padding()
        self._tok_full.no_truncation()
        specials = self._tok_full.encode("").ids
        self._prefix, self._suffix = specials[:1], specials[1:]
        self.vocab_size = self._tok_full.get_vocab_size()
        self.pad_id = self.manifest.pad_token_id
        self.model_name = self.manifest.model.name
        self.task = self.manifest.task
        self.task_info = task_info(self.task)
        self._typed = "token_type_ids" in self.manifest.inputs
        self.output_dim = self.manifest.model.output_dim

    # -- inputs ---------------------------------------------------------------------------------
    def tokenize(self, texts: list, truncate: bool = True) -> list[list[int]]:
        """Token rows of `texts`: strings, or (text, text) pairs encoded as the tokenizer encodes
        pairs (token type ids, longest-first truncation). Rows that were cut, and pairs, are `Row`s
        saying so (`serve.buckets.truncated_count`); `truncate=False` raises `InputTooLong` instead."""
        encodings = self._tok.encode_batch([t if isinstance(t, str) else tuple(t) for t in texts])
        rows: list[list[int]] = []
        for i, enc in enumerate(encodings):
            cut = bool(enc.overflowing)
            if cut and not truncate:
                full = self._tok_full.encode(*((texts[i],) if isinstance(texts[i], str) else tuple(texts[i])))
                raise InputTooLong(len(full.ids), self.max_len, index=i)
            if isinstance(texts[i], str):
                rows.append(Row(enc.ids, truncated=True) if cut else enc.ids)
            else:
                rows.append(Row(enc.ids, enc.type_ids if self._typed else None, cut))
        return rows

    def tokens(self, texts: list[str], add_special_tokens: bool = True) -> list[list[dict]]:
        """TEI's /tokenize: per text, its tokens (id, text, special, character start and stop),
        without truncation."""
        result = []
        for text, enc in zip(texts, self._tok_full.encode_batch(texts, add_special_tokens=add_special_tokens)):
            tokens = []
            for tid, tok, special, (start, stop) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets):
                if special:
                    tokens.append({"id": tid, "text": tok, "special": True, "start": None, "stop": None})
                else:
                    tokens.append({"id": tid, "text": text[start:stop], "special": False, "start": start, "stop": stop})
            result.append(tokens)
        return result

    def decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """TEI's /decode: token ids back to text."""
        return self._tok_full.decode_batch(ids, skip_special_tokens=skip_special_tokens)

    def rows_from_token_ids(self, ids_list: list[list[int]], truncate: bool = True) -> list[list[int]]:
        """Token ids as the OpenAI API sends them (no special tokens): wrap them as the tokenizer would."""
        room = self.max_len - len(self._prefix) - len(self._suffix)
        rows = []
        for i, ids in enumerate(ids_list):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InputError(f"input {i}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", "input")
            if len(ids) > room:
                if not truncate:
                    raise InputTooLong(len(ids) + len(self._prefix) + len(self._suffix), self.max_len, index=i)
                rows.append(Row(self._prefix + list(ids[:room]) + self._suffix, truncated=True))
                continue
            rows.append(self._prefix + list(ids) + self._suffix)
        return rows

    # -- execution ------------------------------------------------------------------------------
    def run_bucket(self, bucket: Bucket, rows: list[list[int]], threads: int | None = None) -> np.ndarray:
        """Pad `rows` (which fit `bucket`) to the bucket, run it, return (len(rows), output_dim).
        `threads` (CPU backend only): torch threads for this batch instead of the backend's."""
        ids, mask = pad_rows(rows, bucket, self.pad_id)
        types = pad_types(rows, bucket) if self._typed else None
        inputs = graph_inputs(self.manifest.inputs, torch.from_numpy(ids), torch.from_numpy(mask),
                              None if types is None else torch.from_numpy(types))
        out = self.backend.forward(bucket, inputs, threads) if threads else self.backend.forward(bucket, inputs)
        return unpad(out.numpy(), len(rows))

    def run_batch(self, bucket: Bucket, rows: list[list[int]], layout: list[list[int]] | None = None,
                  threads: int | None = None) -> np.ndarray:
        """`run_bucket`, or `run_packed` when a packing `layout` is given (the batcher's call)."""
        if layout is None:
            return self.run_bucket(bucket, rows, threads)
        return self.run_packed(bucket, rows, layout, threads)

    @property
    def packing(self) -> bool:
        """Whether batches may pack several rows per sequence (`run_packed`)."""
        return bool(getattr(self.backend, "packing", False))

    def run_packed(self, bucket: Bucket, rows: list[list[int]], layout: list[list[int]],
                   threads: int | None = None) -> np.ndarray:
        """Run `rows` packed into `bucket`'s sequences as `layout` says (`models.packing.pack_rows`:
        per sequence, the indices of its rows); returns (len(rows), output_dim) in row order, each
        row as it would be alone."""
        from neuronserve.models.tasks import pool_packed

        packed = self.manifest.packed
        arrays = pad_packed(rows, layout, bucket, self.pad_id, packed.position_offset)
        inputs = tuple(torch.from_numpy(a) for a in arrays)
        hidden = self.backend.forward_packed(bucket, inputs, threads)  # only the CPU backend packs
        return pool_packed(hidden, inputs[2], len(rows), self.manifest.pooling.mode).numpy()

    def plan(self, rows: list[list[int]], max_batch_tokens: int | None = None) -> list[Batch]:
        """The batches `run_rows` runs: the planner's least-time split of `rows` over `timings`."""
        return plan([len(r) for r in rows], self.timings, max_batch_tokens=max_batch_tokens)

    def run_rows(self, rows: list[list[int]], max_batch_tokens: int | None = None,
                 records: list[BatchRecord] | None = None) -> np.ndarray:
        """Every row's raw output, in order; `records`, if given, receives one `BatchRecord` per batch."""
        out = np.empty((len(rows), self.output_dim), dtype=np.float32)
        for batch in self.plan(rows, max_batch_tokens):
            chosen = [rows[i] for i in batch.rows]
            t0 = time.perf_counter()
            out[list(batch.rows)] = self.run_bucket(batch.bucket, chosen)
            if records is not None:
                records.append(BatchRecord(batch.bucket, len(chosen), sum(len(r) for r in chosen),
                                           batch.bucket.padded_tokens, time.perf_counter() - t0))
        return out

    # -- outputs --------------------------------------------------------------------------------
    def postprocess_embeddings(self, raw: np.ndarray, dimensions: int | None = None,
                               normalize: bool | None = None) -> np.ndarray:
        """Cut to `dimensions`, then L2-normalise if `normalize` says (default: as the model's
        sentence-transformers modules do)."""
        if dimensions is not None:
            if not 1 <= dimensions <= raw.shape[1]:
                raise InputError(f"dimensions must be between 1 and {raw.shape[1]}, got {dimensions}", "dimensions")
            raw = raw[:, :dimensions]
        pooling = self.manifest.pooling
        if normalize is None:
            normalize = pooling is None or pooling.normalize
        vectors = normalize_rows(raw) if normalize else raw
        # C-contiguous float32 rows: what response JSON writes as shortest float32 text.
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def postprocess_labels(self, raw: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per row, every (label, probability), best first."""
        probs = softmax(raw.astype(np.float64))
        labels = self.manifest.labels or {}
        result = []
        for row in probs:
            order = np.argsort(-row)
            result.append([(labels.get(int(j), f"LABEL_{int(j)}"), float(row[j])) for j in order])
        return result

    def postprocess_sparse(self, raw: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each row's non-zero (vocabulary index, weight) pairs (`sparse`)."""
        return sparse_rows(raw)

    def prompt(self, prompt_name: str | None) -> str | None:
        """The text put before every input: the named prompt, else the model's default prompt (as
        sentence-transformers' `encode` chooses it), else none."""
        prompts = self.manifest.prompts
        if prompt_name is None:
            return prompts.get(self.manifest.default_prompt_name) if self.manifest.default_prompt_name else None
        if prompt_name not in prompts:
            raise InputError(f"prompt_name {prompt_name!r} is not one of this model's prompts "
                             f"({', '.join(map(repr, prompts)) or 'it has none'})", "prompt_name")
        return prompts[prompt_name]

    def with_prompt(self, texts: list[str], prompt_name: str | None = None) -> list[str]:
        """`texts` with the prompt `prompt(prompt_name)` put before each, as sentence-transformers does."""
        prompt = self.prompt(prompt_name)
        return [prompt + t for t in texts] if prompt else texts

    def postprocess_scores(self, raw: np.ndarray, raw_scores: bool = False) -> np.ndarray:
        """A score per row of a single-logit head: through the model's activation (as
        sentence-transformers' `CrossEncoder.predict` computes it), or the raw logit."""
        return activate(raw, None if raw_scores else self.manifest.activation)

    # -- convenience ----------------------------------------------------------------------------
    def embed(self, texts: list[str], truncate: bool = True, dimensions: int | None = None,
              prompt_name: str | None = None) -> np.ndarray:
        rows = self.tokenize(self.with_prompt(texts, prompt_name), truncate)
        return self.postprocess_embeddings(self.run_rows(rows), dimensions)

    def sparse(self, texts: list[str], truncate: bool = True, prompt_name: str | None = None):
        """Per text, its non-zero (vocabulary index, weight) pairs."""
        return self.postprocess_sparse(self.run_rows(self.tokenize(self.with_prompt(texts, prompt_name), truncate)))

    def classify(self, texts: list[str], truncate: bool = True) -> list[tuple[str, float]]:
        return [ranked[0] for ranked in self.postprocess_labels(self.run_rows(self.tokenize(texts, truncate)))]

    def rerank(self, pairs: list[tuple[str, str]], truncate: bool = True, raw_scores: bool = False) -> np.ndarray:
        """A relevance score per (query, document) pair, in order."""
        return self.postprocess_scores(self.run_rows(self.tokenize(pairs, truncate)), raw_scores)
