"""The desired-state builder: every mode and variant of SPEC.md, names, env precedence and the config hash."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kaos_modelapi import desired, litellm, ollama
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.settings import GatewayRef, Settings

SAMPLES = Path(__file__).resolve().parent.parent / "config" / "samples"
GATEWAY = Settings(gateway=GatewayRef("shared", "gateway-system"))


def modelapi(spec: dict[str, Any], name: str = "m", namespace: str = "ns") -> ModelAPI:
    return ModelAPI.model_validate({
        "apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
        "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 3},
        "spec": spec,
    })


def children(m: ModelAPI, settings: Settings = Settings()) -> dict[str, dict[str, Any]]:
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in desired.build(m, settings).children}


def container(objs: dict[str, dict[str, Any]], name: str, which: str = "containers") -> dict[str, Any]:
    deployment = next(o for o in objs.values() if o["kind"] == "Deployment")
    return next(c for c in deployment["spec"]["template"]["spec"][which] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def litellm_config(objs: dict[str, dict[str, Any]], name: str = "m") -> Any:
    return yaml.safe_load(objs[f"ConfigMap/litellm-config-{name}"]["data"]["config.yaml"])


PROXY = {"mode": "Proxy", "proxyConfig": {"apiBase": "http://ollama.ollama.svc:11434"}}


def test_wildcard_proxy_children_names_labels_and_owner() -> None:
    objs = children(modelapi(PROXY))
    assert set(objs) == {"ConfigMap/litellm-config-m", "Secret/litellm-master-key-m",
                         "Deployment/modelapi-m", "Service/modelapi-m"}
    for obj in objs.values():
        assert obj["metadata"]["namespace"] == "ns"
        assert obj["metadata"]["labels"]["app"] == "modelapi"
        assert obj["metadata"]["labels"]["modelapi"] == "m"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "name": "m", "uid": "uid-1",
                         "controller": True, "blockOwnerDeletion": True}
    template = objs["Deployment/modelapi-m"]["spec"]["template"]
    assert template["metadata"]["labels"]["modelapi"] == "m"
    assert litellm_config(objs) == litellm.wildcard_config("http://ollama.ollama.svc:11434")


def test_proxy_container_runs_litellm_on_8000_with_probes() -> None:
    objs = children(modelapi(PROXY))
    c = container(objs, "model-api")
    assert c["image"] == litellm.DEFAULT_IMAGE
    assert c["args"] == ["--config", "/etc/litellm/config.yaml", "--port", "8000"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/liveliness"
    service = objs["Service/modelapi-m"]["spec"]
    assert service["ports"][0]["port"] == 8000
    assert service["selector"] == {"app": "modelapi", "modelapi": "m"}


def test_master_key_comes_from_a_secret_never_a_literal() -> None:
    objs = children(modelapi(PROXY))
    secret = objs["Secret/litellm-master-key-m"]
    assert "data" not in secret and "stringData" not in secret  # the apply layer generates it on creation
    assert desired.build(modelapi(PROXY), Settings()).generated == (
        desired.GeneratedKey("litellm-master-key-m", "master-key"),)
    assert env_of(container(objs, "model-api"))["LITELLM_MASTER_KEY"] == {
        "secretKeyRef": {"name": "litellm-master-key-m", "key": "master-key"}}


def test_user_master_key_wins_and_no_secret_is_generated() -> None:
    spec = copy.deepcopy(PROXY)
    spec["proxyConfig"]["env"] = [{"name": "LITELLM_MASTER_KEY",
                                   "valueFrom": {"secretKeyRef": {"name": "mine", "key": "k"}}}]
    objs = children(modelapi(spec))
    assert "Secret/litellm-master-key-m" not in objs
    assert env_of(container(objs, "model-api"))["LITELLM_MASTER_KEY"] == {
        "secretKeyRef": {"name": "mine", "key": "k"}}


def test_single_model_and_mock_variants() -> None:
    single = children(modelapi({"mode": "Proxy", "proxyConfig": {"apiBase": "https://api.openai.com",
                                                                "model": "gpt-4o-mini"}}))
    assert litellm_config(single) == litellm.single_model_config("https://api.openai.com", "gpt-4o-mini")
    assert env_of(container(single, "model-api"))["KAOS_LITELLM_AUTH"] == "open"
    mock = children(modelapi({"mode": "Proxy", "proxyConfig": {"model": "gpt-3.5-turbo"}}))
    assert litellm_config(mock) == litellm.mock_config("gpt-3.5-turbo")
    assert env_of(container(mock, "model-api"))["KAOS_LITELLM_AUTH"] == "mock"


def test_a_usual_generated_config_is_written_by_the_fast_emitter(monkeypatch: pytest.MonkeyPatch) -> None:
    def pure(*_: Any, **__: Any) -> str:
        raise AssertionError("the pure-Python emitter wrote it")

    monkeypatch.setattr(yaml, "safe_dump", pure)
    desired._config_yaml.cache_clear()  # (what an earlier test rendered)
    for config in (litellm.single_model_config("http://ollama.models:11434", "ollama/llama3.1:8b-instruct"),
                   litellm.mock_config("gpt-4o-mini"), litellm.wildcard_config("https://api.openai.com/v1")):
        assert yaml.safe_load(desired._config_yaml(json.dumps(config))) == config


def test_config_yaml_from_string_is_passed_through_untouched() -> None:
    text = "# my routing\nmodel_list:\n  - model_name: fast\n    litellm_params: {model: ollama/x}\n"
    m = modelapi({"mode": "Proxy", "proxyConfig": {"configYaml": {"fromString": text},
                                                   "apiBase": "http://ignored:1"}})
    built = desired.build(m, Settings())
    objs = {f"{c['kind']}/{c['metadata']['name']}": c for c in built.children}
    assert objs["ConfigMap/litellm-config-m"]["data"]["config.yaml"] == text
    assert built.model == "fast"
    assert any("ignored" in note for note in built.notes)


def test_config_yaml_from_secret_is_mounted_not_read() -> None:
    m = modelapi({"mode": "Proxy", "proxyConfig": {"configYaml": {
        "fromSecretKeyRef": {"name": "litellm-config", "key": "routes.yaml"}}}})
    built = desired.build(m, Settings())
    objs = {f"{c['kind']}/{c['metadata']['name']}": c for c in built.children}
    assert "ConfigMap/litellm-config-m" not in objs
    volumes = objs["Deployment/modelapi-m"]["spec"]["template"]["spec"]["volumes"]
    config_volume = next(v for v in volumes if v["name"] == "litellm-config")
    assert config_volume["secret"] == {"secretName": "litellm-config",
                                       "items": [{"key": "routes.yaml", "path": "config.yaml"}]}
    assert [r.name for r in built.secret_refs] == ["litellm-config"]


def test_a_new_version_of_the_config_secret_rolls_the_pods() -> None:
    spec = {"mode": "Proxy", "proxyConfig": {"configYaml": {
        "fromSecretKeyRef": {"name": "litellm-config", "key": "routes.yaml"}}}}
    assert desired.config_secret(modelapi(spec)) == "litellm-config"
    assert _hash(spec, secret_version="41") == _hash(spec, secret_version="41")
    assert _hash(spec, secret_version="42") != _hash(spec, secret_version="41")
    assert _hash(spec) != _hash(spec, secret_version="41")  # the Secret appearing rolls pods that could not start


def test_only_a_config_secret_is_versioned() -> None:
    assert desired.config_secret(modelapi(PROXY)) is None
    assert desired.config_secret(modelapi(HOSTED)) is None
    assert _hash(PROXY) == _hash(PROXY, secret_version="7")


def test_invalid_config_yaml_is_a_spec_error() -> None:
    m = modelapi({"mode": "Proxy", "proxyConfig": {"configYaml": {"fromString": "model_list: [oops"}}})
    with pytest.raises(desired.SpecError) as e:
        desired.build(m, Settings())
    assert e.value.reason == "InvalidConfig"
    assert "configYaml.fromString" in e.value.message


def test_user_env_wins_on_the_same_name_and_keeps_operator_order() -> None:
    spec = copy.deepcopy(PROXY)
    spec["proxyConfig"]["env"] = [{"name": "EXTRA", "value": "1"},
                                  {"name": "LITELLM_LOCAL_MODEL_COST_MAP", "value": "False"}]
    env = container(children(modelapi(spec)), "model-api")["env"]
    names = [e["name"] for e in env]
    assert names == ["LITELLM_MASTER_KEY", "LITELLM_LOCAL_MODEL_COST_MAP", "EXTRA", "KAOS_LITELLM_AUTH",
                     "KAOS_LITELLM_RUNTIME_DIR"]
    assert env[1] == {"name": "LITELLM_LOCAL_MODEL_COST_MAP", "value": "False"}


def test_env_secret_refs_are_reported_unless_optional() -> None:
    spec = copy.deepcopy(PROXY)
    spec["proxyConfig"]["env"] = [
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "needed", "key": "k"}}},
        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "maybe", "key": "k", "optional": True}}},
    ]
    refs = desired.build(modelapi(spec), Settings()).secret_refs
    assert [(r.name, r.why) for r in refs] == [("needed", "env A")]


HOSTED = {"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m",
                                             "env": [{"name": "OLLAMA_DEBUG", "value": "false"}]}}
TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}  # (what Ollama writes but its state: the root is read-only)


def test_hosted_pulls_in_an_init_container_and_serves_on_11434() -> None:
    built = desired.build(modelapi(HOSTED), Settings())
    objs = {f"{c['kind']}/{c['metadata']['name']}": c for c in built.children}
    assert set(objs) == {"Deployment/modelapi-m", "Service/modelapi-m"}
    pod = objs["Deployment/modelapi-m"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == "pull-model"
    assert init["command"] == ["/bin/sh", "-c", ollama.PULL_SCRIPT]
    assert "smollm2" not in " ".join(init["command"])  # the model name only travels in the environment
    assert env_of(init)[ollama.ENV_MODEL] == "smollm2:135m"
    assert env_of(init)["OLLAMA_DEBUG"] == "false"
    (serve,) = pod["containers"]
    assert serve["name"] == "model-api" and serve["image"] == ollama.DEFAULT_IMAGE
    assert serve["ports"][0]["containerPort"] == 11434
    # Ready means the model is loaded: the probe runs the load script, with the model in the environment.
    assert serve["readinessProbe"]["exec"]["command"] == ["/bin/sh", "-c", ollama.READY_SCRIPT]
    assert env_of(serve)[ollama.ENV_MODEL] == "smollm2:135m"
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"] + serve["volumeMounts"]}
    assert mounts == {"ollama-data": ollama.DATA_DIR, "tmp": "/tmp"}
    assert pod["volumes"] == [{"name": "ollama-data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    assert objs["Service/modelapi-m"]["spec"]["ports"][0]["port"] == 11434
    assert built.endpoint == "http://modelapi-m.ns.svc.cluster.local:11434"
    assert built.model == "smollm2:135m"


def test_hosted_user_cannot_override_the_model_variable() -> None:
    spec = copy.deepcopy(HOSTED)
    spec["hostedConfig"]["env"].append({"name": ollama.ENV_MODEL, "value": "other"})
    init = container(children(modelapi(spec)), "pull-model", "initContainers")
    assert env_of(init)[ollama.ENV_MODEL] == "smollm2:135m"


def test_pod_spec_override_merges_resources_onto_model_api() -> None:
    spec = copy.deepcopy(HOSTED)
    spec["podSpec"] = {"containers": [{"name": "model-api", "resources": {
        "limits": {"nvidia.com/gpu": "1"}}}], "tolerations": [{"key": "gpu", "operator": "Exists"}]}
    objs = children(modelapi(spec))
    c = container(objs, "model-api")
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert c["image"] == ollama.DEFAULT_IMAGE  # the rest of the container is kept
    pod = objs["Deployment/modelapi-m"]["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_pod_spec_override_that_cannot_apply_is_a_spec_error() -> None:
    spec = copy.deepcopy(HOSTED)
    spec["podSpec"] = {"containers": [{"image": "no-name"}]}
    with pytest.raises(desired.SpecError) as e:
        desired.build(modelapi(spec), Settings())
    assert e.value.reason == "InvalidPodSpec"
    assert "spec.podSpec" in e.value.message


def test_http_route_only_with_a_gateway() -> None:
    spec = copy.deepcopy(PROXY)
    spec["gatewayRoute"] = {"timeout": "4m"}
    objs = children(modelapi(spec), GATEWAY)
    route = objs["HTTPRoute/modelapi-m"]["spec"]
    assert route["parentRefs"] == [{"name": "shared", "namespace": "gateway-system"}]
    (rule,) = route["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/ns/modelapi/m"}}]
    assert rule["filters"][0]["urlRewrite"]["path"] == {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}
    assert rule["backendRefs"] == [{"name": "modelapi-m", "port": 8000}]
    assert rule["timeouts"] == {"request": "4m"}
    assert "HTTPRoute/modelapi-m" not in children(modelapi(spec))


def test_route_timeout_defaults_to_120s_and_zero_means_none() -> None:
    default = children(modelapi(PROXY), GATEWAY)["HTTPRoute/modelapi-m"]["spec"]["rules"][0]
    assert default["timeouts"] == {"request": "120s"}
    spec = copy.deepcopy(PROXY)
    spec["gatewayRoute"] = {"timeout": "0s"}
    assert "timeouts" not in children(modelapi(spec), GATEWAY)["HTTPRoute/modelapi-m"]["spec"]["rules"][0]


def _hash(spec: dict[str, Any], settings: Settings = Settings(), secret_version: str | None = None) -> str:
    built = desired.build(modelapi(spec), settings, secret_version)
    deployment = next(c for c in built.children if c["kind"] == "Deployment")
    return str(deployment["spec"]["template"]["metadata"]["annotations"][desired.CONFIG_HASH_ANNOTATION])


def test_config_hash_changes_exactly_when_the_pod_must_restart() -> None:
    base = _hash(PROXY)
    assert _hash(PROXY) == base  # deterministic
    other_backend = {"mode": "Proxy", "proxyConfig": {"apiBase": "http://other:11434"}}
    assert _hash(other_backend) != base  # config content only: LiteLLM does not reload it
    with_env = copy.deepcopy(PROXY)
    with_env["proxyConfig"]["env"] = [{"name": "X", "value": "1"}]
    assert _hash(with_env) != base
    assert _hash(PROXY, Settings(litellm_image="example/litellm:other")) != base
    with_timeout = copy.deepcopy(PROXY)
    with_timeout["gatewayRoute"] = {"timeout": "10m"}
    assert _hash(with_timeout, GATEWAY) == base  # the route is not the pod
    assert _hash(PROXY, GATEWAY) == base


def test_configmap_and_secret_names_stay_valid_at_the_longest_name() -> None:
    name = "a" * 54
    objs = children(modelapi(PROXY, name=name))
    assert f"Service/modelapi-{name}" in objs
    assert len(f"modelapi-{name}") == 63


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_sample_builds(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc.get("kind") == "ModelAPI":
            doc["metadata"].setdefault("namespace", "default")
            built = desired.build(ModelAPI.model_validate(doc), GATEWAY)
            kinds = [c["kind"] for c in built.children]
            assert kinds.count("Deployment") == 1 and kinds.count("Service") == 1
            assert kinds.count("HTTPRoute") == 1


def test_user_cannot_switch_the_boot_script_into_mock_mode() -> None:
    spec = copy.deepcopy(PROXY)
    spec["proxyConfig"]["env"] = [{"name": "KAOS_LITELLM_AUTH", "value": "mock"}]
    assert env_of(container(children(modelapi(spec)), "model-api"))["KAOS_LITELLM_AUTH"] == "open"


def test_pod_spec_override_with_an_unknown_field_is_a_spec_error_naming_it() -> None:
    spec = copy.deepcopy(HOSTED)
    spec["podSpec"] = {"containers": [{"name": "model-api", "resorces": {}, "$patch": "merge"}]}
    with pytest.raises(desired.SpecError) as e:
        desired.build(modelapi(spec), Settings())
    assert e.value.message == "spec.podSpec.containers[0].resorces: unknown field (not in Kubernetes' PodSpec)"


# --- scaling ----------------------------------------------------------------------------------------------


def test_unset_replicas_leave_the_count_to_whoever_scales_the_deployment() -> None:
    objs = children(modelapi(PROXY))
    assert "replicas" not in objs["Deployment/modelapi-m"]["spec"]
    assert not [k for k in objs if k.startswith("PodDisruptionBudget/")]


def test_set_replicas_are_owned_and_more_than_one_gets_a_disruption_budget() -> None:
    one = children(modelapi({**PROXY, "replicas": 1}))
    assert one["Deployment/modelapi-m"]["spec"]["replicas"] == 1
    assert not [k for k in one if k.startswith("PodDisruptionBudget/")], "one pod: a budget would block drains"
    three = children(modelapi({**PROXY, "replicas": 3}))
    assert three["Deployment/modelapi-m"]["spec"]["replicas"] == 3
    assert three["PodDisruptionBudget/modelapi-m"]["spec"] == {
        "maxUnavailable": 1, "selector": {"matchLabels": {"app": "modelapi", "modelapi": "m"}}}


def test_scaling_never_changes_the_pod_template() -> None:
    templates = [children(modelapi({**PROXY, **extra}))["Deployment/modelapi-m"]["spec"]["template"]
                 for extra in ({}, {"replicas": 1}, {"replicas": 5})]
    assert templates[0] == templates[1] == templates[2]


def test_pods_spread_over_nodes_unless_the_override_replaces_it() -> None:
    spread = children(modelapi(PROXY))["Deployment/modelapi-m"]["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                       "labelSelector": {"matchLabels": {"app": "modelapi", "modelapi": "m"}},
                       "matchLabelKeys": ["pod-template-hash"]}]
    zone = {"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"modelapi": "m"}}}
    override = {**PROXY, "podSpec": {"topologySpreadConstraints": [{"$patch": "replace"}, zone]}}
    replaced = children(modelapi(override))["Deployment/modelapi-m"]["spec"]["template"]["spec"]
    assert replaced["topologySpreadConstraints"] == [zone]


def test_the_seeds_reference_example_uses_the_block_its_mode_names() -> None:
    both = {**PROXY, "hostedConfig": {"model": "smollm2:135m"}}
    built = desired.build(modelapi(both), Settings())
    assert "hostedConfig is ignored because mode is Proxy" in built.notes
    assert [c["kind"] for c in built.children] == ["ConfigMap", "Secret", "Deployment", "Service"]
    hosted = desired.build(modelapi({**both, "mode": "Hosted"}), Settings())
    assert "proxyConfig is ignored because mode is Hosted" in hosted.notes
    assert [c["kind"] for c in hosted.children] == ["Deployment", "Service"]


# --- Hosted model store --------------------------------------------------------------------------------


def _with_store(**store: Any) -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(HOSTED)
    spec["hostedConfig"]["modelStore"] = {"size": "20Gi", **store}
    return spec


def test_a_model_store_is_a_claim_the_modelapi_owns_mounted_where_ollama_keeps_models() -> None:
    objs = children(modelapi(_with_store(storageClassName="fast")))
    claim = objs["PersistentVolumeClaim/modelapi-m-models"]
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}},
                             "storageClassName": "fast"}
    assert claim["metadata"]["ownerReferences"][0]["kind"] == "ModelAPI"
    pod = objs["Deployment/modelapi-m"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "ollama-data", "persistentVolumeClaim": {"claimName": "modelapi-m-models"}},
                              {"name": "tmp", "emptyDir": {}}]
    for c in (container(objs, "pull-model", "initContainers"), container(objs, "model-api")):
        assert c["volumeMounts"] == [{"name": "ollama-data", "mountPath": ollama.DATA_DIR}, TMP_MOUNT]


@pytest.mark.parametrize(("store", "strategy"), [
    ({"accessMode": "ReadWriteOnce"}, {"type": "Recreate"}),
    ({}, {"type": "Recreate"}),  # ReadWriteOnce is the default
    ({"accessMode": "ReadWriteOncePod"}, {"type": "Recreate"}),
    ({"accessMode": "ReadWriteMany"}, None),
    (None, None),
])
def test_a_single_node_store_is_rolled_by_stopping_the_old_pod_first(store: dict[str, Any] | None,
                                                                    strategy: dict[str, Any] | None) -> None:
    """A new pod cannot attach a ReadWriteOnce claim on another node (nor a ReadWriteOncePod claim anywhere)
    while the old pod holds it: a rolling update would stall, Recreate lets go of the claim first."""
    spec = HOSTED if store is None else _with_store(**store)
    deployment = children(modelapi(spec))["Deployment/modelapi-m"]
    assert deployment["spec"].get("strategy") == strategy
    proxy = children(modelapi({"mode": "Proxy", "proxyConfig": {"model": "m"}}))["Deployment/modelapi-m"]
    assert proxy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def test_without_a_store_class_the_claim_leaves_it_to_the_cluster_default() -> None:
    claim = children(modelapi(_with_store(accessMode="ReadWriteMany")))["PersistentVolumeClaim/modelapi-m-models"]
    assert "storageClassName" not in claim["spec"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_no_claim_in_proxy_mode_even_with_an_ignored_hosted_store() -> None:
    spec = {"mode": "Proxy", "proxyConfig": {"model": "m"}, **{"hostedConfig": _with_store()["hostedConfig"]}}
    assert not [k for k in children(modelapi(spec)) if k.startswith("PersistentVolumeClaim/")]


@pytest.mark.parametrize(("access", "replicas", "refused"), [
    ("ReadWriteOnce", 2, True), ("ReadWriteOncePod", 3, True), ("ReadWriteOnce", 1, False),
    ("ReadWriteMany", 3, False), ("ReadWriteOnce", None, False),
])
def test_more_than_one_replica_needs_a_shared_store(access: str, replicas: int | None, refused: bool) -> None:
    spec = _with_store(accessMode=access)
    if replicas is not None:
        spec["replicas"] = replicas
    if refused:
        with pytest.raises(ValidationError, match="replicas: at most 1 replica"):
            modelapi(spec)
    else:
        modelapi(spec)


def test_a_store_size_must_be_a_quantity() -> None:
    with pytest.raises(ValidationError, match="size"):
        modelapi(_with_store(size="twenty gigs"))


# --- security defaults (README, "Pod Security") ---------------------------------------------------------

NO_PRIVILEGE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
RUNTIME_DEFAULT = {"type": "RuntimeDefault"}


def pod_of(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = objs["Deployment/modelapi-m"]["spec"]["template"]["spec"]
    return pod


@pytest.mark.parametrize("proxy_config", [
    {"apiBase": "http://b:11434"}, {"apiBase": "http://b:11434", "model": "m"}, {"model": "m"},
    {"configYaml": {"fromString": "model_list: []\n"}}, {"configYaml": {"fromSecretKeyRef": {"name": "s", "key": "k"}}},
])
def test_proxy_pods_meet_the_restricted_standard_as_the_nonroot_user(proxy_config: dict[str, Any]) -> None:
    pod = pod_of(children(modelapi({"mode": "Proxy", "proxyConfig": proxy_config})))
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "seccompProfile": RUNTIME_DEFAULT}
    (c,) = pod["containers"]
    assert c["securityContext"] == {**NO_PRIVILEGE, "readOnlyRootFilesystem": True}
    # What LiteLLM writes goes to emptyDirs; the other volumes are read-only kinds the standard allows.
    writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] in writable} == {"/tmp", litellm.RUNTIME_DIR}
    assert all(set(v) - {"name"} <= {"emptyDir", "configMap", "secret"} for v in pod["volumes"])


@pytest.mark.parametrize("store", [False, True], ids=["emptyDir", "model store"])
def test_hosted_pods_meet_the_restricted_standard_as_the_nonroot_user_owning_their_model_volume(
        store: bool) -> None:
    pod = pod_of(children(modelapi(_with_store() if store else HOSTED)))
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "fsGroup": 65532, "fsGroupChangePolicy": "OnRootMismatch",
                                      "seccompProfile": RUNTIME_DEFAULT}
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert c["securityContext"] == {**NO_PRIVILEGE, "readOnlyRootFilesystem": True}, c["name"]
        # Ollama's state (its key pair under $HOME/.ollama, the models) on the volume, not under /root.
        assert (env_of(c)["HOME"], env_of(c)["OLLAMA_MODELS"]) == (ollama.DATA_DIR, f"{ollama.DATA_DIR}/models")
        assert c["volumeMounts"] == [{"name": "ollama-data", "mountPath": ollama.DATA_DIR}, TMP_MOUNT]
    assert all(set(v) - {"name"} <= {"emptyDir", "persistentVolumeClaim"} for v in pod["volumes"])


def test_a_users_env_moves_ollamas_state_folders() -> None:
    spec = copy.deepcopy(HOSTED)
    spec["hostedConfig"]["env"] = [{"name": "OLLAMA_MODELS", "value": "/models"}]
    pod = pod_of(children(modelapi(spec)))
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert (env_of(c)["HOME"], env_of(c)["OLLAMA_MODELS"]) == (ollama.DATA_DIR, "/models")


@pytest.mark.parametrize("spec", [PROXY, HOSTED], ids=["Proxy", "Hosted"])
def test_pods_get_no_api_token_and_no_service_links_unless_the_podspec_asks(spec: dict[str, Any]) -> None:
    pod = pod_of(children(modelapi(spec)))
    assert (pod["automountServiceAccountToken"], pod["enableServiceLinks"]) == (False, False)
    asked = {**copy.deepcopy(spec), "podSpec": {"serviceAccountName": "reader", "automountServiceAccountToken": True}}
    pod = pod_of(children(modelapi(asked)))
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == ("reader", True)


def test_a_podspec_security_context_wins_field_by_field_or_replaces_with_a_directive() -> None:
    spec = copy.deepcopy(PROXY)
    spec["podSpec"] = {"securityContext": {"runAsUser": 1000, "fsGroup": 1000},
                       "containers": [{"name": "model-api", "securityContext": {
                           "readOnlyRootFilesystem": False, "capabilities": {"add": ["NET_BIND_SERVICE"]}}}]}
    pod = pod_of(children(modelapi(spec)))
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 65532, "fsGroup": 1000,
                                      "seccompProfile": RUNTIME_DEFAULT}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}
    # Root again: the whole pod-level context replaced.
    spec["podSpec"] = {"securityContext": {"$patch": "replace", "runAsUser": 0}}
    assert pod_of(children(modelapi(spec)))["securityContext"] == {"runAsUser": 0}

