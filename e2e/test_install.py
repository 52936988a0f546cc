"""Installing the operator the way users do, against a real API server.

- The Helm chart (`helm template`, pinned helm from hack/helm) and `kubectl apply -k config/default` are
  applied with server-side dry-run: the API server admits every object (schemas, RBAC, CRD size for
  client-side apply).
- A real install: no image can run here (the stand-in kubelet marks pods Ready without running them), so
  the chart's CRD, ServiceAccount and RBAC are applied for real, and the operator runs as a local process
  with the arguments of the chart's Deployment and a token of the chart's ServiceAccount (TokenRequest), so
  every request it makes is authorized by the chart's RBAC and nothing else. A sample ModelAPI must reach
  phase Ready, with no request refused.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.chart import CHART, build_helm, manifest, render, service_account_kubeconfig
from e2e.operator_process import (
    Kubectl,
    OperatorProcess,
    metric_value,
    wait_until,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "config" / "samples" / "proxy-mock.yaml"
KUSTOMIZE_NAMESPACE = "kaos-system"
# Flags the test sets itself: loopback ports and readable logs (OperatorProcess), the kubeconfig.
LOCAL_FLAGS = ("--metrics-bind-address", "--health-probe-bind-address", "--log-level", "--log-format",
               "--kubeconfig")

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> str:
    return build_helm()


def dry_run(kubectl: Kubectl, *args: str, stdin: str | None = None) -> str:
    done = kubectl.run("apply", "--dry-run=server", *args, stdin=stdin, check=False)
    assert done.returncode == 0, f"the API server refused:\n{done.stderr}"
    return done.stdout


def release_name() -> str:
    return f"kaos-{secrets.token_hex(3)}"


@pytest.fixture
def extra_namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-install-watched-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", name)
    kubectl.run("label", "namespace", name, "kaos.tools/test=true")
    wait_until(lambda: kubectl.get("serviceaccount", "default", name), 30, f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        kubectl.run("delete", "namespace", name, "--wait=false", check=False)


# --- server-side dry-run --------------------------------------------------------------------------------


async def test_chart_is_admitted_by_the_api_server(kubectl: Kubectl, helm: str, namespace: str) -> None:
    objs = render(helm, release_name(), namespace, "--include-crds")
    out = dry_run(kubectl, "-f", "-", stdin=manifest(objs))
    assert out.count("(server dry run)") == len(objs), out


async def test_namespaced_chart_is_admitted_by_the_api_server(kubectl: Kubectl, helm: str, namespace: str,
                                                             extra_namespace: str) -> None:
    objs = render(helm, release_name(), namespace, "--set", f"watchNamespaces={{{extra_namespace}}}")
    assert {o["kind"] for o in objs} >= {"Role", "RoleBinding"}
    assert not [o for o in objs if o["kind"].startswith("Cluster")]
    out = dry_run(kubectl, "-f", "-", stdin=manifest(objs))
    assert out.count("(server dry run)") == len(objs), out


async def test_kustomize_default_is_admitted_by_the_api_server(kubectl: Kubectl) -> None:
    # A dry-run never creates the Namespace, and the API server refuses objects in a namespace that does not
    # exist: make kaos-system exist for this check (removed again if this test made it).
    created = kubectl.run("get", "namespace", KUSTOMIZE_NAMESPACE, check=False).returncode != 0
    if created:
        kubectl.run("create", "namespace", KUSTOMIZE_NAMESPACE)
    try:
        out = dry_run(kubectl, "-k", str(REPO / "config" / "default"))
    finally:
        if created:
            kubectl.run("delete", "namespace", KUSTOMIZE_NAMESPACE, "--wait=false", check=False)
    rendered = kubectl.run("kustomize", str(REPO / "config" / "default")).stdout
    assert out.count("(server dry run)") == len([d for d in yaml.safe_load_all(rendered) if d]), out


# --- a real install, the operator running as the chart's ServiceAccount -------------------------------


def operator_args(deployment: Obj, namespace: str) -> list[str]:
    """The chart container's args, with $(POD_NAMESPACE) expanded as the kubelet would, minus LOCAL_FLAGS."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: namespace for e in container["env"] if e["name"] == "POD_NAMESPACE"}
    assert env, "the chart must give the operator POD_NAMESPACE"
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    return [a for a in args if not a.startswith(LOCAL_FLAGS)]


