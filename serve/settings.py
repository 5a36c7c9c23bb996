"""Serving settings, declared once. Units are in the names. Every field can be set from the
environment (NEURONSERVE_<FIELD>), from `neuronserve serve` flags, or from a Ray Serve config's
application args; the batching knobs also live-update through Serve's `user_config`."""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "NEURONSERVE_"
BATCHING_KNOBS = ("max_batch_tokens", "batch_wait_ms", "max_concurrent_batches", "max_queued_rows", "packing")


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # batching (user_config keys)
    max_batch_tokens: int = Field(2048, ge=1, description="padded-token budget of one batch")
    batch_wait_ms: float = Field(0.0, ge=0, le=10_000, description="extra wait for a fuller batch; 0 dispatches as soon as the device is idle")
    max_concurrent_batches: int = Field(1, ge=1, le=64, description="batches in flight per replica",
                                        json_schema_extra={"default_help": "1 on Neuron; on CPU the layout's, one per core of the replica"})
    max_queued_rows: int = Field(2048, ge=1, description="rows waiting per replica before 429")
    packing: bool = Field(True, description="on CPU, pack several short rows per sequence when the artifact has a packed graph")
    # requests
    request_timeout_s: float = Field(30.0, gt=0, description="per request, queue + inference")
    max_inputs_per_request: int = Field(256, ge=1, description="texts one request may carry")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted")
    truncate: bool = Field(True, description="truncate inputs longer than the largest bucket, for requests that do not say")
    # security (serve.auth): keys travel through Ray only as digests; see docs/security.md
    api_key: SecretStr | None = Field(None, description="API keys (comma-separated) every inference and metadata "
                                      "route requires as `Authorization: Bearer <key>`; prefer the variable or "
                                      "--api-key-file, as a flag shows in the process list",
                                      json_schema_extra={"metavar": "KEY[,KEY...]", "default_help": "none: no authentication"})
    api_key_file: str | None = Field(None, description="file of API keys, one per line (# comments and blank lines skipped); "
                                     "read by each replica, so the path must exist where replicas run",
                                     json_schema_extra={"metavar": "FILE"})
    # faults
    max_consecutive_failed_batches: int = Field(3, ge=0, description="failed batches in a row (backend errors) after "
                                                "which a replica reports unhealthy, so Ray restarts it; a good batch "
                                                "resets the count; 0: never")
    # placement
    threads_per_replica: int | None = Field(None, ge=1, description="CPU backend: torch threads per forward; a replica reserves threads x concurrent batches CPUs",
                                            json_schema_extra={"default_help": "cores / replicas / concurrent batches, usually 1"})
    # metrics and cost
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus exporter port; 0: no exporter")
    instance_type: str | None = Field(None, description="instance type for cost metrics, e.g. inf2.xlarge",
                                      json_schema_extra={"default_help": "detected from EC2 instance metadata"})
    price_per_hour_usd: float | None = Field(None, ge=0, description="instance price for cost metrics",
                                             json_schema_extra={"default_help": "the price table's, for the instance type"})
    # tracing (serve.tracing; OTEL_SERVICE_NAME names the service, default neuronserve)
    otlp_endpoint: str | None = Field(None, description="export request and batch spans over OTLP/HTTP to this collector, e.g. http://127.0.0.1:4318",
                                      json_schema_extra={"default_help": "off", "metavar": "URL"})

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, url: str | None) -> str | None:
        """An http(s) URL, and the exporter installed (checked without importing it)."""
        if not url:
            return None
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL such as http://127.0.0.1:4318, got {url!r}")
        import importlib.util

        try:
            installed = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
        except ModuleNotFoundError:
            installed = False
        if not installed:
            raise ValueError("tracing needs the OpenTelemetry OTLP exporter, which is not installed: "
                             "pip install 'neuronserve[tracing]'")
        return url

    @field_validator("api_key")
    @classmethod
    def _some_key(cls, value: SecretStr | None) -> SecretStr | None:
        from neuronserve.serve.auth import parse_keys

        if value is not None and not parse_keys(value.get_secret_value()):
            raise ValueError("holds no key; give one or more keys separated by commas, or leave it unset")
        return value

    @field_validator("api_key_file")
    @classmethod
    def _readable_keys(cls, value: str | None) -> str | None:
        from neuronserve.serve.auth import read_key_file

        if value:
            read_key_file(value)  # KeyFileError (a ValueError) says why, never what it holds
        return value or None

    def api_keys(self) -> list[str]:
        """Every key these settings give (`api_key` and `api_key_file`), in clear: use, never log."""
        from neuronserve.serve.auth import parse_keys, read_key_file

        keys = parse_keys(self.api_key.get_secret_value()) if self.api_key is not None else []
        return keys + (read_key_file(self.api_key_file) if self.api_key_file else [])


