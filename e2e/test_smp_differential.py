"""kaos_modelapi.smp against the API server's own strategic merge, on the corpus in tests/smp_corpus.yaml.

For each case the server merges the override itself (a dry-run strategic-merge PATCH of a Deployment whose
pod template is the corpus base) and, separately, defaults our merge (a dry-run create of a Deployment
whose pod template is `merge_pod_spec(base, override)`); both pod specs have then been through the same
server defaulting, so they compare like with like.

A second test installs a throwaway CRD whose spec.podSpec is `podspec_crd_schema()`: a real apiserver must
accept the schema, and must store every corpus override so that it still merges the same way (no pruned
directive, no dropped null).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.operator_process import crd_established
from kaos_modelapi.podspec_schema import podspec_crd_schema
from kaos_modelapi.smp import StrategicMergeError, merge_pod_spec

pytestmark = pytest.mark.cluster

CORPUS: dict[str, Any] = yaml.safe_load((Path(__file__).parent.parent / "tests" / "smp_corpus.yaml").read_text())
BASE: dict[str, Any] = CORPUS["base"]
CASES: list[dict[str, Any]] = CORPUS["cases"]
LABELS = {"app.kubernetes.io/name": "smp-differential"}
SMP = "application/strategic-merge-patch+json"


def deployment(name: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": LABELS},
            "template": {"metadata": {"labels": LABELS}, "spec": pod_spec},
        },
    }


async def raw(call: Any) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a kubernetes_asyncio call made with _preload_content=False."""
    response = await call
    try:
        return response.status, json.loads(await response.read())
    finally:
        response.release()


def pod_spec_of(body: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = body["spec"]["template"]["spec"]
    return spec


async def server_merge(apps: Any, namespace: str, override: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    patch = {"spec": {"template": {"spec": override}}}
    call = apps.patch_namespaced_deployment(
        "smp-base", namespace, patch, dry_run="All", _content_type=SMP, _preload_content=False
    )
    return await raw(call)


async def server_defaults(apps: Any, namespace: str, pod_spec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    call = apps.create_namespaced_deployment(
        namespace, deployment("smp-merged", pod_spec), dry_run="All", _preload_content=False
    )
    return await raw(call)


async def compare(apps: Any, namespace: str, case: dict[str, Any]) -> str | None:
    """None when the server agrees with the corpus case, else what differs."""
    status, patched = await server_merge(apps, namespace, case["override"])
    if "error" in case:
        return None if status >= 400 else f"server accepted an override we reject ({case['error']})"
    if status >= 400:
        if "server_differs" in case:
            return None
        return f"server rejected the override: {patched.get('message')}"
    created_status, created = await server_defaults(apps, namespace, merge_pod_spec(BASE, case["override"]))
    if created_status >= 400:
        return f"server rejected our merged pod spec: {created.get('message')}"
    same = pod_spec_of(patched) == pod_spec_of(created)
    if "server_differs" in case:
        return "server now agrees: drop server_differs from the corpus" if same else None
    if same:
        return None
    server, ours = json.dumps(pod_spec_of(patched), sort_keys=True), json.dumps(pod_spec_of(created), sort_keys=True)
    return f"pod specs differ:\n  server: {server}\n  ours:   {ours}"


async def test_server_merges_the_corpus_like_us(api_client: Any, namespace: str) -> None:
    from kubernetes_asyncio import client

    apps: Any = client.AppsV1Api(api_client)
    status, body = await raw(
        apps.create_namespaced_deployment(namespace, deployment("smp-base", BASE), _preload_content=False)
    )
    assert status == 201, body
    mismatches = {case["name"]: await compare(apps, namespace, case) for case in CASES}
    report = "\n".join(f"{name}: {problem}" for name, problem in mismatches.items() if problem)
    assert not report, report


# --------------------------------------------------------------------------------------------------------
# the CRD schema on a real apiserver
# --------------------------------------------------------------------------------------------------------


def probe_crd(group: str, plural: str) -> dict[str, Any]:
    spec_schema = {"type": "object", "properties": {"podSpec": podspec_crd_schema("A partial PodSpec.")}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": "SmpProbe", "listKind": "SmpProbeList"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": spec_schema}}},
                }
            ],
        },
    }


