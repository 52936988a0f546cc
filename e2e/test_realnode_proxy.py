"""Proxy mode on the real node (e2e/node.py): the operator installed with the Helm chart runs as a pod from
the image built from the Dockerfile, and the LiteLLM pods it generates run from the LiteLLM image and answer
requests from client pods, through Services and cluster DNS.

Everything here runs as containers: the operator, LiteLLM (its boot script in the image), the stub backend
(e2e/stub_backend.py in localhost/kaos-stub-backend:dev) and a client (localhost/kaos-client:dev, whose
`kaos-http` is a small curl). All ModelAPIs are created at once by the module's fixture, so that their
LiteLLM pods start side by side while the operator pod starts; each test waits for the ones it uses.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from e2e import chart, images, node
from e2e.node import Net
from e2e.operator_process import Kubectl, wait_until
from e2e.stub_backend import REPLY, SEEN_PATH
from kaos_modelapi import litellm
from kaos_modelapi.desired import CONTAINER

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]

RELEASE = "kaos-modelapi"  # the chart's name: its objects are named kaos-modelapi, kaos-modelapi-metrics
READY_TIMEOUT = 300.0  # several LiteLLM pods start at once on two shared cores
OPENAI_KEY = "sk-from-the-secret-" + secrets.token_hex(4)
MOCK_MODEL = "gpt-4.6-turbo"
BACKEND_PORT = 11434

# A restrictive container: no root, nothing writable but the operator's /tmp emptyDir, no capabilities.
RESTRICTED_POD = {"securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}}
RESTRICTED_CONTAINER = {"runAsNonRoot": True, "runAsUser": 65532, "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}}


@dataclass
class Env:
    kubectl: Kubectl
    ns: str  # the operator, its ModelAPIs, the backend
    client_ns: str  # the client pod: another namespace

    def http(self, url: str, body: Obj | None = None) -> tuple[int, str]:
        """A request from the client pod: (kaos-http's exit code, the body; what it said too, if it failed)."""
        cmd = ["exec", "-n", self.client_ns, "client", "--", "kaos-http", "-m", "60"]
        if body is not None:
            cmd += ["-d", json.dumps(body)]
        done = self.kubectl.run(*cmd, url, check=False)
        return done.returncode, done.stdout if done.returncode == 0 else f"{done.stdout}{done.stderr}"

    def chat(self, endpoint: str, body: Obj) -> Obj:
        code, out = self.http(f"{endpoint}/v1/chat/completions", body)
        assert code == 0, out
        answer: Obj = json.loads(out)
        return answer

    def seen(self) -> list[Obj]:
        """What reached the stub backend so far, oldest first."""
        code, out = self.http(f"{backend_url(self.ns)}{SEEN_PATH}")
        assert code == 0, out
        return [s for s in json.loads(out) if s["path"] != "/api/show"]


def backend_url(ns: str) -> str:
    return f"http://stub.{ns}.svc.cluster.local:{BACKEND_PORT}"


def text_of(answer: Obj) -> str:
    return str(answer["choices"][0]["message"]["content"])


# --- what the module installs --------------------------------------------------------------------------


def modelapi(name: str, proxy_config: Obj, pod_spec: Obj | None = None) -> Obj:
    return {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": name},
            "spec": {"mode": "Proxy", "replicas": 1, "proxyConfig": proxy_config,
                     "podSpec": node.on_real_node(pod_spec or {})}}


def secret(name: str, **string_data: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": string_data}


def openai_env() -> list[Obj]:
    return [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "api-secrets", "key": "openai-key"}}}]


def routed_config(ns: str, fast_name: str = "fast") -> str:
    """The seed's multi-model routing example, pointed at the stub backend by its Service name."""
    base = backend_url(ns)
    return yaml.safe_dump({"model_list": [
        {"model_name": fast_name, "litellm_params": {"model": "ollama/smollm2:135m", "api_base": base}},
        {"model_name": "smart", "litellm_params": {"model": "gpt-4o", "api_key": "os.environ/OPENAI_API_KEY",
                                                   "api_base": base}},
    ]}, sort_keys=False)


def backend_objects() -> list[Obj]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stub", "labels": {"app": "stub"}},
           "spec": node.on_real_node({"containers": [{
               "name": "stub", "image": images.STUB_BACKEND_REF, "ports": [{"containerPort": BACKEND_PORT}],
               "readinessProbe": {"tcpSocket": {"port": BACKEND_PORT}, "periodSeconds": 1}}]})}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "stub"},
               "spec": {"selector": {"app": "stub"}, "ports": [{"port": BACKEND_PORT}]}}
    return [pod, service]