class AppArgs(ServeSettings):
    """Typed arguments of the Ray Serve application builder `neuronserve.serve.app:build_app`."""

    artifacts: str | list[str] = Field(
        description="artifact directory from `neuronserve compile`, or the s3:// URI `neuronserve compile --push` "
        "prints (pulled into the local cache and verified); repeat it to serve several models from the same "
        "replicas, each as NAME=DIR|URI to name the model requests route to (else the manifest's model name)",
        json_schema_extra={"metavar": "[NAME=]DIR|URI", "repeatable": True})
    backend: Literal["auto", "cpu", "neuron", "simulated"] = Field(
        "auto", description="where replicas run; auto: the artifact's target; simulated: a simulated NeuronCore "
        "(no model: device time from --device-profile, for measuring the host path)")
    device_profile: str = Field("zero", description="--backend simulated: device-time profile, a name (zero, bert-base-inf2, "
                                "distilbert-base-inf2, minilm-l6-inf2) or a JSON file", json_schema_extra={"metavar": "NAME|FILE"})
    max_models_per_replica: int | None = Field(None, ge=1, description="with more --artifacts than this, each replica "
                                               "holds at most this many models, loading the others on demand and "
                                               "unloading the least recently used; requests go to a replica that "
                                               "holds their model (Ray Serve model multiplexing)",
                                               json_schema_extra={"default_help": "all: every replica loads every model"})
    model_name: str | None = Field(None, description="served model name",
                                   json_schema_extra={"default_help": "the artifact's model name"})
    num_replicas: int | Literal["auto"] = Field("auto", description="replicas, or auto: one per NeuronCore group / CPU layout")
    cores_per_replica: int = Field(1, ge=1, description="Neuron backend: NeuronCores per replica")
    host_processes: int = Field(1, ge=1, le=64, description="device backends: processes answering HTTP per "
                                "replica; above 1, each replica's NeuronCores are held by one device process fed "
                                "token rows in bulk by this many HTTP/tokenizer processes, so a replica's host work "
                                "uses several vCPUs (docs/host-sizing.md)")
    device_memory_gib: float | None = Field(None, gt=0, description="device memory one replica's models may use; "
                                            "start-up refuses models that need more",
                                            json_schema_extra={"default_help": "16 GiB per NeuronCore on inf2/trn1, "
                                                               "24 on trn2, times the replica's cores; not checked on CPU"})
    max_ongoing_requests: int = Field(1024, ge=1, description="Ray Serve per-replica cap; the replica queues itself")
    # autoscaling (Serve's autoscaling_config; docs/decisions.md, "Autoscaling")
    autoscale: str | None = Field(None, description="scale between MIN and MAX replicas with the load instead of a fixed "
                                  "count (MIN 0: scale to zero when idle)",
                                  json_schema_extra={"metavar": "MIN:MAX", "default_help": "off: --replicas"})
    target_ongoing_requests: float | None = Field(None, gt=0, description="with --autoscale: requests per replica "
                                                  "(running and queued) the autoscaler aims for",
                                                  json_schema_extra={"default_help": "the replica's batch capacity: "
                                                                     "concurrent batches x rows per full batch of "
                                                                     "128-token inputs / inputs per request"})
    inputs_per_request: int = Field(1, ge=1, description="with --autoscale: texts a typical request carries, for the "
                                    "default target")
    upscale_delay_s: float = Field(10.0, ge=0, description="with --autoscale: load above target this long adds replicas")
    downscale_delay_s: float = Field(300.0, ge=0, description="with --autoscale: load below target this long removes "
                                     "replicas (to MIN 0 too)")
    metrics_dir: str | None = Field(None, description="PROMETHEUS_MULTIPROC_DIR shared by this node's replicas")
    access_log: bool = Field(False, description="Ray Serve per-request access log (costs throughput)")
    cached_timings: bool = Field(True, description="start from the warm-up timing table kept in the cache for this "
                                 "artifact and host (each graph runs once, then the replica is ready); "
                                 "--no-cached-timings times every bucket again and refreshes the table")

    @field_validator("artifacts")
    @classmethod
    def _artifact_list(cls, value: str | list[str]) -> str | list[str]:
        """One artifact stays a string (as before); several stay a list, each `[NAME=]DIR|URI`."""
        if isinstance(value, list):
            if not value:
                raise ValueError("no artifacts: give at least one DIR or URI")
            for item in value:
                parse_artifact(item)
            names = [n for n, _ in map(parse_artifact, value) if n is not None]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"model name {', '.join(map(repr, twice))} given to more than one artifact; "
                                 "each served model needs its own NAME=")
            return value[0] if len(value) == 1 and parse_artifact(value[0])[0] is None else value
        parse_artifact(value)
        return value

    @model_validator(mode="after")
    def _one_model_name(self):
        if self.model_name and isinstance(self.artifacts, list):
            raise ValueError(f"model_name {self.model_name!r} names one model, but {len(self.artifacts)} artifacts are "
                             "given: name each as NAME=DIR instead")
        return self

    def catalog_mode(self) -> bool:
        """Whether replicas hold only some of the models and load the others on demand.

        >>> AppArgs(artifacts=["a", "b", "c"], max_models_per_replica=2).catalog_mode()
        True
        >>> AppArgs(artifacts=["a", "b"], max_models_per_replica=2).catalog_mode()
        False
        """
        return (self.max_models_per_replica is not None and isinstance(self.artifacts, list)
                and len(self.artifacts) > self.max_models_per_replica)

    def artifact_list(self) -> list[tuple[str | None, str]]:
        """Every artifact served, as (name given or None, DIR|URI), in the order given.

        >>> AppArgs(artifacts=["e5=/a/e5", "s3://b/k"]).artifact_list()
        [('e5', '/a/e5'), (None, 's3://b/k')]
        >>> AppArgs(artifacts="/a/minilm", model_name="minilm").artifact_list()
        [('minilm', '/a/minilm')]
        """
        if isinstance(self.artifacts, str):
            name, path = parse_artifact(self.artifacts)
            return [(name or self.model_name, path)]
        return [parse_artifact(a) for a in self.artifacts]

    @field_validator("autoscale")
    @classmethod
    def _autoscale_range(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parse_autoscale(value)
        return value.strip()

    def autoscale_range(self) -> tuple[int, int] | None:
        """(MIN, MAX) replicas of `autoscale`, or None for a fixed count.

        >>> AppArgs(artifacts="a", autoscale="0:2").autoscale_range()
        (0, 2)
        """
        return parse_autoscale(self.autoscale) if self.autoscale is not None else None

    def user_config(self) -> dict:
        return {k: getattr(self, k) for k in BATCHING_KNOBS}

    def with_user_config(self, user_config: dict) -> "AppArgs":
        """These settings with Serve's user_config applied (the live-tunable batching knobs only).

        >>> AppArgs(artifacts="a").with_user_config({"batch_wait_ms": 2}).batch_wait_ms
        2.0
        >>> AppArgs(artifacts="a").with_user_config({"threads": 2})
        Traceback (most recent call last):
        ...
        ValueError: unknown user_config keys ['threads']; allowed: max_batch_tokens, batch_wait_ms, max_concurrent_batches, max_queued_rows, packing
        """
        unknown = set(user_config) - set(BATCHING_KNOBS)
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; allowed: {', '.join(BATCHING_KNOBS)}")
        return AppArgs.model_validate({**self.model_dump(), **user_config})


ARTIFACT_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})=(.+)$")


