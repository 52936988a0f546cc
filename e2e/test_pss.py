"""Pod Security Standards (README, "Pod Security"): the API server's PodSecurity admission, on the real node.

- A namespace labelled `pod-security.kubernetes.io/enforce=restricted` admits the pods the operator
  generates (non-root 65532, read-only root, no privilege escalation, no capabilities, RuntimeDefault
  seccomp; Hosted with its model volume given to the user's group): the Proxy pods serve a mock
  answer to a client pod, the Hosted pods pull the tiny model from the stand-in registry (e2e/
  test_hosted_node.py's setup) and answer /api/tags and /api/chat. A podSpec that makes a pod root again
  is refused there, and the ModelAPI says so. The operator's own pod (Helm chart and kustomize) is admitted
  there too.
- A namespace that enforces `baseline` admits that root pod.

Everything is applied at once by the module's fixture so that LiteLLM and Ollama start side by side.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import chart, images, node
from e2e.node import Net
from e2e.ollama_registry import RunningRegistry
from e2e.operator_process import Kubectl, OperatorProcess, wait_until
from e2e.test_hosted_node import MODEL, ca_configmap, client_call, hosted, pod_registry, wait_client, wait_ready
from kaos_modelapi import desired

pytestmark = pytest.mark.cluster

__all__ = ["pod_registry"]  # the module fixture, shared with test_hosted_node

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parent.parent
ENFORCE = "pod-security.kubernetes.io/enforce"
READY_TIMEOUT = 300.0  # LiteLLM and Ollama start side by side on two shared cores
MOCK_MODEL = "gpt-4o-mini"


@dataclass
class Env:
    kubectl: Kubectl
    restricted: str
    baseline: str
    client: str  # no Pod Security label: the client image runs as root

    def call(self, url: str, body: Obj | None = None) -> Obj:
        return client_call(self.kubectl, self.client, url, body)


def create_namespace(kubectl: Kubectl, name: str, level: str | None) -> None:
    kubectl.run("create", "namespace", name)
    labels = ["kaos.tools/test=true", *([f"{ENFORCE}={level}"] if level else [])]
    kubectl.run("label", "namespace", name, *labels)
    # The API refuses pods in a namespace until its default ServiceAccount exists.
    wait_until(lambda: kubectl.get("serviceaccount", "default", name), 30, f"ServiceAccount {name}/default")


def apply(kubectl: Kubectl, namespace: str, *objs: Obj) -> None:
    kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}), namespace)


def mock(name: str, pod_spec: Obj | None = None) -> Obj:
    return {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": name},
            "spec": {"mode": "Proxy", "proxyConfig": {"model": MOCK_MODEL},
                     "podSpec": node.on_real_node(pod_spec or {})}}


# A user's podSpec that runs the pod as root again.
AS_ROOT = {"securityContext": {"runAsNonRoot": False, "runAsUser": 0}}


def client_pod() -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
            "spec": node.on_real_node({"containers": [{"name": "main", "image": images.CLIENT_REF}]})}


@pytest.fixture(scope="module")
def env(kubectl: Kubectl, crd: str, operator: OperatorProcess, node_images: dict[str, str], real_node: Net,
        pod_registry: RunningRegistry) -> Iterator[Env]:
    token = secrets.token_hex(3)
    e = Env(kubectl, f"pss-restricted-{token}", f"pss-baseline-{token}", f"pss-client-{token}")
    try:
        for name, level in ((e.restricted, "restricted"), (e.baseline, "baseline"), (e.client, None)):
            create_namespace(kubectl, name, level)
        apply(kubectl, e.restricted, mock("mock"), mock("rooted", AS_ROOT), ca_configmap(pod_registry),
              hosted("tiny", MODEL, pod_registry))
        apply(kubectl, e.baseline, mock("rooted", AS_ROOT))
        apply(kubectl, e.client, client_pod())
        yield e
    finally:
        for name in (e.restricted, e.baseline, e.client):
            kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def pods(e: Env, namespace: str, name: str) -> list[Obj]:
    live = e.kubectl.list("pods", namespace, f"modelapi={name}")
    return [p for p in live if not p["metadata"].get("deletionTimestamp")]


def dry_run_pod(e: Env, namespace: str, spec: Obj) -> tuple[int, str]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"dry-{secrets.token_hex(3)}"}, "spec": spec}
    done = e.kubectl.run("create", "--dry-run=server", "-n", namespace, "-f", "-", stdin=json.dumps(pod), check=False)
    return done.returncode, done.stderr


def no_api_token(pod: Obj) -> bool:
    """Whether the ServiceAccount admission left the pod without the API token volume it adds by default."""
    volumes = [v for v in pod["spec"].get("volumes") or [] if "projected" in v]
    mounts = [m for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
              for m in c.get("volumeMounts") or [] if m["mountPath"].startswith("/var/run/secrets/kubernetes.io")]
    return pod["spec"]["automountServiceAccountToken"] is False and not volumes and not mounts


# --- the tests -----------------------------------------------------------------------------------------


def test_the_control_plane_enforces_pod_security(env: Env) -> None:
    """PodSecurity admission is on (kube-apiserver's default plugins): a root pod is refused by `restricted`."""
    root = {"containers": [{"name": "c", "image": images.CLIENT_REF, "securityContext": {"runAsUser": 0}}]}
    code, err = dry_run_pod(env, env.restricted, root)
    assert code != 0 and 'violates PodSecurity "restricted:latest"' in err, err
    code, err = dry_run_pod(env, env.baseline, root)
    assert code == 0, err


@pytest.mark.parametrize("install", ["helm", "kustomize"])
def test_the_operators_own_pod_meets_restricted(env: Env, install: str) -> None:
    if install == "helm":
        objs = chart.render(chart.build_helm(), "kaos-modelapi", env.restricted, *images.operator_chart_flags())
    else:
        rendered = env.kubectl.run("kustomize", str(REPO / "config" / "default")).stdout
        objs = [o for o in yaml.safe_load_all(rendered) if o]
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    spec = dict(deployment["spec"]["template"]["spec"])
    spec.pop("serviceAccountName")  # the pod's identity is not what is checked here (and not created)
    code, err = dry_run_pod(env, env.restricted, spec)
    assert code == 0, err


def test_proxy_pods_are_admitted_by_restricted_and_serve(env: Env) -> None:
    status = wait_ready(env.kubectl, env.restricted, "mock", READY_TIMEOUT)
    (pod,) = pods(env, env.restricted, "mock")
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    assert pod["spec"]["securityContext"]["runAsUser"] == desired.NON_ROOT_UID
    assert no_api_token(pod)
    (container,) = pod["status"]["containerStatuses"]
    assert container["ready"] and container["restartCount"] == 0
    wait_client(env.kubectl, env.client)

    def answer() -> Obj:
        return env.call(f"{status['endpoint']}/v1/chat/completions", {
            "model": MOCK_MODEL, "messages": [{"role": "user", "content": "hello"}],
            "mock_response": "admitted by restricted"})

    reply = wait_until(answer, 120, "a mock answer from the client pod")
    assert reply["choices"][0]["message"]["content"] == "admitted by restricted"


def test_a_pod_made_root_by_its_podspec_is_refused_by_restricted_and_the_status_says_why(env: Env) -> None:
    status = env.kubectl.wait_phase("rooted", env.restricted, "Failed", 120)
    assert status["conditions"][0]["reason"] == "FailedCreate"
    assert 'violates PodSecurity "restricted:latest"' in status["message"], status["message"]
    assert "runAsUser=0" in status["message"]
    assert f"kubectl describe replicaset -n {env.restricted} -l modelapi=rooted" in status["message"]
    assert pods(env, env.restricted, "rooted") == []
    # `baseline` lets root run.
    wait_ready(env.kubectl, env.baseline, "rooted", READY_TIMEOUT)
    (pod,) = pods(env, env.baseline, "rooted")
    assert pod["spec"]["securityContext"]["runAsUser"] == 0


def test_hosted_pods_are_admitted_by_restricted_and_serve(env: Env) -> None:
    status = wait_ready(env.kubectl, env.restricted, "tiny", READY_TIMEOUT)
    (pod,) = pods(env, env.restricted, "tiny")
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    assert pod["spec"]["securityContext"]["runAsUser"] == desired.NON_ROOT_UID
    for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c["name"]
    assert no_api_token(pod)
    wait_client(env.kubectl, env.client)
    url = status["endpoint"]
    tags = wait_until(lambda: env.call(f"{url}/api/tags"), 60, "an answer from Ollama")
    assert [m["name"] for m in tags["models"]] == [MODEL]
    answer = env.call(f"{url}/api/chat", {"model": MODEL, "stream": False, "options": {"num_predict": 4, "seed": 7},
                                          "messages": [{"role": "user", "content": "hello from restricted"}]})
    assert answer["done"] is True and answer["message"]["role"] == "assistant"
