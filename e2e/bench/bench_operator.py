"""Benchmark: N ModelAPIs from apply to Ready, then a restart and a resync on the converged set.

Prints figures (no assertions): time to converge, the operator's memory, and the API requests it made,
counted by the operator (rest_client_requests_total) and by the API server (apiserver_request_total).

    make bench                 # N=100
    BENCH_N=500 make bench
Uses the control plane of `make cluster` when it runs (or $KUBECONFIG), else starts a private one.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml

from e2e import cluster
from e2e.operator_process import (
    Kubectl,
    OperatorProcess,
    apiserver_writes,
    metric_value,
    wait_until,
)

RESOURCES = ("modelapis", "deployments", "services", "configmaps", "secrets", "httproutes", "events")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def manifests(n: int) -> str:
    docs = []
    for i in range(n):
        spec = ({"mode": "Proxy", "proxyConfig": {"model": f"model-{i}"}} if i % 2 == 0
                else {"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m"}})
        docs.append({"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
                     "metadata": {"name": f"bench-{i}"}, "spec": spec})
    return yaml.safe_dump_all(docs)


def requests_by_method(operator: OperatorProcess) -> dict[str, int]:
    text = operator.metrics()
    return {m: int(metric_value(text, "rest_client_requests_total", method=m))
            for m in ("GET", "POST", "PATCH", "PUT", "DELETE")}


def ready_count(kubectl: Kubectl, namespace: str) -> int:
    items = kubectl.list("modelapis", namespace)
    return sum(1 for o in items if (o.get("status") or {}).get("phase") == "Ready")


def run(kubeconfig: str, n: int) -> None:
    kubectl = Kubectl(kubeconfig)
    crd = os.popen(f"{sys.executable} -m kaos_modelapi crd").read()
    kubectl.run("apply", "-f", "-", stdin=crd)
    kubectl.wait_established("modelapis.kaos.tools")
    namespace = f"bench-{int(time.time())}"
    kubectl.run("create", "namespace", namespace)
    log = Path(tempfile.mkdtemp()) / "operator.log"
    operator = OperatorProcess(kubeconfig, args=["--resync-period", "30", "--log-level", "info"], log_path=log)
    operator.start()
    try:
        assert operator.proc is not None
        idle_rss = rss_mib(operator.proc.pid)
        started = time.monotonic()
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=manifests(n))
        wait_until(lambda: ready_count(kubectl, namespace) == n, 60 + 2 * n, f"{n} ModelAPIs Ready")
        converge = time.monotonic() - started
        converged_rss = rss_mib(operator.proc.pid)
        converge_requests = requests_by_method(operator)

        operator.restart()
        assert operator.proc is not None
        before = apiserver_writes(kubectl.raw_metrics(), RESOURCES)
        reconciles = metric_value(operator.metrics(), "controller_runtime_reconcile_total")
        wait_until(lambda: metric_value(operator.metrics(), "controller_runtime_reconcile_total")
                   >= reconciles + n, 120, "a full resync")
        writes_after_restart = apiserver_writes(kubectl.raw_metrics(), RESOURCES) - before
        print(f"ModelAPIs:                         {n} (half Proxy/mock, half Hosted)")
        print(f"apply to all Ready:                {converge:.1f} s ({n / converge:.1f} ModelAPIs/s)")
        print(f"operator RSS idle / converged:     {idle_rss:.0f} MiB / {converged_rss:.0f} MiB")
        print(f"operator requests to converge:     {converge_requests}")
        print(f"  writes per ModelAPI:             "
              f"{(converge_requests['POST'] + converge_requests['PATCH']) / n:.1f}")
        print(f"restart + full resync, requests:   {requests_by_method(operator)}")
        print(f"restart + full resync, writes seen by the API server: {writes_after_restart:.0f}")
        print(f"operator RSS after restart+resync: {rss_mib(operator.proc.pid):.0f} MiB")
    finally:
        operator.stop()
        kubectl.run("delete", "namespace", namespace, "--wait=false")


def main() -> int:
    n = int(os.environ.get("BENCH_N", "100"))
    if os.environ.get("KUBECONFIG"):
        run(os.environ["KUBECONFIG"], n)
    elif cluster.is_running():
        run(str(cluster.state_dir() / "kubeconfig"), n)
    else:
        state = Path(tempfile.mkdtemp(prefix="kaos-bench-"))
        started = cluster.start(state, cluster.free_ports(), exit_with_parent=True)
        try:
            run(str(started.kubeconfig), n)
        finally:
            cluster.stop(cluster=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