def can_i(kubectl: Kubectl, kubeconfig: Path, *args: str) -> bool:
    done = kubectl.run("--kubeconfig", str(kubeconfig), "auth", "can-i", *args, check=False)
    return done.stdout.strip() == "yes"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
async def test_installed_chart_runs_the_operator(kubectl: Kubectl, helm: str, namespace: str,
                                                 extra_namespace: str, mode: str,
                                                 tmp_path: Path) -> None:
    release = release_name()
    watched = namespace if mode == "cluster-wide" else extra_namespace
    flags = [] if mode == "cluster-wide" else ["--set", f"watchNamespaces={{{watched}}}"]
    objs = render(helm, release, namespace, *flags)
    rbac_and_identity = [o for o in objs if o["kind"] not in {"Deployment", "Service"}]
    cluster_scoped = [o for o in rbac_and_identity if o["kind"].startswith("Cluster")]
    assert bool(cluster_scoped) == (mode == "cluster-wide")

    # The CRD as a user installs it (client-side apply); the session's other tests apply the same one.
    kubectl.run("apply", "-f", str(CHART / "crds" / "modelapis.kaos.tools.yaml"))
    kubectl.wait_established("modelapis.kaos.tools")
    kubectl.run("apply", "-f", "-", stdin=manifest(rbac_and_identity))
    try:
        (sa,) = [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"]
        kubeconfig = service_account_kubeconfig(kubectl, namespace, sa, tmp_path / "sa-kubeconfig")
        # The identity is the chart's, with exactly the chart's rights.
        assert can_i(kubectl, kubeconfig, "watch", "modelapis.kaos.tools", "-n", watched)
        assert can_i(kubectl, kubeconfig, "create", "secrets", "-n", watched)
        assert not can_i(kubectl, kubeconfig, "update", "secrets", "-n", watched)
        assert not can_i(kubectl, kubeconfig, "create", "pods", "-n", watched)
        # A pull's progress comes from the tail of its log: reading logs, and nothing else of a pod's insides.
        assert can_i(kubectl, kubeconfig, "get", "pods", "--subresource=log", "-n", watched)
        assert not can_i(kubectl, kubeconfig, "create", "pods", "--subresource=exec", "-n", watched)
        assert not can_i(kubectl, kubeconfig, "get", "pods", "-n", watched)
        assert can_i(kubectl, kubeconfig, "list", "modelapis.kaos.tools", "--all-namespaces") == (
            mode == "cluster-wide")

        (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
        args = operator_args(deployment, namespace)
        if mode == "cluster-wide":
            # Same rights, but serve only this test's namespace: other tests' ModelAPIs are not ours to touch.
            args.append(f"--namespaces={watched}")
        operator = OperatorProcess(str(kubeconfig), args=args, log_path=tmp_path / "operator.log")
        try:
            operator.start()  # inside the try: a start that times out still stops the process
            kubectl.apply(SAMPLE.read_text(), watched)
            name = yaml.safe_load(SAMPLE.read_text())["metadata"]["name"]
            status = kubectl.wait_phase(name, watched, "Ready", timeout=120)
            assert status["ready"] is True

            # This process leads on the Lease in the release namespace, and keeps renewing it.
            lease = kubectl.get("lease", "kaos-modelapi", namespace)
            assert lease is not None
            first_renewal = lease["spec"]["renewTime"]

            def renewed() -> bool:
                now = kubectl.get("lease", "kaos-modelapi", namespace) or {}
                return bool(now.get("spec", {}).get("renewTime") != first_renewal)

            wait_until(renewed, 60, "the leader to renew its Lease")
            metrics = operator.metrics()
            assert metric_value(metrics, "leader_election_master_status") == 1
            assert metric_value(metrics, "controller_runtime_reconcile_total", result="success") >= 1
        finally:
            code = operator.stop()
        log = operator.log_path.read_text()
        assert code == 0, log[-4000:]
        # A clean stop gives the Lease up (a standby takes over at once) ...
        lease = kubectl.get("lease", "kaos-modelapi", namespace)
        assert lease is not None and not lease["spec"].get("holderIdentity"), lease
        # ... and over the whole run the API server refused this identity nothing.
        assert "Forbidden" not in log and "Unauthorized" not in log, log[-4000:]
        refused = {code: metric_value(metrics, "rest_client_requests_total", code=code) for code in ("401", "403")}
        assert refused == {"401": 0, "403": 0}
    finally:
        for obj in cluster_scoped:
            kubectl.run("delete", obj["kind"].lower(), obj["metadata"]["name"], "--wait=false", check=False)


async def test_installed_kustomize_base_runs_the_operator(kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    """`kubectl apply -k config/default` for real, then the operator as its ServiceAccount serves a sample."""
    rendered = [d for d in yaml.safe_load_all(kubectl.run("kustomize", str(REPO / "config" / "default")).stdout)
                if d]
    cluster_scoped = [o for o in rendered if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}]

    def not_terminating() -> bool:  # the dry-run test above may have just deleted it
        ns = kubectl.get("namespace", KUSTOMIZE_NAMESPACE, "default")
        return ns is None or ns["status"].get("phase") != "Terminating"

    wait_until(not_terminating, 120, f"namespace {KUSTOMIZE_NAMESPACE} not terminating")
    kubectl.run("apply", "-k", str(REPO / "config" / "default"))
    try:
        kubectl.wait_established("modelapis.kaos.tools")
        (sa,) = [o["metadata"]["name"] for o in rendered if o["kind"] == "ServiceAccount"]
        kubeconfig = service_account_kubeconfig(kubectl, KUSTOMIZE_NAMESPACE, sa, tmp_path / "sa-kubeconfig")
        (deployment,) = [o for o in rendered if o["kind"] == "Deployment"]
        args = [*operator_args(deployment, KUSTOMIZE_NAMESPACE), f"--namespaces={namespace}"]
        operator = OperatorProcess(str(kubeconfig), args=args, log_path=tmp_path / "operator.log")
        try:
            operator.start()
            kubectl.apply(SAMPLE.read_text(), namespace)
            name = yaml.safe_load(SAMPLE.read_text())["metadata"]["name"]
            assert kubectl.wait_phase(name, namespace, "Ready", timeout=120)["ready"] is True
            metrics = operator.metrics()
        finally:
            code = operator.stop()
        log = operator.log_path.read_text()
        assert code == 0, log[-4000:]
        assert "Forbidden" not in log, log[-4000:]
        assert metric_value(metrics, "rest_client_requests_total", code="403") == 0
    finally:
        # Not the CRD: deleting it would delete every ModelAPI of the other tests.
        for obj in cluster_scoped:
            kubectl.run("delete", obj["kind"].lower(), obj["metadata"]["name"], "--wait=false", check=False)
        kubectl.run("delete", "namespace", KUSTOMIZE_NAMESPACE, "--wait=false", check=False)


# --- RBAC the cluster enforces beyond the operator's own calls -------------------------------------------


def role(name: str, namespace: str, rules: list[Obj]) -> str:
    account = {"kind": "ServiceAccount", "name": "limited", "namespace": namespace}
    return manifest([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace}, "subjects": [account],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}},
    ])


