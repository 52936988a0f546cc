"""Faults injected while a few hundred ModelAPIs converge; the operator (a real `kaos-modelapi run`) must end
with every ModelAPI converged: its children there once each and owned by it, status written for its latest
generation, Ready; no ModelAPI lost, no duplicate or orphaned child. Each recovery time is printed, never
asserted.

The file runs its own control plane (free ports, its own state folder, removed at the end): killing and
restarting one would disturb the other test files of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import cluster
from e2e.faults import FaultProxy, TcpProxy, kubeconfig_via
from e2e.operator_process import Kubectl, OperatorProcess, metric_value, wait_until

pytestmark = pytest.mark.cluster

N = int(os.environ.get("KAOS_FAULTS_MODELAPIS", "200"))  # ModelAPIs converging during each fault
WATCH_TIMEOUT = 5  # --watch-timeout: each watch lasts 5-10 s, so that an outage can outlast one
STALL_SECONDS = 2 * WATCH_TIMEOUT + 5
KILLS = 5
CONVERGE_TIMEOUT = 180.0
CHILD_KINDS = {"ConfigMap", "Secret", "Deployment", "Service"}  # of a Proxy ModelAPI without a Gateway
LEASE = "kaos-modelapi-faults"
# Shorter than the defaults (15, 10, 2 s), with room for a loaded machine: a renewal may take a second.
FAST_LEASE = ["--leader-elect", "--leader-election-id", LEASE, "--leader-election-namespace", "default",
              "--leader-elect-lease-duration", "12", "--leader-elect-renew-deadline", "8",
              "--leader-elect-retry-period", "2"]


Report = Callable[[str, str], None]


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """Recovery times go to the terminal whether or not pytest captures output (measured, never asserted)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(fault: str, what: str) -> None:
        line = f"[faults] {fault}: {what}"
        if capture is None:
            print(line)
            return
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    return say


# ------------------------------------------------------------------------------ the private cluster


@dataclass
class Private:
    """This file's own control plane, which a test may kill and restart on the same data."""

    state: Path
    ports: dict[str, int]
    cluster: cluster.Cluster
    kubectl: Kubectl
    restarts: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    def kill(self) -> None:
        """SIGKILL to the whole control plane (etcd, kube-apiserver, controllers, stand-in kubelet)."""
        os.killpg(self.cluster.pid, signal.SIGKILL)
        if self.cluster.proc is not None:
            self.cluster.proc.wait()
        # Its children die with it (Pdeathsig), a moment later: their ports are free then.
        wait_until(lambda: all(port_free(p) for p in self.ports.values()), 30, "the killed control plane's ports")

    def restart(self) -> None:
        self.cluster = cluster.start(self.state, self.ports, exit_with_parent=True, restart=True)
        self.restarts += 1


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def private() -> Iterator[Private]:
    state = Path(tempfile.mkdtemp(prefix="kaos-faults-"))
    ports = cluster.free_ports()
    started: cluster.Cluster | None = None
    try:
        started = cluster.start(state, ports, exit_with_parent=True)
        kubectl = Kubectl(str(started.kubeconfig))
        crd = subprocess.run([sys.executable, "-m", "kaos_modelapi", "crd"], capture_output=True, text=True,
                             check=True).stdout
        kubectl.run("apply", "-f", "-", stdin=crd)
        kubectl.wait_established("modelapis.kaos.tools")
        plane = Private(state, ports, started, kubectl)
        yield plane
        started = plane.cluster
    finally:
        if started is not None:
            cluster.stop(cluster=started)
        shutil.rmtree(state, ignore_errors=True)


# ------------------------------------------------------------------------------------ the workload


def modelapi(name: str) -> dict[str, Any]:
    return {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": name},
            "spec": {"mode": "Proxy", "proxyConfig": {"model": "gpt-4o-mini"}}}


def burst(kubectl: Kubectl, namespace: str, count: int, prefix: str = "m") -> list[str]:
    """Create `count` ModelAPIs at once (four kubectl processes side by side); return their names."""
    if kubectl.get("namespace", namespace, "default") is None:
        kubectl.run("create", "namespace", namespace)
    names = [f"{prefix}{i}" for i in range(count)]
    chunks = [names[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda chunk: kubectl.run("create", "-n", namespace, "-f", "-",
                                                stdin=yaml.safe_dump_all([modelapi(n) for n in chunk])), chunks))
    return names


