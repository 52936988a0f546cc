"""The operator against a real API server: what a user applies with kubectl becomes children and status."""

from __future__ import annotations

import json
import signal
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.operator_process import (
    GATEWAY_NAME,
    GATEWAY_NAMESPACE,
    REPO,
    Kubectl,
    OperatorProcess,
    apiserver_writes,
    metric_value,
    wait_until,
)

pytestmark = pytest.mark.cluster

SAMPLES = sorted(p for p in (REPO / "config" / "samples").glob("*.yaml") if p.name != "kustomization.yaml")
CHILD_RESOURCES = ("modelapis", "deployments", "services", "configmaps", "secrets", "httproutes")


def modelapi_yaml(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
                           "metadata": {"name": name}, "spec": spec})


def mock(model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"mode": "Proxy", "proxyConfig": {"model": model}}


def wildcard(api_base: str) -> dict[str, Any]:
    return {"mode": "Proxy", "proxyConfig": {"apiBase": api_base}}


HOSTED = {"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m"}}


def template_hash(kubectl: Kubectl, name: str, namespace: str) -> str:
    deployment = kubectl.get("deployment", f"modelapi-{name}", namespace)
    assert deployment is not None
    return str(deployment["spec"]["template"]["metadata"]["annotations"]["kaos.tools/config-hash"])


def pods_run_only(kubectl: Kubectl, name: str, namespace: str, config_hash: str) -> bool:
    """Every live pod of the ModelAPI runs the pod template with this config hash."""
    pods = kubectl.list("pods", namespace, f"modelapi={name}")
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return bool(live) and all(p["metadata"]["annotations"]["kaos.tools/config-hash"] == config_hash for p in live)


def ready_condition(st: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})


def events_for(kubectl: Kubectl, name: str, namespace: str) -> list[dict[str, Any]]:
    items = kubectl.list("events.events.k8s.io", namespace)
    return [e for e in items if e.get("regarding", {}).get("name") == name]


def reasons_said(kubectl: Kubectl, name: str, namespace: str) -> list[str]:
    """The reasons of the Events about ModelAPI `name`, oldest first."""
    return [e["reason"] for e in sorted(events_for(kubectl, name, namespace), key=lambda e: e["eventTime"])]


def reconciles(operator: OperatorProcess) -> float:
    return metric_value(operator.metrics(), "controller_runtime_reconcile_total", controller="modelapi")


def wait_for_reconcile(operator: OperatorProcess, kubectl: Kubectl, name: str, namespace: str) -> None:
    """Make the operator look at `name` again and wait until it has."""
    before = reconciles(operator)
    kubectl.run("annotate", "--overwrite", "modelapi", name, "-n", namespace, f"test/poke={time.monotonic_ns()}")
    wait_until(lambda: reconciles(operator) > before, 30, "a reconcile")


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
async def test_every_sample_becomes_ready(sample: Path, kubectl: Kubectl, operator: OperatorProcess,
                                          namespace: str) -> None:
    kubectl.apply(sample.read_text(), namespace)
    for doc in yaml.safe_load_all(sample.read_text()):
        if doc["kind"] != "ModelAPI":
            continue
        name = doc["metadata"]["name"]
        if "nvidia.com/gpu" in json.dumps(doc["spec"]):
            # The test node has no GPU: the status must say why the pod waits (as on a GPU-less cluster).
            wait_until(lambda n=name: ready_condition(kubectl.status(n, namespace)).get("reason") == "Unschedulable",
                       60, "an Unschedulable reason")
            assert "nvidia.com/gpu" in kubectl.status(name, namespace)["message"]
            continue
        # kubectl (1.32) fails at once while status.conditions is absent; the operator writes it right away.
        wait_until(lambda n=name: ready_condition(kubectl.status(n, namespace)), 30, "a Ready condition")
        kubectl.run("wait", "--for=condition=Ready", f"modelapi/{name}", "-n", namespace, "--timeout=90s")
        st = kubectl.status(name, namespace)
        port = 8000 if doc["spec"]["mode"] == "Proxy" else 11434
        assert st["phase"] == "Ready" and st["ready"] is True
        assert st["endpoint"] == f"http://modelapi-{name}.{namespace}.svc.cluster.local:{port}"
        assert st["deployment"]["availableReplicas"] == 1
        assert st["observedGeneration"] == kubectl.get("modelapi", name, namespace)["metadata"]["generation"]
        kinds = {child.split("/")[0] for child in kubectl.children(name, namespace)}
        assert {"Deployment", "Service", "HTTPRoute"} <= kinds
        from_secret = "fromSecretKeyRef" in json.dumps(doc["spec"])
        assert ("ConfigMap" in kinds) == (doc["spec"]["mode"] == "Proxy" and not from_secret)
    table = kubectl.run("get", "modelapi", "-n", namespace).stdout.splitlines()[0].split()
    assert table == ["NAME", "MODE", "MODEL", "PHASE", "READY", "ENDPOINT", "AGE"]


