"""Fixtures for the operator's end-to-end tests: the CRD installed, the operator running."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from e2e import chart
from e2e.operator_process import GATEWAY_NAME, GATEWAY_NAMESPACE, Kubectl, OperatorProcess

RESYNC_SECONDS = 10


@pytest.fixture(scope="session")
def kubectl(kubeconfig: str) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture(scope="session")
def crd(kubectl: Kubectl) -> str:
    """The ModelAPI CRD, installed the way a user would: client-side `kubectl apply -f`."""
    manifest = subprocess.run([sys.executable, "-m", "kaos_modelapi", "crd"], capture_output=True, text=True,
                              check=True).stdout
    kubectl.run("apply", "-f", "-", stdin=manifest)
    kubectl.wait_established("modelapis.kaos.tools")
    return "modelapis.kaos.tools"




@pytest.fixture(scope="session")
def chart_credentials(kubectl: Kubectl, crd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kubeconfig holding a token of the chart's ServiceAccount, bound by exactly the chart's RBAC: the
    session operator runs with it, so the whole controller suite proves those permissions are enough."""
    # Fresh names each session: a previous session's namespace may still be terminating.
    release = f"kaos-e2e-{secrets.token_hex(3)}"
    objs = chart.render(chart.build_helm(), release, release)
    rbac = [o for o in objs if o["kind"] in {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                             "RoleBinding"}]
    kubectl.run("create", "namespace", release)
    kubectl.run("apply", "-f", "-", stdin=chart.manifest(rbac))
    (account,) = [o["metadata"]["name"] for o in rbac if o["kind"] == "ServiceAccount"]
    path = tmp_path_factory.mktemp("chart") / "kubeconfig"
    try:
        yield str(chart.service_account_kubeconfig(kubectl, release, account, path))
    finally:
        for obj in rbac:
            if obj["kind"].startswith("Cluster"):
                kubectl.run("delete", obj["kind"].lower(), obj["metadata"]["name"], "--wait=false", check=False)
        kubectl.run("delete", "namespace", release, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator(chart_credentials: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator for the session, as the chart's ServiceAccount, configured with a Gateway so that
    HTTPRoutes are in play."""
    process = OperatorProcess(
        chart_credentials,
        args=["--gateway-name", GATEWAY_NAME, "--gateway-namespace", GATEWAY_NAMESPACE,
              "--resync-period", str(RESYNC_SECONDS)],
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
