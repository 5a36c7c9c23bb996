"""`neuronserve deploy render`: Kubernetes manifests (KubeRay RayService, metrics Service,
PodDisruptionBudget, NetworkPolicies)."""

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
        help="print a RayService, its metrics Service, PodDisruptionBudget and NetworkPolicies for an artifact",
        description=(
            "Print a multi-document YAML: a KubeRay RayService (ray.io/v1) whose serveConfigV2 comes from the "
            "artifact manifest, a headless Service for the metrics ports, a PodDisruptionBudget for the serving "
            "pods and NetworkPolicies (Serve from the ingress, metrics from Prometheus, the dashboard from the "
            "KubeRay operator, Ray's own ports from the app's pods). Every container passes the Kubernetes "
            "'restricted' Pod Security Standard. A local --artifacts DIR is "
            "assumed baked into --image at /opt/neuronserve/artifacts (deploy/docker/); an s3:// URI (what "
            "`neuronserve compile --push` prints) is pulled by the pods themselves, verified, with the IAM role of "
            "--service-account. Apply with `kubectl apply -f`."
        ),
    )
    from neuronserve.serve.settings import BATCHING_KNOBS, AppArgs, add_flags

    r.add_argument("--artifacts", required=True, metavar="[NAME=]DIR|URI", action="append",
                   help="local artifact directory (baked into the image) or s3://bucket/prefix/<cache key>; repeat it "
                        "for several models served by every replica (NAME= names one; local ones are expected in the "
                        "image at /opt/neuronserve/artifacts/NAME), sized for their combined device memory")
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
    add_flags(r.add_argument_group("autoscaling (between --min-replicas and --max-replicas; docs/decisions.md, "
                                   "\"Autoscaling\")"),
              AppArgs, ["target_ongoing_requests", "inputs_per_request", "upscale_delay_s", "downscale_delay_s"],
              env=False)
    r.add_argument("--service-account",
                   help="serviceAccountName for the Ray pods: with s3:// artifacts, one whose IAM role (IRSA or EKS "
                        "Pod Identity) may read the bucket")
    from neuronserve.deploy.render import (
        DEFAULT_API_KEY_SECRET_KEY, DEFAULT_INGRESS_NAMESPACE, DEFAULT_KUBERAY_NAMESPACE, DEFAULT_KUBERAY_VERSION,
        DEFAULT_PROMETHEUS_NAMESPACE, RAY_AUTH_MODES,
    )

    sec = r.add_argument_group("security (docs/deploy-eks.md, \"Security\")")
    sec.add_argument("--api-key-secret", metavar="NAME[:KEY]",
                     help="read the serving API key(s) from this Secret: env NEURONSERVE_API_KEY (comma-separated "
                          f"keys) on the Ray containers from key KEY (default {DEFAULT_API_KEY_SECRET_KEY})")
    sec.add_argument("--ray-auth", choices=RAY_AUTH_MODES, default="token",
                     help="Ray token authentication through KubeRay's authOptions (needs KubeRay >= 1.5.1)")
    sec.add_argument("--kuberay-version", default=DEFAULT_KUBERAY_VERSION, metavar="X.Y.Z",
                     help="the KubeRay operator's version; token authentication is refused below 1.5.1, whose CRD "
                          "would drop authOptions silently")
    sec.add_argument("--expose-dashboard", action="store_true",
                     help="bind the Ray dashboard and Jobs API to every interface (0.0.0.0) and let any pod reach "
                          "it (default: the head pod's own address, reachable from the KubeRay operator only)")
    sec.add_argument("--no-network-policy", dest="network_policy", action="store_false",
                     help="leave the NetworkPolicies out (e.g. when the namespace has its own)")
    sec.add_argument("--ingress-namespace", default=DEFAULT_INGRESS_NAMESPACE, metavar="NS",
                     help="namespace whose pods may reach the Serve port 8000 (your ingress controller)")
    sec.add_argument("--prometheus-namespace", default=DEFAULT_PROMETHEUS_NAMESPACE, metavar="NS",
                     help="namespace of the Prometheus pods (app.kubernetes.io/name=prometheus) that scrape 9400/8080")
    sec.add_argument("--kuberay-namespace", default=DEFAULT_KUBERAY_NAMESPACE, metavar="NS",
                     help="namespace of the KubeRay operator, the one client of the dashboard port 8265")
    r.add_argument("--out", default="-", metavar="FILE|-", help="output file, or - for stdout")
    r.set_defaults(func=run)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run(args) -> int:
    from neuronserve.deploy.render import RenderError, RenderOptions, render_yaml
    from neuronserve.common.console import fail

    opts = RenderOptions(
        artifacts=args.artifacts[0] if len(args.artifacts) == 1 else args.artifacts,
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
        target_ongoing_requests=args.target_ongoing_requests,
        inputs_per_request=args.inputs_per_request,
        upscale_delay_s=args.upscale_delay_s,
        downscale_delay_s=args.downscale_delay_s,
        price_per_hour_usd=args.price_per_hour_usd,
        service_account=args.service_account,
        ray_auth=args.ray_auth,
        kuberay_version=args.kuberay_version,
        expose_dashboard=args.expose_dashboard,
        api_key_secret=args.api_key_secret,
        network_policy=args.network_policy,
        ingress_namespace=args.ingress_namespace,
        prometheus_namespace=args.prometheus_namespace,
        kuberay_namespace=args.kuberay_namespace,
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