async def test_config_change_rolls_pods_and_route_change_does_not(kubectl: Kubectl, operator: OperatorProcess,
                                                                  namespace: str) -> None:
    kubectl.apply(modelapi_yaml("edit", wildcard("http://one.example:11434")), namespace)
    kubectl.wait_phase("edit", namespace, "Ready")
    first = template_hash(kubectl, "edit", namespace)

    kubectl.apply(modelapi_yaml("edit", wildcard("http://two.example:11434")), namespace)

    def config_updated() -> bool:
        cm = kubectl.get("configmap", "litellm-config-edit", namespace)
        return cm is not None and "two.example" in cm["data"]["config.yaml"]

    wait_until(config_updated, 30, "ConfigMap with the new apiBase")
    wait_until(lambda: template_hash(kubectl, "edit", namespace) != first, 30, "a new pod template")
    second = template_hash(kubectl, "edit", namespace)

    wait_until(lambda: pods_run_only(kubectl, "edit", namespace, second), 60, "pods of the new template only")
    kubectl.wait_phase("edit", namespace, "Ready")

    def roll_told_over() -> bool:
        """`kubectl describe` tells the roll, and that it is over: the last state it tells is Available (it was
        Available moments before the roll too)."""
        said = reasons_said(kubectl, "edit", namespace)
        states = [r for r in said if r != "ConfigRolled"]
        return "ConfigRolled" in said and states[-1:] == ["Available"]

    wait_until(roll_told_over, 30, "Events: ConfigRolled, and Available once the roll is over")
    generation = kubectl.get("deployment", "modelapi-edit", namespace)["metadata"]["generation"]

    spec = wildcard("http://two.example:11434") | {"gatewayRoute": {"timeout": "5m"}}
    kubectl.apply(modelapi_yaml("edit", spec), namespace)

    def route_timeout() -> str | None:
        route = kubectl.get("httproute", "modelapi-edit", namespace)
        return route["spec"]["rules"][0].get("timeouts", {}).get("request") if route else None

    wait_until(lambda: route_timeout() == "5m", 30, "HTTPRoute timeout 5m")
    deployment = kubectl.get("deployment", "modelapi-edit", namespace)
    assert deployment["metadata"]["generation"] == generation  # the pods were not touched
    assert template_hash(kubectl, "edit", namespace) == second


async def test_a_gateway_writing_its_routes_status_wakes_no_reconcile(kubectl: Kubectl, operator: OperatorProcess,
                                                                      namespace: str) -> None:
    kubectl.apply(modelapi_yaml("routed", mock()), namespace)
    kubectl.wait_phase("routed", namespace, "Ready")
    route = "modelapi-routed"
    wait_until(lambda: kubectl.get("httproute", route, namespace), 30, "the HTTPRoute")

    def reconciles_of_routed() -> int:  # (the metric counts every namespace's: other tests' leave some behind)
        key = f"modelapi={namespace}/routed "
        return sum(1 for line in operator.log_path.read_text().splitlines() if "reconciled" in line and key in line)

    before = reconciles_of_routed()
    # What a Gateway's controller writes into the routes it serves, again and again (a reconfiguration, a
    # restart): the operator never reads a route's status.
    for i in range(10):
        condition = {"type": "Accepted", "status": "True", "reason": "Accepted", "message": f"accepted ({i})",
                     "lastTransitionTime": f"2026-11-29T00:00:{i:02d}Z", "observedGeneration": 1}
        parents = [{"parentRef": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE},
                    "controllerName": "example.com/gateway-controller", "conditions": [condition]}]
        kubectl.run("patch", "httproute", route, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"parents": parents}}))
    # Then a label, on the same watch stream after them: that reaches the cache, and wakes its ModelAPI once.
    kubectl.run("label", "httproute", route, "-n", namespace, "example.com/team=a")
    wait_until(lambda: reconciles_of_routed() > before, 30, "the label's reconcile")
    assert reconciles_of_routed() - before < 5  # (one a status write, 10 or more, when the cache kept them)


