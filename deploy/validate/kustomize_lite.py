"""Render the kustomizations under deploy/ without the kustomize binary.

Only the subset of kustomize that deploy/ uses is implemented, and anything
else is refused rather than silently ignored, so a new feature in a
kustomization.yaml fails validation until this renderer learns it:

* ``resources``: YAML files (several documents each) and directories holding a
  kustomization, rendered recursively; duplicate kind/namespace/name is an error.
* ``patches``: strategic-merge patches, from ``path`` or inline ``patch``, on
  the object named by the patch itself (or by ``target`` kind/name). Lists
  merge by the Kubernetes patch merge keys (containers and env by name, ...);
  other lists are replaced; ``null`` deletes a field. (Patching a Service's
  ports is refused: kustomize's behaviour there is not reproduced.)
* ``images``: ``name`` with ``newName``, ``newTag`` or ``digest``, applied to
  every container and init container of pod templates.
* ``namespace``: set on every namespaced object.

Kubernetes behaviour followed: transformers of a kustomization run on the
objects of its resources after those were fully rendered, in the order
patches, images, namespace. Cross-checked against `kubectl kustomize`
(kustomize v5) on deploy/ when written.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "namespace"}

# Kinds that have no namespace; the namespace transformer leaves them alone.
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "ClusterTriggerAuthentication",
}

# patchMergeKey of the Kubernetes list fields that deploy/ patches or may
# patch. `ports` depends on where it is: containers' ports merge by
# containerPort; a Service's are refused (see _merge_key).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
    "hostAliases": "ip",
}


class RenderError(Exception):
    pass


def load_documents(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            raise RenderError(f"{path}: not valid YAML: {e}") from e
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise RenderError(f"{path}: every document must be a Kubernetes object with apiVersion and kind")
    return docs


def kustomization_file(directory: str) -> str:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise RenderError(f"{directory}: no kustomization.yaml")


def object_id(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj["kind"], meta.get("namespace") or "", meta.get("name") or "")


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":
        if all(isinstance(i, dict) and "containerPort" in i for i in items):
            return "containerPort"
        # kustomize merges Service ports by (port, protocol) with defaulting
        # that this renderer does not reproduce: refuse instead of diverging.
        raise RenderError("patching Service ports is not supported by kustomize_lite")
    return MERGE_KEYS.get(field)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge of `patch` into `base` (returns a new value)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise RenderError(f"patch directive {key} is not supported by kustomize_lite")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        # Like kustomize: the patch's items first, in patch order (merged
        # into their base item where the key matches), then the base items
        # the patch does not mention, in base order.
        out = []
        patched_keys = set()
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"patch list {field}: every item needs merge key {key}")
            existing = next((b for b in base if isinstance(b, dict) and b.get(key) == item[key]), None)
            out.append(strategic_merge(existing, item, field) if existing is not None else copy.deepcopy(item))
            patched_keys.add(item[key])
        out.extend(copy.deepcopy(b) for b in base if not (isinstance(b, dict) and b.get(key) in patched_keys))
        return out
    return copy.deepcopy(patch)


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    if obj["kind"] == "Pod":
        return [spec]
    if obj["kind"] == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    template = spec.get("template") or {}
    return [template["spec"]] if isinstance(template.get("spec"), dict) else []


def _split_image(image: str) -> tuple[str, str, str]:
    """Returns (name, tag, digest); tag and digest may be empty."""
    name, digest = (image.split("@", 1) + [""])[:2]
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def apply_images(objects: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    for rule in images:
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown or "name" not in rule:
            raise RenderError(f"images entry {rule}: only name, newName, newTag, digest are supported")
    for obj in objects:
        for pod in _pod_specs(obj):
            for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                name, tag, digest = _split_image(container.get("image", ""))
                for rule in images:
                    if rule["name"] != name:
                        continue
                    new_name = rule.get("newName", name)
                    if "digest" in rule:
                        container["image"] = f"{new_name}@{rule['digest']}"
                    elif "newTag" in rule:
                        container["image"] = f"{new_name}:{rule['newTag']}"
                    else:
                        ref = f"@{digest}" if digest else (f":{tag}" if tag else "")
                        container["image"] = f"{new_name}{ref}"
                    break


def apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any], target: dict[str, Any] | None, where: str) -> None:
    kind = (target or {}).get("kind") or patch.get("kind")
    name = (target or {}).get("name") or (patch.get("metadata") or {}).get("name")
    if target and set(target) - {"kind", "name"}:
        raise RenderError(f"{where}: patch target supports kind and name only")
    matches = [o for o in objects if o["kind"] == kind and o["metadata"].get("name") == name]
    if not matches:
        raise RenderError(f"{where}: patch matches no object ({kind} {name})")
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    body["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k != "name"}
    if not body["metadata"]:
        del body["metadata"]
    for obj in matches:
        merged = strategic_merge(obj, body)
        obj.clear()
        obj.update(merged)


def render(directory: str, _seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    directory = os.path.normpath(directory)
    if directory in _seen:
        raise RenderError(f"{directory}: kustomization cycle")
    path = kustomization_file(directory)
    with open(path, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise RenderError(f"{path}: fields not supported by kustomize_lite: {', '.join(sorted(unknown))}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization")

    objects: list[dict[str, Any]] = []
    seen_ids: dict[tuple[str, str, str], str] = {}
    for entry in k.get("resources") or []:
        source = os.path.join(directory, entry)
        if os.path.isdir(source):
            rendered = render(source, _seen + (directory,))
        elif os.path.isfile(source):
            rendered = load_documents(source)
        else:
            raise RenderError(f"{path}: resource {entry} does not exist (remote resources are not supported)")
        for obj in rendered:
            oid = object_id(obj)
            if oid in seen_ids:
                raise RenderError(f"{path}: {oid[0]} {oid[2]} defined twice ({seen_ids[oid]} and {entry})")
            seen_ids[oid] = entry
            objects.append(obj)

    for i, entry in enumerate(k.get("patches") or []):
        where = f"{path}: patches[{i}]"
        if set(entry) - {"path", "patch", "target"}:
            raise RenderError(f"{where}: only path, patch and target are supported")
        if "path" in entry:
            docs = load_documents(os.path.join(directory, entry["path"]))
        elif "patch" in entry:
            docs = [d for d in yaml.safe_load_all(entry["patch"]) if d is not None]
        else:
            raise RenderError(f"{where}: needs path or patch")
        for doc in docs:
            if isinstance(doc, list):
                raise RenderError(f"{where}: JSON 6902 patches are not supported")
            apply_patch(objects, doc, entry.get("target"), where)

    apply_images(objects, k.get("images") or [])

    namespace = k.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    return objects


def write(objects: list[dict[str, Any]], out_dir: str) -> list[str]:
    """One file per object (checkov and error messages then name the object)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, obj in enumerate(objects):
        name = f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(obj, f, sort_keys=False)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: kustomize_lite.py DIR   (prints the rendered stream)", file=sys.stderr)
        return 2
    try:
        objects = render(argv[1])
    except RenderError as e:
        print(f"kustomize_lite: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
