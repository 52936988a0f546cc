"""Zero-downtime rolls in Proxy mode, on the real node: a client pod sends a steady stream of chat
requests through the ModelAPI's Service (its status.endpoint, by DNS name) while the config changes (the
Deployment rolls its pod) and while the ModelAPI is scaled 1 -> 3 -> 1. Every request must get a 200, from
the Service's first answer on (the client waits for it: see e2e/roll_client.py).

The LiteLLM image and the client image are built by e2e/images.py and imported by `node_images`; the
client is e2e/roll_client.py. The test prints the request count and latencies (never asserts on them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from e2e import node
from e2e.node import Net
from e2e.operator_process import Kubectl, OperatorProcess, wait_until
from kaos_modelapi import litellm
from kaos_modelapi.desired import CONFIG_HASH_ANNOTATION, selector_labels, workload_name

pytestmark = pytest.mark.cluster

NAME = "roll"
MODEL = "mock-roll"
CLIENT_IMAGE = "localhost/kaos-client:dev"
CLIENT_SCRIPT = Path(__file__).with_name("roll_client.py")
START_TIMEOUT = 300.0  # LiteLLM imports for many seconds on two cores shared with other sessions
SELECTOR = ",".join(f"{k}={v}" for k, v in selector_labels(NAME).items())


def modelapi(env_value: str) -> dict[str, Any]:
    return {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": NAME},
            "spec": {"mode": "Proxy",
                     "proxyConfig": {"model": MODEL, "env": [{"name": "KAOS_ROLL_TEST", "value": env_value}]},
                     "podSpec": node.on_real_node({})}}


def client_pod(endpoint: str) -> dict[str, Any]:
    container = {"name": "client", "image": CLIENT_IMAGE, "command": ["python3", "-c", CLIENT_SCRIPT.read_text()],
                 "env": [{"name": "URL", "value": endpoint}, {"name": "MODEL", "value": MODEL}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
            "spec": node.on_real_node({"containers": [container], "restartPolicy": "Never",
                                       "terminationGracePeriodSeconds": 1})}


def client_file(kubectl: Kubectl, namespace: str, path: str) -> dict[str, Any] | None:
    done = kubectl.run("exec", "-n", namespace, "client", "--", "cat", path, check=False)
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout else None


def wait_more_answers(kubectl: Kubectl, namespace: str, more: int, what: str) -> None:
    """The stream is flowing: `more` further answers since now (ok or not: failures are counted at the end)."""
    start = client_file(kubectl, namespace, "/tmp/progress") or {"ok": 0, "failed": 0}

    def grown() -> bool:
        now = client_file(kubectl, namespace, "/tmp/progress") or start
        return int(now["ok"]) + int(now["failed"]) >= int(start["ok"]) + int(start["failed"]) + more

    wait_until(grown, 120, f"{more} more answers {what}")


def rolled_out(kubectl: Kubectl, namespace: str, replicas: int) -> bool:
    """The Deployment has exactly `replicas` pods of its current template, all Ready, and no other pod is left
    (not even a terminating one: its shutdown is what the client must not notice)."""
    dep = kubectl.get("deployment", workload_name(NAME), namespace) or {}
    st = dep.get("status") or {}
    if st.get("observedGeneration", 0) < dep.get("metadata", {}).get("generation", 1):
        return False
    if not st.get("updatedReplicas") == st.get("readyReplicas") == st.get("replicas") == replicas:
        return False
    want = dep["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    pods = kubectl.list("pods", namespace, SELECTOR)
    return len(pods) == replicas and all(
        p["metadata"]["annotations"].get(CONFIG_HASH_ANNOTATION) == want and "deletionTimestamp" not in p["metadata"]
        for p in pods)


def wait_rolled_out(kubectl: Kubectl, namespace: str, replicas: int, what: str) -> None:
    try:
        wait_until(lambda: rolled_out(kubectl, namespace, replicas), START_TIMEOUT, what)
    except AssertionError as err:
        pods = kubectl.run("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
        raise AssertionError(f"{err}\npods:\n{pods}") from None
    wait_until(lambda: kubectl.status(NAME, namespace).get("readiness") == f"{replicas}/{replicas}", 60,
               f"status.readiness {replicas}/{replicas}")


async def test_roll_and_scale_drop_no_request(kubectl: Kubectl, namespace: str, operator: OperatorProcess,
                                             real_node: Net, node_images: dict[str, str]) -> None:
    assert CLIENT_IMAGE in node_images and litellm.DEFAULT_IMAGE in node_images
    kubectl.apply(json.dumps(modelapi("1")), namespace)
    status = kubectl.wait_phase(NAME, namespace, "Ready", START_TIMEOUT)
    assert status["endpoint"] == f"http://{workload_name(NAME)}.{namespace}.svc.cluster.local:{litellm.PORT}"
    kubectl.apply(json.dumps(client_pod(status["endpoint"])), namespace)
    wait_more_answers(kubectl, namespace, 20, "before the roll")

    # (a) A config change: the pod template's config hash changes, the Deployment rolls its pod.
    kubectl.apply(json.dumps(modelapi("2")), namespace)
    wait_rolled_out(kubectl, namespace, 1, "the roll to the new config")
    wait_more_answers(kubectl, namespace, 20, "after the roll")

    # (b) Scaled through the scale subresource, as an autoscaler would.
    for replicas in (3, 1):
        kubectl.run("scale", "-n", namespace, f"modelapi/{NAME}", f"--replicas={replicas}")
        wait_rolled_out(kubectl, namespace, replicas, f"{replicas} replicas")
        wait_more_answers(kubectl, namespace, 20, f"at {replicas} replicas")

    kubectl.run("exec", "-n", namespace, "client", "--", "touch", "/tmp/stop")
    result = wait_until(lambda: client_file(kubectl, namespace, "/tmp/result.json"), 120, "the client's result")
    print(f"\n{result['ok'] + len(result['failures'])} requests, {len(result['failures'])} failed, "
          f"{result['retries']} sent again on a new connection (kept one closed), "
          f"{result['before_first_answer']} refused before the Service first answered; latency "
          f"p50 {result['p50'] * 1000:.0f} ms, p99 {result['p99'] * 1000:.0f} ms, max {result['max'] * 1000:.0f} ms")
    failures = result["failures"]
    assert not failures, f"{len(failures)} requests failed, e.g. " + "; ".join(
        f"{f['status']} {f['error']}" for f in failures[:3])
