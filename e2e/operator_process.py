"""The operator as a real process against the test cluster, and kubectl as a user runs it.

Tests drive the system the way its users do: `kubectl apply` for ModelAPIs, `kaos-modelapi run` for the
operator, `/metrics` and the API server's own metrics for what it did.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GATEWAY_NAME = "shared"
GATEWAY_NAMESPACE = "gateway-system"


def wait_until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll check() until it returns something truthy; fail with its last answer after the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (AssertionError, subprocess.CalledProcessError) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(0.25)  # poll interval


@dataclass
class Kubectl:
    kubeconfig: str

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, *args], input=stdin, text=True,
                              capture_output=True, check=check, timeout=120)

    def apply(self, manifest: str, namespace: str, *extra: str) -> str:
        return self.run("apply", "-n", namespace, "-f", "-", *extra, stdin=manifest).stdout

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        done = self.run("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if done.returncode != 0:
            if "NotFound" in done.stderr:
                return None
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def list(self, kind: str, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        items: list[dict[str, Any]] = json.loads(self.run(*args).stdout)["items"]
        return items

    def status(self, name: str, namespace: str) -> dict[str, Any]:
        obj = self.get("modelapi", name, namespace)
        return (obj or {}).get("status") or {}

    def wait_phase(self, name: str, namespace: str, phase: str, timeout: float = 90.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status(name, namespace)
            return st if st.get("phase") == phase else None

        try:
            result: dict[str, Any] = wait_until(check, timeout, f"ModelAPI {namespace}/{name} phase {phase}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nstatus now: {self.status(name, namespace)}") from None
        return result

    def children(self, name: str, namespace: str) -> set[str]:
        """kind/name of every object the operator created for ModelAPI `name`."""
        found = set()
        for kind in ("configmaps", "secrets", "deployments", "services", "httproutes"):
            for obj in self.list(kind, namespace, f"modelapi={name}"):
                found.add(f"{obj['kind']}/{obj['metadata']['name']}")
        return found

    def wait_established(self, crd: str, timeout: float = 60.0) -> None:
        """(`kubectl wait --for=condition=Established` fails outright while status.conditions is null.)"""

        wait_until(lambda: crd_established(self.get("crd", crd, "default")), timeout, f"CRD {crd} established")

    def raw_metrics(self) -> str:
        return self.run("get", "--raw", "/metrics").stdout


def crd_established(crd: dict[str, Any] | None) -> bool:
    """Whether a CRD is served; a new CRD's status.conditions is null until the apiserver gets to it."""
    conditions = ((crd or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


@dataclass
class OperatorProcess:
    """`kaos-modelapi run` as a child process, with its metrics and health ports on loopback."""

    kubeconfig: str
    args: Sequence[str] = ()
    log_path: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")) / "kaos-operator.log")
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    health_port: int = 0

    def start(self) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        command = [
            sys.executable, "-m", "kaos_modelapi", "run", "--kubeconfig", self.kubeconfig,
            "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}",
            "--health-probe-bind-address", f"127.0.0.1:{self.health_port}",
            "--log-format", "console", "--log-level", "debug", *self.args,
        ]
        log = self.log_path.open("ab")
        # kubernetes_asyncio writes a kubeconfig's certificates and key to temporary files it removes at exit:
        # an operator a test kills leaves them, in the test's own folder rather than in /tmp.
        scratch = self.log_path.with_suffix(".tmp")
        scratch.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "TMPDIR": str(scratch)})
        wait_until(self.ready, 60, f"operator /readyz (log: {self.log_path})")

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
        try:
            return scrape(f"http://127.0.0.1:{self.health_port}/readyz") == "ok"
        except OSError:
            return False

    def metrics(self) -> str:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()


def metric_value(text: str, metric: str, /, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(metric) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != metric:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE")


def apiserver_writes(text: str, resources: Sequence[str]) -> float:
    """Write requests the API server counted for `resources` (apiserver_request_total)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        series, _, value = line.rpartition(" ")
        labels = dict(part.split("=", 1) for part in series[len("apiserver_request_total{"):-1].split(",")
                      if "=" in part)
        verb = labels.get("verb", "").strip('"')
        resource = labels.get("resource", "").strip('"')
        if verb in WRITE_VERBS and resource in resources:
            total += float(value)
    return total
