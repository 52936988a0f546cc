"""`kaos-modelapi run` when it cannot start: one line that says what to do, a non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from e2e import chart, cluster
from e2e.operator_process import Kubectl

pytestmark = pytest.mark.cluster


def run_operator(kubeconfig: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kaos_modelapi", "run", "--kubeconfig", kubeconfig,
                           "--metrics-bind-address", "0", "--health-probe-bind-address", "0", *flags],
                          capture_output=True, text=True, timeout=90)


def failed_with(done: subprocess.CompletedProcess[str], *hints: str) -> str:
    """The one line the operator ended with; it must be an error naming all `hints`."""
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr
    for hint in hints:
        assert hint in last, last
    return last


def test_a_kubeconfig_that_does_not_exist(tmp_path: Path) -> None:
    failed_with(run_operator(str(tmp_path / "nope")), "cannot load the kubeconfig", "nope", "--kubeconfig")


def test_a_kubeconfig_that_does_not_parse(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [ {name: x\n")
    failed_with(run_operator(str(bad)), "cannot load the kubeconfig", str(bad))


def test_bad_flags_are_refused_before_anything_starts(tmp_path: Path) -> None:
    done = run_operator(str(tmp_path / "unused"), "--workers", "0")
    assert done.returncode == 2
    failed_with(done, "--workers must be at least 1")


def test_an_api_server_that_does_not_answer(kubeconfig: str, tmp_path: Path) -> None:
    config = yaml.safe_load(Path(kubeconfig).read_text())
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    moved = tmp_path / "kubeconfig"
    moved.write_text(yaml.safe_dump(config))
    failed_with(run_operator(str(moved)), "cannot reach the API server")


def test_a_port_in_use(kubeconfig: str, crd: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        done = run_operator(kubeconfig, "--metrics-bind-address", address)
    failed_with(done, "--metrics-bind-address", address, "choose a free address")


def test_rbac_that_forbids_a_list(kubectl: Kubectl, crd: str, namespace: str, tmp_path: Path) -> None:
    kubectl.run("create", "serviceaccount", "powerless", "-n", namespace)
    powerless = chart.service_account_kubeconfig(kubectl, namespace, "powerless", tmp_path / "kubeconfig")
    failed_with(run_operator(str(powerless)), "RBAC forbids listing", "grant get/list/watch")


@pytest.fixture
def cluster_without_the_crd(tmp_path: Path) -> Iterator[str]:
    started = cluster.start(tmp_path / "cluster", cluster.free_ports(), exit_with_parent=True)
    try:
        yield str(started.kubeconfig)
    finally:
        cluster.stop(cluster=started)


def test_a_missing_crd(cluster_without_the_crd: str) -> None:
    failed_with(run_operator(cluster_without_the_crd), "ModelAPI CRD", "kubectl apply -f config/crd/bases/")
