"""The controller's pure helpers (the reconcile itself is tested against the API server in e2e/)."""

from __future__ import annotations

from typing import Any

from kaos_modelapi.controller import SECRET_REF_INDEX, secret_refs
from kaos_modelapi.informer import Change, Store


def modelapi(name: str, namespace: str, proxy_config: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
            "spec": {"mode": "Proxy", "proxyConfig": proxy_config}}  # fmt: skip


def test_a_secret_finds_the_modelapis_that_reference_it_in_its_own_namespace() -> None:
    env = {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k"}}}
    config = {"configYaml": {"fromSecretKeyRef": {"name": "routes", "key": "config.yaml"}}, "env": [env]}
    store = Store({SECRET_REF_INDEX: secret_refs})
    store.apply(Change("add", None, modelapi("both", "a", config)))
    store.apply(Change("add", None, modelapi("env-only", "a", {"model": "m", "env": [env]})))
    store.apply(Change("add", None, modelapi("elsewhere", "b", config)))
    store.apply(Change("add", None, modelapi("none", "a", {"model": "m"})))

    def names(key: str) -> list[str]:
        return [o["metadata"]["name"] for o in store.by_index(SECRET_REF_INDEX, key)]

    assert names("a/routes") == ["both"]
    assert names("a/keys") == ["both", "env-only"]
    assert names("b/routes") == ["elsewhere"]
    assert names("a/other") == []
