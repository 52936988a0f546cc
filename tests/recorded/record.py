"""Record what the API server holds for a converged ModelAPI, for the reconciler's unit tests.

Run against a cluster where the operator has made `NAME` Ready (e.g. `make dev`, then
`python tests/recorded/record.py mock-api default > tests/recorded/proxy-mock.yaml`). Objects pass through the
operator's own cache transforms, so a Secret keeps its identity only, never its data, as in the operator.
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from kaos_modelapi import controller

KINDS = ("modelapi", "configmap", "secret", "deployment", "service", "pod")


def get(kind: str, namespace: str, *selector: str) -> list[dict[str, object]]:
    out = subprocess.run(["kubectl", "get", kind, "-n", namespace, "-o", "json", *selector],
                         capture_output=True, text=True, check=True).stdout
    items: list[dict[str, object]] = json.loads(out)["items"]
    return items


def main(name: str, namespace: str) -> None:
    objects = [o for o in get("modelapi", namespace) if o["metadata"]["name"] == name]  # type: ignore[index]
    for kind in KINDS[1:]:
        objects += get(kind, namespace, "-l", f"modelapi={name}")
    transform = {"Secret": controller.secret_identity, "Pod": controller.pod_status_only}
    recorded = [transform.get(str(o["kind"]), controller.strip_managed)(o) for o in objects]
    yaml.safe_dump_all(recorded, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(*sys.argv[1:3])