async def test_mode_switch_leaves_exactly_the_right_children(kubectl: Kubectl, operator: OperatorProcess,
                                                             namespace: str) -> None:
    proxy_children = {"ConfigMap/litellm-config-switch", "Secret/litellm-master-key-switch",
                      "Deployment/modelapi-switch", "Service/modelapi-switch", "HTTPRoute/modelapi-switch"}
    hosted_children = {"Deployment/modelapi-switch", "Service/modelapi-switch", "HTTPRoute/modelapi-switch"}
    kubectl.apply(modelapi_yaml("switch", mock()), namespace)
    wait_until(lambda: kubectl.children("switch", namespace) == proxy_children, 30, "Proxy children")

    kubectl.apply(modelapi_yaml("switch", HOSTED), namespace)
    wait_until(lambda: kubectl.children("switch", namespace) == hosted_children, 30, "Hosted children only")
    st = kubectl.wait_phase("switch", namespace, "Ready")
    assert st["endpoint"].endswith(":11434")
    service = kubectl.get("service", "modelapi-switch", namespace)
    assert [p["port"] for p in service["spec"]["ports"]] == [11434]

    kubectl.apply(modelapi_yaml("switch", mock()), namespace)
    wait_until(lambda: kubectl.children("switch", namespace) == proxy_children, 30, "Proxy children again")
    deployment = kubectl.get("deployment", "modelapi-switch", namespace)
    assert not deployment["spec"]["template"]["spec"].get("initContainers")
    kubectl.wait_phase("switch", namespace, "Ready")


async def test_the_seeds_reference_example_with_both_blocks_serves_its_mode_and_switches(
        kubectl: Kubectl, operator: OperatorProcess, namespace: str) -> None:
    both = {**mock(), "hostedConfig": HOSTED["hostedConfig"]}
    kubectl.apply(modelapi_yaml("both", both), namespace)
    st = kubectl.wait_phase("both", namespace, "Ready")
    assert st["endpoint"].endswith(":8000")
    assert "hostedConfig is ignored because mode is Proxy" in st["message"]
    wait_until(lambda: any("hostedConfig is ignored" in e.get("note", "")
                           for e in events_for(kubectl, "both", namespace)), 30, "an Event naming the ignored block")

    kubectl.apply(modelapi_yaml("both", {**both, "mode": "Hosted"}), namespace)  # switching mode just works
    wait_until(lambda: kubectl.status("both", namespace)["endpoint"].endswith(":11434"), 30, "the Hosted endpoint")
    st = kubectl.wait_phase("both", namespace, "Ready")
    assert "proxyConfig is ignored because mode is Hosted" in st["message"]
    assert "ConfigMap/litellm-config-both" not in kubectl.children("both", namespace)


