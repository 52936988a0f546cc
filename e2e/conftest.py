"""Fixtures for the operator's end-to-end tests: the CRD installed, the operator running."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

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
    kubectl.run("wait", "--for=condition=Established", "crd/modelapis.kaos.tools", "--timeout=30s")
    return "modelapis.kaos.tools"


@pytest.fixture(scope="session")
def operator(kubeconfig: str, crd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator for the session, configured with a Gateway so that HTTPRoutes are in play."""
    process = OperatorProcess(
        kubeconfig,
        args=["--gateway-name", GATEWAY_NAME, "--gateway-namespace", GATEWAY_NAMESPACE,
              "--resync-period", str(RESYNC_SECONDS)],
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
