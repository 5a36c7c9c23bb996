"""`neuronserve compile`."""

from __future__ import annotations

import argparse
from pathlib import Path

from neuronserve.common.neuron_sdk import NEURON_TARGETS


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "compile",
        help="trace a model into one graph per (batch, seq_len) bucket, validate it, write an artifact",
        description=(
            "Trace a Hugging Face encoder for a target into one graph per bucket, check every bucket against "
            "the eager fp32 model, and write an artifact directory (manifest.json, tokenizer/, graphs/). "
            "An unchanged compile is a cache hit and returns at once."
        ),
    )
    p.add_argument("--model", default="default", metavar="DIR|default", help="local model directory, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--task", default="embed", choices=["embed", "classify", "rerank", "sparse"],
                   help="embed: one vector per text; classify: labels and scores from a sequence-classification head "
                        "(texts or text pairs); rerank: a cross-encoder's relevance score per (query, document) pair; sparse: SPLADE weights per vocabulary "
                        "token from a masked-LM head (a sentence-transformers SparseEncoder)")
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
    p.set_defaults(func=run)


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

    try:
        buckets = buckets_from_args(args)
    except ValueError as e:
        return fail(str(e), code=2)
    push = getattr(args, "push", None)
    if push:
        from neuronserve.compile.store import S3Uri, StoreError

        try:
            S3Uri.parse(push)  # a bad URI fails before the compile, not after it
        except StoreError as e:
            return fail(f"--push: {e}", code=2)
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

