"""Leader election: one writer at a time, a standby takes over, a leader that lost its Lease stops writing."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from e2e.operator_process import Kubectl, OperatorProcess, metric_value, wait_until

pytestmark = pytest.mark.cluster

LEASE = "kaos-modelapi-test-leader"
FAST_LEASE = ["--leader-elect", "--leader-election-id", LEASE, "--leader-election-namespace", "default",
              "--leader-elect-lease-duration", "6", "--leader-elect-renew-deadline", "4",
              "--leader-elect-retry-period", "1"]


def leading(process: OperatorProcess) -> bool:
    return metric_value(process.metrics(), "leader_election_master_status", name=LEASE) == 1


def mock(name: str) -> str:
    return yaml.safe_dump({"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": name},
                           "spec": {"mode": "Proxy", "proxyConfig": {"model": "gpt-4o-mini"}}})


def writes(process: OperatorProcess) -> float:
    text = process.metrics()
    return sum(metric_value(text, "rest_client_requests_total", method=m) for m in ("POST", "PATCH", "DELETE"))


async def test_standby_takes_over_and_a_deposed_leader_stops_writing(
    kubeconfig: str, crd: str, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    kubectl.run("delete", "lease", LEASE, "-n", "default", "--ignore-not-found")
    first = OperatorProcess(kubeconfig, args=FAST_LEASE, log_path=tmp_path / "first.log")
    second = OperatorProcess(kubeconfig, args=FAST_LEASE, log_path=tmp_path / "second.log")
    third = OperatorProcess(kubeconfig, args=FAST_LEASE, log_path=tmp_path / "third.log")
    try:
        first.start()
        wait_until(lambda: leading(first), 30, "the first operator leading")
        second.start()
        kubectl.apply(mock("before"), namespace)
        kubectl.wait_phase("before", namespace, "Ready")
        assert not leading(second)
        assert writes(second) == 0  # a standby never writes

        first.stop(signal.SIGKILL)  # no chance to release the Lease
        wait_until(lambda: leading(second), 30, "the standby taking over")
        kubectl.apply(mock("after-failover"), namespace)
        kubectl.wait_phase("after-failover", namespace, "Ready")

        third.start()

        def steal() -> bool:  # the leader renews every second: retry on a resourceVersion conflict
            lease = json.loads(kubectl.run("get", "lease", LEASE, "-n", "default", "-o", "json").stdout)
            lease["spec"]["holderIdentity"] = "someone-else"
            lease["spec"]["renewTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            return kubectl.run("replace", "-f", "-", stdin=json.dumps(lease), check=False).returncode == 0

        wait_until(steal, 20, "the Lease taken by someone else")
        assert second.proc is not None
        code = second.proc.wait(timeout=30)
        assert code != 0  # it exits so that a fresh process stands for election
        log = (tmp_path / "second.log").read_text()
        after_loss = log[log.index("leadership lost"):]
        for decision in ("created", "updated", "deleted", "status"):
            assert f" {decision} " not in after_loss and f"[{decision}" not in after_loss, after_loss

        wait_until(lambda: leading(third), 40, "the third operator leading once the stolen Lease expires")
        kubectl.apply(mock("after-steal"), namespace)
        kubectl.wait_phase("after-steal", namespace, "Ready")
    finally:
        for process in (first, second, third):
            process.stop()
