"""The CRD schema of spec.podSpec: structural, small, and accepting partial pod specs and SMP directives."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kaos_modelapi import podspec_schema
from kaos_modelapi.podspec_schema import kubernetes_source, pod_spec_schema, podspec_crd_schema, unknown_fields

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = podspec_crd_schema("A partial PodSpec.")
CORPUS = yaml.safe_load((ROOT / "tests" / "smp_corpus.yaml").read_text())

# JSONSchemaProps fields a CRD accepts (apiextensions.k8s.io/v1), minus the ones this schema never needs.
CRD_KEYS = {
    "type",
    "format",
    "description",
    "properties",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "nullable",
    "anyOf",
    "pattern",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}

# Budget for the podSpec schema as compact JSON: client-side `kubectl apply` copies the whole CRD into an
# annotation limited to 256 KiB, and the rest of the CRD needs room too.
SIZE_BUDGET = 150_000


def nodes(node: dict[str, Any], path: str = "podSpec") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (property names, [] for items, {} for map values)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


def validate(value: Any, schema: dict[str, Any], path: str = "podSpec") -> list[str]:
    """A minimal structural-schema validator; unknown fields count as errors since the apiserver would
    prune them, silently losing that part of the override."""
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: null not allowed"]
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{path}: must be integer or string"]
    errors = _type_errors(value, schema, path)
    if errors:
        return errors
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in {schema['enum']}"]
    if isinstance(value, list):
        return [e for i, item in enumerate(value) for e in validate(item, schema["items"], f"{path}[{i}]")]
    if isinstance(value, dict):
        return _object_errors(value, schema, path)
    return []


def _type_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    python_types: dict[str, tuple[type, ...]] = {
        "object": (dict,),
        "array": (list,),
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
    }
    wanted = python_types[schema["type"]]
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        return [f"{path}: expected {schema['type']}"]
    return []


def _object_errors(value: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
    if "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        return [e for k, v in value.items() for e in validate(v, extra, f"{path}.{k}")]
    props = schema.get("properties", {})
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields")
    errors = [] if keeps_unknown else [f"{path}.{k}: unknown field (would be pruned)" for k in value if k not in props]
    return errors + [e for k, v in value.items() if k in props for e in validate(v, props[k], f"{path}.{k}")]


# --------------------------------------------------------------------------------------------------------
# shape
# --------------------------------------------------------------------------------------------------------


def test_every_node_is_structural() -> None:
    for path, node in nodes(SCHEMA):
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
        if node.get("type") == "object":
            shapes = [
                k for k in ("properties", "additionalProperties", "x-kubernetes-preserve-unknown-fields") if k in node
            ]
            # Structs keep unknown fields too, so that strategic-merge directives survive pruning.
            assert shapes in (
                ["properties", "x-kubernetes-preserve-unknown-fields"],
                ["additionalProperties"],
                ["x-kubernetes-preserve-unknown-fields"],
            ), f"{path}: {shapes}"
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), path


def test_only_crd_keys_and_no_refs_or_patch_metadata() -> None:
    text = json.dumps(SCHEMA)
    assert "$ref" not in text
    assert "x-kubernetes-patch" not in text
    for path, node in nodes(SCHEMA):
        assert set(node) <= CRD_KEYS, f"{path}: {set(node) - CRD_KEYS}"
        assert "required" not in node, path


def test_quantities_carry_their_syntax_and_int_or_string_ports_do_not() -> None:
    container = SCHEMA["properties"]["containers"]["items"]["properties"]
    limit = container["resources"]["properties"]["limits"]["additionalProperties"]
    assert limit["pattern"] == podspec_schema.QUANTITY_PATTERN and limit["x-kubernetes-int-or-string"]
    port = container["readinessProbe"]["properties"]["httpGet"]["properties"]["port"]
    assert "pattern" not in port and port["x-kubernetes-int-or-string"]


def test_description_only_at_the_top() -> None:
    assert SCHEMA["description"] == "A partial PodSpec."
    assert [path for path, node in nodes(SCHEMA) if "description" in node] == ["podSpec"]


def test_free_form_only_where_upstream_is() -> None:
    free = [
        path
        for path, node in nodes(SCHEMA)
        if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node
    ]
    assert free and all(path.endswith(".fieldsV1") for path in free)


def test_no_dollar_named_properties() -> None:
    """Client-side kubectl apply would read them as strategic-merge directives and mangle the CRD."""
    assert [path for path, _ in nodes(SCHEMA) if "$" in path] == []


@pytest.mark.parametrize(
    ("override", "unknown"),
    [
        (
            {"containers": [{"name": "x", "imagePullPolicyy": "Always"}]},
            ["spec.podSpec.containers[0].imagePullPolicyy"],
        ),
        ({"tolerationz": []}, ["spec.podSpec.tolerationz"]),
        ({"containers": [{"name": "x", "$patch": "delete"}], "$setElementOrder/containers": [{"name": "x"}]}, []),
        ({"nodeSelector": {"any-key": "v"}, "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}]}, []),
    ],
)
def test_unknown_fields_are_named_but_directives_are_not(override: dict[str, Any], unknown: list[str]) -> None:
    assert unknown_fields(override) == unknown


def test_quantities_and_int_or_strings() -> None:
    container = SCHEMA["properties"]["containers"]["items"]
    limits = container["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    port = container["properties"]["readinessProbe"]["properties"]["httpGet"]["properties"]["port"]
    assert limits["x-kubernetes-int-or-string"] and port["x-kubernetes-int-or-string"]


def test_list_map_keys_are_defaulted_and_never_nullable() -> None:
    """The apiserver rejects a CRD whose list-map keys are neither required nor defaulted, or nullable."""
    seen = 0
    for path, node in nodes(SCHEMA):
        if node.get("x-kubernetes-list-type") != "map":
            continue
        items = node["items"]
        assert not items.get("nullable"), path
        for key in node["x-kubernetes-list-map-keys"]:
            prop = items["properties"][key]
            assert "default" in prop and not prop.get("nullable"), f"{path}.{key}"
            assert prop.get("type") in ("string", "integer"), f"{path}.{key}"
            seen += 1
    assert seen >= 20


def test_port_protocol_defaults_to_tcp() -> None:
    ports = SCHEMA["properties"]["containers"]["items"]["properties"]["ports"]
    assert ports["x-kubernetes-list-map-keys"] == ["containerPort", "protocol"]
    assert ports["items"]["properties"]["protocol"]["default"] == "TCP"


def test_set_lists_hold_scalars() -> None:
    for path, node in nodes(SCHEMA):
        if node.get("x-kubernetes-list-type") == "set":
            assert node["items"]["type"] in ("string", "integer"), path


def test_size_budget() -> None:
    size = len(json.dumps(SCHEMA, separators=(",", ":")))
    assert size < SIZE_BUDGET, f"podSpec schema is {size} bytes"


def test_source_version_is_recorded() -> None:
    assert kubernetes_source().startswith("k8s.io/kubernetes@v1.")


def test_vendored_schema_has_patch_metadata() -> None:
    containers = pod_spec_schema().prop("containers")
    assert containers is not None
    assert (containers.merge_key, containers.patch_strategies) == ("name", frozenset({"merge"}))
    volumes = pod_spec_schema().prop("volumes")
    assert volumes is not None and volumes.patch_strategies == {"merge", "retainKeys"}


# --------------------------------------------------------------------------------------------------------
# what validates
# --------------------------------------------------------------------------------------------------------


def test_tolerations_only_override_validates() -> None:
    assert validate({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}, SCHEMA) == []


def test_container_with_only_resources_validates() -> None:
    resources = {"limits": {"nvidia.com/gpu": 1, "cpu": "2", "memory": "8Gi"}, "requests": {"cpu": 1}}
    assert validate({"containers": [{"resources": resources}]}, SCHEMA) == []
    assert validate({"containers": [{"name": "model-api", "resources": resources}]}, SCHEMA) == []


def test_nulls_survive_for_deletion() -> None:
    override = {"securityContext": None, "nodeSelector": {"a": None}, "containers": [{"name": "x", "image": None}]}
    assert validate(override, SCHEMA) == []


@pytest.mark.parametrize("case", [c for c in CORPUS["cases"] if "expected" in c], ids=lambda c: c["name"])
def test_corpus_overrides_validate(case: dict[str, Any]) -> None:
    """Every directive the corpus uses has a place in the schema, so pruning keeps it."""
    assert validate(case["override"], SCHEMA) == []


@pytest.mark.parametrize(
    "override",
    [
        {"containers": {"name": "x"}},
        {"containers": [{"name": "x", "resources": "lots"}]},
        {"containers": [{"name": "x", "env": [{"name": "N", "value": 3}]}]},
        {"nodeSelector": {"$patch": 1}},
        {"hostNetwork": "yes"},
        {"containers": [{"name": None}]},
    ],
)
def test_invalid_overrides_fail(override: dict[str, Any]) -> None:
    assert validate(override, SCHEMA) != []


# --------------------------------------------------------------------------------------------------------
# the vendoring script
# --------------------------------------------------------------------------------------------------------


def load_vendor_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vendor_podspec_schema", ROOT / "hack" / "vendor_podspec_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vendor_script_trims_and_follows_refs() -> None:
    vendor = load_vendor_script()
    prefix = "#/components/schemas/"
    spec = {
        "components": {
            "schemas": {
                "io.k8s.api.core.v1.PodSpec": {
                    "description": "dropped",
                    "type": "object",
                    "required": ["containers"],
                    "properties": {
                        "containers": {
                            "type": "array",
                            "description": "dropped",
                            "items": {"allOf": [{"$ref": prefix + "C"}], "default": {}},
                            "x-kubernetes-patch-merge-key": "name",
                            "x-kubernetes-patch-strategy": "merge",
                        }
                    },
                },
                "C": {"type": "object", "properties": {"name": {"type": "string", "default": ""}}},
                "Unused": {"type": "string"},
            }
        }
    }
    document = vendor.vendored_document(spec, "v9.9.9")
    schemas = document["components"]["schemas"]
    assert set(schemas) == {"io.k8s.api.core.v1.PodSpec", "C"}
    assert document["x-source"]["module"] == "k8s.io/kubernetes@v9.9.9"
    assert schemas["io.k8s.api.core.v1.PodSpec"] == {
        "type": "object",
        "properties": {
            "containers": {
                "type": "array",
                "items": {"$ref": prefix + "C"},
                "x-kubernetes-patch-merge-key": "name",
                "x-kubernetes-patch-strategy": "merge",
            }
        },
    }
    assert schemas["C"]["properties"]["name"] == {"type": "string", "default": ""}