def parse_artifact(text: str) -> tuple[str | None, str]:
    """`[NAME=]DIR|URI` of --artifacts: (the served name, or None for the manifest's, and where).

    >>> parse_artifact("reranker=/opt/artifacts/bge")
    ('reranker', '/opt/artifacts/bge')
    >>> parse_artifact("s3://bucket/prefix/3f2a")
    (None, 's3://bucket/prefix/3f2a')
    >>> parse_artifact("e5=")
    Traceback (most recent call last):
    ...
    ValueError: artifact 'e5=' names a model but no DIR or URI; give NAME=DIR or NAME=s3://...
    """
    text = str(text).strip()
    if not text:
        raise ValueError("empty artifact: give DIR, URI or NAME=DIR")
    if text.endswith("=") and ARTIFACT_NAME.match(text + "x"):
        raise ValueError(f"artifact {text!r} names a model but no DIR or URI; give NAME=DIR or NAME=s3://...")
    m = ARTIFACT_NAME.match(text)
    return (m.group(1), m.group(2)) if m else (None, text)


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` replicas of --autoscale.

    >>> parse_autoscale("1:4")
    (1, 4)
    >>> parse_autoscale("3:2")
    Traceback (most recent call last):
    ...
    ValueError: MIN:MAX '3:2': MIN is greater than MAX; e.g. 1:4, or 0:2 to scale to zero when idle
    """
    hint = "e.g. 1:4, or 0:2 to scale to zero when idle"
    low, sep, high = str(text).strip().partition(":")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise ValueError(f"MIN:MAX {text!r}: expected two whole numbers of replicas; {hint}") from None
    if not sep or lo < 0 or hi < 1:
        raise ValueError(f"MIN:MAX {text!r}: MIN must be >= 0 and MAX >= 1; {hint}")
    if lo > hi:
        raise ValueError(f"MIN:MAX {text!r}: MIN is greater than MAX; {hint}")
    return lo, hi


class ServeCommand(BaseSettings):
    """Settings of the `neuronserve serve` process itself (not its replicas')."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field("127.0.0.1", description="address the HTTP server listens on")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    address: str | None = Field(None, description="Ray cluster address to join",
                                json_schema_extra={"default_help": "$RAY_ADDRESS, else start a local Ray"})
    auto_cast: Literal["none", "bf16"] = Field("none", description="precision when compiling the default model (no --artifacts)")
    ready_timeout_s: float = Field(600.0, gt=0, description="give up if the replicas are not ready by then")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM/Ctrl-C, wait this long for in-flight requests, then stop anyway")


# --- command-line flags from the declaration ------------------------------------------------------
def env_name(field: str) -> str:
    """The environment variable of a setting.

    >>> env_name("max_batch_tokens")
    'NEURONSERVE_MAX_BATCH_TOKENS'
    """
    return ENV_PREFIX + field.upper()


def flag_help(model: type[BaseModel], name: str, *, env: bool = True, default: str | None = None) -> str:
    """A setting's help: its description, its true default and its environment variable.

    >>> flag_help(ServeSettings, "max_batch_tokens")
    'padded-token budget of one batch (default: 2048; env NEURONSERVE_MAX_BATCH_TOKENS)'
    """
    field = model.model_fields[name]
    if not field.description:
        raise ValueError(f"{model.__name__}.{name} has no description: it is its flag's help")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    default = default or extra.get("default_help")
    if default is None and field.default is not PydanticUndefined and field.default is not None:
        default = str(field.default).lower() if isinstance(field.default, bool) else f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
    notes = [f"default: {default}"] if default is not None else []
    if env:
        notes.append(f"env {env_name(name)}")
    return field.description.replace("%", "%%") + (f" ({'; '.join(notes)})" if notes else "")


def _flag_type(annotation) -> tuple[type | None, list | None]:
    """(argparse type, choices) for a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return None, list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _flag_type(args[0])
        if int in args and any(typing.get_origin(a) is Literal for a in args):  # e.g. int | "auto"
            words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
            return _int_or(words), None
    return annotation, None


def _int_or(words: list[str]):
    def parse(value: str):
        if value in words:
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {' or '.join(map(repr, words))}, got {value!r}") from None

    parse.__name__ = "|".join(["N", *words])
    return parse


def add_flags(parser, model: type[BaseModel], names: Iterable[str] | None = None, *, env: bool = True,
              aliases: dict[str, list[str]] | None = None, defaults: dict[str, str] | None = None) -> list[str]:
    """Add one flag per setting of `model` (all, or `names`): `--max-batch-tokens` for
    `max_batch_tokens`, booleans as `--x/--no-x`. Each flag's argparse default is None (unset: the
    environment variable, then the declared default, apply); its help says the declared default and,
    with `env`, the variable (`defaults` overrides what help says of a default). Returns the
    settings' names (each flag's `dest`).

    >>> p = argparse.ArgumentParser()
    >>> add_flags(p, ServeSettings, ["packing", "max_batch_tokens"])
    ['packing', 'max_batch_tokens']
    >>> p.parse_args(["--no-packing"])
    Namespace(packing=False, max_batch_tokens=None)
    """
    names = list(model.model_fields) if names is None else list(names)
    for name in names:
        field = model.model_fields[name]
        flags = ["--" + name.replace("_", "-"), *(aliases or {}).get(name, [])]
        text = flag_help(model, name, env=env, default=(defaults or {}).get(name))
        kind, choices = _flag_type(field.annotation)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("repeatable"):  # str | list[str]: the flag may be given several times
            parser.add_argument(*flags, dest=name, action="append", default=None, help=text,
                                metavar=extra.get("metavar"))
            continue
        if kind is bool:
            action = parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
            action.help = text  # BooleanOptionalAction appends "(default: None)" before Python 3.13
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        metavar = extra.get("metavar") or (None if choices else getattr(kind, "__name__", "") if kind not in (int, float, str)
                                           else "N" if kind in (int, float) else name.split("_")[-1].upper())
        parser.add_argument(*flags, dest=name, type=kind, choices=choices, default=None, help=text, metavar=metavar)
    return names


def given(namespace: argparse.Namespace, names: Iterable[str]) -> dict:
    """The settings a command line set (flags left out are None)."""
    return {k: getattr(namespace, k) for k in names if getattr(namespace, k, None) is not None}
