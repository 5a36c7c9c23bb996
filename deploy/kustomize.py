"""Build a kustomization into objects: with a real kustomize (`kustomize build` or `kubectl kustomize`)
when one is installed, else with the small subset the repo's k8s/ tree uses.

The subset covers `resources` (files and kustomization directories), `patches` with a target and an
RFC 6902 patch (inline or `path`), `namespace` and `namePrefix`. Anything else raises, so a
kustomization that grows past it fails loudly instead of building differently.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace", "namePrefix"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass"}


class KustomizeError(ValueError):
    pass


def real_kustomize() -> list[str] | None:
    """The command of an installed kustomize, or None."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        try:
            out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and "Kustomize" in out.stdout:
            return ["kubectl", "kustomize"]
    return None


def build(path: str | Path, *, use_real: bool | None = None) -> list[dict[str, Any]]:
    """Objects of `kustomize build path`. use_real: True requires a real kustomize, False forces the subset."""
    cmd = real_kustomize() if use_real is not False else None
    if use_real and not cmd:
        raise KustomizeError("no kustomize found (neither `kustomize` nor `kubectl kustomize`)")
    if cmd:
        out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise KustomizeError(f"{' '.join(cmd)} {path}: {out.stderr.strip()}")
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return build_subset(path)


def build_subset(path: str | Path) -> list[dict[str, Any]]:
    root = Path(path)
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unsupported = set(k) - SUPPORTED
    if unsupported:
        raise KustomizeError(f"{kfile}: the built-in subset does not support {', '.join(sorted(unsupported))}; install kustomize")
    objs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = (root / res).resolve()
        if target.is_dir():
            objs.extend(build_subset(target))
        elif target.is_file():
            objs.extend(copy.deepcopy(d) for d in yaml.safe_load_all(target.read_text()) if d)
        else:
            raise KustomizeError(f"{kfile}: resource {res} not found")
    for patch in k.get("patches", []):
        if "target" not in patch:
            raise KustomizeError(f"{kfile}: the subset supports only targeted RFC 6902 patches")
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (root / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise KustomizeError(f"{kfile}: the subset supports only RFC 6902 patches (a list of operations)")
        matched = [o for o in objs if _matches(o, patch["target"])]
        if not matched:
            raise KustomizeError(f"{kfile}: patch target {patch['target']} matches nothing")
        for o in matched:
            apply_json_patch(o, ops)
    prefix = k.get("namePrefix")
    if prefix:
        for o in objs:
            o["metadata"]["name"] = prefix + o["metadata"]["name"]
    if k.get("namespace"):
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    return objs


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {"group": group, "version": version, "kind": obj.get("kind"), "name": obj["metadata"].get("name")}
    return all(target[key] == value for key, value in checks.items() if key in target)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, parts[-1]


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply RFC 6902 add/remove/replace/test in place.

    >>> apply_json_patch({"a": [1, 2]}, [{"op": "replace", "path": "/a/1", "value": 3}, {"op": "add", "path": "/b", "value": 0}])
    {'a': [1, 3], 'b': 0}
    """
    for op in ops:
        parts = _pointer(op["path"])
        if not parts:
            raise KustomizeError("patching the whole document is not supported")
        parent, key = _parent(doc, parts)
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if key == "-" else int(key)
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[index]
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            elif kind == "test":
                if parent[index] != op["value"]:
                    raise KustomizeError(f"test failed at {op['path']}")
            else:
                raise KustomizeError(f"op {kind} not supported")
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and key not in parent:
                    raise KustomizeError(f"replace: {op['path']} does not exist")
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            elif kind == "test":
                if parent.get(key) != op["value"]:
                    raise KustomizeError(f"test failed at {op['path']}")
            else:
                raise KustomizeError(f"op {kind} not supported")
    return doc
