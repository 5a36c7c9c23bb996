"""`neuronserve compile`."""

from __future__ import annotations

import argparse
from pathlib import Path

from neuronserve.common.neuron_sdk import NEURON_TARGETS


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "compile",
        help="trace a model into one graph per (batch, seq_len) bucket, validate the graphs, write an artifact",
        description=(
            "Trace a Hugging Face encoder for a target into one graph per bucket, check the graphs against "
            "the eager fp32 model, and write an artifact directory (manifest.json, tokenizer/, graphs/). "
            "On Neuron every bucket's graph is checked (on a host with a NeuronCore); on cpu one graph serves "
            "every bucket, and a grid of more than 32 buckets (the default has 121) runs it on the largest batch "
            "of each sequence length and on each batch size, which covers the other buckets (the manifest names, "
            "per bucket, the buckets that cover it). "
            "With --task generate, check a causal LM and write the artifact vLLM serves it from: the model and "
            "its engine settings, plus on Neuron the precompiled graphs (docs/generation-artifacts.md). "
            "An unchanged compile is a cache hit and returns at once."
        ),
    )
    p.add_argument("--model", default="default", metavar="DIR|default", help="local model directory, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--task", default="embed", choices=["embed", "classify", "rerank", "sparse", "generate"],
                   help="embed: one vector per text; classify: labels and scores from a sequence-classification head "
                        "(texts or text pairs); rerank: a cross-encoder's relevance score per (query, document) pair; sparse: SPLADE weights per vocabulary "
                        "token from a masked-LM head (a sentence-transformers SparseEncoder); generate: a causal LM "
                        "(*ForCausalLM) served by vLLM: on cpu vLLM's CPU backend, on trn2/trn3 the vLLM Neuron "
                        "plugin, on inf2/trn1 vLLM over NxD Inference (see 'generate' options below)")
    p.add_argument("--target", default="cpu", choices=["cpu", *NEURON_TARGETS],
                   help="cpu: TorchScript for the CPU backend; inf2/trn1: torch_neuronx.trace (the XLA toolchain, "
                        "extra neuron); trn2/trn3: TorchNeuron, torch.compile(backend='neuron') on the device, which "
                        "must be present (extra trainium; docs/trainium.md)")
    p.add_argument("--buckets", metavar="BxS,...", help="BATCHxSEQ list, e.g. 1x32,8x32,8x128 (default: a grid sized for the target)")
    p.add_argument("--batch-sizes", metavar="N,...", help="grid form: batch sizes, e.g. 1,8,32 (with --seq-lens)")
    p.add_argument("--seq-lens", metavar="N,...", help="grid form: sequence lengths, e.g. 32,128,256 (with --batch-sizes)")
    p.add_argument("--out", type=Path, metavar="DIR", help="artifact directory (default: the cache, ~/.cache/neuronserve)")
    p.add_argument("--auto-cast", default="none", choices=["none", "bf16"],
                   help="bf16: inf2/trn1 --auto-cast matmult --auto-cast-type bf16; trn2/trn3 "
                        "torch.autocast(device_type='neuron', dtype=bfloat16); CPU bf16 autocast. Parity is measured.")
    p.add_argument("--optlevel", type=int, default=2, choices=[1, 2, 3],
                   help="neuronx-cc --optlevel (1 compiles fastest; trn2/trn3: passed in NEURON_CC_FLAGS)")
    p.add_argument("--compiler-arg", action="append", default=[], dest="extra_compiler_args", metavar="FLAG",
                   help="extra neuronx-cc flag (repeatable; trn2/trn3: passed in NEURON_CC_FLAGS)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU embedding artifacts: also trace the packed graph (several short rows per sequence)")
    p.add_argument("--force", action="store_true", help="recompile even when the cache holds this compile")
    p.add_argument("--push", metavar="s3://BUCKET/PREFIX",
                   help="also upload the artifact to PREFIX/<cache key>/ (manifest last; a key already there is left "
                        "as it is) and print that URI, which `neuronserve serve --artifacts` takes. AWS credentials "
                        "come from the standard chain; AWS_ENDPOINT_URL points at an S3-compatible store")
    g = p.add_argument_group(
        "generate (--task generate)",
        "vLLM engine settings, fixed at compile time (on Neuron they are the compiled shapes) and recorded in the "
        "manifest's `generation` section. Bucket lists are comma-separated; the largest bucket must equal its maximum.")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: float32 on cpu, bfloat16 on Neuron)")
    g.add_argument("--tp-degree", type=int, default=1, metavar="N",
                   help="tensor-parallel degree: NeuronCores per replica on Neuron (Ray's neuron_cores; replicas = "
                        "cores / N), CPU ranks per replica on cpu")
    g.add_argument("--max-model-len", type=int, metavar="TOKENS",
                   help="longest prompt plus output (default: the model's positions, at most 4096)")
    g.add_argument("--max-num-seqs", type=int, default=8, metavar="N", help="sequences decoded together per replica")
    g.add_argument("--kv-cache-gib", type=int, metavar="GIB",
                   help="cpu: VLLM_CPU_KVCACHE_SPACE (default: room for --max-num-seqs sequences of --max-model-len)")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="TOKENS",
                   help="trn2/trn3: tokens per prefill step, the largest prefill bucket (default: --max-model-len)")
    g.add_argument("--num-batched-tokens-buckets", metavar="N,...",
                   help="trn2/trn3: prefill token-count buckets (vllm-neuron num_batched_tokens_buckets; default: "
                        "powers of two from 128)")
    g.add_argument("--num-seqs-buckets", metavar="N,...",
                   help="trn2/trn3: decode batch-size buckets (vllm-neuron num_seqs_buckets; default: powers of two "
                        "from 1)")
    g.add_argument("--block-size", type=int, metavar="TOKENS", help="trn2/trn3: tokens per KV-cache block (default 32)")
    g.add_argument("--num-gpu-blocks", type=int, metavar="N",
                   help="trn2/trn3: KV-cache blocks (vLLM num_gpu_blocks_override; default: every sequence at "
                        "--max-model-len)")
    g.add_argument("--context-buckets", metavar="N,...",
                   help="inf2/trn1: NxD Inference context_encoding_buckets, prompt lengths (default: powers of two "
                        "from 128)")
    g.add_argument("--token-gen-buckets", metavar="N,...",
                   help="inf2/trn1: NxD Inference token_generation_buckets, sequence lengths while decoding "
                        "(default: powers of two from 128)")
    p.set_defaults(func=run)


