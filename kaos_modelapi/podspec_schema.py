"""Kubernetes' PodSpec schema, vendored in schemas/podspec.json (see hack/vendor_podspec_schema.py).

Two consumers read it: the CRD field spec.podSpec (`podspec_crd_schema`) and the strategic-merge engine
in smp.py (`pod_spec_schema`, a navigable view carrying the x-kubernetes-patch-* metadata).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Literal

_REF_PREFIX = "#/components/schemas/"

Kind = Literal["struct", "map", "free-form", "array", "string", "integer", "number", "boolean", "scalar-union"]

# Strategic-merge directives (k8s.io/apimachinery/pkg/util/strategicpatch).
PATCH_DIRECTIVE = "$patch"
RETAIN_KEYS_DIRECTIVE = "$retainKeys"
SET_ELEMENT_ORDER_PREFIX = "$setElementOrder/"
DELETE_FROM_PRIMITIVE_LIST_PREFIX = "$deleteFromPrimitiveList/"
PATCH_DIRECTIVE_VALUES = ("replace", "delete", "merge")


@dataclass(frozen=True)
class SchemaNode:
    """One resolved node of the vendored schema; `$ref`s are followed lazily on navigation."""

    raw: Mapping[str, Any]
    definitions: Mapping[str, Any] = field(repr=False)

    @property
    def kind(self) -> Kind:
        if "oneOf" in self.raw:
            return "scalar-union"
        node_type = self.raw.get("type")
        if node_type == "object":
            if "properties" in self.raw:
                return "struct"
            return "map" if "additionalProperties" in self.raw else "free-form"
        if node_type in ("array", "string", "integer", "number", "boolean"):
            return node_type  # type: ignore[no-any-return]
        raise ValueError(f"vendored schema node has no usable type: {dict(self.raw)!r}")

    def prop(self, name: str) -> SchemaNode | None:
        props = self.raw.get("properties", {})
        return self._resolve(props[name]) if name in props else None

    def prop_names(self) -> Iterator[str]:
        return iter(self.raw.get("properties", {}))

    def items(self) -> SchemaNode | None:
        return self._resolve(self.raw["items"]) if "items" in self.raw else None

    def values(self) -> SchemaNode | None:
        extra = self.raw.get("additionalProperties")
        return self._resolve(extra) if isinstance(extra, Mapping) else None

    @property
    def patch_strategies(self) -> frozenset[str]:
        strategy = self.raw.get("x-kubernetes-patch-strategy", "")
        return frozenset(s.strip() for s in strategy.split(",") if s.strip())

    @property
    def merge_key(self) -> str | None:
        key = self.raw.get("x-kubernetes-patch-merge-key")
        return key if isinstance(key, str) else None

    @property
    def scalar_types(self) -> frozenset[str]:
        """JSON types a scalar node accepts (IntOrString and Quantity accept two)."""
        if self.kind == "scalar-union":
            return frozenset(option["type"] for option in self.raw["oneOf"])
        return frozenset({self.raw["type"]})

    def _resolve(self, node: Mapping[str, Any]) -> SchemaNode:
        return resolve(node, self.definitions)


def resolve(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> SchemaNode:
    """Follow a `$ref`; keys next to it (patch metadata on a property) override the target's."""
    ref = node.get("$ref")
    if ref is None:
        return SchemaNode(node, definitions)
    if not ref.startswith(_REF_PREFIX):
        raise ValueError(f"unsupported $ref {ref!r}")
    target = definitions[ref[len(_REF_PREFIX) :]]
    siblings = {k: v for k, v in node.items() if k != "$ref"}
    return resolve({**target, **siblings}, definitions)


@cache
def vendored_document() -> Mapping[str, Any]:
    text = resources.files("kaos_modelapi").joinpath("schemas/podspec.json").read_text()
    document: Mapping[str, Any] = json.loads(text)
    return document


def kubernetes_source() -> str:
    """Which Kubernetes release the vendored schema comes from, e.g. 'k8s.io/kubernetes@v1.37.2'."""
    return str(vendored_document()["x-source"]["module"])


def pod_spec_schema() -> SchemaNode:
    document = vendored_document()
    definitions = document["components"]["schemas"]
    return SchemaNode(definitions[document["root"]], definitions)


# ---------------------------------------------------------------------------------------------------------
# CRD schema
# ---------------------------------------------------------------------------------------------------------

_INT_OR_STRING: Mapping[str, Any] = {
    "x-kubernetes-int-or-string": True,
    "anyOf": [{"type": "integer"}, {"type": "string"}],
}
# A resource.Quantity's syntax, as controller-gen writes it into CRDs: a bad one (`cpu: lots`) is refused when
# the ModelAPI is applied, naming the field, instead of failing the Deployment later (a 500, not a 422).
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
                    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_COPIED_KEYS = (
    "format",
    "enum",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
)