def phases(kubectl: Kubectl, namespace: str) -> Counter[str]:
    out = kubectl.run("get", "modelapis", "-n", namespace, "-o",
                      "jsonpath={range .items[*]}{.status.phase}{'\\n'}{end}").stdout
    return Counter(line or "-" for line in out.split("\n")[:-1])


def wait_some_ready(kubectl: Kubectl, namespace: str, count: int) -> None:
    """Wait until the converge is under way (`count` Ready): the moment to inject a fault."""
    wait_until(lambda: phases(kubectl, namespace)["Ready"] >= count, 120, f"{count} ModelAPIs Ready in {namespace}")


def problems(kubectl: Kubectl, namespace: str, names: list[str]) -> list[str]:
    """What keeps the ModelAPIs `names` in `namespace` from being converged (empty: converged)."""
    items = json.loads(kubectl.run("get", "modelapis", "-n", namespace, "-o", "json").stdout)["items"]
    found = {m["metadata"]["name"]: m for m in items}
    wrong = [f"lost: {n}" for n in names if n not in found]
    for name, m in sorted(found.items()):
        st = m.get("status") or {}
        if st.get("phase") != "Ready" or st.get("observedGeneration") != m["metadata"]["generation"]:
            wrong.append(f"{name}: phase {st.get('phase')}, observedGeneration {st.get('observedGeneration')}")
    uids = {name: m["metadata"]["uid"] for name, m in found.items()}
    counts: Counter[tuple[str, str]] = Counter()
    for child in children(kubectl, namespace):
        owner = child["metadata"]["labels"]["modelapi"]
        refs = [r["uid"] for r in child["metadata"].get("ownerReferences") or [] if r.get("controller")]
        if refs != [uids.get(owner)]:
            wrong.append(f"orphan: {child['kind']} {child['metadata']['name']} (owner {refs}, ModelAPI {owner})")
        counts[(owner, child["kind"])] += 1
    for name in found:
        for kind in CHILD_KINDS:
            if counts[(name, kind)] != 1:
                wrong.append(f"{name}: {counts[(name, kind)]} {kind}")
    return wrong