# Flags that only --task generate takes, and the encoder flags it does not (with their defaults).
GENERATE_FLAGS = ("dtype", "max_model_len", "kv_cache_gib", "max_num_batched_tokens", "num_batched_tokens_buckets",
                  "num_seqs_buckets", "block_size", "num_gpu_blocks", "context_buckets", "token_gen_buckets")
GENERATE_DEFAULTS = {"tp_degree": 1, "max_num_seqs": 8}
ENCODER_FLAGS = {"buckets": None, "batch_sizes": None, "seq_lens": None, "auto_cast": "none", "optlevel": 2,
                 "extra_compiler_args": [], "packing": True}


def _flag(name: str) -> str:
    return "--" + {"extra_compiler_args": "compiler-arg"}.get(name, name).replace("_", "-")


def generation_options(args):
    """`GenerationOptions` from the generate flags; ValueError naming a misplaced or bad flag."""
    from neuronserve.models.artifact import parse_int_list
    from neuronserve.models.generation import GenerationOptions

    encoder = [_flag(k) for k, default in ENCODER_FLAGS.items() if getattr(args, k, default) != default]
    if encoder:
        raise ValueError(f"{', '.join(encoder)}: encoder options; --task generate takes the generate options "
                         "(neuronserve compile --help)")

    def ints(name: str, what: str):
        value = getattr(args, name, None)
        return None if value is None else parse_int_list(value, what)

    return GenerationOptions(
        target=args.target, dtype=args.dtype, tp_degree=args.tp_degree, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_batched_tokens_buckets=ints("num_batched_tokens_buckets", "--num-batched-tokens-buckets"),
        num_seqs_buckets=ints("num_seqs_buckets", "--num-seqs-buckets"),
        context_encoding_buckets=ints("context_buckets", "--context-buckets"),
        token_generation_buckets=ints("token_gen_buckets", "--token-gen-buckets"),
        block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks, kv_cache_gib=args.kv_cache_gib,
    )