def podspec_crd_schema(description: str) -> dict[str, Any]:
    """Structural schema for spec.podSpec: upstream PodSpec with every field optional.

    Beyond upstream's shape the override needs three things a plain embedded PodSpec lacks:
    - `nullable: true` on fields and map values, because the apiserver prunes nulls from non-nullable
      fields before the operator sees them, and `null` is how strategic merge deletes a field;
    - `x-kubernetes-preserve-unknown-fields` on its objects, because structural pruning would otherwise drop
      the merge directives ($patch, $retainKeys, $setElementOrder/.., $deleteFromPrimitiveList/..). They
      cannot be declared as properties: a CRD whose schema has `$`-named properties is mangled by
      client-side `kubectl apply`, whose strategic merge reads them as directives (a second apply silently
      drops podSpec's properties). Unknown fields that are not directives are refused by the operator
      instead (`unknown_fields`), naming the field;
    - defaults for list-map keys (see `_key_property`).
    """
    return {"description": description, **_crd_node(pod_spec_schema(), ())}


def _crd_node(node: SchemaNode, map_keys: tuple[str, ...] = (), retain_keys: bool = False) -> dict[str, Any]:
    """`map_keys` and `retain_keys` come from the enclosing list field: they shape its item schema."""
    kind = node.kind
    if kind == "scalar-union":
        # IntOrString and Quantity: `cpu: 1` and `memory: 1Gi` must both validate.
        if node.raw.get("format") == "int-or-string":
            return dict(_INT_OR_STRING)
        return {**_INT_OR_STRING, "pattern": QUANTITY_PATTERN}
    out: dict[str, Any] = {"type": "object" if kind in ("struct", "map", "free-form") else kind}
    out.update({k: node.raw[k] for k in _COPIED_KEYS if k in node.raw})
    if kind == "struct":
        out["properties"] = _crd_properties(node, map_keys, retain_keys)
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "map":
        values = node.values()
        assert values is not None
        out["additionalProperties"] = {**_crd_node(values), "nullable": True}
    elif kind == "free-form":
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        items = node.items()
        assert items is not None
        keys = tuple(node.raw.get("x-kubernetes-list-map-keys", ()))
        out["items"] = _crd_node(items, keys, "retainKeys" in node.patch_strategies)
    return out


def _crd_properties(node: SchemaNode, map_keys: tuple[str, ...], retain_keys: bool) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name in node.prop_names():
        child = node.prop(name)
        assert child is not None
        if name in map_keys:
            props[name] = _key_property(child, name)
        else:
            own_retain_keys = child.kind == "struct" and "retainKeys" in child.patch_strategies
            props[name] = {**_crd_node(child, retain_keys=own_retain_keys), "nullable": True}
    return props


def _key_property(child: SchemaNode, name: str) -> dict[str, Any]:
    """A list-map key: the apiserver rejects a CRD whose list-map keys are neither required nor defaulted.

    Making keys required would reject the list-level marker `{"$patch": "replace"}`, which carries no key,
    so the key gets upstream's default instead ("" for names, 0 for containerPort, TCP for protocol). A
    default can never merge with anything real (no Kubernetes name is empty, no port is 0), and smp.py
    reports an empty merge key as missing, so a forgotten key still surfaces as an error naming the item.
    Keys must not be nullable either (apiserver rule), so they are the one place a null cannot delete.
    """
    if "default" not in child.raw:
        raise ValueError(f"list-map key {name!r} has no upstream default; it would have to stay required")
    return {**_crd_node(child), "default": child.raw["default"]}


def _is_directive(name: str) -> bool:
    return name in (PATCH_DIRECTIVE, RETAIN_KEYS_DIRECTIVE) or name.startswith(
        (SET_ELEMENT_ORDER_PREFIX, DELETE_FROM_PRIMITIVE_LIST_PREFIX)
    )


def unknown_fields(override: Any, node: SchemaNode | None = None, path: str = "spec.podSpec") -> list[str]:
    """Paths of fields in a podSpec override that PodSpec does not have (a typo such as `resorces`).

    The CRD keeps unknown fields so that merge directives survive, so this is where typos are caught."""
    node = node or pod_spec_schema()
    found: list[str] = []
    if isinstance(override, Mapping) and node.kind == "struct":
        for name, value in override.items():
            child = node.prop(name)
            if child is None:
                if not _is_directive(name):
                    found.append(f"{path}.{name}")
            else:
                found += unknown_fields(value, child, f"{path}.{name}")
    elif isinstance(override, Mapping) and node.kind == "map" and (values := node.values()) is not None:
        for name, value in override.items():
            found += unknown_fields(value, values, f"{path}.{name}")
    elif isinstance(override, list) and node.kind == "array" and (items := node.items()) is not None:
        for index, item in enumerate(override):
            found += unknown_fields(item, items, f"{path}[{index}]")
    return found
