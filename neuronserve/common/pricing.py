"""Instance facts and on-demand prices, for turning serving time into dollars.

Pure data plus a few small functions: no heavy imports, no network unless asked for
(`detect_instance_type(allow_imds=True)`).

Prices are us-east-1, on-demand, Linux, in USD per instance-hour, as listed in the price table the
Karpenter AWS provider generated on 2026-01-19 (`zz_generated.pricing_aws.go`). They differ by
region and change over time, so every price can be overridden: per call (`overrides=`), or for a
whole process with the environment variable `NEURONSERVE_PRICES_JSON`, a JSON object mapping
instance type to $/hour (see `load_overrides`). trn2.48xlarge has no reliable public on-demand
figure: its price is `None` and must be configured (`price_per_hour_usd`). No Trn3 size is listed:
the Neuron documentation names Trn3 only as UltraServers (Gen1: four servers of 16 Trainium3 chips;
Gen2: 36 of 4), with no instance size, vCPU count or price per instance; cost a Trn3 node with
`NEURONSERVE_PRICES_JSON` and the cores per instance (docs/trainium.md).

>>> price_per_hour("inf2.xlarge")
0.7582
>>> price_per_hour("inf2.xlarge", overrides={"inf2.xlarge": 0.5})
0.5
>>> round(cost_per_million(2674, 0.7582), 4)   # bert-base on inf2.xlarge, AWS's published rate
0.0788
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

PRICES_ENV = "NEURONSERVE_PRICES_JSON"
INSTANCE_TYPE_ENV = "NEURONSERVE_INSTANCE_TYPE"
# The node's `node.kubernetes.io/instance-type` label, as the deployment passes it. The downward
# API cannot read node labels, so the renderer sets it from the node selector it pins pods to (or an
# init step copies it); see docs/metrics.md.
NODE_INSTANCE_TYPE_ENV = "NODE_INSTANCE_TYPE"

PRICE_SOURCE = "us-east-1 on-demand Linux, Karpenter AWS provider price table generated 2026-01-19"


class UnknownInstanceError(ValueError):
    """The instance type is not in the table."""


class MissingPriceError(ValueError):
    """The instance type is known but has no price, and none was configured."""


@dataclass(frozen=True)
class InstanceType:
    """One EC2 instance type as far as cost accounting needs it.

    `cores` is the unit a serving replica reserves on this instance, used to split the instance
    price between replicas: NeuronCores on inf2/trn1/trn2, GPUs on GPU instances, vCPUs on CPU
    instances.
    """

    name: str
    family: str | None  # accelerator family: "inf2", "trn1", "trn2" (the compile target); None for CPU and GPU instances
    vcpus: int
    memory_gib: int
    price_per_hour_usd: float | None
    neuron_cores: int = 0
    gpus: int = 0
    arch: str = "x86_64"

    @property
    def cores(self) -> int:
        if self.neuron_cores:
            return self.neuron_cores
        if self.gpus:
            return self.gpus
        return self.vcpus

    @property
    def core_kind(self) -> str:
        if self.neuron_cores:
            return "neuron_core"
        if self.gpus:
            return "gpu"
        return "vcpu"


def _table() -> dict[str, InstanceType]:
    rows = [
        # name, family, vCPU, RAM GiB, $/h, NeuronCores, GPUs, arch
        ("inf2.xlarge", "inf2", 4, 16, 0.7582, 2, 0, "x86_64"),
        ("inf2.8xlarge", "inf2", 32, 128, 1.96786, 2, 0, "x86_64"),
        ("inf2.24xlarge", "inf2", 96, 384, 6.49063, 12, 0, "x86_64"),
        ("inf2.48xlarge", "inf2", 192, 768, 12.98127, 24, 0, "x86_64"),
        ("trn1.2xlarge", "trn1", 8, 32, 1.34375, 2, 0, "x86_64"),
        ("trn1.32xlarge", "trn1", 128, 512, 21.50, 32, 0, "x86_64"),
        # 16 Trainium2 chips of 8 physical NeuronCore-v3 (96 GiB HBM each), 64 logical NeuronCores at
        # the default LNC=2; 192 vCPUs, 2,048 GiB (Neuron docs, "Amazon EC2 Trn2 Architecture" and
        # "Best practices for training"). No reliable public on-demand price.
        ("trn2.48xlarge", "trn2", 192, 2048, None, 64, 0, "x86_64"),
        # CPU instances users compare against (Graviton3 and Sapphire Rapids).
        ("c7g.xlarge", None, 4, 8, 0.145, 0, 0, "arm64"),
        ("c7g.2xlarge", None, 8, 16, 0.29, 0, 0, "arm64"),
        ("c7g.4xlarge", None, 16, 32, 0.58, 0, 0, "arm64"),
        ("c7i.xlarge", None, 4, 8, 0.1785, 0, 0, "x86_64"),
        ("c7i.2xlarge", None, 8, 16, 0.357, 0, 0, "x86_64"),
        ("c7i.4xlarge", None, 16, 32, 0.714, 0, 0, "x86_64"),
        # GPU instances: one A10G (g5) or one L4 (g6).
        ("g5.xlarge", None, 4, 16, 1.006, 0, 1, "x86_64"),
        ("g5.2xlarge", None, 8, 32, 1.212, 0, 1, "x86_64"),
        ("g6.xlarge", None, 4, 16, 0.8048, 0, 1, "x86_64"),
        ("g6.2xlarge", None, 8, 32, 0.9776, 0, 1, "x86_64"),
    ]
    return {
        r[0]: InstanceType(name=r[0], family=r[1], vcpus=r[2], memory_gib=r[3],
                           price_per_hour_usd=r[4], neuron_cores=r[5], gpus=r[6], arch=r[7])
        for r in rows
    }


INSTANCES: dict[str, InstanceType] = _table()


def get_instance(name: str) -> InstanceType:
    key = name.strip().lower()
    try:
        return INSTANCES[key]
    except KeyError:
        raise UnknownInstanceError(
            f"unknown instance type {name!r}; known: {', '.join(sorted(INSTANCES))}. "
            f"Set price_per_hour_usd (and the cores per instance) to cost an instance type not listed"
        ) from None


def load_overrides(env: Mapping[str, str] | None = None) -> dict[str, float]:
    """Price overrides from `NEURONSERVE_PRICES_JSON`, e.g. '{"inf2.xlarge": 0.99}'.

    >>> load_overrides({"NEURONSERVE_PRICES_JSON": '{"inf2.xlarge": 0.99}'})
    {'inf2.xlarge': 0.99}
    >>> load_overrides({})
    {}
    """
    env = os.environ if env is None else env
    raw = env.get(PRICES_ENV, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{PRICES_ENV} is not valid JSON ({e}); expected e.g. "
                         '\'{"inf2.xlarge": 0.7582}\'') from None
    if not isinstance(data, dict):
        raise ValueError(f"{PRICES_ENV} must be a JSON object of instance type -> $/hour, "
                         f"got {type(data).__name__}")
    out: dict[str, float] = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{PRICES_ENV}: price for {name!r} must be a non-negative number "
                             f"of USD per hour, got {value!r}")
        out[str(name).strip().lower()] = float(value)
    return out


def price_per_hour(name: str, overrides: Mapping[str, float] | None = None) -> float:
    """USD per instance-hour; `overrides` win over the table and may name unknown instances."""
    key = name.strip().lower()
    if overrides:
        normalised = {k.strip().lower(): v for k, v in overrides.items()}
        if key in normalised:
            return float(normalised[key])
    inst = get_instance(key)
    if inst.price_per_hour_usd is None:
        raise MissingPriceError(
            f"no price for {inst.name} (no reliable public on-demand figure); set "
            f"price_per_hour_usd (env NEURONSERVE_PRICE_PER_HOUR_USD) or {PRICES_ENV}="
            f'\'{{"{inst.name}": <USD per hour>}}\'')
    return inst.price_per_hour_usd


def price_per_core_second(name: str, cores_per_instance: int | None = None,
                          overrides: Mapping[str, float] | None = None) -> float:
    """USD per core-second: the instance price split evenly over its cores.

    >>> round(price_per_core_second("inf2.xlarge") * 3600, 4)   # half the instance per hour
    0.3791
    """
    if cores_per_instance is None:
        cores_per_instance = get_instance(name).cores
    if cores_per_instance <= 0:
        raise ValueError(f"cores_per_instance must be positive, got {cores_per_instance}")
    return price_per_hour(name, overrides) / 3600.0 / cores_per_instance


def cost_per_million(requests_per_s: float, price_per_hour: float) -> float:
    """USD per 1M requests at a sustained throughput: 1e6 / rps * price / 3600."""
    if requests_per_s <= 0:
        raise ValueError(f"requests_per_s must be positive, got {requests_per_s}")
    return 1e6 / requests_per_s * price_per_hour / 3600.0


def detect_instance_type(env: Mapping[str, str] | None = None, *, allow_imds: bool = False,
                         imds_timeout_s: float = 0.2) -> str | None:
    """The EC2 instance type this process runs on, or None if it cannot be told.

    Order: `NEURONSERVE_INSTANCE_TYPE`, then `NODE_INSTANCE_TYPE` (the Kubernetes node label via
    the downward API), then, only with `allow_imds=True`, EC2 instance metadata (IMDSv2).
    """
    env = os.environ if env is None else env
    for var in (INSTANCE_TYPE_ENV, NODE_INSTANCE_TYPE_ENV):
        value = env.get(var, "").strip()
        if value:
            return value.lower()
    if allow_imds:
        return _imds_instance_type(imds_timeout_s)
    return None


def _imds_instance_type(timeout_s: float) -> str | None:
    # urllib rather than httpx: this module stays free of third-party imports.
    import urllib.error
    import urllib.request

    base = "http://169.254.169.254/latest"
    try:
        token_req = urllib.request.Request(
            f"{base}/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(token_req, timeout=timeout_s) as r:
            token = r.read().decode()
        req = urllib.request.Request(f"{base}/meta-data/instance-type",
                                     headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            value = r.read().decode().strip()
        return value.lower() or None
    except (OSError, urllib.error.URLError, ValueError):
        return None