def children(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    out = kubectl.run("get", "configmaps,secrets,deployments,services", "-n", namespace, "-l", "modelapi",
                      "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def wait_converged(kubectl: Kubectl, namespace: str, names: list[str], since: float) -> float:
    """Wait until every ModelAPI of `names` is converged; return the seconds since `since` (monotonic)."""
    last: list[str] = []

    def check() -> bool:
        nonlocal last
        last = problems(kubectl, namespace, names)
        return not last

    try:
        wait_until(check, CONVERGE_TIMEOUT, f"{len(names)} ModelAPIs converged in {namespace}")
    except AssertionError:
        raise AssertionError(f"not converged in {namespace} ({len(last)} problems), e.g. {last[:10]}") from None
    return time.monotonic() - since


def generated_secrets(kubectl: Kubectl, namespace: str) -> dict[str, str]:
    """name -> uid of the operator's generated key Secrets (a re-created one gets a new uid)."""
    out = kubectl.run("get", "secrets", "-n", namespace, "-l", "modelapi", "-o",
                      "jsonpath={range .items[*]}{.metadata.name}={.metadata.uid}{'\\n'}{end}").stdout
    return dict(line.split("=", 1) for line in out.split("\n") if line)


@pytest.fixture
def run_operator(private: Private, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """Starts operators against the private cluster (through `kubeconfig`, e.g. a proxy's); stops them all."""
    started: list[OperatorProcess] = []

    def run(kubeconfig: Path | None = None, args: tuple[str, ...] = (), name: str = "operator",
            wait_ready: bool = True) -> OperatorProcess:
        process = OperatorProcess(str(kubeconfig or private.kubeconfig),
                                  args=["--watch-timeout", str(WATCH_TIMEOUT), *args],
                                  log_path=tmp_path / f"{name}.log")
        started.append(process)
        if wait_ready:
            process.start()
        return process

    yield run
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            with_signal(process.proc.pid, signal.SIGCONT)
        process.stop()


def with_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def delete_namespace(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)


# ------------------------------------------------------------------------------------------ faults


def test_the_whole_control_plane_killed_and_restarted_on_its_data(
    private: Private, run_operator: Callable[..., OperatorProcess], report: Report
) -> None:
    run_operator()
    names = burst(private.kubectl, "f-restart", N)
    wait_some_ready(private.kubectl, "f-restart", N // 10)
    killed = time.monotonic()
    private.kill()
    private.restart()
    report("control plane SIGKILLed and restarted", f"control plane back after {time.monotonic() - killed:.1f} s")
    took = wait_converged(private.kubectl, "f-restart", names, killed)
    report("control plane SIGKILLed and restarted", f"all {N} converged after the kill in {took:.1f} s")
    delete_namespace(private.kubectl, "f-restart")


def test_the_connection_cut_briefly_then_silent_for_longer_than_a_watch(
    private: Private, run_operator: Callable[..., OperatorProcess], report: Report, tmp_path: Path
) -> None:
    proxy = TcpProxy(private.ports["apiserver"])
    try:
        via = kubeconfig_via(private.kubeconfig, proxy.start(), tmp_path / "kubeconfig")
        run_operator(via)
        names = burst(private.kubectl, "f-cut", N)
        wait_some_ready(private.kubectl, "f-cut", N // 10)
        proxy.cut()  # every connection reset, new ones refused
        time.sleep(3)  # the outage's length, not a wait for state
        proxy.restore()
        wait_some_ready(private.kubectl, "f-cut", N // 2)
        proxy.stall()  # nothing flows and nothing is closed, for longer than any watch lasts
        time.sleep(STALL_SECONDS)
        restored = time.monotonic()
        proxy.restore()
        took = wait_converged(private.kubectl, "f-cut", names, restored)
        report(f"connection reset for 3 s, later silent for {STALL_SECONDS} s",
               f"all {N} converged after the second restore in {took:.1f} s")
    finally:
        proxy.close()
    delete_namespace(private.kubectl, "f-cut")


def test_watch_history_gone_in_the_middle_of_a_burst(
    private: Private, run_operator: Callable[..., OperatorProcess], report: Report, tmp_path: Path
) -> None:
    if private.restarts == 0:
        # The watch caches of built-in resources start at the revision the API server started at: on a
        # fresh cluster that is near 1, so a resume from 1 would not be Gone. After a restart it is.
        private.kill()
        private.restart()
    proxy = FaultProxy(private.ports["apiserver"], private.pki)
    try:
        via = kubeconfig_via(private.kubeconfig, proxy.start(), tmp_path / "kubeconfig")
        operator = run_operator(via)
        names = burst(private.kubectl, "f-gone", N)
        wait_some_ready(private.kubectl, "f-gone", N // 10)
        expired = time.monotonic()
        proxy.expire_watches()
        took = wait_converged(private.kubectl, "f-gone", names, expired)
        report("410 Gone on every watch mid-burst", f"all {N} converged in {took:.1f} s")
        # The API server's own answer, for the ModelAPIs and for every kind of child the operator watches.
        relisted = set(re.findall(r"watch expired; relisting .*too old resource version.* resource=(\w+)",
                                  operator.log_path.read_text()))
        assert relisted >= {"modelapis", "configmaps", "secrets", "deployments", "services", "pods"}, relisted
        assert any("modelapis" in path for path in proxy.expired)
    finally:
        proxy.close()
    delete_namespace(private.kubectl, "f-gone")


def test_the_operator_sigkilled_again_and_again_at_random_points(
    private: Private, run_operator: Callable[..., OperatorProcess], report: Report
) -> None:
    rng = random.Random()
    names = burst(private.kubectl, "f-kill", N)
    first_seen: dict[str, str] = {}
    kills = 0
    while kills < KILLS:
        operator = run_operator(name=f"operator-{kills}")
        time.sleep(rng.uniform(0.2, 2.5))  # a random point of its work
        operator.stop(signal.SIGKILL)
        kills += 1
        for name, uid in generated_secrets(private.kubectl, "f-kill").items():
            first_seen.setdefault(name, uid)
    last_kill = time.monotonic()
    run_operator(name="operator-last")
    took = wait_converged(private.kubectl, "f-kill", names, last_kill)
    report(f"operator SIGKILLed {kills} times", f"all {N} converged after the last kill in {took:.1f} s")
    final = generated_secrets(private.kubectl, "f-kill")
    recreated = [n for n, uid in first_seen.items() if final.get(n) != uid]
    assert not recreated, f"generated Secrets created again (their key changed): {recreated[:10]}"
    delete_namespace(private.kubectl, "f-kill")


def leading(process: OperatorProcess) -> bool:
    return metric_value(process.metrics(), "leader_election_master_status", name=LEASE) == 1


def test_a_frozen_leader_past_its_lease_never_writes_again(
    private: Private, run_operator: Callable[..., OperatorProcess], report: Report, tmp_path: Path
) -> None:
    private.kubectl.run("delete", "lease", LEASE, "-n", "default", "--ignore-not-found")
    proxies = [FaultProxy(private.ports["apiserver"], private.pki) for _ in range(2)]
    try:
        # Each replica through its own proxy: the proxy counts what reaches the API server from it.
        configs = [kubeconfig_via(private.kubeconfig, p.start(), tmp_path / f"kubeconfig-{i}")
                   for i, p in enumerate(proxies)]
        first = run_operator(configs[0], tuple(FAST_LEASE), name="first")
        wait_until(lambda: leading(first), 30, "the first replica leading")
        second = run_operator(configs[1], tuple(FAST_LEASE), name="second")
        names = burst(private.kubectl, "f-leader", N)
        wait_some_ready(private.kubectl, "f-leader", N // 10)
        assert first.proc is not None
        wait_until(lambda: leading(first) and not leading(second), 30, "the first replica still leading")
        frozen = time.monotonic()
        os.kill(first.proc.pid, signal.SIGSTOP)
        assert "leadership lost" not in first.log_path.read_text()  # it is frozen while leading
        wait_until(lambda: leading(second), 60, "the second replica taking the Lease")
        report("leader SIGSTOPped", f"the standby took the Lease after {time.monotonic() - frozen:.1f} s")
        thawed = time.monotonic()
        os.kill(first.proc.pid, signal.SIGCONT)
        code = first.proc.wait(timeout=60)
        assert code != 0  # it found it lost the Lease and exits, so that a fresh process stands again
        took = wait_converged(private.kubectl, "f-leader", names, thawed)
        report("leader SIGSTOPped past its Lease", f"all {N} converged after the thaw in {took:.1f} s")
        after = proxies[0].writes_since(thawed)
        assert after == [], f"the deposed leader wrote after it was thawed: {after[:10]}"
    finally:
        for proxy in proxies:
            proxy.close()
    delete_namespace(private.kubectl, "f-leader")


def test_an_api_server_answering_429_then_500_for_a_while(
    private: Private, run_operator: Callable[..., OperatorProcess], report: Report, tmp_path: Path
) -> None:
    proxy = FaultProxy(private.ports["apiserver"], private.pki)
    try:
        via = kubeconfig_via(private.kubeconfig, proxy.start(), tmp_path / "kubeconfig")
        run_operator(via, ("--kube-api-qps", "50", "--kube-api-burst", "100"))
        names = burst(private.kubectl, "f-errors", N)
        wait_some_ready(private.kubectl, "f-errors", N // 10)
        began, requests = time.monotonic(), proxy.requests
        for status in (429, 500):
            proxy.fail(status, 8)
            time.sleep(8)  # the fault's length, not a wait for state
        recovered = time.monotonic()
        rate = (proxy.requests - requests) / (recovered - began)
        report("429 then 500 for 8 s each",
               f"{rate:.1f} requests/s during the errors; answered by the proxy: {proxy.injected}")
        took = wait_converged(private.kubectl, "f-errors", names, recovered)
        report("429 then 500 for 8 s each", f"all {N} converged after the recovery in {took:.1f} s")
        assert proxy.injected.get(429) and proxy.injected.get(500)
    finally:
        proxy.close()
    delete_namespace(private.kubectl, "f-errors")


def test_an_operator_started_while_the_api_server_is_not_ready_starts_once_it_is(
    private: Private, run_operator: Callable[..., OperatorProcess], tmp_path: Path
) -> None:
    """At its start the server answers 429 (as it does while a resource's storage is (re)initializing, e.g. just
    after its CRD was installed: seen by the benchmark) or 503 (a server still starting): the operator asks
    again as the server asks, instead of exiting, and serves once it answers."""
    proxy = FaultProxy(private.ports["apiserver"], private.pki)
    try:
        via = kubeconfig_via(private.kubeconfig, proxy.start(), tmp_path / "kubeconfig")
        for status in (429, 503):
            proxy.fail(status, 4)
            operator = run_operator(via, name=f"operator-{status}")  # (waits for /readyz: caches synced)
            assert proxy.injected.get(status), f"the operator started before the proxy answered {status}"
            log = (tmp_path / f"operator-{status}.log").read_text()
            assert "the API server is not ready; asking again" in log, log[-2000:]
            if status == 503:
                names = burst(private.kubectl, "f-not-ready", 4)
                wait_converged(private.kubectl, "f-not-ready", names, time.monotonic())
            operator.stop()
    finally:
        proxy.close()
    delete_namespace(private.kubectl, "f-not-ready")