def modelapis(ns: str) -> list[Obj]:
    restricted = {**RESTRICTED_POD, "containers": [{"name": CONTAINER, "securityContext": RESTRICTED_CONTAINER}]}
    return [
        secret("api-secrets", **{"openai-key": OPENAI_KEY}),
        secret("litellm-config", **{"config.yaml": routed_config(ns)}),
        secret("broken-config", **{"config.yaml": "model_list: [\n"}),  # LiteLLM's boot script exits on it
        modelapi("mock-api", {"model": MOCK_MODEL}),
        modelapi("wild", {"apiBase": backend_url(ns), "env": openai_env()}, restricted),
        modelapi("single", {"apiBase": backend_url(ns), "model": "ollama/smollm2:135m"}),
        modelapi("routed", {"configYaml": {"fromSecretKeyRef": {"name": "broken-config", "key": "config.yaml"}},
                            "env": openai_env()}),
    ]


def chart_values(ns: str) -> Obj:
    return {"replicaCount": 1, "watchNamespaces": [ns], "logFormat": "console",
            **node.on_real_node({})}


def client_pod() -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
            "spec": node.on_real_node({"containers": [{"name": "client", "image": images.CLIENT_REF}]})}


def apply(kubectl: Kubectl, ns: str, objs: list[Obj]) -> None:
    kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}), ns)


def create_namespace(kubectl: Kubectl, name: str) -> None:
    kubectl.run("create", "namespace", name)
    kubectl.run("label", "namespace", name, "kaos.tools/test=true")
    # The API refuses pods in a namespace until its default ServiceAccount exists.
    wait_until(lambda: kubectl.get("serviceaccount", "default", name), 30, f"ServiceAccount {name}/default")


@pytest.fixture(scope="module")
def env(kubectl: Kubectl, crd: str, node_images: dict[str, str], real_node: Net,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    token = secrets.token_hex(3)
    e = Env(kubectl, f"rn-proxy-{token}", f"rn-client-{token}")
    values = tmp_path_factory.mktemp("chart") / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(e.ns)))
    objs = chart.render(chart.build_helm(), RELEASE, e.ns, *images.operator_chart_flags(), "-f", str(values))
    cluster_scoped = [o for o in objs if o["kind"].startswith("Cluster")]
    try:
        for ns in (e.ns, e.client_ns):
            create_namespace(kubectl, ns)
        kubectl.run("apply", "-f", "-", stdin=chart.manifest(objs))
        apply(kubectl, e.ns, [*backend_objects(), *modelapis(e.ns)])
        apply(kubectl, e.client_ns, [client_pod()])
        yield e
    finally:
        for obj in cluster_scoped:
            kubectl.run("delete", obj["kind"].lower(), obj["metadata"]["name"], "--wait=false", check=False)
        for ns in (e.ns, e.client_ns):
            kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


# --- waiting ---------------------------------------------------------------------------------------------


def pod_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def wait_pod_ready(e: Env, ns: str, selector: str) -> Obj:
    def ready() -> Obj | None:
        pods = [p for p in e.kubectl.list("pod", ns, selector) if not p["metadata"].get("deletionTimestamp")]
        return pods[0] if len(pods) == 1 and pod_ready(pods[0]) else None

    try:
        found: Obj = wait_until(ready, READY_TIMEOUT, f"a Ready pod {selector} in {ns}")
    except AssertionError as err:
        events = e.kubectl.run("get", "events", "-n", ns, check=False).stdout
        raise AssertionError(f"{err}\nevents:\n{events}") from None
    return found


def wait_modelapi(e: Env, name: str, phase: str = "Ready", reason: str | None = None) -> Obj:
    def check() -> Obj | None:
        obj = e.kubectl.get("modelapi", name, e.ns) or {}
        status = obj.get("status") or {}
        ready: Obj = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        if status.get("phase") == phase and status.get("observedGeneration") == obj["metadata"]["generation"] \
                and (reason is None or ready.get("reason") == reason):
            return status
        return None

    try:
        status: Obj = wait_until(check, READY_TIMEOUT, f"ModelAPI {name} {phase}")
    except AssertionError as err:
        pods = e.kubectl.run("get", "pods", "-n", e.ns, "-o", "wide", check=False).stdout
        raise AssertionError(f"{err}\nstatus: {(e.kubectl.get('modelapi', name, e.ns) or {}).get('status')}\n"
                             f"pods:\n{pods}") from None
    return status


