"""Hosted mode in pods on the real node: the operator's Deployment runs the Ollama image built here
(e2e/images.py: the source-built binary under the default image's ref), its pull-model init container
pulls the generated tiny model from the stand-in registry, and a client pod reaches it through the Service.
With a model store, a restarted or rolled pod finds the model on the ModelAPI's PersistentVolumeClaim and
downloads nothing (`ollama pull` reads the manifest, finds every blob, transfers none: counted at the
stand-in registry).

The stand-in registry and its CONNECT proxy listen on the host's end of the node's veth (10.<o>.255.1),
the one host address the pod network reaches; nothing listens anywhere else. The ModelAPI passes what a
cluster behind a corporate proxy would, in hostedConfig.env: HTTPS_PROXY, NO_PROXY for the direct blob
URLs, and SSL_CERT_FILE pointing at the session's test CA, mounted from a ConfigMap through the podSpec
override (which also places the pod on the real node).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import images, node
from e2e.node import Net
from e2e.ollama_registry import RunningRegistry, running_registry
from e2e.operator_process import Kubectl, OperatorProcess, wait_until
from e2e.tiny_model import registry_model
from kaos_modelapi import desired, ollama

pytestmark = pytest.mark.cluster

MODEL = "kaos-tiny:random"
CA_DIR = "/etc/kaos-registry-ca"
CA_CONFIGMAP = "registry-ca"
# A cold pod: image already imported, `ollama serve` start, a 0.5 MB pull, on two shared cores.
READY_TIMEOUT = 300.0
CONNECT_FAILED = 7  # kaos-http's exit status when no connection was made (curl's)
CHAT_OPTIONS = {"num_predict": 8, "seed": 7}

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def pod_registry(real_node: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with running_registry(tmp_path_factory.mktemp("registry"), host=real_node.host_ip) as running:
        running.registry.add(MODEL, registry_model())
        yield running


def ca_configmap(registry: RunningRegistry) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CA_CONFIGMAP},
            "data": {"ca.crt": registry.ca.ca_cert.read_text()}}


def hosted(name: str, model: str, registry: RunningRegistry, place: Callable[[Obj], Obj] = node.on_real_node,
           **hosted_extra: Any) -> Obj:
    """A Hosted ModelAPI as a user behind a proxy writes it (the proxy's CA mounted from a ConfigMap,
    `ca_configmap`), placed on the real node."""
    env = registry.client_env(ca_file=f"{CA_DIR}/ca.crt")
    mount = [{"name": CA_CONFIGMAP, "mountPath": CA_DIR, "readOnly": True}]
    pod_spec = place({
        "initContainers": [{"name": ollama.PULL_CONTAINER, "volumeMounts": mount}],
        "containers": [{"name": "model-api", "volumeMounts": mount}],
        "volumes": [{"name": CA_CONFIGMAP, "configMap": {"name": CA_CONFIGMAP}}],
    })
    return {
        "apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": name},
        "spec": {"mode": "Hosted", "podSpec": pod_spec,
                 "hostedConfig": {"model": model, "env": [{"name": k, "value": v} for k, v in env.items()],
                                  **hosted_extra}},
    }


def client_pod() -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
            "spec": node.on_real_node({"containers": [{"name": "main", "image": images.CLIENT_REF}]})}


def apply(kubectl: Kubectl, namespace: str, *objs: Obj) -> None:
    kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}), namespace)


def pods(kubectl: Kubectl, namespace: str, name: str) -> list[Obj]:
    return kubectl.list("pods", namespace, f"modelapi={name}")


def wait_ready(kubectl: Kubectl, namespace: str, name: str, timeout: float = READY_TIMEOUT) -> Obj:
    try:
        return kubectl.wait_phase(name, namespace, "Ready", timeout)
    except AssertionError as err:
        events = kubectl.run("get", "events", "-n", namespace, check=False).stdout
        logs = kubectl.run("logs", "-n", namespace, "-l", f"modelapi={name}", "-c", ollama.PULL_CONTAINER,
                           "--tail", "30", check=False)
        raise AssertionError(f"{err}\npods: {pods(kubectl, namespace, name)}\nevents:\n{events}\n"
                             f"pull-model log:\n{logs.stdout}{logs.stderr}") from None


def client_call(kubectl: Kubectl, namespace: str, url: str, body: Obj | None = None) -> Obj:
    args = ["exec", "-n", namespace, "client", "--", "kaos-http", "-m", "120"]
    args += ["-d", json.dumps(body)] if body is not None else []
    done = kubectl.run(*args, url)
    result: Obj = json.loads(done.stdout)
    return result


def first_answer(kubectl: Kubectl, namespace: str, url: str, body: Obj | None = None) -> Obj:
    """The first call to a Service just Ready: its endpoints reach kube-proxy's rules a moment after the pod's
    readiness, and until then a connection is refused or lost (kaos-http's exit 7, within its connect
    timeout), as on any cluster. Any other failure fails at once."""
    def call() -> Obj | None:
        try:
            return client_call(kubectl, namespace, url, body)
        except subprocess.CalledProcessError as e:
            if e.returncode != CONNECT_FAILED:
                pytest.fail(f"{url}: kaos-http exited {e.returncode}: {e.stderr}")
            return None

    answer: Obj = wait_until(call, 60, f"{url} to accept connections")
    return answer


def wait_client(kubectl: Kubectl, namespace: str) -> None:
    def ready() -> bool:
        obj = kubectl.get("pod", "client", namespace) or {}
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in (obj.get("status") or {}).get("conditions") or [])

    wait_until(ready, 120, "the client pod Ready")


@pytest.fixture
def hosted_env(kubectl: Kubectl, namespace: str, crd: str, operator: OperatorProcess,
               node_images: dict[str, str], pod_registry: RunningRegistry) -> tuple[Kubectl, str, RunningRegistry]:
    apply(kubectl, namespace, ca_configmap(pod_registry))
    return kubectl, namespace, pod_registry


async def test_a_hosted_modelapi_pulls_serves_and_answers_through_its_service(
    hosted_env: tuple[Kubectl, str, RunningRegistry],
) -> None:
    kubectl, namespace, registry = hosted_env
    pulls_before = len(registry.registry.seen())
    apply(kubectl, namespace, hosted("tiny", MODEL, registry), client_pod())
    status = wait_ready(kubectl, namespace, "tiny")
    assert status["endpoint"] == f"http://modelapi-tiny.{namespace}.svc.cluster.local:{ollama.PORT}"
    (pod,) = pods(kubectl, namespace, "tiny")
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    log = kubectl.run("logs", "-n", namespace, pod["metadata"]["name"], "-c", ollama.PULL_CONTAINER).stdout
    assert f"pull-model: pulled {MODEL}" in log
    # The pod fetched the manifest and every blob from the stand-in, through the proxy.
    seen = registry.registry.seen()[pulls_before:]
    assert any(r.path == "/v2/library/kaos-tiny/manifests/random" for r in seen)
    assert {r.path.rsplit("/", 1)[1] for r in seen if r.path.startswith("/direct/") and r.method == "GET"} \
        == set(registry_model().blobs)

    wait_client(kubectl, namespace)
    url = status["endpoint"]
    tags = first_answer(kubectl, namespace, f"{url}/api/tags")
    assert [m["name"] for m in tags["models"]] == [MODEL]
    # Ready means loaded: the model is in memory before the first request.
    assert [m["name"] for m in client_call(kubectl, namespace, f"{url}/api/ps")["models"]] == [MODEL]
    answer = client_call(kubectl, namespace, f"{url}/api/chat", {
        "model": MODEL, "stream": False, "options": CHAT_OPTIONS,
        "messages": [{"role": "user", "content": "hello from a pod"}]})
    assert answer["model"] == MODEL and answer["done"] is True
    assert answer["message"]["role"] == "assistant"
    assert 1 <= answer["eval_count"] <= CHAT_OPTIONS["num_predict"]

    # A Proxy ModelAPI in wildcard mode in front of it: real LiteLLM in a pod to real Ollama in a pod.
    proxy = {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": "front"},
             "spec": {"mode": "Proxy", "proxyConfig": {"apiBase": url}, "podSpec": node.on_real_node({})}}
    apply(kubectl, namespace, proxy)
    front = wait_ready(kubectl, namespace, "front")["endpoint"]
    completion = first_answer(kubectl, namespace, f"{front}/v1/chat/completions", {
        "model": f"ollama_chat/{MODEL}", "max_tokens": CHAT_OPTIONS["num_predict"],
        "messages": [{"role": "user", "content": "hello through the proxy"}]})
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert completion["usage"]["prompt_tokens"] > 0  # counted by Ollama, passed on by LiteLLM


async def test_a_slow_pull_shows_its_progress_in_the_status_before_ready(
    hosted_env: tuple[Kubectl, str, RunningRegistry],
) -> None:
    kubectl, namespace, registry = hosted_env
    # The 0.5 MB layer over about half a minute, as a large model over a slow link: the operator reads the
    # progress from the pull-model log every 10 s and puts it in the status message.
    registry.registry.blob_rate = 16_000
    shown: list[str] = []
    progress = re.compile(rf"^pulling model {re.escape(MODEL)}: (\d{{1,3}})% \(\d+/\d+ KB\)$")

    def progress_or_ready() -> Obj | None:
        st = kubectl.status("slow", namespace)
        message = st.get("message") or ""
        if progress.match(message) and message not in shown:
            shown.append(message)
        return st if st.get("phase") == "Ready" else None

    try:
        apply(kubectl, namespace, hosted("slow", MODEL, registry))
        wait_until(progress_or_ready, READY_TIMEOUT, "ModelAPI slow Ready")
    finally:
        registry.registry.blob_rate = None
    assert shown, "no progress in the status message while the model was pulled"
    percents = [int(progress.match(m)[1]) for m in shown]  # type: ignore[index]
    assert percents == sorted(percents), shown
    # Progress is not news: one Event for the pull, not one for each step.
    reasons = [e["reason"] for e in kubectl.list("events.events.k8s.io", namespace)
               if e.get("regarding", {}).get("name") == "slow"]
    assert reasons.count("PullingModel") == 1, reasons
    print(f"\nprogress shown in the status: {shown}")


async def test_a_scale_up_shows_the_new_pods_pull_while_the_first_pod_serves(
    hosted_env: tuple[Kubectl, str, RunningRegistry],
) -> None:
    kubectl, namespace, registry = hosted_env
    apply(kubectl, namespace, hosted("scaled", MODEL, registry))
    wait_ready(kubectl, namespace, "scaled")
    # The second pod pulls the model into a store of its own (emptyDir), slowly, while the first serves.
    registry.registry.blob_rate = 16_000
    shown: list[str] = []
    phases: set[str] = set()
    progress = re.compile(rf"^1 of 2 pods ready; pulling model {re.escape(MODEL)}: (\d{{1,3}})% \(\d+/\d+ KB\)$")

    def progress_or_both_ready() -> Obj | None:
        st = kubectl.status("scaled", namespace)
        phases.add(st.get("phase") or "")
        message = st.get("message") or ""
        if progress.match(message) and message not in shown:
            shown.append(message)
        return st if st.get("readiness") == "2/2" else None

    try:
        kubectl.run("scale", "modelapi/scaled", "-n", namespace, "--replicas=2")
        wait_until(progress_or_both_ready, READY_TIMEOUT, "ModelAPI scaled 2 of 2 pods ready")
    finally:
        registry.registry.blob_rate = None
    assert phases == {"Ready"}  # the first pod served all along
    assert shown, "no progress of the new pod's pull in the status message"
    percents = [int(progress.match(m)[1]) for m in shown]  # type: ignore[index]
    assert percents == sorted(percents), shown
    print(f"\nprogress shown in the status: {shown}")


async def test_an_unknown_model_fails_the_pull_the_pod_and_the_status(
    hosted_env: tuple[Kubectl, str, RunningRegistry],
) -> None:
    kubectl, namespace, registry = hosted_env
    apply(kubectl, namespace, hosted("missing", "no-such-model:1b", registry))
    status = kubectl.wait_phase("missing", namespace, "Failed", READY_TIMEOUT)
    (condition,) = status["conditions"]
    assert condition["reason"] == "ModelPullFailed"
    hint = f"kubectl logs -n {namespace} -l modelapi=missing -c {ollama.PULL_CONTAINER}"
    assert "pulling model no-such-model:1b failed" in status["message"] and hint in status["message"]
    # The pod: its init container failed (and is retried with back-off), the serving container never ran.
    (pod,) = pods(kubectl, namespace, "missing")
    (init,) = pod["status"]["initContainerStatuses"]
    failed = (init.get("state") or {}).get("terminated") or (init.get("lastState") or {}).get("terminated")
    assert failed and failed["exitCode"] != 0
    assert pod["status"]["phase"] == "Pending"
    # What the hint shows: the model and Ollama's own reason.
    # (The init container is retried: wait for an attempt's log that got to the end.)
    def failed_attempt_log() -> str | None:
        out = kubectl.run(*hint.split()[1:], "--tail", "-1", check=False).stdout
        return out if "pull-model: pulling no-such-model:1b failed" in out else None

    log = wait_until(failed_attempt_log, 120, "the failed pull's log")
    assert "file does not exist" in log


# --- the model store --------------------------------------------------------------------------------------
# The local cluster has no storage provisioner: the test makes a PersistentVolume by hand (a local volume:
# a folder in the test's temporary folder on the real node, storage class kaos-static, pre-bound to the
# claim the operator will create), as the administrator of a cluster with static volumes would. The control
# plane runs the PersistentVolume binder and the protection controllers (e2e/controlplane/main.go). A local
# volume, unlike a hostPath one, is given to the pod's fsGroup by the kubelet, as most volumes are.

STORE_CLASS = "kaos-static"



def static_volume(name: str, folder: Path, namespace: str, claim: str) -> Obj:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": STORE_CLASS, "persistentVolumeReclaimPolicy": "Retain",
                     "local": {"path": str(folder)},
                     "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                         {"key": "kubernetes.io/hostname", "operator": "In", "values": [node.NODE_NAME]}]}]}},
                     "claimRef": {"namespace": namespace, "name": claim}}}


def blob_downloads(registry: RunningRegistry, since: int) -> list[str]:
    return [r.path for r in registry.registry.seen()[since:] if r.path.startswith("/direct/") and r.method == "GET"]


def manifest_reads(registry: RunningRegistry, since: int) -> int:
    return sum(1 for r in registry.registry.seen()[since:] if r.path.endswith("/manifests/random"))


def wait_new_ready_pod(kubectl: Kubectl, namespace: str, name: str, old: set[str]) -> Obj:
    """Until the ModelAPI is Ready again on pods none of which is in `old` (uids)."""
    def fresh() -> Obj | None:
        live = [p for p in pods(kubectl, namespace, name) if not p["metadata"].get("deletionTimestamp")]
        ready = [p for p in live if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in (p.get("status") or {}).get("conditions") or [])]
        if ready and not {p["metadata"]["uid"] for p in live} & old:
            return ready[0]
        return None

    pod: Obj = wait_until(fresh, READY_TIMEOUT, f"new Ready pods of {name}")
    wait_ready(kubectl, namespace, name)
    return pod


async def test_a_restart_and_a_roll_find_the_model_in_the_store(
    hosted_env: tuple[Kubectl, str, RunningRegistry], tmp_path: Path,
) -> None:
    kubectl, namespace, registry = hosted_env
    claim = "modelapi-store-models"
    volume = f"kaos-store-{namespace}"
    # As a store an earlier operator's pods (root) began: root's, and only root may write in it.
    (tmp_path / "store" / "models").mkdir(parents=True)
    for folder in (tmp_path / "store", tmp_path / "store" / "models"):
        folder.chmod(0o755)
    kubectl.run("apply", "-f", "-", stdin=json.dumps(static_volume(volume, tmp_path / "store", namespace, claim)))
    try:
        start = len(registry.registry.seen())
        store = {"size": "64Mi", "storageClassName": STORE_CLASS}
        apply(kubectl, namespace, hosted("store", MODEL, registry, modelStore=store))
        wait_ready(kubectl, namespace, "store")
        assert sorted(p.rsplit("/", 1)[1] for p in blob_downloads(registry, start)) == sorted(registry_model().blobs)
        pvc = kubectl.get("pvc", claim, namespace)
        assert pvc is not None and pvc["status"]["phase"] == "Bound" and pvc["spec"]["volumeName"] == volume
        assert pvc["metadata"]["ownerReferences"][0]["name"] == "store"
        # One node's volume: a roll stops the old pod before it starts the new one (which attaches the volume).
        deployment = kubectl.get("deployment", "modelapi-store", namespace)
        assert deployment is not None and deployment["spec"]["strategy"] == {"type": "Recreate"}

        # A restart: the pod is deleted, its ReplicaSet makes a new one, whose pull finds every blob.
        (first,) = pods(kubectl, namespace, "store")
        mark = len(registry.registry.seen())
        kubectl.run("delete", "pod", "-n", namespace, first["metadata"]["name"], "--wait=false")
        second = wait_new_ready_pod(kubectl, namespace, "store", {first["metadata"]["uid"]})
        log = kubectl.run("logs", "-n", namespace, second["metadata"]["name"], "-c", "pull-model").stdout
        assert f"pull-model: pulled {MODEL}" in log
        assert manifest_reads(registry, mark) >= 1, "the pull checked the registry for a newer manifest"
        assert blob_downloads(registry, mark) == []

        # A roll (a new ReplicaSet): the same.
        mark = len(registry.registry.seen())
        kubectl.run("rollout", "restart", "-n", namespace, "deployment/modelapi-store")
        wait_new_ready_pod(kubectl, namespace, "store", {second["metadata"]["uid"]})
        assert manifest_reads(registry, mark) >= 1
        assert blob_downloads(registry, mark) == []

        # Deleting the ModelAPI deletes its claim (owner reference); the volume follows its reclaim
        # policy (Retain here: Released, the data kept).
        kubectl.run("delete", "modelapi", "-n", namespace, "store", "--wait=false")
        wait_until(lambda: kubectl.get("pvc", claim, namespace) is None, 120, "the claim deleted")
        released = wait_until(lambda: (pv := kubectl.get("pv", volume, "default")) and
                              pv["status"]["phase"] == "Released" and pv, 60, "the volume Released")
        assert released["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        assert (tmp_path / "store" / "models" / "manifests").is_dir()
        # Written by the pods' user, in the group the kubelet gave the volume to.
        blob = next((tmp_path / "store" / "models" / "blobs").iterdir()).stat()
        assert (blob.st_uid, blob.st_gid) == (desired.NON_ROOT_UID, desired.NON_ROOT_UID)
    finally:
        kubectl.run("delete", "pv", volume, "--wait=false", check=False)


async def test_a_store_the_pods_user_may_not_write_fails_the_pull_and_says_why(
    hosted_env: tuple[Kubectl, str, RunningRegistry], tmp_path: Path,
) -> None:
    """A hostPath volume is not given to the pod's fsGroup: root's folder stays root's (README, "Pod
    Security": chown it to 65532)."""
    kubectl, namespace, registry = hosted_env
    claim, volume = "modelapi-rootstore-models", f"kaos-rootstore-{namespace}"
    (tmp_path / "store").mkdir(mode=0o755)
    pv = static_volume(volume, tmp_path / "store", namespace, claim)
    del pv["spec"]["local"], pv["spec"]["nodeAffinity"]
    pv["spec"]["hostPath"] = {"path": str(tmp_path / "store"), "type": "Directory"}
    kubectl.run("apply", "-f", "-", stdin=json.dumps(pv))
    try:
        apply(kubectl, namespace, hosted("rootstore", MODEL, registry,
                                         modelStore={"size": "64Mi", "storageClassName": STORE_CLASS}))
        status = kubectl.wait_phase("rootstore", namespace, "Failed", READY_TIMEOUT)
        assert status["conditions"][0]["reason"] == "ModelPullFailed"
        hint = f"kubectl logs -n {namespace} -l modelapi=rootstore -c {ollama.PULL_CONTAINER}"
        assert hint in status["message"]
        # What the hint shows: Ollama could not write its state into the volume. (The kubelet starts the pull
        # again after each failure, and a new attempt's log may still be empty: the last one's is --previous.)
        denied = f"mkdir {ollama.DATA_DIR}/.ollama: permission denied"

        def shown() -> str | None:
            for previous in ((), ("--previous",)):
                log: str = kubectl.run(*hint.split()[1:], "--tail", "-1", *previous, check=False).stdout
                if denied in log:
                    return log
            return None

        wait_until(shown, 60, f"{denied!r} in the output of {hint}")
    finally:
        kubectl.run("delete", "modelapi", "-n", namespace, "rootstore", "--wait=false", check=False)
        kubectl.run("delete", "pv", volume, "--wait=false", check=False)


async def test_a_single_node_store_with_replicas_is_refused_naming_the_field(kubectl: Kubectl, crd: str,
                                                                              namespace: str) -> None:
    spec = {"mode": "Hosted", "replicas": 2,
            "hostedConfig": {"model": MODEL, "modelStore": {"size": "1Gi"}}}
    obj = {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": "two"}, "spec": spec}
    done = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=False)
    assert done.returncode != 0
    assert "spec.replicas" in done.stderr and "at most 1 replica" in done.stderr, done.stderr
    spec["hostedConfig"]["modelStore"] = {"size": "1Gi", "accessMode": "ReadWriteMany"}  # type: ignore[index]
    done = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=False)
    assert done.returncode == 0, done.stderr
    # kubectl explain documents the store (the API server serves the CRD's schema).
    explained = kubectl.run("explain", "modelapi.spec.hostedConfig.modelStore").stdout
    assert "PersistentVolumeClaim" in explained
    assert all(f in explained for f in ("size", "storageClassName", "accessMode")), explained