async def test_kubectl_scale_modelapi_scales_its_pods_without_rolling_them(
        kubectl: Kubectl, operator: OperatorProcess, namespace: str) -> None:
    kubectl.apply(modelapi_yaml("scaled", mock()), namespace)
    kubectl.wait_phase("scaled", namespace, "Ready")
    running = template_hash(kubectl, "scaled", namespace)

    kubectl.run("scale", "modelapi/scaled", "-n", namespace, "--replicas=3")
    wait_until(lambda: kubectl.status("scaled", namespace).get("readiness") == "3/3", 60, "3 of 3 pods ready")
    assert "3/3" in kubectl.run("get", "modelapi", "scaled", "-n", namespace).stdout  # the READY column
    budget = wait_until(lambda: kubectl.get("poddisruptionbudget", "modelapi-scaled", namespace), 30, "a PDB")
    assert budget["spec"]["maxUnavailable"] == 1
    scale = json.loads(kubectl.run("get", "--raw", f"/apis/kaos.tools/v1alpha1/namespaces/{namespace}/modelapis/"
                                   "scaled/scale").stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["selector"] == "app=modelapi,modelapi=scaled"
    assert template_hash(kubectl, "scaled", namespace) == running  # scaling never rolls the pods
    assert pods_run_only(kubectl, "scaled", namespace, running)
    wait_until(lambda: kubectl.status("scaled", namespace)["message"] == "3 of 3 pods ready", 30, "the pods counted")
    said = reasons_said(kubectl, "scaled", namespace)
    assert all(a != b for a, b in pairwise(said)), said  # each Event a new state, not one a pod counted
    # While the new pods start, the Deployment is not Available (maxUnavailable 0 wants all three), yet the first
    # pod serves: the ModelAPI stays Ready (an autoscaler's scale-up must not page anyone), saying how many are.
    assert "PodsNotReady" not in said and said[0] == "Available", said

    kubectl.run("scale", "modelapi/scaled", "-n", namespace, "--replicas=1")
    wait_until(lambda: kubectl.status("scaled", namespace).get("readiness") == "1/1", 60, "1 of 1 pods ready")
    wait_until(lambda: kubectl.get("poddisruptionbudget", "modelapi-scaled", namespace) is None, 30,
               "no PDB for one pod")
    wait_until(lambda: kubectl.status("scaled", namespace)["message"] == "1 of 1 pods ready", 30, "the pods counted")
    assert "RollingOut" not in reasons_said(kubectl, "scaled", namespace)  # a scale, either way, is not a roll


async def test_deleting_a_modelapi_removes_its_children(kubectl: Kubectl, operator: OperatorProcess,
                                                        namespace: str) -> None:
    kubectl.apply(modelapi_yaml("gone", mock()), namespace)
    kubectl.wait_phase("gone", namespace, "Ready")
    kubectl.run("delete", "modelapi", "gone", "-n", namespace)
    wait_until(lambda: not kubectl.children("gone", namespace), 60, "children garbage-collected")
    wait_until(lambda: not kubectl.list("pods", namespace, "modelapi=gone"), 60, "pods gone")


async def test_hand_edits_are_reverted_but_foreign_fields_are_kept(kubectl: Kubectl, operator: OperatorProcess,
                                                                   namespace: str) -> None:
    kubectl.apply(modelapi_yaml("edited", mock()), namespace)
    kubectl.wait_phase("edited", namespace, "Ready")
    deployment = "deployment/modelapi-edited"
    original_image = kubectl.get("deployment", "modelapi-edited", namespace)["spec"]["template"]["spec"][
        "containers"][0]["image"]

    kubectl.run("delete", "service", "modelapi-edited", "-n", namespace)
    wait_until(lambda: kubectl.get("service", "modelapi-edited", namespace), 30, "the Service re-created")
    kubectl.run("patch", "service", "modelapi-edited", "-n", namespace, "--type=json",
                "-p", '[{"op": "replace", "path": "/spec/ports/0/port", "value": 9999}]')
    kubectl.run("set", "image", deployment, "model-api=example.com/evil:1", "-n", namespace)
    kubectl.run("set", "env", deployment, "LITELLM_LOCAL_MODEL_COST_MAP=False", "-n", namespace)
    kubectl.run("annotate", deployment, "team=ml", "-n", namespace)
    kubectl.run("scale", deployment, "--replicas=2", "-n", namespace)

    def restored() -> bool:
        obj = kubectl.get("deployment", "modelapi-edited", namespace)
        service = kubectl.get("service", "modelapi-edited", namespace)
        container = obj["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        return (container["image"] == original_image and env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
                and service is not None and [p["port"] for p in service["spec"]["ports"]] == [8000])

    wait_until(restored, 30, "image, env and Service put back")
    wait_for_reconcile(operator, kubectl, "edited", namespace)
    obj = kubectl.get("deployment", "modelapi-edited", namespace)
    assert obj["metadata"]["annotations"]["team"] == "ml"
    assert obj["spec"]["replicas"] == 2
    reasons = {e["reason"] for e in events_for(kubectl, "edited", namespace)}
    assert "FieldsReclaimed" in reasons


async def test_missing_config_secret_is_pending_until_it_exists(kubectl: Kubectl, operator: OperatorProcess,
                                                                namespace: str) -> None:
    spec = {"mode": "Proxy", "proxyConfig": {"configYaml": {"fromSecretKeyRef": {"name": "later", "key": "c"}}}}
    kubectl.apply(modelapi_yaml("waits", spec), namespace)
    st = kubectl.wait_phase("waits", namespace, "Pending")
    wait_until(lambda: "later" in kubectl.status("waits", namespace).get("message", ""), 30,
               "a message naming the Secret")
    assert ready_condition(kubectl.status("waits", namespace))["reason"] == "SecretNotFound"
    assert st["ready"] is False
    kubectl.run("create", "secret", "generic", "later", "-n", namespace, "--from-literal=c=model_list: []")
    kubectl.wait_phase("waits", namespace, "Ready")

    # LiteLLM does not reload its config: a new version of the Secret must roll the pods.
    first = template_hash(kubectl, "waits", namespace)
    kubectl.run("patch", "secret", "later", "-n", namespace, "-p", '{"stringData": {"c": "model_list: [] # v2"}}')
    wait_until(lambda: template_hash(kubectl, "waits", namespace) != first, 30, "a new pod template")
    second = template_hash(kubectl, "waits", namespace)
    wait_until(lambda: pods_run_only(kubectl, "waits", namespace, second), 60, "pods of the new template only")


async def test_bad_override_and_bad_config_fail_without_stopping_others(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    bad_override = dict(HOSTED, podSpec={"containers": [{"image": "no-name-given"}]})
    bad_config = {"mode": "Proxy", "proxyConfig": {"configYaml": {"fromString": "model_list: [oops"}}}
    kubectl.apply(modelapi_yaml("bad-override", bad_override), namespace)
    kubectl.apply(modelapi_yaml("bad-config", bad_config), namespace)
    kubectl.apply(modelapi_yaml("fine", mock()), namespace)
    for name, reason in (("bad-override", "InvalidPodSpec"), ("bad-config", "InvalidConfig")):
        st = kubectl.wait_phase(name, namespace, "Failed")
        condition = ready_condition(st)
        assert condition["status"] == "False" and condition["reason"] == reason
        assert "spec." in st["message"]
        wait_until(lambda n=name, r=reason: any(e["reason"] == r and e["type"] == "Warning"
                                                for e in events_for(kubectl, n, namespace)), 30, f"{reason} Event")
    kubectl.wait_phase("fine", namespace, "Ready")
    assert not kubectl.children("bad-config", namespace)  # nothing half-built


async def test_a_podspec_the_api_server_refuses_fails_once_and_leaves_the_running_pods(
        kubectl: Kubectl, operator: OperatorProcess, namespace: str) -> None:
    """An override that merges cleanly but yields a Deployment the API server refuses is the user's to fix:
    Failed with the server's message, one Warning Event, no retries, and the pods keep running."""
    kubectl.apply(modelapi_yaml("refused", mock()), namespace)
    kubectl.wait_phase("refused", namespace, "Ready")
    running = template_hash(kubectl, "refused", namespace)

    broken = dict(mock(), podSpec={"containers": [{"name": "model-api", "image": ""}]})
    kubectl.apply(modelapi_yaml("refused", broken), namespace)
    st = kubectl.wait_phase("refused", namespace, "Failed")
    assert ready_condition(st)["reason"] == "InvalidPodSpec"
    assert "Deployment/modelapi-refused" in st["message"] and "image: Required value" in st["message"]
    wait_until(lambda: [e for e in events_for(kubectl, "refused", namespace) if e["reason"] == "InvalidPodSpec"],
               30, "an InvalidPodSpec Event")
    wait_for_reconcile(operator, kubectl, "refused", namespace)  # woken again: still no retry, no new Event
    warnings = [e for e in events_for(kubectl, "refused", namespace) if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["InvalidPodSpec"]
    key = f"{namespace}/refused"
    retries = [line for line in operator.log_path.read_text().splitlines() if key in line and "retrying" in line]
    assert retries == []  # (the session's operator serves other tests' namespaces too: not a global count)
    assert template_hash(kubectl, "refused", namespace) == running  # the running pods were left alone
    assert pods_run_only(kubectl, "refused", namespace, running)

    kubectl.apply(modelapi_yaml("refused", mock()), namespace)
    kubectl.wait_phase("refused", namespace, "Ready")


async def test_status_reports_model_pull_and_failing_container(kubectl: Kubectl, operator: OperatorProcess,
                                                              namespace: str) -> None:
    slow_pull = dict(HOSTED, podSpec={"initContainers": [
        {"name": "pull-model", "env": [{"name": "KAOS_FAKE_RUN_SECONDS", "value": "600"}]}]})
    kubectl.apply(modelapi_yaml("pulling", slow_pull), namespace)
    wait_until(lambda: kubectl.status("pulling", namespace).get("message") == "pulling model smollm2:135m", 60,
               "the pulling message")
    assert kubectl.status("pulling", namespace)["phase"] == "Pending"

    crashing = dict(mock(), podSpec={"containers": [
        {"name": "model-api", "env": [{"name": "KAOS_FAKE_EXIT_CODE", "value": "1"}]}]})
    kubectl.apply(modelapi_yaml("crashing", crashing), namespace)
    st = kubectl.wait_phase("crashing", namespace, "Failed")
    assert ready_condition(st)["reason"] == "ContainerFailing"
    assert "model-api" in st["message"] and "kubectl logs" in st["message"]


async def test_a_roll_held_up_by_a_crashing_pod_says_why_while_the_old_pod_serves(
        kubectl: Kubectl, operator: OperatorProcess, namespace: str) -> None:
    kubectl.apply(modelapi_yaml("stuck", mock()), namespace)
    kubectl.wait_phase("stuck", namespace, "Ready")
    crashing = dict(mock(), podSpec={"containers": [
        {"name": "model-api", "env": [{"name": "KAOS_FAKE_EXIT_CODE", "value": "1"}]}]})
    kubectl.apply(modelapi_yaml("stuck", crashing), namespace)  # a new pod template: a roll, whose pod crashes

    def says_why() -> dict[str, Any] | None:
        st = kubectl.status("stuck", namespace)
        return st if "model-api is failing" in st.get("message", "") else None

    st = wait_until(says_why, 60, "the roll's message naming the failing container")
    assert (st["phase"], st["ready"], ready_condition(st)["reason"]) == ("Ready", True, "RollingOut")
    assert st["message"].startswith("rolling out: ")
    assert "RollingOut" in reasons_said(kubectl, "stuck", namespace)


async def test_a_store_added_later_moves_the_deployment_to_recreate(kubectl: Kubectl, operator: OperatorProcess,
                                                                    namespace: str) -> None:
    """A Deployment made without a strategy carries the API server's rollingUpdate defaults, which no field
    manager owns; the operator still moves it to Recreate when a ReadWriteOnce store is added."""
    kubectl.apply(modelapi_yaml("later", HOSTED), namespace)

    def strategy() -> dict[str, Any] | None:
        deployment = kubectl.get("deployment", "modelapi-later", namespace)
        return deployment["spec"]["strategy"] if deployment else None

    assert wait_until(strategy, 60, "the Deployment")["type"] == "RollingUpdate"
    with_store = {**HOSTED, "hostedConfig": {**HOSTED["hostedConfig"], "modelStore": {"size": "1Gi"}}}
    kubectl.apply(modelapi_yaml("later", with_store), namespace)
    wait_until(lambda: strategy() == {"type": "Recreate"}, 60, "the Recreate strategy")
    st = kubectl.status("later", namespace)
    assert st["phase"] != "Failed", st
    assert not [e for e in events_for(kubectl, "later", namespace) if e["type"] == "Warning"]


async def test_invalid_specs_are_refused_at_apply_time_with_the_field_named(kubectl: Kubectl, crd: str,
                                                                            namespace: str) -> None:
    cases = {
        "spec.proxyConfig": {"mode": "Proxy"},
        "spec.hostedConfig": {"mode": "Hosted", "proxyConfig": {"model": "m"}},
        "at least one of apiBase": {"mode": "Proxy", "proxyConfig": {}},
        "exactly one of fromString or fromSecretKeyRef": {"mode": "Proxy", "proxyConfig": {"configYaml": {
            "fromString": "a: b", "fromSecretKeyRef": {"name": "s", "key": "k"}}}},
        "spec.proxyConfig.apiBase": {"mode": "Proxy", "proxyConfig": {"apiBase": "not a url"}},
        "spec.gatewayRoute.timeout": {"mode": "Proxy", "proxyConfig": {"model": "m"},
                                      "gatewayRoute": {"timeout": "two minutes"}},
    }
    for expected, spec in cases.items():
        done = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=modelapi_yaml("refused", spec), check=False)
        assert done.returncode != 0, f"accepted: {spec}"
        assert expected in done.stderr, done.stderr
    long_name = "n" * 55
    done = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=modelapi_yaml(long_name, mock()), check=False)
    assert done.returncode != 0 and "at most 54 characters" in done.stderr, done.stderr
    done = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=modelapi_yaml("a.b", mock()), check=False)
    assert done.returncode != 0 and "must not contain '.'" in done.stderr, done.stderr
    done = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=modelapi_yaml("n" * 54, mock()), check=False)
    assert done.returncode == 0, done.stderr


