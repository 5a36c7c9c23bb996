"""Check rendered manifests offline: built-in kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), RayService against KubeRay's CRD schema (k8s/schemas/), the Prometheus
Operator kinds structurally, and serveConfigV2 against Ray Serve's own schema.

Unknown fields are errors everywhere: the API server would silently prune them from a custom
resource, and Ray Serve's schema would silently ignore them, so a typo would deploy as a default.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

K8S_VERSION = "1.33"
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "k8s" / "schemas"
RAYSERVICE_CRD = SCHEMA_DIR / "ray.io_rayservices.yaml"


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class ManifestInvalid(ValueError):
    """An object does not validate; the message names the object and the failing path."""


def _where(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


@functools.lru_cache(maxsize=4)
def _crd_schema(path: str, version: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ManifestInvalid(f"CRD schema {p} is missing: restore k8s/schemas/ (see its README)")
    crd = yaml.safe_load(p.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    raise ManifestInvalid(f"{p} has no version {version}")


def _strict(schema: Any) -> Any:
    """Close every object schema that lists its properties (the API server prunes unknown fields)."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for item in schema:
            _strict(item)
    return schema


def _jsonschema_errors(schema: dict[str, Any], obj: Any) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


def _builtin(obj: dict[str, Any], k8s_version: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(map(str, e.absolute_path)) or "(root)"
        raise ManifestInvalid(f"{_where(obj)}: {path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ManifestInvalid(f"{_where(obj)}: {e.message}") from None


def _metadata(obj: dict[str, Any], k8s_version: str) -> None:
    # Custom resources' metadata is a plain object in their CRD; check it as ObjectMeta.
    _builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata") or {}}, k8s_version)


def _pod_template(template: dict[str, Any], where: str, k8s_version: str) -> None:
    try:
        _builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}, k8s_version)
    except ManifestInvalid as e:
        raise ManifestInvalid(f"{where}: {e}") from None


def validate_rayservice(obj: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    version = obj.get("apiVersion", "").split("/")[-1]
    errors = _jsonschema_errors(_crd_schema(str(RAYSERVICE_CRD), version), obj)
    if errors:
        raise ManifestInvalid(f"{_where(obj)}: " + "; ".join(errors[:5]))
    _metadata(obj, k8s_version)
    cluster = obj["spec"]["rayClusterConfig"]
    _pod_template(cluster["headGroupSpec"]["template"], f"{_where(obj)} head", k8s_version)
    for group in cluster.get("workerGroupSpecs", []):
        _pod_template(group["template"], f"{_where(obj)} worker group {group['groupName']}", k8s_version)
        if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31):
            raise ManifestInvalid(f"{_where(obj)}: worker group {group['groupName']}: minReplicas > maxReplicas")
    if "serveConfigV2" in obj["spec"]:
        validate_serve_config(obj["spec"]["serveConfigV2"])


def _structural(obj: dict[str, Any], required_spec: dict[str, type]) -> None:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ManifestInvalid(f"{_where(obj)}: spec must be an object")
    for key, kind in required_spec.items():
        if not isinstance(spec.get(key), kind):
            raise ManifestInvalid(f"{_where(obj)}: spec.{key} must be a {kind.__name__}")


def validate_podmonitor(obj: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    _metadata(obj, k8s_version)
    _structural(obj, {"selector": dict, "podMetricsEndpoints": list})
    for i, ep in enumerate(obj["spec"]["podMetricsEndpoints"]):
        if not isinstance(ep, dict) or not (ep.get("port") or ep.get("portNumber") or ep.get("targetPort")):
            raise ManifestInvalid(f"{_where(obj)}: podMetricsEndpoints[{i}] needs a port")


def validate_prometheusrule(obj: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    _metadata(obj, k8s_version)
    _structural(obj, {"groups": list})
    for g in obj["spec"]["groups"]:
        if not g.get("name") or not isinstance(g.get("rules"), list):
            raise ManifestInvalid(f"{_where(obj)}: every group needs a name and a list of rules")
        for r in g["rules"]:
            if not isinstance(r.get("expr"), (str, int)):
                raise ManifestInvalid(f"{_where(obj)}: group {g['name']}: a rule has no expr")
            if bool(r.get("record")) == bool(r.get("alert")):
                raise ManifestInvalid(f"{_where(obj)}: group {g['name']}: a rule needs exactly one of record/alert")


CUSTOM = {
    ("ray.io", "RayService"): validate_rayservice,
    ("monitoring.coreos.com", "PodMonitor"): validate_podmonitor,
    ("monitoring.coreos.com", "PrometheusRule"): validate_prometheusrule,
}


def validate_object(obj: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    """Raise ManifestInvalid unless `obj` is a valid object of its kind."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        raise ManifestInvalid(f"not a Kubernetes object: {str(obj)[:80]}")
    name = (obj.get("metadata") or {}).get("name", "")
    if not DNS_LABEL.fullmatch(name or ""):
        raise ManifestInvalid(f"{_where(obj)}: metadata.name must be a DNS-1123 label (lowercase letters, digits, '-')")
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    check = CUSTOM.get((group, obj["kind"]))
    if check:
        check(obj, k8s_version)
    else:
        _builtin(obj, k8s_version)


def _closed(model_cls, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        return
    unknown = set(data) - set(model_cls.model_fields) - {f.alias for f in model_cls.model_fields.values() if f.alias}
    if unknown:
        raise ManifestInvalid(f"serveConfigV2 {where}: unknown key(s) {', '.join(sorted(unknown))}")


def validate_serve_config(text: str) -> dict[str, Any]:
    """Parse a serveConfigV2 string and validate it with Ray Serve's ServeDeploySchema; returns it."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestInvalid(f"serveConfigV2 is not YAML: {e}") from None
    try:
        ServeDeploySchema.model_validate(data)
    except ValueError as e:
        raise ManifestInvalid(f"serveConfigV2 rejected by Ray Serve: {e}") from None
    _closed(ServeDeploySchema, data, "(root)")
    for app in data.get("applications", []):
        _closed(ServeApplicationSchema, app, f"application {app.get('name')}")
        for d in app.get("deployments", []):
            where = f"deployment {d.get('name')}"
            _closed(DeploymentSchema, d, where)
            _closed(RayActorOptionsSchema, d.get("ray_actor_options"), f"{where} ray_actor_options")
            if d.get("autoscaling_config") is not None:
                _closed(AutoscalingConfig, d["autoscaling_config"], f"{where} autoscaling_config")
                # DeploymentSchema keeps autoscaling_config as a plain dict; Serve checks it later.
                try:
                    AutoscalingConfig.model_validate(d["autoscaling_config"])
                except ValueError as e:
                    raise ManifestInvalid(f"serveConfigV2 {where} autoscaling_config: {e}") from None
    return data
