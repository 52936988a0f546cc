"""The ModelAPI CustomResourceDefinition, generated from the pydantic models in `api.py`.

pydantic emits JSON Schema with $refs, nullable unions and titles; a CRD needs a structural OpenAPI v3 schema
(no $ref, one type per node). `structural()` does that conversion; `podSpec` is replaced by Kubernetes' own
PodSpec schema so `kubectl explain` and server-side validation treat it as a real PodSpec.
"""

from __future__ import annotations

from typing import Any

from . import api, yamlio
from .podspec_schema import podspec_crd_schema

_DROP = {"title", "default", "additionalProperties"}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = dict(defs[ref.rsplit("/", 1)[-1]])
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def _drop_null(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None` becomes X: in Kubernetes an optional field is simply absent, never null."""
    options = node.get("anyOf")
    if options is None:
        return node
    kept = [o for o in options if o.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(kept) == 1:
        return {**kept[0], **rest}
    if sorted(o.get("type", "") for o in kept) == ["integer", "string"]:
        return {**rest, "x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    raise ValueError(f"cannot express union {options} structurally")


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    node = _resolve(_drop_null(_resolve(node, defs)), defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if node.get("additionalProperties") not in (None, False) and "properties" not in out:
        extra = node["additionalProperties"]
        if extra is True or extra == {}:
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out["additionalProperties"] = structural(extra, defs)
    if out.get("type") == "array":
        out.setdefault("x-kubernetes-list-type", "atomic")
    return out


def _spec_schema(defs: dict[str, Any], spec_node: dict[str, Any]) -> dict[str, Any]:
    spec = structural(spec_node, defs)
    podspec_description = spec["properties"]["podSpec"].get("description", "")
    spec["properties"]["podSpec"] = podspec_crd_schema(podspec_description)
    # Env vars merge by name (as in a Pod) so server-side apply users can own single entries.
    for config in ("proxyConfig", "hostedConfig"):
        env = spec["properties"][config]["properties"]["env"]
        env["x-kubernetes-list-type"] = "map"
        env["x-kubernetes-list-map-keys"] = ["name"]
    return spec


def _status_schema(defs: dict[str, Any], status_node: dict[str, Any]) -> dict[str, Any]:
    status = structural(status_node, defs)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return status


def openapi_schema() -> dict[str, Any]:
    """The structural schema of the whole ModelAPI object."""
    raw = api.ModelAPI.model_json_schema(mode="validation")
    defs = raw.get("$defs", {})
    props = raw["properties"]
    return {
        "type": "object",
        "description": raw.get("description", ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kaos.tools/v1alpha1"},
            "kind": {"type": "string", "description": "ModelAPI"},
            "metadata": {"type": "object"},
            "spec": _spec_schema(defs, props["spec"]),
            "status": _status_schema(defs, props["status"]),
        },
        "x-kubernetes-validations": [rule.to_crd() for rule in api.ModelAPI.rules],
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
    {"name": "Model", "type": "string", "jsonPath": ".status.model"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.readiness"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 0},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["kaos"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    # scale: `kubectl scale modelapi`, a HorizontalPodAutoscaler or KEDA can target a ModelAPI.
                    "subresources": {"status": {}, "scale": {
                        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector"}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kaos-modelapi crd` from kaos_modelapi/api.py: do not edit by hand.\n"
    return header + yamlio.dump(crd())
