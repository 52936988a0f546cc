"""The desired state of one ModelAPI: every child object, as plain Kubernetes dicts.

Pure and synchronous: a ModelAPI and the operator settings in, the children out. No I/O, no clock, no
randomness. The only thing the builder cannot produce is the LiteLLM master key's value: it emits the
Secret without data and names it in `Desired.generated`, and the apply layer fills in a random key when it
creates it. Also the one home of the children's names, labels and owner reference (written and read).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import api, kube, litellm, ollama
from .api import EnvVar, ModelAPI
from .podspec_schema import unknown_fields
from .settings import Settings
from .smp import StrategicMergeError, merge_pod_spec

CONTAINER = "model-api"
INIT_CONTAINER = ollama.PULL_CONTAINER
MODELAPI_LABEL = "modelapi"  # users select a ModelAPI's pods with -l modelapi=NAME
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kaos-modelapi"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"  # every child and pod carries it
CONFIG_HASH_ANNOTATION = "kaos.tools/config-hash"
PRESTOP_SECONDS = 5
DRAIN_SECONDS = 125  # the HTTPRoute's default request timeout (api.DEFAULT_ROUTE_TIMEOUT) and a margin
# The unprivileged user Proxy pods run as (the distroless "nonroot" user): the LiteLLM image is root-owned and
# world-readable, and everything LiteLLM writes goes to the pod's emptyDirs.
NON_ROOT_UID = 65532


class SpecError(Exception):
    """The spec is valid for the API server but cannot be turned into children (status: Failed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SecretRef:
    """A Secret the ModelAPI's pods use; unless optional, they cannot start without it."""

    name: str
    why: str
    optional: bool = False


@dataclass(frozen=True)
class GeneratedKey:
    """A child Secret whose `key` the apply layer fills with a random value when it creates the Secret, and
    never after (the builder has no randomness)."""

    secret: str
    key: str


@dataclass(frozen=True, slots=True)
class Desired:
    children: tuple[dict[str, Any], ...]
    endpoint: str
    model: str
    secret_refs: tuple[SecretRef, ...] = ()  # the Secrets the pods cannot start without
    notes: tuple[str, ...] = field(default=())
    generated: tuple[GeneratedKey, ...] = ()


# --- names and metadata -----------------------------------------------------------------------------------


def workload_name(name: str) -> str:
    return f"{api.SERVICE_PREFIX}{name}"


def config_map_name(name: str) -> str:
    return f"litellm-config-{name}"


def selector_labels(name: str) -> dict[str, str]:
    return {"app": "modelapi", MODELAPI_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), MANAGED_BY_LABEL: MANAGED_BY}