def answered(e: Env, endpoint: str, body: Obj) -> Obj:
    """The first answer: the Service's endpoints follow the pod's readiness within seconds."""
    result: Obj = wait_until(lambda: e.chat(endpoint, body), 60, f"an answer from {endpoint}")
    return result


# --- the tests -----------------------------------------------------------------------------------------


def test_chart_operator_runs_as_a_pod_on_the_real_node_and_serves_metrics(env: Env) -> None:
    e = env
    pod = wait_pod_ready(e, e.ns, f"app.kubernetes.io/instance={RELEASE}")
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    assert pod["spec"]["serviceAccountName"] == RELEASE
    (manager,) = pod["status"]["containerStatuses"]
    assert manager["ready"] and manager["restartCount"] == 0
    assert node.normalize(manager["image"]) == node.normalize(images.OPERATOR_REF)
    container = pod["spec"]["containers"][0]
    # Its probes are the kubelet's: a Ready pod passed /readyz, and /healthz is probed too.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"

    status = wait_modelapi(e, "mock-api")
    assert status["endpoint"] == f"http://modelapi-mock-api.{e.ns}.svc.cluster.local:8000"

    def ready_gauge() -> str | None:
        code, out = e.http(f"http://{RELEASE}-metrics.{e.ns}.svc.cluster.local:8080/metrics")
        ready_lines = [line for line in out.splitlines() if line.startswith('kaos_modelapi_modelapis{phase="Ready"}')]
        return out if code == 0 and ready_lines and float(ready_lines[0].split()[-1]) >= 1 else None

    metrics = wait_until(ready_gauge, 60, "the Ready gauge on /metrics, from the client pod")
    assert "controller_runtime_reconcile_total" in metrics


def test_mock_answers_a_client_in_another_namespace(env: Env) -> None:
    e = env
    endpoint = wait_modelapi(e, "mock-api")["endpoint"]
    wait_pod_ready(e, e.client_ns, "")
    # No key: the client sends no Authorization header at all.
    first = answered(e, endpoint, {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "hello"}],
                                   "mock_response": "the mock answer, ünïcode included"})
    assert text_of(first) == "the mock answer, ünïcode included"
    assert e.chat(endpoint, {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "hello"}]}) \
        ["choices"][0]["message"]["content"] == litellm.MOCK_DEFAULT_RESPONSE

    # A multi-turn exchange with a tool call: the model asks for the tool, the client answers with its result.
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    question = {"role": "user", "content": "What is the weather in Paris?"}
    asked = e.chat(endpoint, {"model": MOCK_MODEL, "messages": [question], "tools": tools, "tool_choice": "auto",
                              "mock_tool_calls": [call]})
    (got,) = asked["choices"][0]["message"]["tool_calls"]
    assert (got["id"], got["type"], got["function"]) == (call["id"], call["type"], call["function"])
    history = [question, {"role": "assistant", "content": None, "tool_calls": [got]},
               {"role": "tool", "tool_call_id": got["id"], "content": '{"temp_c": 18}'}]
    final = e.chat(endpoint, {"model": MOCK_MODEL, "messages": history, "tools": tools, "tool_choice": "auto",
                              "mock_response": "It is 18 degrees in Paris."})
    assert text_of(final) == "It is 18 degrees in Paris."

    # A streamed answer: server-sent events, each a chunk of the text, then [DONE].
    code, out = e.http(f"{endpoint}/v1/chat/completions", {
        "model": MOCK_MODEL, "messages": [question], "stream": True, "mock_response": "streamed, word by word"})
    assert code == 0, out
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(ev) for ev in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) \
        == "streamed, word by word"


