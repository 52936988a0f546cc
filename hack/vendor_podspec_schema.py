#!/usr/bin/env python3
"""Regenerate kaos_modelapi/schemas/podspec.json from Kubernetes' published OpenAPI v3 spec.

The operator needs PodSpec's schema twice: to build the CRD field spec.podSpec and to drive
strategic-merge-patch. Both must follow the Kubernetes release the operator targets, so the
schema is vendored from the k8s.io/kubernetes Go module rather than written by hand.

Usage:
    hack/vendor_podspec_schema.py --version v1.35.0          # fetches the module via `go mod download`
    hack/vendor_podspec_schema.py --openapi path/to/api__v1_openapi.json --version v1.35.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = "io.k8s.api.core.v1.PodSpec"
SPEC_PATH = "api/openapi-spec/v3/api__v1_openapi.json"
REF_PREFIX = "#/components/schemas/"
OUTPUT = Path(__file__).resolve().parent.parent / "kaos_modelapi" / "schemas" / "podspec.json"

# Everything the CRD generator and the SMP engine read; descriptions are the bulk of the
# upstream file and neither consumer needs them.
KEPT_KEYS = frozenset(
    {
        "type",
        "properties",
        "items",
        "additionalProperties",
        "format",
        "enum",
        "oneOf",
        "x-kubernetes-patch-merge-key",
        "x-kubernetes-patch-strategy",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
    }
)


def module_spec_file(version: str) -> Path:
    """Download k8s.io/kubernetes@version into the Go module cache and return its v1 spec file."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["go", "mod", "init", "vendorpodspec"], cwd=tmp, check=True, capture_output=True)
        out = subprocess.run(
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
            cwd=tmp,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return Path(json.loads(out)["Dir"]) / SPEC_PATH


def ref_name(ref: str) -> str:
    if not ref.startswith(REF_PREFIX):
        raise ValueError(f"unexpected $ref {ref!r}")
    return ref[len(REF_PREFIX) :]


def trim(node: Any) -> Any:
    """Keep only structural and patch metadata; unwrap `allOf: [{$ref}]` into a plain $ref."""
    if isinstance(node, list):
        return [trim(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and "$ref" in all_of[0]:
        out["$ref"] = all_of[0]["$ref"]
    elif "$ref" in node:
        out["$ref"] = node["$ref"]
    elif "allOf" in node:
        raise ValueError(f"allOf with more than a single $ref is not supported: {node['allOf']!r}")
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: trim(prop) for name, prop in value.items()}
        elif key in KEPT_KEYS:
            out[key] = trim(value)
        elif key == "default" and not isinstance(value, dict | list):
            # Scalar defaults are what a CRD needs for list-map keys (e.g. ports' protocol: TCP);
            # object defaults ({}) are generator noise.
            out[key] = value
    return out


def refs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield ref_name(value)
            else:
                yield from refs_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs_in(value)


def closure(schemas: dict[str, Any], root: str) -> dict[str, Any]:
    """Trimmed definitions of root and every definition it references, transitively."""
    found: dict[str, Any] = {}
    pending = [root]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found[name] = trim(schemas[name])
        pending.extend(refs_in(found[name]))
    return dict(sorted(found.items()))


def vendored_document(spec: dict[str, Any], version: str) -> dict[str, Any]:
    return {
        "x-source": {"module": f"k8s.io/kubernetes@{version}", "file": SPEC_PATH},
        "x-generated-by": "hack/vendor_podspec_schema.py",
        "root": ROOT,
        "components": {"schemas": closure(spec["components"]["schemas"], ROOT)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", required=True, help="k8s.io/kubernetes module version, e.g. v1.35.0")
    parser.add_argument("--openapi", type=Path, help="api__v1_openapi.json to read instead of the module")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    spec_file = args.openapi or module_spec_file(args.version)
    document = vendored_document(json.loads(spec_file.read_text()), args.version)
    args.output.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.output} ({len(document['components']['schemas'])} definitions)")


if __name__ == "__main__":
    main()