def check_encoder_args(args) -> None:
    given = [_flag(k) for k in GENERATE_FLAGS if getattr(args, k, None) is not None]
    given += [_flag(k) for k, default in GENERATE_DEFAULTS.items() if getattr(args, k, default) != default]
    if given:
        raise ValueError(f"{', '.join(given)}: options of --task generate; --task {args.task} compiles an encoder")


def buckets_from_args(args):
    from neuronserve.models.artifact import bucket_grid, parse_buckets, parse_int_list

    if args.buckets and (args.batch_sizes or args.seq_lens):
        raise ValueError("give either --buckets or --batch-sizes/--seq-lens, not both")
    if args.buckets:
        return parse_buckets(args.buckets)
    if args.batch_sizes or args.seq_lens:
        if not (args.batch_sizes and args.seq_lens):
            raise ValueError("--batch-sizes and --seq-lens go together (their grid is the bucket list)")
        return bucket_grid(parse_int_list(args.batch_sizes, "batch sizes"), parse_int_list(args.seq_lens, "sequence lengths"))
    return None


def run(args) -> int:
    from neuronserve.common.console import err, fail

    if getattr(args, "task", None) == "generate":
        return run_generate(args)
    try:
        check_encoder_args(args)
        buckets = buckets_from_args(args)
    except ValueError as e:
        return fail(str(e), code=2)
    push = getattr(args, "push", None)
    if push and (problem := bad_push_uri(push)):
        return fail(problem, code=2)
    from neuronserve.compile.compiler import CompileError, CompileOptions, compile_artifact
    from neuronserve.models.families import UnsupportedModelError
    from neuronserve.models.loading import ModelError

    opts = CompileOptions(
        model=args.model, task=args.task, target=args.target, buckets=buckets, out=args.out,
        auto_cast=args.auto_cast, optlevel=args.optlevel, force=args.force, packing=args.packing,
        extra_compiler_args=args.extra_compiler_args,
    )
    try:
        result = compile_artifact(opts, log=err)
    except (CompileError, ModelError, UnsupportedModelError) as e:
        return fail(str(e))
    status = "cache hit" if result.cache_hit else "compiled"
    err(f"{status}: {result.out_dir} ({len(result.manifest.buckets)} buckets, {result.seconds:.1f}s)")
    return finish(result, push)


def finish(result, push: str | None) -> int:
    """Print the artifact's directory, or push it and print its store URI."""
    from neuronserve.common.console import err, fail

    if not push:
        print(result.out_dir)
        return 0
    from neuronserve.compile.store import StoreError, push as push_artifact

    try:
        pushed = push_artifact(result.out_dir, push, log=err)
    except StoreError as e:
        return fail(str(e))
    print(pushed.uri)
    err(f"serve it with: neuronserve serve --artifacts {pushed.uri}")
    return 0


def bad_push_uri(push: str) -> str | None:
    """What is wrong with `--push URI`, checked before the compile, not after it."""
    from neuronserve.compile.store import S3Uri, StoreError

    try:
        S3Uri.parse(push)
    except StoreError as e:
        return f"--push: {e}"
    return None


def run_generate(args) -> int:
    """`neuronserve compile --task generate`: a causal LM's artifact for vLLM (compile.generation)."""
    from neuronserve.common.console import err, fail

    try:
        gen_opts = generation_options(args)
    except ValueError as e:
        return fail(str(e), code=2)
    push = getattr(args, "push", None)
    if push and (problem := bad_push_uri(push)):
        return fail(problem, code=2)
    from neuronserve.compile.compiler import CompileError
    from neuronserve.compile.generation import GenerateOptions, compile_generate
    from neuronserve.models.loading import ModelError

    opts = GenerateOptions(model=args.model, target=args.target, out=args.out, force=args.force, generation=gen_opts)
    try:
        result = compile_generate(opts, log=err)
    except (CompileError, ModelError) as e:
        return fail(str(e))
    gen = result.manifest.generation
    status = "cache hit" if result.cache_hit else "compiled"
    err(f"{status}: {result.out_dir} ({gen.engine}, tp_degree {gen.tp_degree}, {result.seconds:.1f}s)")
    return finish(result, push)