def test_wildcard_with_a_restrictive_security_context_and_single_model_reach_the_backend(env: Env) -> None:
    e = env
    wild = wait_modelapi(e, "wild")["endpoint"]
    pod = wait_pod_ready(e, e.ns, "modelapi=wild")
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    wait_pod_ready(e, e.ns, "app=stub")
    wait_pod_ready(e, e.client_ns, "")

    before = len(e.seen())
    ask = {"messages": [{"role": "user", "content": "first question"}]}
    assert text_of(answered(e, wild, {"model": "ollama/smollm2:135m", **ask})) == REPLY
    (seen,) = e.seen()[before:]
    assert (seen["path"], seen["body"]["model"]) == ("/api/generate", "smollm2:135m")
    # An OpenAI-style name takes the OpenAI API to the same base, with the key from the user's Secret.
    before = len(e.seen())
    assert text_of(e.chat(wild, {"model": "gpt-4o", **ask})) == REPLY
    (seen,) = e.seen()[before:]
    assert (seen["path"], seen["body"]["model"]) == ("/chat/completions", "gpt-4o")
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"

    single = wait_modelapi(e, "single")["endpoint"]
    before = len(e.seen())
    assert text_of(answered(e, single, {"model": "ollama/smollm2:135m", **ask})) == REPLY
    (seen,) = e.seen()[before:]
    assert (seen["path"], seen["body"]["model"]) == ("/api/generate", "smollm2:135m")
    code, out = e.http(f"{single}/v1/chat/completions", {"model": "gpt-4o", **ask})
    assert code != 0 and "gpt-4o" in out  # only its model
    assert e.seen()[before + 1:] == []


def test_failing_config_reports_the_kubelet_status_and_config_edits_roll_the_pods(env: Env) -> None:
    e = env
    status = wait_modelapi(e, "routed", phase="Failed", reason="ContainerFailing")
    assert f"kubectl logs -n {e.ns} -l modelapi=routed -c {CONTAINER} --previous" in status["message"]

    def previous_logs() -> str | None:
        # The hint's command: it answers once the kubelet has restarted the container at least once.
        # Between restarts the kubelet may already have removed the instance it names as the previous one:
        # kubectl then prints "unable to retrieve container logs for containerd://..." and exits 0; ask again.
        done = e.kubectl.run("logs", "-n", e.ns, "-l", "modelapi=routed", "-c", CONTAINER, "--previous", check=False)
        retrieved = done.returncode == 0 and done.stdout and "unable to retrieve container logs" not in done.stdout
        return done.stdout if retrieved else None

    logs = wait_until(previous_logs, 120, "the failed container's log")
    assert "kaos-litellm-boot: cannot load LiteLLM config" in logs

    # The fix: the config from a valid Secret, the key from another Secret in the env.
    fixed = {"configYaml": {"fromSecretKeyRef": {"name": "litellm-config", "key": "config.yaml"}}, "env": openai_env()}
    e.kubectl.run("patch", "modelapi", "routed", "-n", e.ns, "--type=merge",
                  "-p", json.dumps({"spec": {"proxyConfig": fixed}}))
    endpoint = wait_modelapi(e, "routed")["endpoint"]
    ask = {"messages": [{"role": "user", "content": "to a named model"}]}
    before = len(e.seen())
    assert text_of(answered(e, endpoint, {"model": "fast", **ask})) == REPLY
    assert text_of(e.chat(endpoint, {"model": "smart", **ask})) == REPLY
    fast, smart = e.seen()[before:]
    assert (fast["path"], fast["body"]["model"]) == ("/api/generate", "smollm2:135m")
    assert (smart["path"], smart["body"]["model"]) == ("/chat/completions", "gpt-4o")
    assert smart["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    old_pod = wait_pod_ready(e, e.ns, "modelapi=routed")["metadata"]["name"]

    # An edit of the config rolls the pods; the new pod serves the new config.
    # (A merge patch: null removes the Secret reference that the string replaces.)
    edited = {"configYaml": {"fromSecretKeyRef": None, "fromString": routed_config(e.ns, fast_name="quick")},
              "env": openai_env()}
    e.kubectl.run("patch", "modelapi", "routed", "-n", e.ns, "--type=merge",
                  "-p", json.dumps({"spec": {"proxyConfig": edited}}))

    def rolled() -> Obj | None:
        obj = e.kubectl.get("modelapi", "routed", e.ns) or {}
        status = obj.get("status") or {}
        pods = e.kubectl.list("pod", e.ns, "modelapi=routed")
        done = status.get("observedGeneration") == obj["metadata"]["generation"] and \
            status["conditions"][0]["reason"] == "Available" and [p["metadata"]["name"] for p in pods] != [old_pod]
        return status if done and len(pods) == 1 and pod_ready(pods[0]) else None

    wait_until(rolled, READY_TIMEOUT, "the rolled pod Ready and the old one gone")
    assert text_of(answered(e, endpoint, {"model": "quick", **ask})) == REPLY
    code, out = e.http(f"{endpoint}/v1/chat/completions", {"model": "fast", **ask})
    assert code != 0, out
