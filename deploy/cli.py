"""`neuronserve deploy render`: Kubernetes manifests (KubeRay RayService + metrics Service)."""

from __future__ import annotations

import argparse
import sys

from neuronserve.common.neuron_sdk import NEURON_TARGETS


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="render Kubernetes (KubeRay) manifests for an artifact",
        description="Operate neuronserve on Kubernetes with KubeRay.",
    )
    sub = p.add_subparsers(dest="deploy_command", metavar="ACTION")
    r = sub.add_parser(
        "render",
        help="print a RayService and a metrics Service sized for an artifact and an instance type",
        description=(
            "Print a multi-document YAML: a KubeRay RayService (ray.io/v1) whose serveConfigV2 comes from the "
            "artifact manifest, and a headless Service for the metrics ports. A local --artifacts DIR is "
            "assumed baked into --image at /opt/neuronserve/artifacts (deploy/docker/); an s3:// URI is synced "
            "into each pod by an init container. Apply with `kubectl apply -f`."
        ),
    )
    from neuronserve.serve.settings import BATCHING_KNOBS, AppArgs, add_flags

    r.add_argument("--artifacts", required=True, metavar="DIR|URI",
                   help="local artifact directory (baked into the image) or s3://bucket/prefix")
    r.add_argument("--instance-type", required=True, metavar="TYPE",
                   help="EC2 instance type of the worker nodes, e.g. inf2.48xlarge")
    r.add_argument("--image", required=True, help="container image (deploy/docker/Dockerfile.neuron or .cpu)")
    r.add_argument("--name", default="neuronserve", help="RayService name")
    r.add_argument("--namespace", help="metadata.namespace (default: none, use kubectl -n)")
    r.add_argument("--manifest", dest="manifest_file", metavar="FILE",
                   help="local copy of an s3:// artifact's manifest.json, to size from it")
    r.add_argument("--target", choices=["cpu", *NEURON_TARGETS],
                   help="an s3:// artifact's target when no --manifest is given (default buckets assumed)")
    r.add_argument("--min-replicas", type=int, metavar="N", help="Serve replicas at least (default: one node's worth)")
    r.add_argument("--max-replicas", type=int, metavar="N", help="Serve replicas at most (default: two nodes' worth)")
    # The replicas' settings: the same declaration, help and defaults as `neuronserve serve`'s flags
    # (no environment variables here: a rendering depends on its flags only).
    add_flags(r.add_argument_group("replicas (as `neuronserve serve` on a machine of the pod's vCPUs but one)"),
              AppArgs, ["backend", "cores_per_replica", "threads_per_replica", *BATCHING_KNOBS, "price_per_hour_usd"],
              env=False)
    r.add_argument("--service-account", help="serviceAccountName for the Ray pods (e.g. an IRSA role to read S3)")
    r.add_argument("--aws-cli-image", help="image of the init container that syncs s3:// artifacts")
    r.add_argument("--out", default="-", metavar="FILE|-", help="output file, or - for stdout")
    r.set_defaults(func=run)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run(args) -> int:
    from neuronserve.deploy.render import DEFAULT_AWS_CLI_IMAGE, RenderError, RenderOptions, render_yaml
    from neuronserve.common.console import fail

    opts = RenderOptions(
        artifacts=args.artifacts,
        instance_type=args.instance_type,
        image=args.image,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        cores_per_replica=args.cores_per_replica,
        threads_per_replica=args.threads_per_replica,
        name=args.name,
        namespace=args.namespace,
        backend=args.backend or "auto",
        manifest_file=args.manifest_file,
        target=args.target,
        max_batch_tokens=args.max_batch_tokens,
        batch_wait_ms=args.batch_wait_ms,
        max_concurrent_batches=args.max_concurrent_batches,
        max_queued_rows=args.max_queued_rows,
        packing=args.packing,
        price_per_hour_usd=args.price_per_hour_usd,
        service_account=args.service_account,
        aws_cli_image=args.aws_cli_image or DEFAULT_AWS_CLI_IMAGE,
    )
    try:
        text = render_yaml(opts)
    except RenderError as e:
        return fail(str(e), code=2)
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            with open(args.out, "w") as f:
                f.write(text)
        except OSError as e:
            return fail(f"cannot write {args.out}: {e.strerror}")
    return 0