async def test_a_converged_cluster_gets_no_writes_after_a_restart(kubectl: Kubectl, operator: OperatorProcess,
                                                                  namespace: str) -> None:
    names = [f"steady-{i}" for i in range(5)]
    for name in names:
        kubectl.apply(modelapi_yaml(name, mock()), namespace)
    for name in names:
        kubectl.wait_phase(name, namespace, "Ready")
    # Earlier tests' namespaces are still being emptied by the namespace controller: let that finish.
    wait_until(lambda: not [n for n in kubectl.list("namespaces", "default")
                            if n["status"].get("phase") == "Terminating"], 120, "no terminating namespaces")
    operator.restart()
    wait_until(lambda: reconciles(operator) >= len(names), 60, "the initial reconciles")
    before = apiserver_writes(kubectl.raw_metrics(), CHILD_RESOURCES)
    after_start = reconciles(operator)
    # A full resync enqueues every ModelAPI again: wait until all have been looked at once more.
    wait_until(lambda: reconciles(operator) >= after_start + len(names), 60, "a full resync")
    after = apiserver_writes(kubectl.raw_metrics(), CHILD_RESOURCES)
    assert after - before == 0
    metrics = operator.metrics()
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert metric_value(metrics, "rest_client_requests_total", method=method) == 0, method