async def test_blocking_owner_deletion_needs_the_finalizers_permission_the_chart_grants(
    kubectl: Kubectl, helm: str, crd: str, namespace: str
) -> None:
    """Children carry `blockOwnerDeletion`, which clusters with OwnerReferencesPermissionEnforcement (OpenShift;
    the local control plane enables it) allow only to who may update the owner's finalizers."""
    if os.environ.get("KUBECONFIG"):
        pytest.skip("only the local control plane is known to enforce OwnerReferencesPermissionEnforcement")
    finalizers = {"apiGroups": ["kaos.tools"], "resources": ["modelapis/finalizers"], "verbs": ["update"]}
    chart_rules = [r for o in render(helm, release_name(), namespace) if o["kind"] == "ClusterRole"
                   for r in o["rules"]]
    assert finalizers in chart_rules

    owner = {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "name": "owner", "uid": str(uuid.uuid4()),
             "controller": True, "blockOwnerDeletion": True}
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "ownerReferences": [owner]}}

    def create_child() -> subprocess.CompletedProcess[str]:
        return kubectl.run("--as", f"system:serviceaccount:{namespace}:limited", "create", "--dry-run=server",
                           "-n", namespace, "-f", "-", stdin=json.dumps(child), check=False)

    kubectl.apply(role("configmaps", namespace, [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}]), namespace)

    def refused_for_blocking_owner_deletion() -> bool:
        done = create_child()
        return done.returncode != 0 and "Forbidden" in done.stderr and "blockOwnerDeletion" in done.stderr

    wait_until(refused_for_blocking_owner_deletion, 30, "a create refused for blockOwnerDeletion alone")
    kubectl.apply(role("finalizers", namespace, [finalizers]), namespace)
    wait_until(lambda: create_child().returncode == 0, 30, "the create allowed with the finalizers permission")