def owner_reference(m: ModelAPI) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": m.metadata.name,
        "uid": m.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controlling_modelapi(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the ModelAPI that controls a child, read from the owner reference written above."""
    ref = kube.controller_ref(obj, api.GROUP, api.KIND)
    return (str(ref.get("name")), str(ref.get("uid"))) if ref is not None else None


def labelled_modelapi(obj: dict[str, Any]) -> str | None:
    """The name of the ModelAPI a pod belongs to, from its label (pods are owned by ReplicaSets)."""
    value = (obj["metadata"].get("labels") or {}).get(MODELAPI_LABEL)
    return str(value) if value else None


def _metadata(m: ModelAPI, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": m.metadata.namespace, "labels": labels(m.metadata.name)}
    if m.metadata.uid:  # absent when rendering a file offline
        meta["ownerReferences"] = [owner_reference(m)]
    return meta


def _object(api_version: str, kind: str, metadata: dict[str, Any], **body: Any) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}


# --- env ----------------------------------------------------------------------------------------------


def _env_dicts(env: list[EnvVar] | None) -> list[dict[str, Any]]:
    dumped: list[dict[str, Any]] = [e.model_dump(exclude_none=True) for e in env or []]
    return dumped


def merge_env(operator: list[dict[str, Any]], user: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user's variables win on the same name; operator variables keep their place so that a user's
    $(VAR) reference to one of them still resolves."""
    by_name = {e["name"]: e for e in user}
    merged = [by_name.get(e["name"], e) for e in operator]
    known = {e["name"] for e in operator}
    return merged + [e for e in user if e["name"] not in known]


def _env_secret_refs(env: list[EnvVar] | None) -> list[SecretRef]:
    refs = []
    for e in env or []:
        ref = e.valueFrom.secretKeyRef if e.valueFrom else None
        if ref is not None:
            refs.append(SecretRef(ref.name, f"env {e.name}", bool(ref.optional)))
    return refs


def secret_refs(m: ModelAPI) -> tuple[SecretRef, ...]:
    """Every user Secret the pods of `m` use (the config first), derived from the block its mode names."""
    if m.spec.mode == "Hosted":
        return tuple(_env_secret_refs(m.spec.hostedConfig.env if m.spec.hostedConfig else None))
    pc = m.spec.proxyConfig
    if pc is None:
        return ()
    ref = pc.configYaml.fromSecretKeyRef if pc.configYaml else None
    config = [SecretRef(ref.name, "configYaml.fromSecretKeyRef", bool(ref.optional))] if ref else []
    return (*config, *_env_secret_refs(pc.env))


# --- security defaults ------------------------------------------------------------------------------------
# What every generated pod meets: the `restricted` Pod Security Standard (README, "Pod Security"): a
# non-root user, no privilege escalation, no capabilities, the runtime's default seccomp profile; and a
# read-only root filesystem (what they write goes to emptyDirs). Hosted pods add the user's group to their
# model volume (`fsGroup`: a model store written by an earlier pod, as root, included), since Ollama writes
# its models there.
# A podSpec override merges over these field by field (or replaces them with `$patch: replace`).

_RUNTIME_DEFAULT_SECCOMP = {"type": "RuntimeDefault"}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}


def _pod_security(writes_volumes: bool) -> dict[str, Any]:
    security: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID}
    if writes_volumes:
        # Only when the volume's root is not already the group's: a model store holds gigabytes of files.
        security |= {"fsGroup": NON_ROOT_UID, "fsGroupChangePolicy": "OnRootMismatch"}
    return {**security, "seccompProfile": dict(_RUNTIME_DEFAULT_SECCOMP)}


# --- Proxy (LiteLLM) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProxyPlan:
    """What differs between the Proxy variants."""

    config_text: str | None  # ConfigMap content; None when the config is mounted from the user's Secret
    config_volume: dict[str, Any]
    auth: str
    model: str
    notes: tuple[str, ...]


@functools.lru_cache(maxsize=256)
def _user_config_models(text: str) -> str:
    """The models of the user's LiteLLM config. Parsing YAML is slow (the pure-Python parser: milliseconds
    for a config), and every reconcile of a ModelAPI reads the same text. (A SpecError is not cached.)"""
    return _model_names(_parse_user_config(text))


