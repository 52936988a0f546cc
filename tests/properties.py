"""Hypothesis strategies for ModelAPIs the schema accepts (and some it does not), shared by the property tests
of the pure code (tests/test_properties.py) and the server-side dry-run of a sample (e2e/test_properties.py)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

# Text as users (and attackers) write it: shell metacharacters, quotes, newlines, YAML syntax, unicode.
hostile_text = st.text(
    alphabet=st.sampled_from([*"abcXYZ019-_.:/ $`;|&(){}[]<>'\"\\\n\t#*!?=%~@,+", "é", "😀", "\u2028"]),
    min_size=1, max_size=40,
)
names = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
env_names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,15}", fullmatch=True)
urls = st.builds(lambda scheme, host, path: f"{scheme}://{host}{path}", st.sampled_from(["http", "https"]),
                 st.sampled_from(["backend", "10.0.0.1:8000", "api.example.com", "ollama.ns.svc:11434"]),
                 st.sampled_from(["", "/v1", "/api/x?y=z"]))


def env_vars() -> st.SearchStrategy[list[dict[str, Any]]]:
    literal = st.builds(lambda n, v: {"name": n, "value": v}, env_names, hostile_text)
    from_secret = st.builds(
        lambda n, s, k, o: {"name": n, "valueFrom": {"secretKeyRef": {"name": s, "key": k,
                                                                      **({"optional": o} if o is not None else {})}}},
        env_names, names, names, st.none() | st.booleans())
    return st.lists(literal | from_secret, max_size=4)


config_texts = st.one_of(
    hostile_text,
    st.just("model_list:\n- model_name: m\n  litellm_params: {model: openai/m}\n"),
    st.just("- a\n- b\n"),
    st.just("a: &a [x, x]\nb: [*a, *a]\n"),
    st.just("model_list: [\n"),
)


def proxy_configs() -> st.SearchStrategy[dict[str, Any]]:
    config_yaml = st.one_of(
        st.builds(lambda t: {"fromString": t}, config_texts),
        st.builds(lambda n, k: {"fromSecretKeyRef": {"name": n, "key": k}}, names, names),
    )
    return st.fixed_dictionaries({}, optional={
        "apiBase": urls, "model": hostile_text, "configYaml": config_yaml, "env": env_vars(),
    }).filter(lambda c: any(k in c for k in ("apiBase", "model", "configYaml")))


hosted_configs = st.fixed_dictionaries({"model": hostile_text}, optional={"env": env_vars()})

containers = st.fixed_dictionaries({"name": st.sampled_from(["model-api", "pull-model", "sidecar"])}, optional={
    "image": st.sampled_from(["", "busybox", "registry.local/x:1"]),
    "env": env_vars(),
    "args": st.lists(hostile_text, max_size=2),
    "resources": st.fixed_dictionaries({}, optional={"limits": st.dictionaries(
        st.sampled_from(["cpu", "memory", "nvidia.com/gpu"]), st.sampled_from(["1", "500m", "1Gi", 2]))}),
    "$patch": st.sampled_from(["delete", "replace", "merge"]),
    "ports": st.lists(st.fixed_dictionaries({"containerPort": st.integers(1, 65535)}), max_size=2),
})
pod_specs = st.fixed_dictionaries({}, optional={
    "containers": st.lists(containers, max_size=2),
    "initContainers": st.lists(containers, max_size=1),
    "nodeSelector": st.dictionaries(names, names, max_size=2),
    "tolerations": st.lists(st.fixed_dictionaries({"key": names, "operator": st.just("Exists")}), max_size=2),
    "volumes": st.lists(st.fixed_dictionaries({"name": names, "emptyDir": st.just({})}), max_size=2),
    "topologySpreadConstraints": st.lists(st.just({"$patch": "replace"}), max_size=1),
    "hostNetwork": st.booleans(),
    "notAField": st.integers(),
})


def specs() -> st.SearchStrategy[dict[str, Any]]:
    proxy = st.builds(lambda c: {"mode": "Proxy", "proxyConfig": c}, proxy_configs())
    hosted = st.builds(lambda c: {"mode": "Hosted", "hostedConfig": c}, hosted_configs)
    extras = st.fixed_dictionaries({}, optional={
        "podSpec": pod_specs, "replicas": st.integers(0, 5),
        "gatewayRoute": st.fixed_dictionaries({"timeout": st.sampled_from(["0s", "120s", "1h30m", "5ms"])}),
    })
    return st.builds(lambda base, extra: {**base, **extra}, proxy | hosted, extras)


def modelapis(namespace: str = "props") -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda name, spec: {
        "apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
        "metadata": {"name": name, "namespace": namespace, "uid": "00000000-0000-0000-0000-00000000beef",
                     "generation": 1},
        "spec": spec}, names, specs())
