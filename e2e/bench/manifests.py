"""What the scenarios apply: N ModelAPIs in a realistic mix, their update, and unrelated noise.

The mix, per ten ModelAPIs: two wildcard Proxies (apiBase), two single-model (apiBase + model), two mocks,
one with a full LiteLLM configYaml, one mock with env, its own route timeout and a podSpec override, and two
Hosted. The operator runs with a Gateway (--gateway-name), so every one has an HTTPRoute.

BENCH_MIX picks another mix, to measure a peer (another operator of kaos.tools/v1alpha1, e.g. KAOS's Go one) on
what both CRDs have: `peer` is half mock Proxy, half Hosted, spelled for this CRD (proxyConfig.model); `peer-kaos`
the same ModelAPIs spelled for KAOS's CRD (proxyConfig.models, a list, which it requires and this CRD does not
know). Their update sets an env var through a podSpec override of the `model-api` container, which both CRDs
accept and both operators name so.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

API_VERSION = "kaos.tools/v1alpha1"
BACKEND = "http://ollama.models.svc:11434"
CONFIG = """model_list:
  - model_name: fast
    litellm_params: {{model: "ollama/smollm2:135m", api_base: "{backend}"}}
  - model_name: smart-{i}
    litellm_params: {{model: "ollama/qwen2.5:0.5b", api_base: "{backend}"}}
router_settings: {{num_retries: 1}}
"""
VARIANTS = ("wildcard", "wildcard", "single", "single", "mock", "mock", "config", "custom", "hosted", "hosted")
MIXES = ("default", "peer", "peer-kaos")
PEER_VARIANTS = ("mock", "hosted")


def mix() -> str:
    """BENCH_MIX (default: the mix above)."""
    value = os.environ.get("BENCH_MIX") or "default"
    if value not in MIXES:
        raise ValueError(f"BENCH_MIX={value!r}: expected one of {', '.join(MIXES)}")
    return value


def variant(i: int) -> str:
    if mix() != "default":
        return PEER_VARIANTS[i % len(PEER_VARIANTS)]
    return VARIANTS[i % len(VARIANTS)]


def _peer_spec(i: int, revision: int) -> dict[str, Any]:
    """The mix both CRDs accept, in this CRD's spelling or KAOS's (mix `peer-kaos`)."""
    spec: dict[str, Any]
    if variant(i) == "hosted":
        spec = {"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m"}}
    else:
        proxy = {"models": [f"gpt-mock-{i}"]} if mix() == "peer-kaos" else {"model": f"gpt-mock-{i}"}
        spec = {"mode": "Proxy", "proxyConfig": proxy}
    if revision:
        env = [{"name": "BENCH_REVISION", "value": str(revision)}]
        spec["podSpec"] = {"containers": [{"name": "model-api", "env": env}]}
    return spec


def _spec(i: int, revision: int) -> dict[str, Any]:
    if mix() != "default":
        return _peer_spec(i, revision)
    env = [{"name": "BENCH_REVISION", "value": str(revision)}] if revision else []
    kind = variant(i)
    if kind == "hosted":
        return {"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m", **({"env": env} if env else {})}}
    variants: dict[str, dict[str, Any]] = {
        "wildcard": {"apiBase": BACKEND},
        "single": {"apiBase": BACKEND, "model": f"ollama/model-{i}"},
        "mock": {"model": f"gpt-mock-{i}"},
        "config": {"configYaml": {"fromString": CONFIG.format(i=i, backend=BACKEND)}},
        "custom": {"model": f"gpt-mock-{i}", "env": [{"name": "LITELLM_LOG", "value": "INFO"}]},
    }
    proxy = variants[kind]
    if env:
        proxy["env"] = [*proxy.get("env", []), *env]
    spec: dict[str, Any] = {"mode": "Proxy", "proxyConfig": proxy}
    if kind == "custom":
        spec["gatewayRoute"] = {"timeout": "300s"}
        spec["podSpec"] = {"containers": [{"name": "model-api",
                                           "resources": {"requests": {"cpu": "50m", "memory": "256Mi"}}}]}
    return spec


def modelapi(i: int, namespace: str, revision: int = 0, prefix: str = "m") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "ModelAPI",
            "metadata": {"name": f"{prefix}-{i}", "namespace": namespace}, "spec": _spec(i, revision)}


def modelapis(n: int, namespace: str, revision: int = 0, prefix: str = "m") -> list[dict[str, Any]]:
    """N ModelAPIs; `revision` > 0 changes every spec's pod environment, so every config hash changes (a roll)."""
    return [modelapi(i, namespace, revision, prefix) for i in range(n)]


def dump(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def noise(namespace: str, configmaps: int, deployments: int, secrets: int) -> list[dict[str, Any]]:
    """Objects the operator has no business with: unlabelled ConfigMaps and Secrets, and Deployments (scaled to
    0 so the stand-in node is not the one measured) labelled like someone else's app."""
    objs: list[dict[str, Any]] = []
    for i in range(configmaps):
        meta = {"name": f"noise-{i}", "namespace": namespace}
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                     "data": {"settings.yaml": f"replicas: {i}\nfeature: {'x' * 200}\n"}})
    for i in range(secrets):
        meta = {"name": f"noise-{i}", "namespace": namespace}
        objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"token": f"t-{i:08d}" * 8}})
    for i in range(deployments):
        labels = {"app": f"noise-{i}"}
        objs.append({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": {"name": f"noise-{i}", "namespace": namespace, "labels": labels},
                     "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                              "template": {"metadata": {"labels": labels},
                                           "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}}})
    return objs
