"""Compile on tiny random-weight models: every family and task against the eager model, the cache,
and the errors a user can make."""

import json

import numpy as np
import pytest
import torch

from neuronserve.compile.compiler import CompileError, CompileOptions, compile_artifact, default_buckets
from neuronserve.models.artifact import ArtifactError, Bucket, BucketSpecError, load_manifest, parse_buckets
from neuronserve.models.families import UnsupportedModelError
from neuronserve.models.loading import ModelError
from neuronserve.serve.engine import Engine
from tests.fixtures.tiny_models import make_tiny_model

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a",
         "model serving on inferentia keeps padding low " * 3]
BUCKETS = parse_buckets("1x8,2x8,4x16,2x32,1x64")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def eager_outputs(model_dir, task, texts):
    """The reference: transformers on each text alone, no padding at all."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cls = AutoModelForSequenceClassification if task == "classify" else AutoModel
    model = cls.from_pretrained(str(model_dir)).eval()
    outs = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=True, max_length=64)
        with torch.no_grad():
            out = model(**enc)
        if task == "classify":
            outs.append(out.logits[0].softmax(-1).numpy())
        else:
            outs.append(out.last_hidden_state[0].mean(0).numpy())  # tiny models use mean pooling
    return np.stack(outs)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("task", ["embed", "classify"])
def test_compiled_artifact_matches_eager_model(models_dir, tmp_path, family, task):
    model = make_tiny_model(models_dir, family=family, task=task)
    result = compile_artifact(CompileOptions(model=str(model), task=task, buckets=BUCKETS, out=tmp_path / "art"))
    m = result.manifest
    assert not result.cache_hit and m.task == task and m.model.family == family
    assert m.inputs[-1] == ("token_type_ids" if family == "bert" else "attention_mask")
    assert [str(e.bucket) for e in m.buckets] == [str(b) for b in BUCKETS]
    assert all(e.parity.passed and e.parity.min_cosine >= 0.9999 for e in m.buckets)
    engine = Engine(result.out_dir, "cpu")
    want = eager_outputs(model, task, TEXTS)
    if task == "embed":
        got = engine.embed(TEXTS)
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
        assert np.abs(got - want).max() < 1e-4
    else:
        labels = engine.classify(TEXTS)
        assert [lab for lab, _ in labels] == [f"label_{i}" for i in want.argmax(1)]
        assert np.allclose([s for _, s in labels], want.max(1), atol=1e-4)
        assert set(m.labels.values()) == {"label_0", "label_1", "label_2"}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_packed_rows_match_each_row_alone(models_dir, tmp_path, family):
    """Several rows packed into each sequence (positions restarting per row, RoBERTa's offset
    included) give every row the embedding it gets alone, in any order and with empty sequences."""
    from neuronserve.models.packing import pack_rows

    model = make_tiny_model(models_dir, family=family, task="embed")
    result = compile_artifact(CompileOptions(model=str(model), buckets=parse_buckets("1x64,2x64,4x64"), out=tmp_path / "art"))
    packed = result.manifest.packed
    assert packed is not None and packed.parity.passed and packed.parity.min_cosine >= 0.9999
    assert packed.position_offset == (2 if family == "roberta" else 0)
    engine = Engine(result.out_dir, "cpu")
    assert engine.packing
    rows = engine.tokenize(TEXTS + ["serving", "low padding per request", "cost per token"])
    alone = np.stack([engine.run_bucket(Bucket(1, 64), [r])[0] for r in rows])
    layout, left = pack_rows([len(r) for r in rows], bins=2, capacity=64)
    assert not left and any(len(seq) > 1 for seq in layout)
    got = engine.run_packed(Bucket(4, 64), rows, layout)  # two of the four sequences stay empty
    assert np.abs(got - alone).max() < 1e-4
    shuffled = [list(reversed(seq)) for seq in reversed(layout)]
    assert np.abs(engine.run_packed(Bucket(2, 64), rows, shuffled) - alone).max() < 1e-4


def test_packing_is_compiled_for_cpu_embedding_artifacts_only(models_dir, tmp_path):
    embed = make_tiny_model(models_dir, family="bert", task="embed")
    classify = make_tiny_model(models_dir, family="bert", task="classify")
    off = compile_artifact(CompileOptions(model=str(embed), buckets=BUCKETS, out=tmp_path / "off", packing=False))
    assert off.manifest.packed is None and not Engine(off.out_dir, "cpu").packing
    assert not (off.out_dir / "graphs" / "cpu-packed.pt").exists()
    on = compile_artifact(CompileOptions(model=str(embed), buckets=BUCKETS, out=tmp_path / "off"))
    assert not on.cache_hit and on.manifest.packed is not None  # packing is part of the cache key
    cls = compile_artifact(CompileOptions(model=str(classify), task="classify", buckets=BUCKETS, out=tmp_path / "cls"))
    assert cls.manifest.packed is None
    from neuronserve.compile.compiler import packs

    assert packs(CompileOptions(target="cpu")) and not packs(CompileOptions(target="inf2"))  # Neuron: not built


def test_every_bucket_matches_for_classification(models_dir, tmp_path):
    """Each bucket, run alone with rows that fill it, agrees with the eager model."""
    model = make_tiny_model(models_dir, family="bert", task="classify")
    out = compile_artifact(CompileOptions(model=str(model), task="classify", buckets=BUCKETS, out=tmp_path / "a")).out_dir
    engine = Engine(out, "cpu")
    for bucket in BUCKETS:
        texts = [("word " * max(1, bucket.seq_len - 3)).strip()[: 4 * bucket.seq_len]] * bucket.batch_size
        rows = [r[: bucket.seq_len] for r in engine.tokenize(texts)]
        rows = [r[:-1][: bucket.seq_len - 1] + r[-1:] for r in rows]
        got = engine.postprocess_labels(engine.run_bucket(bucket, rows))
        want = eager_outputs(model, "classify", [engine._tok.decode(r, skip_special_tokens=True) for r in rows[:1]])[0]
        assert got[0][0][0] == f"label_{want.argmax()}"
        assert abs(got[0][0][1] - want.max()) < 1e-3


def test_unchanged_compile_is_a_cache_hit(models_dir, tmp_path):
    model = make_tiny_model(models_dir)
    opts = CompileOptions(model=str(model), buckets=BUCKETS, out=tmp_path / "art")
    first = compile_artifact(opts)
    graph = first.out_dir / first.manifest.buckets[0].file
    mtime = graph.stat().st_mtime_ns
    again = compile_artifact(opts)
    assert again.cache_hit and again.manifest.cache_key == first.manifest.cache_key
    assert graph.stat().st_mtime_ns == mtime
    changed = compile_artifact(CompileOptions(model=str(model), buckets=parse_buckets("1x8"), out=tmp_path / "art"))
    assert not changed.cache_hit and len(changed.manifest.buckets) == 1
    forced = compile_artifact(CompileOptions(model=str(model), buckets=parse_buckets("1x8"), out=tmp_path / "art", force=True))
    assert not forced.cache_hit


def _change_weights(model):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def _change_json(path, **values):
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


@pytest.mark.parametrize("change", ["weights", "config", "tokenizer", "tokenizer_config", "option"])
def test_a_changed_input_is_not_a_cache_hit(tmp_path, change):
    """What the cache key covers: every weight, config and tokenizer file, and the options."""
    model = make_tiny_model(tmp_path / "models")
    opts = CompileOptions(model=str(model), buckets=parse_buckets("1x8,2x16"), out=tmp_path / "art")
    first = compile_artifact(opts)
    assert compile_artifact(opts).cache_hit
    if change == "weights":
        _change_weights(model)
    elif change == "config":
        _change_json(model / "config.json", layer_norm_eps=1e-6)
    elif change == "tokenizer":
        _change_json(model / "tokenizer.json")  # the same tokenizer, other bytes
    elif change == "tokenizer_config":
        _change_json(model / "tokenizer_config.json", model_max_length=64)
    else:
        opts.packing = False
    again = compile_artifact(opts)
    assert not again.cache_hit and again.manifest.cache_key != first.manifest.cache_key


def test_a_cache_hit_imports_no_torch(models_dir, tmp_path):
    """The cache-hit path reads and hashes files only: no torch, no transformers, no model loaded."""
    import subprocess
    import sys

    model = make_tiny_model(models_dir)
    out = tmp_path / "art"
    compile_artifact(CompileOptions(model=str(model), buckets=BUCKETS, out=out))
    code = ("import sys\n"
            "from neuronserve.compile.compiler import CompileOptions, compile_artifact\n"
            "from neuronserve.models.artifact import parse_buckets\n"
            f"r = compile_artifact(CompileOptions(model={str(model)!r}, buckets=parse_buckets({','.join(map(str, BUCKETS))!r}), out={str(out)!r}))\n"
            "print(r.cache_hit, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[0] == "True []", done.stdout + done.stderr


def test_cache_dir_is_used_without_out(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "cache"))
    model = make_tiny_model(models_dir)
    first = compile_artifact(CompileOptions(model=str(model), buckets=BUCKETS))
    assert first.out_dir.parent == tmp_path / "cache" / "artifacts"
    assert compile_artifact(CompileOptions(model=str(model), buckets=BUCKETS)).cache_hit


def test_tampered_graph_is_not_a_cache_hit(models_dir, tmp_path):
    model = make_tiny_model(models_dir)
    opts = CompileOptions(model=str(model), buckets=BUCKETS, out=tmp_path / "art")
    first = compile_artifact(opts)
    (first.out_dir / first.manifest.buckets[0].file).write_bytes(b"corrupt")
    assert not compile_artifact(opts).cache_hit


def test_bf16_parity_is_measured_and_recorded(models_dir, tmp_path):
    model = make_tiny_model(models_dir)
    m = compile_artifact(CompileOptions(model=str(model), buckets=BUCKETS, out=tmp_path / "a", auto_cast="bf16")).manifest
    assert m.precision == "bf16"
    assert all(e.parity.passed and e.parity.min_cosine >= 0.999 for e in m.buckets)
    assert max(e.parity.max_abs_err for e in m.buckets) > 0  # bf16 really ran: measured, not assumed


def test_errors_name_the_problem(models_dir, tmp_path):
    model = make_tiny_model(models_dir)
    with pytest.raises(CompileError, match=r"bucket 1x256 is longer than the model's max positions \(128"):
        compile_artifact(CompileOptions(model=str(model), buckets=[Bucket(1, 256)], out=tmp_path / "a"))
    with pytest.raises(ModelError, match="does not exist"):
        compile_artifact(CompileOptions(model=str(tmp_path / "nope"), out=tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        compile_artifact(CompileOptions(model=str(tmp_path / "empty"), out=tmp_path / "a"))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="bert, distilbert, roberta, xlm-roberta"):
        compile_artifact(CompileOptions(model=str(gpt), out=tmp_path / "a"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CompileError, match="cannot write to output directory"):
        compile_artifact(CompileOptions(model=str(model), buckets=BUCKETS, out=blocker / "sub"))
    with pytest.raises(CompileError, match="unknown target 'gpu'"):
        compile_artifact(CompileOptions(model=str(model), target="gpu", out=tmp_path / "a"))
    with pytest.raises(BucketSpecError, match="expected BATCHxSEQ_LEN"):
        parse_buckets("8by128")
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_manifest(tmp_path)


def test_default_buckets_fit_the_model_and_target():
    cpu = default_buckets("cpu", 256)
    assert max(b.seq_len for b in cpu) == 256 and all(b.batch_size == 1 or b.padded_tokens <= 4096 for b in cpu)
    assert {b.seq_len for b in cpu if b.batch_size == 1} == {b.seq_len for b in cpu}
    seq_lens = sorted({b.seq_len for b in cpu})
    for n in range(12, 257):  # a lone row of n tokens pads to the next length by at most 25%
        assert min(s for s in seq_lens if s >= n) <= 1.25 * n, n
    neuron = default_buckets("inf2", 512)
    assert len(neuron) == 15 and max(b.seq_len for b in neuron) == 512


@pytest.mark.parametrize("task", ["embed", "rerank"])
def test_references_run_each_distinct_row_once_alone_and_match_the_padded_batch(models_dir, task):
    """`References`: the eager model runs each distinct sample row once, alone and without padding
    (rows of one length together), and every bucket gets what the model gives its padded batch."""
    from neuronserve.compile.compiler import References, sample_inputs
    from neuronserve.models.loading import build_module, inspect_model, load_tokenizer

    spec = inspect_model(str(make_tiny_model(models_dir, task=task)), task)
    tokenizer, module = load_tokenizer(spec), build_module(spec)
    buckets = parse_buckets("1x16,2x16,4x16,3x16,8x16,2x32,1x32")
    mask_at = list(spec.family.inputs).index("attention_mask")
    runs = []

    def counted(*example):
        assert bool(example[mask_at].all()), "a reference row was padded"
        assert len({tuple(r.tolist()) for r in example[0]}) == example[0].shape[0], "a row ran twice in one batch"
        runs.append(tuple(example[0].shape))
        return module(*example)

    references = References(counted, spec.family.inputs)
    distinct = set()
    for bucket in sorted(buckets):
        example = sample_inputs(tokenizer, spec, bucket, tokenizer.pad_token_id or 0)
        distinct |= {tuple(tuple(t[i][: int(example[mask_at][i].sum())].tolist()) for t in example)
                     for i in range(bucket.batch_size)}
        got = references.of(example)
        with torch.inference_mode():
            padded = module(*example)
        assert got.shape == padded.shape
        assert torch.allclose(got, padded, atol=1e-5), bucket
    assert sum(n for n, _ in runs) == len(references.rows) == len(distinct)  # each distinct row once
    assert len(runs) == references.runs


def test_parity_plan_runs_every_length_and_batch_size_and_covers_the_rest(models_dir):
    """`parity_plan` on the default CPU grid: the graph runs on the largest batch of every sequence
    length and on every batch size; each other bucket names a run bucket at its length that holds
    all its sample rows and a run bucket of its batch size."""
    from neuronserve.compile.compiler import parity_plan, sample_inputs, sample_rows
    from neuronserve.models.loading import inspect_model, load_tokenizer

    spec = inspect_model(str(make_tiny_model(models_dir)), "embed")
    tokenizer = load_tokenizer(spec)
    rows = lambda b: sample_rows(sample_inputs(tokenizer, spec, b, tokenizer.pad_token_id or 0))  # noqa: E731
    buckets = default_buckets("cpu", 128)
    plan = parity_plan(buckets, rows)  # 101 buckets
    run = {b for b, via in plan.items() if not via}
    assert set(plan) == set(buckets)
    assert {b.seq_len for b in run} == {b.seq_len for b in buckets}
    assert {b.batch_size for b in run} == {b.batch_size for b in buckets}
    for s in {b.seq_len for b in buckets}:
        assert max(b for b in buckets if b.seq_len == s) in run
    for bucket, via in plan.items():
        if via:
            at_length, of_size = via
            assert at_length in run and at_length.seq_len == bucket.seq_len
            assert set(rows(bucket)) <= set(rows(at_length))
            assert of_size in run and of_size.batch_size == bucket.batch_size
    assert len(run) < len(buckets) // 3
    # 3 does not divide 8: 3x16's rows are not 8x16's, so it runs itself; so do the shortest (here
    # the only) buckets of batch sizes 1 and 2.
    odd = parity_plan(parse_buckets("1x16,2x16,3x16,8x16"), rows, every_up_to=0)
    assert all(via == () for via in odd.values())
    assert parity_plan(parse_buckets("1x16,1x32,2x16,2x32"), rows, every_up_to=0)[Bucket(1, 32)] == (
        Bucket(2, 32), Bucket(1, 16))
    small = parity_plan(parse_buckets("1x16,1x32,2x16,2x32"), rows)  # a small grid: every bucket runs
    assert all(via == () for via in small.values())


COVERED_GRID = parse_buckets("1x8,2x8,4x8,1x16,2x16,4x16")


def test_cpu_manifest_records_which_buckets_ran_and_what_covers_the_others(models_dir, tmp_path, monkeypatch):
    from neuronserve.compile import compiler

    monkeypatch.setattr(compiler, "PARITY_EVERY_BUCKET_UP_TO", 0)  # the plan, as on a large grid
    model = make_tiny_model(models_dir, family="bert", task="embed")
    result = compile_artifact(CompileOptions(model=str(model), buckets=COVERED_GRID, out=tmp_path / "art"))
    entries = {str(e.bucket): e for e in load_manifest(result.out_dir).buckets}
    assert [str(b) for b in COVERED_GRID] == list(entries)  # every bucket is in the manifest
    assert {k: e.parity_covered_by for k, e in entries.items() if e.parity_covered_by} == {
        "1x16": ["4x16", "1x8"], "2x16": ["4x16", "2x8"]}
    for key in ("1x8", "2x8", "4x8", "4x16"):
        assert entries[key].parity.passed and entries[key].parity.min_cosine >= 0.9999
        assert entries[key].parity.samples == entries[key].batch_size
    assert entries["1x16"].parity is None and entries["2x16"].parity is None
    engine = Engine(result.out_dir, "cpu")  # a covered bucket serves what the model gives each row alone
    rows = engine.tokenize(TEXTS[:2])
    got = engine.run_bucket(Bucket(2, 16), rows)
    want = eager_outputs(model, "embed", TEXTS[:2])
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert np.abs(got / np.linalg.norm(got, axis=1, keepdims=True) - want).max() < 1e-4


@pytest.mark.parametrize("wrong_at, bucket", [("batch", "2x8"), ("length", "4x16")])
def test_a_graph_wrong_at_one_batch_size_or_length_fails_the_compile(models_dir, tmp_path, monkeypatch,
                                                                       wrong_at, bucket):
    """The parity plan runs every batch size and every length: a graph wrong only at batch size 2,
    or only at length 16, fails the compile at the bucket of the plan that shows it."""
    model = make_tiny_model(models_dir, family="bert", task="embed")
    trace = torch.jit.trace
    dim, size = (0, 2) if wrong_at == "batch" else (1, 16)

    def wrong_trace(module, example, **kwargs):
        graph = trace(module, example, **kwargs)
        return lambda *x: -graph(*x) if x[0].shape[dim] == size else graph(*x)

    from neuronserve.compile import compiler

    monkeypatch.setattr(compiler, "PARITY_EVERY_BUCKET_UP_TO", 0)  # the plan, as on a large grid
    monkeypatch.setattr(torch.jit, "trace", wrong_trace)
    monkeypatch.setattr(torch.jit, "save", lambda *a, **k: None)
    with pytest.raises(CompileError, match=f"bucket {bucket} failed validation"):
        compile_artifact(CompileOptions(model=str(model), buckets=COVERED_GRID, out=tmp_path / "art"))