def _parse_user_config(text: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError("InvalidConfig", f"spec.proxyConfig.configYaml.fromString is not valid YAML: "
                                         f"{' '.join(str(e).split())}") from e
    if not isinstance(config, dict):
        raise SpecError("InvalidConfig", "spec.proxyConfig.configYaml.fromString must be a YAML mapping "
                                         "(a LiteLLM config with model_list)")
    return config


def _model_names(config: dict[str, Any]) -> str:
    entries = config.get("model_list") or []
    names = [str(e.get("model_name")) for e in entries if isinstance(e, dict) and e.get("model_name")]
    return ",".join(names)


def _proxy_plan(m: ModelAPI) -> _ProxyPlan:
    pc = m.spec.proxyConfig
    assert pc is not None  # guaranteed by the spec rules
    cm_volume = {"name": "litellm-config", "configMap": {"name": config_map_name(m.metadata.name)}}
    if pc.configYaml is not None:
        notes: tuple[str, ...] = ()
        if pc.apiBase is not None or pc.model is not None:
            notes = ("proxyConfig.apiBase and proxyConfig.model are ignored because configYaml is set",)
        ref = pc.configYaml.fromSecretKeyRef
        if ref is not None:
            volume = {"name": "litellm-config", "secret": {
                "secretName": ref.name, "items": [{"key": ref.key, "path": litellm.CONFIG_FILE}]}}
            return _ProxyPlan(None, volume, litellm.AUTH_OPEN, f"(Secret {ref.name})", notes)
        text = pc.configYaml.fromString or ""
        return _ProxyPlan(text, cm_volume, litellm.AUTH_OPEN, _user_config_models(text), notes)
    if pc.apiBase is not None and pc.model is not None:
        generated, model, auth = litellm.single_model_config(pc.apiBase, pc.model), pc.model, litellm.AUTH_OPEN
    elif pc.apiBase is not None:
        generated, model, auth = litellm.wildcard_config(pc.apiBase), "*", litellm.AUTH_OPEN
    else:
        assert pc.model is not None
        generated, model, auth = litellm.mock_config(pc.model), pc.model, litellm.AUTH_MOCK
    return _ProxyPlan(_config_yaml(json.dumps(generated)), cm_volume, auth, model, ())


# libyaml's emitter (PyYAML's C binding) writes a config 5x faster than the pure-Python one, and the same text
# for strings of printable ASCII on lines too short to wrap; not always otherwise (long escaped strings wrap
# elsewhere), and another text would roll every LiteLLM pod. tests/test_properties.py checks the two agree.
_FAST_DUMPER: Any = getattr(yaml, "CSafeDumper", None)
_WRAP_WIDTH = 80  # (the emitters' default)


@functools.lru_cache(maxsize=4096)
def _config_yaml(config_json: str) -> str:
    """YAML emission is most of a build's CPU, and every reconcile of a ModelAPI renders the same config."""
    config = json.loads(config_json)
    # (json.dumps escapes every quote, backslash, control and non-ASCII character: without a backslash, every
    # string is printable ASCII but for DEL)
    if _FAST_DUMPER is not None and "\\" not in config_json and "\x7f" not in config_json:
        text: str = yaml.dump(config, Dumper=_FAST_DUMPER, sort_keys=False)
        if all(len(line) <= _WRAP_WIDTH for line in text.splitlines()):
            return text
    return yaml.safe_dump(config, sort_keys=False)


def _proxy_env(m: ModelAPI, plan: _ProxyPlan) -> list[dict[str, Any]]:
    key_ref = {"name": litellm.master_key_secret_name(m.metadata.name), "key": litellm.MASTER_KEY_SECRET_KEY}
    defaults: list[dict[str, Any]] = [
        {"name": litellm.ENV_MASTER_KEY, "valueFrom": {"secretKeyRef": key_ref}},
        {"name": litellm.ENV_LOCAL_COST_MAP, "value": "True"},
    ]
    # The boot script's contract: a user's value here would, e.g., enable client mock answers on a real proxy.
    reserved: list[dict[str, Any]] = [
        {"name": litellm.ENV_AUTH, "value": plan.auth},
        {"name": litellm.ENV_RUNTIME_DIR, "value": litellm.RUNTIME_DIR},
    ]
    assert m.spec.proxyConfig is not None
    return merge_env(merge_env(defaults, _env_dicts(m.spec.proxyConfig.env)), reserved)


def _http_probe(path: str, **timing: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, **timing}


def _proxy_pod_spec(m: ModelAPI, s: Settings, plan: _ProxyPlan) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.litellm_image,
        "command": ["python3", "-c", litellm.BOOT_SCRIPT],
        "args": ["--config", litellm.CONFIG_PATH, "--port", str(litellm.PORT)],
        "ports": [{"name": "http", "containerPort": litellm.PORT, "protocol": "TCP"}],
        "env": _proxy_env(m, plan),
        "volumeMounts": [
            {"name": "litellm-config", "mountPath": litellm.CONFIG_DIR, "readOnly": True},
            {"name": "litellm-runtime", "mountPath": litellm.RUNTIME_DIR},
            # LiteLLM writes to /tmp at import: with it here, the root filesystem can be read-only.
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        # LiteLLM needs several seconds to import on a small node; the startup probe covers slow starts
        # without making liveness lax for the rest of the pod's life.
        "startupProbe": _http_probe(litellm.LIVENESS_PATH, periodSeconds=2, failureThreshold=150),
        "livenessProbe": _http_probe(litellm.LIVENESS_PATH, periodSeconds=15, failureThreshold=4),
        "readinessProbe": _http_probe(litellm.READINESS_PATH, periodSeconds=5),
        # A stopping pod keeps serving until the endpoint controllers and kube-proxy have taken it out of the
        # Service; then LiteLLM (uvicorn) gets SIGTERM and finishes the requests in flight.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "securityContext": _container_security(),
    }
    return {
        "securityContext": _pod_security(writes_volumes=False),
        "containers": [container],
        "volumes": [plan.config_volume, {"name": "litellm-runtime", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        # A stopping pod finishes its requests in flight, up to the HTTPRoute's default timeout (streamed answers
        # of slow models are long); it exits as soon as they are done, so this costs nothing otherwise.
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + DRAIN_SECONDS,
    }


def _proxy_children(m: ModelAPI) -> tuple[_ProxyPlan, list[dict[str, Any]], tuple[GeneratedKey, ...]]:
    plan = _proxy_plan(m)
    assert m.spec.proxyConfig is not None
    children = []
    if plan.config_text is not None:
        children.append(_object("v1", "ConfigMap", _metadata(m, config_map_name(m.metadata.name)),
                                data={litellm.CONFIG_FILE: plan.config_text}))
    user_env = {e.name for e in m.spec.proxyConfig.env or []}
    if litellm.ENV_MASTER_KEY in user_env:
        return plan, children, ()
    key_secret = litellm.master_key_secret_name(m.metadata.name)
    children.append(_object("v1", "Secret", _metadata(m, key_secret), type="Opaque"))
    return plan, children, (GeneratedKey(key_secret, litellm.MASTER_KEY_SECRET_KEY),)


# --- Hosted (Ollama) ------------------------------------------------------------------------------------


def _hosted_pod_spec(m: ModelAPI, s: Settings) -> dict[str, Any]:
    hc = m.spec.hostedConfig
    assert hc is not None
    # The user's variables win over the state folders as over any other (moving them is theirs to do).
    env = merge_env([{"name": "HOME", "value": ollama.DATA_DIR},
                     {"name": "OLLAMA_MODELS", "value": ollama.MODELS_DIR}], _env_dicts(hc.env))
    # Ollama writes only its state (the model volume) and temporary files: the root filesystem is read-only.
    data_mount = [{"name": ollama.VOLUME_NAME, "mountPath": ollama.DATA_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    pull: dict[str, Any] = {
        "name": INIT_CONTAINER,
        "image": s.ollama_image,
        "command": ["/bin/sh", "-c", ollama.PULL_SCRIPT],
        # The model name reaches the shell only through the environment, never inside the script text.
        "env": merge_env(env, [{"name": ollama.ENV_MODEL, "value": hc.model}]),
        "volumeMounts": data_mount,
        "securityContext": _container_security(),
    }
    serve: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.ollama_image,
        "ports": [{"name": "http", "containerPort": ollama.PORT, "protocol": "TCP"}],
        # The readiness probe reads the model's name from the environment too (the operator's value wins).
        "env": merge_env(merge_env([{"name": "OLLAMA_HOST", "value": f"0.0.0.0:{ollama.PORT}"}], env),
                         [{"name": ollama.ENV_MODEL, "value": hc.model}]),
        "volumeMounts": data_mount,
        "livenessProbe": _http_probe(ollama.LIVENESS_PATH, periodSeconds=15, failureThreshold=4),
        "readinessProbe": {"exec": {"command": ["/bin/sh", "-c", ollama.READY_SCRIPT]},
                           "periodSeconds": ollama.READY_PERIOD_SECONDS,
                           "timeoutSeconds": ollama.READY_TIMEOUT_SECONDS},
        "securityContext": _container_security(),
    }
    return {
        "securityContext": _pod_security(writes_volumes=True),
        "initContainers": [pull],
        "containers": [serve],
        "volumes": [_model_volume(m), {"name": "tmp", "emptyDir": {}}],
    }


def model_store_name(name: str) -> str:
    return f"{workload_name(name)}-models"


def _model_volume(m: ModelAPI) -> dict[str, Any]:
    """Where the models live: the ModelAPI's own claim when it asks for a store, else an emptyDir (gone with
    the pod, so every new pod pulls again)."""
    assert m.spec.hostedConfig is not None
    if m.spec.hostedConfig.modelStore is None:
        return {"name": ollama.VOLUME_NAME, "emptyDir": {}}
    claim = {"claimName": model_store_name(m.metadata.name)}
    return {"name": ollama.VOLUME_NAME, "persistentVolumeClaim": claim}


def _model_store(m: ModelAPI) -> dict[str, Any] | None:
    assert m.spec.hostedConfig is not None
    store = m.spec.hostedConfig.modelStore
    if store is None:
        return None
    spec: dict[str, Any] = {"accessModes": [store.accessMode],
                            "resources": {"requests": {"storage": store.size}}}
    if store.storageClassName is not None:
        spec["storageClassName"] = store.storageClassName
    return _object("v1", "PersistentVolumeClaim", _metadata(m, model_store_name(m.metadata.name)), spec=spec)


# --- shared children -------------------------------------------------------------------------------------


def config_hash(pod_spec: dict[str, Any], config_data: dict[str, str] | None) -> str:
    """Changes exactly when what runs in the pod changes: the pod spec or the mounted config content
    (LiteLLM does not reload its config, so a new config needs new pods)."""
    canonical = json.dumps({"podSpec": pod_spec, "config": config_data}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _deployment(m: ModelAPI, pod_spec: dict[str, Any], config_data: dict[str, str] | None) -> dict[str, Any]:
    name = m.metadata.name
    template = {
        "metadata": {
            "labels": labels(name),
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash(pod_spec, config_data)},
        },
        "spec": pod_spec,
    }
    spec: dict[str, Any] = {"selector": {"matchLabels": selector_labels(name)}, "template": template}
    if m.spec.replicas is not None:  # else left to its default (1) or to whoever scales the Deployment
        spec["replicas"] = m.spec.replicas
    if (strategy := _rolling_update(m)) is not None:
        spec["strategy"] = strategy
    return _object("apps/v1", "Deployment", _metadata(m, workload_name(name)), spec=spec)


def _rolling_update(m: ModelAPI) -> dict[str, Any] | None:
    """Proxy pods are cheap: a roll starts each new pod before it stops an old one, so serving capacity never
    drops. A Hosted pod on a single-node model store (ReadWriteOnce, ReadWriteOncePod) is replaced by stopping
    the old pod first: a new pod could not attach the claim the old one holds (on another node, or on any
    node for ReadWriteOncePod), and the roll would stall. Other Hosted pods keep the Deployment's default (a
    surge would need a second GPU)."""
    if m.spec.mode == "Proxy":
        return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    store = m.spec.hostedConfig.modelStore if m.spec.hostedConfig else None
    if store is not None and store.accessMode in api.SINGLE_NODE_ACCESS:
        return {"type": "Recreate"}
    return None


# Neither LiteLLM nor Ollama calls the Kubernetes API: their pods (which serve whatever agents send) get no
# ServiceAccount token, nor the namespace's Services as environment variables (FOO_SERVICE_HOST, FOO_PORT,
# ...: seven or more per Service, thousands in a large namespace, read by nothing in them).
_ISOLATION = {"automountServiceAccountToken": False, "enableServiceLinks": False}


def _spread(m: ModelAPI, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """Pods spread over nodes, softly. Always present, whatever the replica count: scaling must never change
    the pod template (that would roll every pod). Pods of the same revision only, so a roll is not skewed."""
    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
              "labelSelector": {"matchLabels": selector_labels(m.metadata.name)},
              "matchLabelKeys": ["pod-template-hash"]}
    return {**pod_spec, "topologySpreadConstraints": [spread]}


def _disruption_budget(m: ModelAPI) -> dict[str, Any] | None:
    """At most one pod down at a time in a drain, once there is more than one (with one, a budget would
    block every node drain)."""
    if m.spec.replicas is None or m.spec.replicas < 2:
        return None
    spec = {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(m.metadata.name)}}
    return _object("policy/v1", "PodDisruptionBudget", _metadata(m, workload_name(m.metadata.name)), spec=spec)


def _service(m: ModelAPI, port: int) -> dict[str, Any]:
    spec = {
        "type": "ClusterIP",
        "selector": selector_labels(m.metadata.name),
        "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
    }
    return _object("v1", "Service", _metadata(m, workload_name(m.metadata.name)), spec=spec)


def _http_route(m: ModelAPI, s: Settings, port: int) -> dict[str, Any]:
    assert s.gateway is not None
    parent: dict[str, Any] = {"name": s.gateway.name, "namespace": s.gateway.namespace}
    if s.gateway.section_name:
        parent["sectionName"] = s.gateway.section_name
    rule: dict[str, Any] = {
        "matches": [{"path": {"type": "PathPrefix",
                              "value": f"/{m.metadata.namespace}/modelapi/{m.metadata.name}"}}],
        "filters": [{"type": "URLRewrite",
                     "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
        "backendRefs": [{"name": workload_name(m.metadata.name), "port": port}],
    }
    timeout = m.spec.effective_timeout()
    if not _is_zero_duration(timeout):
        rule["timeouts"] = {"request": timeout}
    spec = {"parentRefs": [parent], "rules": [rule]}
    return _object("gateway.networking.k8s.io/v1", "HTTPRoute",
                   _metadata(m, workload_name(m.metadata.name)), spec=spec)


def _is_zero_duration(value: str) -> bool:
    return all(ch in "0hms" for ch in value)


def _apply_override(m: ModelAPI, pod_spec: dict[str, Any]) -> dict[str, Any]:
    if not m.spec.podSpec:
        return pod_spec
    unknown = unknown_fields(m.spec.podSpec)
    if unknown:
        raise SpecError("InvalidPodSpec", f"{', '.join(unknown)}: unknown field (not in Kubernetes' PodSpec)")
    try:
        return merge_pod_spec(pod_spec, m.spec.podSpec)
    except StrategicMergeError as e:
        raise SpecError("InvalidPodSpec", f"cannot merge the podSpec override: {e}") from e


def _ignored_block(m: ModelAPI) -> tuple[str, ...]:
    """The seed's own reference example carries both blocks: the mode picks one, the other is kept, unused."""
    if m.spec.mode == "Proxy" and m.spec.hostedConfig is not None:
        return ("hostedConfig is ignored because mode is Proxy",)
    if m.spec.mode == "Hosted" and m.spec.proxyConfig is not None:
        return ("proxyConfig is ignored because mode is Hosted",)
    return ()


def endpoint(m: ModelAPI, s: Settings, port: int) -> str:
    host = f"{workload_name(m.metadata.name)}.{m.metadata.namespace}.svc.{s.cluster_domain}"
    return f"http://{host}:{port}"


def config_secret(m: ModelAPI) -> str | None:
    """The user's Secret the LiteLLM config is mounted from, if any."""
    config = m.spec.proxyConfig.configYaml if m.spec.proxyConfig else None
    return config.fromSecretKeyRef.name if config and config.fromSecretKeyRef else None


def build(m: ModelAPI, s: Settings, config_secret_version: str | None = None) -> Desired:
    """All children of `m`, in the order they should be applied. Raises SpecError for a spec the API server
    accepted but that cannot work (a config that does not parse, a podSpec override that cannot apply).

    `config_secret_version` is the resourceVersion of `config_secret(m)`: the operator never reads that
    Secret's data, so its version stands for the content in the config hash, and editing it rolls the pods."""
    generated: tuple[GeneratedKey, ...] = ()
    if m.spec.mode == "Proxy":
        plan, children, generated = _proxy_children(m)
        pod_spec, port, model, notes = _proxy_pod_spec(m, s, plan), litellm.PORT, plan.model, plan.notes
        if plan.config_text is not None:
            config_data = {litellm.CONFIG_FILE: plan.config_text}
        else:
            config_data = {"secretResourceVersion": config_secret_version or ""}
    else:
        assert m.spec.hostedConfig is not None
        store = _model_store(m)
        children, notes = ([store] if store is not None else []), ()
        pod_spec, port, model = _hosted_pod_spec(m, s), ollama.PORT, m.spec.hostedConfig.model
        config_data = None
    notes = (*notes, *_ignored_block(m))
    pod_spec = _apply_override(m, _spread(m, {**pod_spec, **_ISOLATION}))
    children += [_deployment(m, pod_spec, config_data), _service(m, port)]
    if (budget := _disruption_budget(m)) is not None:
        children.append(budget)
    if s.gateway is not None:
        children.append(_http_route(m, s, port))
    required = tuple(r for r in secret_refs(m) if not r.optional)
    return Desired(tuple(children), endpoint(m, s, port), model, required, notes, generated)
