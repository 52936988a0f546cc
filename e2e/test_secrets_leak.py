"""No Secret value ever leaves a Secret: after a run that used Secrets in every way a ModelAPI allows, none
of their values is in the operator's log (at debug level), Events, statuses, the ConfigMaps it wrote, its
metrics, or the children it applied -- nor is the master key it generated."""

from __future__ import annotations

import base64
import secrets

import pytest
import yaml

from e2e.operator_process import Kubectl, OperatorProcess, wait_until

pytestmark = pytest.mark.cluster


def secret(name: str, **values: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                           "stringData": values})


def modelapi(name: str, spec: dict[str, object]) -> str:
    return yaml.safe_dump({"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
                           "metadata": {"name": name}, "spec": spec})


def env_from(name: str, secret_name: str, key: str) -> dict[str, object]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}


async def test_no_secret_value_appears_anywhere_the_operator_writes(
        kubectl: Kubectl, operator: OperatorProcess, namespace: str) -> None:
    values = {k: f"kaos-leak-{k}-{secrets.token_hex(12)}" for k in ("api", "master", "config", "hosted")}
    config = f"model_list:\n- model_name: m\n  litellm_params: {{model: openai/m, api_key: {values['config']}}}\n"
    kubectl.apply(secret("keys", api=values["api"], master=values["master"], hosted=values["hosted"]), namespace)
    kubectl.apply(secret("routes", **{"config.yaml": config}), namespace)
    uses = {
        "env-secret": {"mode": "Proxy", "proxyConfig": {"apiBase": "http://backend:8000/v1", "model": "m",
                                                        "env": [env_from("OPENAI_API_KEY", "keys", "api"),
                                                                env_from("LITELLM_MASTER_KEY", "keys", "master")]}},
        "config-secret": {"mode": "Proxy", "proxyConfig": {
            "configYaml": {"fromSecretKeyRef": {"name": "routes", "key": "config.yaml"}}}},
        "generated-key": {"mode": "Proxy", "proxyConfig": {"model": "m"}},
        "hosted-secret": {"mode": "Hosted", "hostedConfig": {"model": "tiny",
                                                             "env": [env_from("OLLAMA_KEY", "keys", "hosted")]}},
        "missing-secret": {"mode": "Proxy", "proxyConfig": {"model": "m",
                                                            "env": [env_from("K", "absent", "k")]}},
    }
    for name, spec in uses.items():
        kubectl.apply(modelapi(name, spec), namespace)
    for name in uses:
        if name != "missing-secret":
            kubectl.wait_phase(name, namespace, "Ready")
    wait_until(lambda: kubectl.status("missing-secret", namespace).get("phase") == "Pending", 60, "Pending")
    # Rotate one: the operator sees the update (and rolls the config user) without ever reading the value.
    kubectl.apply(secret("routes", **{"config.yaml": config + "# rotated\n"}), namespace)
    kubectl.wait_phase("config-secret", namespace, "Ready")

    generated = kubectl.get("secret", "litellm-master-key-generated-key", namespace)
    assert generated is not None
    values["generated"] = base64.b64decode(next(iter(generated["data"].values()))).decode()

    written = {
        "operator log": operator.log_path.read_text(),
        "metrics": operator.metrics(),
        "events": yaml.safe_dump(kubectl.list("events.events.k8s.io", namespace)),
        "modelapis": yaml.safe_dump(kubectl.list("modelapis", namespace)),
    }
    for kind in ("configmaps", "deployments", "services"):
        written[kind] = yaml.safe_dump(kubectl.list(kind, namespace, "app.kubernetes.io/managed-by=kaos-modelapi"))
    assert "kaos-leak-" not in written["configmaps"] and written["deployments"]  # the scan reads real objects
    for where, text in written.items():
        for key, value in values.items():
            assert value not in text, f"the {key} Secret value is in the {where}"
            assert base64.b64encode(value.encode()).decode() not in text, f"the {key} value (base64) is in {where}"
