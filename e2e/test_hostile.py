"""A corpus of invalid and hostile ModelAPIs against the real API server and the running operator.

Each one is either refused when applied, with a message that names the field, or accepted and then reported
in status (and an Event) -- or, for input that is odd but harmless (shell metacharacters in a model name),
served safely. Meanwhile a well-formed neighbour keeps reconciling, and the operator's memory is printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from e2e.operator_process import Kubectl, OperatorProcess, wait_until
from kaos_modelapi import ollama

pytestmark = pytest.mark.cluster

MOCK = {"mode": "Proxy", "proxyConfig": {"model": "m"}}
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
) + "model_list: *i\n"


def proxy(**config: Any) -> dict[str, Any]:
    return {"mode": "Proxy", "proxyConfig": config}


def with_pod(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {**MOCK, "podSpec": pod_spec}


def env(*variables: dict[str, Any]) -> dict[str, Any]:
    return proxy(model="m", env=list(variables))


@dataclass(frozen=True)
class Case:
    name: str
    spec: Any
    refused: str = ""  # the apply fails and stderr names this
    reason: str = ""  # accepted; the Ready condition ends with this reason
    metadata_name: str = ""

    @property
    def object_name(self) -> str:
        return self.metadata_name or self.name


CASES = [
    # Wrong types, missing and conflicting blocks: the schema and CEL refuse them, naming the field.
    Case("no-mode", {"proxyConfig": {"model": "m"}}, refused="spec.mode"),
    Case("bad-mode", {"mode": "Proxi", "proxyConfig": {"model": "m"}}, refused="spec.mode"),
    Case("mode-int", {"mode": 7, "proxyConfig": {"model": "m"}}, refused="spec.mode"),
    Case("spec-string", "Proxy", refused="spec"),
    Case("no-proxy-block", {"mode": "Proxy"}, refused="spec.proxyConfig"),
    Case("no-hosted-block", {"mode": "Hosted"}, refused="spec.hostedConfig"),
    Case("empty-proxy-block", proxy(), refused="at least one of apiBase"),
    Case("both-config-sources", proxy(configYaml={"fromString": "a: b", "fromSecretKeyRef": {"name": "s", "key": "k"}}),
         refused="exactly one of fromString or fromSecretKeyRef"),
    Case("no-config-source", proxy(configYaml={}), refused="exactly one of fromString or fromSecretKeyRef"),
    Case("api-base-not-url", proxy(apiBase="not a url"), refused="spec.proxyConfig.apiBase"),
    Case("api-base-ftp", proxy(apiBase="ftp://x"), refused="spec.proxyConfig.apiBase"),
    Case("api-base-newline", proxy(apiBase="http://a\nb"), refused="spec.proxyConfig.apiBase"),
    Case("api-base-huge", proxy(apiBase="http://" + "a" * 5000), refused="spec.proxyConfig.apiBase"),
    Case("model-empty", proxy(model=""), refused="spec.proxyConfig.model"),
    Case("model-huge", proxy(model="m" * 1000), refused="spec.proxyConfig.model"),
    Case("model-int", proxy(model=5), refused="spec.proxyConfig.model"),
    Case("hosted-model-empty", {"mode": "Hosted", "hostedConfig": {"model": ""}}, refused="spec.hostedConfig.model"),
    Case("unknown-field", {**MOCK, "bogus": 1}, refused="bogus"),
    Case("unknown-nested-field", proxy(model="m", apiKey="x"), refused="apiKey"),
    Case("env-not-a-list", proxy(model="m", env={"A": "b"}), refused="spec.proxyConfig.env"),
    Case("env-too-many", env(*({"name": f"V{i}", "value": "x"} for i in range(300))), refused="spec.proxyConfig.env"),
    Case("env-no-name", env({"value": "x"}), refused="name"),
    Case("secret-ref-no-key", env({"name": "K", "valueFrom": {"secretKeyRef": {"name": "s"}}}), refused="key"),
    Case("config-one-mb", proxy(configYaml={"fromString": "a: " + "x" * 1_000_000}), refused="fromString"),
    # Past the API server's request limit, before any schema: refused as too large, which is the field's size.
    Case("config-several-mb", proxy(configYaml={"fromString": "a: " + "x" * 3_000_000}),
         refused="Request entity too large"),
    Case("timeout-words", {**MOCK, "gatewayRoute": {"timeout": "two minutes"}}, refused="spec.gatewayRoute.timeout"),
    Case("replicas-negative", {**MOCK, "replicas": -1}, refused="spec.replicas"),
    Case("replicas-word", {**MOCK, "replicas": "three"}, refused="spec.replicas"),
    Case("replicas-huge", {**MOCK, "replicas": 100000}, refused="spec.replicas"),
    Case("podspec-not-a-map", {**MOCK, "podSpec": ["containers"]}, refused="spec.podSpec"),
    Case("podspec-containers-not-a-list", with_pod({"containers": {"name": "x"}}), refused="containers"),
    Case("name-too-long", MOCK, refused="at most 54 characters", metadata_name="n" * 55),
    Case("name-with-dot", MOCK, refused="must not contain '.'", metadata_name="a.b"),
    # What only the operator can see: accepted, then Failed or Pending in status with a reason and an Event.
    Case("config-not-yaml", proxy(configYaml={"fromString": "model_list: [\n"}), reason="InvalidConfig"),
    Case("config-not-a-mapping", proxy(configYaml={"fromString": "- a\n- b\n"}), reason="InvalidConfig"),
    Case("config-yaml-bomb", proxy(configYaml={"fromString": BILLION_LAUGHS}), reason="Available"),
    Case("podspec-typo", with_pod({"containers": [{"name": "model-api", "imagePullPolicyy": "Always"}]}),
         reason="InvalidPodSpec"),
    Case("podspec-empty-image", with_pod({"containers": [{"name": "model-api", "image": ""}]}),
         reason="InvalidPodSpec"),
    Case("podspec-deletes-the-container", with_pod({"containers": [{"name": "model-api", "$patch": "delete"}]}),
         reason="InvalidPodSpec"),
    Case("podspec-bad-quantity", with_pod({"containers": [{"name": "model-api",
                                                           "resources": {"limits": {"cpu": "lots"}}}]}),
         refused="spec.podSpec.containers[0].resources.limits.cpu"),
    Case("env-name-with-equals", env({"name": "A=B", "value": "x"}), reason="InvalidPodSpec"),
    Case("missing-env-secret", env({"name": "K", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}),
         reason="SecretNotFound"),
    Case("missing-config-secret", proxy(configYaml={"fromSecretKeyRef": {"name": "absent", "key": "config.yaml"}}),
         reason="SecretNotFound"),
    Case("missing-configmap-volume", with_pod({"volumes": [{"name": "x", "configMap": {"name": "absent"}}]}),
         reason="Available"),  # the pod waits for it (kubelet); the stand-in node does not mount volumes
    # Odd but harmless: served, with the hostile text only ever as data.
    Case("model-shell-metacharacters", proxy(model="$(touch /tmp/pwned); `id` | rm -rf / && echo"),
         reason="Available"),
    Case("model-newline", proxy(model="a\nb: c"), reason="Available"),
    Case("hosted-model-shell-metacharacters", {"mode": "Hosted", "hostedConfig": {"model": "x; rm -rf / #"}},
         reason="Available"),
    Case("env-value-large", env({"name": "BIG", "value": "v" * 200_000}), reason="Available"),
    Case("reserved-env-overridden", env({"name": "KAOS_LITELLM_AUTH", "value": "mock"}), reason="Available"),
    Case("name-at-the-limit", MOCK, reason="Available", metadata_name="n" * 54),
]


def manifest(case: Case) -> str:
    return yaml.safe_dump({"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
                           "metadata": {"name": case.object_name}, "spec": case.spec}, width=1 << 30)


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status", encoding="ascii"):  # noqa: SIM115 (a small /proc read)
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ready_reason(kubectl: Kubectl, name: str, namespace: str) -> str:
    conditions = (kubectl.status(name, namespace) or {}).get("conditions") or []
    return next((str(c.get("reason")) for c in conditions if c.get("type") == "Ready"), "")


async def test_invalid_and_hostile_modelapis_are_refused_or_reported_and_the_rest_reconcile(
        kubectl: Kubectl, operator: OperatorProcess, namespace: str) -> None:
    assert len(CASES) >= 40
    assert operator.proc is not None
    rss_before = rss_kib(operator.proc.pid)
    accepted = []
    for case in CASES:
        done = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=manifest(case), check=False)
        if case.refused:
            assert done.returncode != 0, f"{case.name}: accepted"
            assert case.refused in done.stderr, f"{case.name}: {done.stderr[:500]}"
        else:
            assert done.returncode == 0, f"{case.name}: {done.stderr[:500]}"
            accepted.append(case)
    kubectl.apply(manifest(Case("neighbour", MOCK)), namespace)

    for case in accepted:
        wait_until(lambda c=case: ready_reason(kubectl, c.object_name, namespace) == c.reason, 90,
                   f"{case.name}: reason {case.reason}")
    kubectl.wait_phase("neighbour", namespace, "Ready")
    events = kubectl.list("events.events.k8s.io", namespace)
    for case in accepted:
        if case.reason != "Available":
            assert any(e.get("regarding", {}).get("name") == case.object_name and e.get("reason") == case.reason
                       for e in events), f"{case.name}: no {case.reason} Event"

    deployment = kubectl.get("deployment", "modelapi-hosted-model-shell-metacharacters", namespace)
    assert deployment is not None
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert "rm -rf" not in " ".join(init["command"])  # the model reaches the shell only as data (env)
    assert {"name": ollama.ENV_MODEL, "value": "x; rm -rf / #"} in init["env"]
    rss_after = rss_kib(operator.proc.pid)
    print(f"\noperator RSS: {rss_before / 1024:.1f} MiB before the corpus, {rss_after / 1024:.1f} MiB after "
          f"({len(CASES)} cases, {len(accepted)} accepted); pid {operator.proc.pid}, {os.uname().machine}")
