"""Requests counted at the API server, per client, by verb and resource.

`apiserver_request_total` has no label for the user or the user agent, and the controller manager and
the stand-in kubelet write Deployments and pods at the same time as the operator. So each measured client
(the operator, the limit client) runs as its own ServiceAccount, and the API server's priority and fairness
(APF) classifies its requests: one FlowSchema per (client, verb, resource), on the `exempt` priority level
(no queueing, so nothing is slowed down), then one per (client, verb) for other resources and one for
non-resource URLs. `apiserver_flowcontrol_dispatched_requests_total{flow_schema}` counts each exactly.
Server-side apply is the verb `patch` here (APF sees the request's verb, not its content type).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from e2e.bench.client import Api, bounded

NAMESPACE = "kaos-bench"
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
RESOURCES = (
    "modelapis", "modelapis/status", "modelapis/scale", "deployments", "services", "configmaps", "secrets",
    "httproutes", "events", "pods", "leases", "poddisruptionbudgets", "persistentvolumeclaims", "replicasets",
    "namespaces", "customresourcedefinitions",
)
OTHER = "other"
NONRESOURCE = "nonresource"
PREFIX = "kaosbench"
MANAGER = "kaos-bench"
_SERIES = re.compile(r'^apiserver_flowcontrol_dispatched_requests_total\{flow_schema="' + PREFIX
                     + r'-([a-z0-9]+)-([a-z]+)-([a-z0-9.]+)",[^}]*\} (\S+)$', re.M)


def _schema(actor: str, verb: str, resource: str, precedence: int, rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
        "metadata": {"name": f"{PREFIX}-{actor}-{verb}-{resource.replace('/', '.')}"},
        "spec": {
            "matchingPrecedence": precedence,
            "priorityLevelConfiguration": {"name": "exempt"},
            "rules": [{"subjects": [{"kind": "ServiceAccount",
                                     "serviceAccount": {"name": actor, "namespace": NAMESPACE}}], **rule}],
        },
    }


def flow_schemas(actor: str, canary_namespace: str) -> list[dict[str, Any]]:
    """The FlowSchemas of one client; its requests in `canary_namespace` are counted apart (verb "any",
    resource "canary"), so that a probe ModelAPI there does not count as work on the measured set."""
    def resource_rule(verb: str, resources: list[str]) -> dict[str, Any]:
        return {"resourceRules": [{"verbs": [verb], "apiGroups": ["*"], "resources": resources,
                                   "clusterScope": True, "namespaces": ["*"]}]}

    schemas = [_schema(actor, "any", "canary", 90, {"resourceRules": [
        {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "namespaces": [canary_namespace]}]})]
    schemas += [_schema(actor, v, r, 100, resource_rule(v, [r])) for v in VERBS for r in RESOURCES]
    schemas += [_schema(actor, v, OTHER, 150, resource_rule(v, ["*"])) for v in VERBS]
    schemas.append(_schema(actor, "any", NONRESOURCE, 160,
                           {"nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}))
    return schemas


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None, timeout: float = 300) -> str:
    done = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


async def identity(admin: Api, kubeconfig: str, actor: str, folder: Path, canary_namespace: str) -> str:
    """A kubeconfig for ServiceAccount `actor` (cluster-admin), whose requests are counted apart. Returns its path."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": actor, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"{PREFIX}-{actor}"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": actor, "namespace": NAMESPACE}]},
    ]
    for doc in docs:
        await admin.apply(doc, MANAGER)
    schemas = flow_schemas(actor, canary_namespace)
    await bounded([lambda d=d: admin.apply(d, MANAGER) for d in schemas], 8)  # type: ignore[misc]
    await in_effect(admin, {d["metadata"]["name"] for d in schemas})
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 86400}}
    answer = await admin.request("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{actor}/token", request)
    config = yaml.safe_load(Path(kubeconfig).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config.get("current-context")) \
        if config.get("current-context") else config["contexts"][0]
    cluster = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])
    mine = {"apiVersion": "v1", "kind": "Config", "clusters": [cluster], "current-context": actor,
            "contexts": [{"name": actor, "context": {"cluster": cluster["name"], "user": actor}}],
            "users": [{"name": actor, "user": {"token": answer["status"]["token"]}}]}
    target = folder / f"{actor}.kubeconfig"
    target.write_text(yaml.safe_dump(mine))
    target.chmod(0o600)
    return str(target)


async def in_effect(admin: Api, names: set[str], timeout: float = 120) -> None:
    """Wait until APF classifies by every FlowSchema in `names`. Its config controller takes new ones in
    asynchronously (seconds on a loaded machine) and then writes each one's `Dangling` condition; a request
    before that goes to a built-in schema and is not counted (a smoke run once counted 4.6 writes per ModelAPI,
    fewer than the children written)."""
    deadline = time.monotonic() + timeout
    while True:
        listing = await admin.request("GET", "/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas")
        digested = {fs["metadata"]["name"] for fs in listing.get("items", [])
                    if any(c.get("type") == "Dangling" for c in (fs.get("status") or {}).get("conditions") or [])}
        if names <= digested:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"APF has not taken in {len(names - digested)} FlowSchemas after {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def ensure_namespace(admin: Api, name: str = NAMESPACE) -> None:
    await admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}, MANAGER)


def parse(text: str) -> dict[str, Counter[str]]:
    """actor -> Counter of "verb resource" -> requests, from the API server's /metrics text."""
    counts: dict[str, Counter[str]] = {}
    for actor, verb, resource, value in _SERIES.findall(text):
        counts.setdefault(actor, Counter())[f"{verb} {resource.replace('.', '/')}"] += int(float(value))
    return counts


async def snapshot(api: Api) -> dict[str, Counter[str]]:
    return parse(await api.raw("/metrics"))


def delta(after: dict[str, Counter[str]], before: dict[str, Counter[str]], actor: str) -> Counter[str]:
    diff = Counter(after.get(actor, Counter()))
    diff.subtract(before.get(actor, Counter()))
    return Counter({k: v for k, v in diff.items() if v > 0})


def writes(counts: Counter[str], resource: str | None = None) -> int:
    return sum(v for k, v in counts.items() if k.split()[0] in WRITE_VERBS
               and (resource is None or k.split()[1] == resource))


def requests_of(counts: Counter[str], verbs: tuple[str, ...]) -> int:
    return sum(v for k, v in counts.items() if k.split()[0] in verbs)


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="kaos-bench-"))