async def established(ext: Any, name: str) -> None:
    for _ in range(150):
        status, body = await raw(ext.read_custom_resource_definition(name, _preload_content=False))
        if status == 200 and crd_established(body):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"CRD {name} never became Established")


def contains(stored: Any, written: Any) -> bool:
    """Whether everything written survived storage (the apiserver may add defaults, never drop)."""
    if isinstance(written, dict):
        return isinstance(stored, dict) and all(k in stored and contains(stored[k], v) for k, v in written.items())
    if isinstance(written, list):
        return isinstance(stored, list) and len(stored) == len(written) and all(map(contains, stored, written))
    return bool(stored == written)


async def stored_override(custom: Any, group: str, plural: str, namespace: str, override: Any) -> tuple[int, Any]:
    body = {
        "apiVersion": f"{group}/v1",
        "kind": "SmpProbe",
        "metadata": {"name": "probe"},
        "spec": {"podSpec": override},
    }
    call = custom.create_namespaced_custom_object(
        group, "v1", namespace, plural, body, dry_run="All", _preload_content=False
    )
    status, created = await raw(call)
    return status, created.get("spec", {}).get("podSpec") if status < 400 else created.get("message")


async def same_once_defaulted(apps: Any, namespace: str, left: dict[str, Any], right: dict[str, Any]) -> bool:
    """Whether two pod specs are equal after server defaulting (the CRD adds e.g. ports' protocol: TCP)."""
    if left == right:
        return True
    (_, a), (_, b) = await server_defaults(apps, namespace, left), await server_defaults(apps, namespace, right)
    return "spec" in a and "spec" in b and pod_spec_of(a) == pod_spec_of(b)


async def check_stored(apps: Any, namespace: str, case: dict[str, Any], status: int, stored: Any) -> str | None:
    if "error" in case:
        if status >= 400:
            return None  # the CRD already refuses it (wrong types)
        try:
            merge_pod_spec(BASE, stored)
        except StrategicMergeError:
            return None
        return "stored override no longer fails to merge"
    if status >= 400:
        return f"rejected: {stored}"
    if not contains(stored, case["override"]):
        return f"pruned: wrote {json.dumps(case['override'])}, stored {json.dumps(stored)}"
    ours, theirs = merge_pod_spec(BASE, stored), merge_pod_spec(BASE, case["override"])
    if not await same_once_defaulted(apps, namespace, ours, theirs):
        return "the stored override (with the CRD's defaults) merges differently"
    return None


async def test_crd_schema_is_accepted_and_keeps_overrides(api_client: Any, namespace: str) -> None:
    from kubernetes_asyncio import client

    ext: Any = client.ApiextensionsV1Api(api_client)
    apps: Any = client.AppsV1Api(api_client)
    custom: Any = client.CustomObjectsApi(api_client)
    suffix = secrets.token_hex(3)
    group, plural = f"smp-{suffix}.kaos.test", f"smpprobes{suffix}"
    crd = probe_crd(group, plural)
    status, body = await raw(ext.create_custom_resource_definition(crd, _preload_content=False))
    assert status == 201, body.get("message")
    try:
        await established(ext, crd["metadata"]["name"])
        problems = {}
        for case in CASES:
            status, stored = await stored_override(custom, group, plural, namespace, case["override"])
            problems[case["name"]] = await check_stored(apps, namespace, case, status, stored)
        report = "\n".join(f"{name}: {problem}" for name, problem in problems.items() if problem)
        assert not report, report
    finally:
        await raw(ext.delete_custom_resource_definition(crd["metadata"]["name"], _preload_content=False))