def refused_writes(operator: OperatorProcess) -> float:
    metrics = operator.metrics()
    return sum(metric_value(metrics, "rest_client_requests_total", method=m, code=str(code))
               for m in ("POST", "PUT", "PATCH", "DELETE") for code in (403, 404, 409, 422))


async def test_deleting_a_namespace_gets_no_refused_write(kubectl: Kubectl, operator: OperatorProcess,
                                                         namespace: str) -> None:
    """The namespace controller deletes the children before the ModelAPIs: the reconciles that wakes must not
    re-create them (or post Events) in the namespace being deleted, which the API server refuses."""
    names = [f"doomed-{i}" for i in range(4)]
    for name in names:
        kubectl.apply(modelapi_yaml(name, mock()), namespace)
    for name in names:
        kubectl.wait_phase(name, namespace, "Ready")
    before = refused_writes(operator)
    kubectl.run("delete", "namespace", namespace, "--wait=false")
    wait_until(lambda: kubectl.get("namespace", namespace, "default") is None, 120, f"namespace {namespace} gone")
    assert refused_writes(operator) - before == 0


async def test_gateway_without_httproute_crd_is_reported_and_the_rest_reconciles(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    crd_name = "httproutes.gateway.networking.k8s.io"
    saved = json.loads(kubectl.run("get", "crd", crd_name, "-o", "json").stdout)
    for field in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation"):
        saved["metadata"].pop(field, None)
    saved.pop("status", None)
    operator.stop()
    kubectl.run("delete", "crd", crd_name, "--wait=true")
    second = OperatorProcess(operator.kubeconfig, args=["--gateway-name", GATEWAY_NAME, "--gateway-namespace",
                                                        GATEWAY_NAMESPACE], log_path=tmp_path / "operator.log")
    try:
        second.start()
        kubectl.apply(modelapi_yaml("no-routes", mock()), namespace)
        st = kubectl.wait_phase("no-routes", namespace, "Ready")
        assert "HTTPRoute" in st["message"] and "Gateway API" in st["message"]
        wait_until(lambda: any(e["reason"] == "GatewayAPIMissing" for e in events_for(kubectl, "no-routes", namespace)),
                   30, "GatewayAPIMissing Event")
        kubectl.run("create", "-f", "-", stdin=json.dumps(saved))
        wait_until(lambda: kubectl.get("httproute", "modelapi-no-routes", namespace) is not None, 90,
                   "the HTTPRoute once the API is installed")
        wait_until(lambda: "HTTPRoute" not in kubectl.status("no-routes", namespace)["message"], 30,
                   "the warning cleared")
    finally:
        second.stop()
        if kubectl.get("crd", crd_name, "default") is None:
            kubectl.run("create", "-f", "-", stdin=json.dumps(saved))
        operator.start()


async def test_sigterm_stops_the_operator_cleanly_within_seconds(kubeconfig: str, crd: str, tmp_path: Path) -> None:
    process = OperatorProcess(kubeconfig, log_path=tmp_path / "operator.log")
    process.start()
    started = time.monotonic()
    assert process.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - started < 15
    assert "shutting down" in (tmp_path / "operator.log").read_text()


async def test_metrics_use_controller_runtime_names_with_real_values(kubectl: Kubectl, operator: OperatorProcess,
                                                                     namespace: str) -> None:
    kubectl.apply(modelapi_yaml("counted", mock()), namespace)
    kubectl.wait_phase("counted", namespace, "Ready")
    text = operator.metrics()
    assert metric_value(text, "controller_runtime_reconcile_total", controller="modelapi", result="success") > 0
    assert metric_value(text, "controller_runtime_reconcile_time_seconds_count", controller="modelapi") > 0
    assert metric_value(text, "workqueue_adds_total", name="modelapi") > 0
    assert metric_value(text, "workqueue_queue_duration_seconds_count", name="modelapi") > 0
    assert metric_value(text, "workqueue_work_duration_seconds_count", name="modelapi") > 0
    assert metric_value(text, "rest_client_requests_total", code="200", method="GET") > 0
    assert metric_value(text, "rest_client_requests_total", method="PATCH") > 0
    assert metric_value(text, "kaos_modelapi_modelapis", phase="Ready") >= 1
    for gauge in ("workqueue_unfinished_work_seconds", "workqueue_longest_running_processor_seconds",
                  "kaos_modelapi_burst_held"):
        assert f'{gauge}{{name="modelapi"}} ' in text, gauge  # read from the queue when scraped
    assert "\nkaos_modelapi_api_requests_waiting 0.0\n" in text  # read from the client's lane: none when idle
    for name in ("controller_runtime_reconcile_errors_total", "workqueue_depth", "workqueue_retries_total",
                 "controller_runtime_terminal_reconcile_errors_total", "leader_election_master_status"):
        assert f"# TYPE {name} " in text, name
