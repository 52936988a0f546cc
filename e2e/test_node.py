"""The real node (e2e/node.py): pods run as containers through the upstream kubelet, containerd and
runc, Services work through kube-proxy, names resolve through CoreDNS, and stopping a cluster leaves
nothing behind.

Pods opt into the real node with its nodeSelector and toleration (`on_real_node`); every other pod
of the session still goes to the stand-in. The container image is e2e/node/testbin (built and
imported by e2e/node.py; nothing is pulled).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from e2e import cluster, node
from e2e.node import Net
from e2e.operator_process import Kubectl, wait_until

pytestmark = pytest.mark.cluster


def tool_image() -> str:
    return node.test_image(lambda _: None)[0]




def pod(name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": node.on_real_node(spec)}


def apply(kubectl: Kubectl, namespace: str, *objs: dict[str, Any]) -> None:
    kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}), namespace)


def server(name: str = "main", **extra: Any) -> dict[str, Any]:
    """A container serving HTTP on 8080 with an HTTP readiness probe."""
    return {"name": name, "image": tool_image(), "args": ["serve", "8080"],
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}, **extra}


def ready(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    obj = kubectl.get("pod", name, namespace)
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return obj if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None


def wait_ready(kubectl: Kubectl, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    try:
        result: dict[str, Any] = wait_until(lambda: ready(kubectl, namespace, name), timeout, f"pod {name} Ready")
    except AssertionError as err:
        events = kubectl.run("get", "events", "-n", namespace, check=False).stdout
        raise AssertionError(f"{err}\npod: {kubectl.get('pod', name, namespace)}\nevents:\n{events}") from None
    return result


def exec_in(kubectl: Kubectl, namespace: str, name: str, *cmd: str) -> str:
    return kubectl.run("exec", "-n", namespace, name, "--", "/testbin", *cmd).stdout


async def test_init_container_emptydir_and_readiness_probe(kubectl: Kubectl, namespace: str, real_node: Net) -> None:
    apply(kubectl, namespace, pod("web", {
        "initContainers": [{"name": "init", "image": tool_image(),
                            "args": ["write", "/data/greeting", "written by the init container"],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        "containers": [server(volumeMounts=[{"name": "data", "mountPath": "/data"}])],
        "volumes": [{"name": "data", "emptyDir": {}}],
    }))
    obj = wait_ready(kubectl, namespace, "web")
    assert obj["spec"]["nodeName"] == node.NODE_NAME
    assert obj["status"]["podIP"].startswith(f"10.{real_node.octet}.0.")
    (init,) = obj["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    (main,) = obj["status"]["containerStatuses"]
    assert main["ready"] and main["containerID"].startswith("containerd://")
    assert exec_in(kubectl, namespace, "web", "cat", "/data/greeting") == "written by the init container"
    # kubectl logs reaches the kubelet through the apiserver: the probes' requests are in the log.
    wait_until(lambda: "GET /healthz" in kubectl.run("logs", "-n", namespace, "web").stdout, 30,
               "the probes' requests in the log")


async def test_failing_container_reaches_crashloopbackoff(kubectl: Kubectl, namespace: str, real_node: Net) -> None:
    crashing = {"name": "main", "image": tool_image(), "args": ["fail", "3"]}
    apply(kubectl, namespace, pod("crash", {"containers": [crashing]}))

    def crashlooping() -> dict[str, Any] | None:
        obj = kubectl.get("pod", "crash", namespace) or {}
        statuses = (obj.get("status") or {}).get("containerStatuses") or []
        st = statuses[0] if statuses else {}
        waiting = (st.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff" and st.get("restartCount", 0) > 0:
            return st
        return None

    st = wait_until(crashlooping, 120, "CrashLoopBackOff")
    assert st["lastState"]["terminated"]["exitCode"] == 3
    assert not st["ready"]
    assert "failing with exit code 3" in kubectl.run("logs", "-n", namespace, "crash", "--previous").stdout


async def test_configmap_secret_volumes_and_env_from_secret(kubectl: Kubectl, namespace: str, real_node: Net) -> None:
    apply(kubectl, namespace,
          {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"config.yaml": "a: 1\n"}},
          {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"},
           "data": {"token": base64.b64encode(b"s3cret").decode(), "API_KEY": base64.b64encode(b"k-123").decode()}},
          pod("vols", {"containers": [server(
              env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}}],
              envFrom=[{"secretRef": {"name": "sec"}}],
              volumeMounts=[{"name": "cfg", "mountPath": "/etc/cfg"},
                            {"name": "sec", "mountPath": "/etc/sec", "readOnly": True}])],
              "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}},
                          {"name": "sec", "secret": {"secretName": "sec"}}]}))
    wait_ready(kubectl, namespace, "vols")
    assert exec_in(kubectl, namespace, "vols", "cat", "/etc/cfg/config.yaml") == "a: 1\n"
    assert exec_in(kubectl, namespace, "vols", "cat", "/etc/sec/token") == "s3cret"
    assert exec_in(kubectl, namespace, "vols", "env", "TOKEN") == "s3cret\n"
    assert exec_in(kubectl, namespace, "vols", "env", "API_KEY") == "k-123\n"


async def test_service_by_dns_name_from_another_pod(kubectl: Kubectl, namespace: str, real_node: Net) -> None:
    apply(kubectl, namespace,
          pod("backend", {"containers": [server()]}, labels={"app": "backend"}),
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
           "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": 8080}]}},
          pod("client", {"containers": [{"name": "main", "image": tool_image(), "args": ["sleep"]}]}))
    wait_ready(kubectl, namespace, "backend")
    wait_ready(kubectl, namespace, "client")
    url = f"http://backend.{namespace}.svc.cluster.local/"

    def answered() -> str | None:
        done = kubectl.run("exec", "-n", namespace, "client", "--", "/testbin", "get", url, check=False)
        return done.stdout if done.returncode == 0 else None

    # The EndpointSlice and kube-proxy's rules follow the pod's readiness within seconds.
    assert wait_until(answered, 60, f"GET {url} from the client pod") == "hello from backend\n"


async def test_service_without_endpoints_refuses_connections(kubectl: Kubectl, namespace: str,
                                                             real_node: Net) -> None:
    """A Service whose selector matches no ready pod refuses a connection at once (kube-proxy's REJECT), as on
    any node: the client sees "connection refused", never "network is unreachable" (what the node's routing
    answered before it routed the Service range), which no pooled client treats as a refusal to retry."""
    apply(kubectl, namespace,
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nobody"},
           "spec": {"selector": {"app": "nobody"}, "ports": [{"port": 80, "targetPort": 8080}]}},
          pod("client", {"containers": [{"name": "main", "image": tool_image(), "args": ["sleep"]}]}))
    wait_ready(kubectl, namespace, "client")
    url = f"http://nobody.{namespace}.svc.cluster.local/"

    def refused() -> str | None:
        done = kubectl.run("exec", "-n", namespace, "client", "--", "/testbin", "get", url, check=False)
        # Until kube-proxy has written the Service's rules the SYN is lost and `get` times out (10 s): not yet.
        return done.stderr if done.returncode != 0 and "connect:" in done.stderr else None

    error = wait_until(refused, 60, f"GET {url} answered by the node")
    assert "connection refused" in error, error


async def test_port_forward(kubectl: Kubectl, namespace: str, real_node: Net) -> None:
    apply(kubectl, namespace, pod("pf", {"containers": [server()]}))
    wait_ready(kubectl, namespace, "pf")
    proc = subprocess.Popen(["kubectl", "--kubeconfig", kubectl.kubeconfig, "port-forward", "-n", namespace, "pod/pf",
                             ":8080"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
        port = int(line.split("->")[0].rsplit(":", 1)[1])
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.read() == b"hello from pf\n"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_missing_image_is_an_error_naming_it(kubectl: Kubectl, namespace: str, real_node: Net) -> None:
    apply(kubectl, namespace, pod("missing", {"containers": [{"name": "main", "image": "example.invalid/nothing:1"}]}))

    def pull_failed() -> str | None:
        obj = kubectl.get("pod", "missing", namespace) or {}
        for st in (obj.get("status") or {}).get("containerStatuses") or []:
            waiting = (st.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff"):
                return str(waiting.get("message", ""))
        return None

    message = wait_until(pull_failed, 60, "ErrImagePull")
    assert "example.invalid/nothing:1" in message


async def test_ordinary_pods_still_go_to_the_stand_in(kubectl: Kubectl, namespace: str, real_node: Net) -> None:
    kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fake"},
                              "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]}}),
                  namespace)
    obj = wait_ready(kubectl, namespace, "fake", timeout=30)
    assert obj["spec"]["nodeName"] == "kaos-node"


def test_start_and_stop_leave_nothing_behind() -> None:
    """A private cluster with a real node, a pod running on it; after stop: no process, namespace, link,
    cgroup, mount or iptables chain of it is left."""
    if os.geteuid() != 0:
        pytest.fail("the real node needs root")
    chains_before = _host_chains()
    state = Path(tempfile.mkdtemp(prefix="kaos-node-test-"))
    began = time.monotonic()
    started = cluster.start(state, cluster.free_ports(), exit_with_parent=True, real_node=True)
    net = node.record_for(state)
    try:
        print(f"cluster with a real node started in {time.monotonic() - began:.1f} s")
        assert net is not None and node.node_ready(state)
        kubectl = Kubectl(str(started.kubeconfig))
        apply(kubectl, "default", pod("p", {"containers": [server(volumeMounts=[{"name": "s", "mountPath": "/s"}])],
                                            "volumes": [{"name": "s", "secret": {"secretName": "s"}}]}),
              {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}})
        wait_ready(kubectl, "default", "p")
        assert node.leftovers(net)  # the check sees a running node
    finally:
        cluster.stop(cluster=started)
    assert net is not None
    assert node.leftovers(net) == []
    assert not state.exists()
    assert _host_chains() == chains_before


def _host_chains() -> set[str]:
    chains = set()
    for tool in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
        chains |= {f"{tool}:{line.split()[0]}" for line in out.splitlines()
                   if line.startswith(":") and ("KUBE-" in line or "CNI-" in line)}
    return chains
