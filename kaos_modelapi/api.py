"""The ModelAPI resource (kaos.tools/v1alpha1) as pydantic models.

These models are the single source of the CRD: `crd.py` generates the OpenAPI schema from them, and each
validation rule is written once, as a `Rule` holding both the CEL expression the API server enforces and the
Python check that `kaos-modelapi render` applies offline, so the two cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, ValidationError, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

GROUP = "kaos.tools"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelAPI"
PLURAL = "modelapis"
SINGULAR = "modelapi"
SHORT_NAMES = ("mapi",)

# The Service is named "modelapi-<name>" and must be a DNS-1035 label (at most 63 characters).
SERVICE_PREFIX = "modelapi-"
MAX_NAME_LENGTH = 63 - len(SERVICE_PREFIX)
DEFAULT_ROUTE_TIMEOUT = "120s"
# Gateway API's Duration (GEP-2257), as its own CRDs validate it.
DURATION_PATTERN = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"


@dataclass(frozen=True)
class Rule:
    """One validation rule, enforced by the API server (CEL) and mirrored in Python for offline use."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None  # relative to the object the rule sits on, e.g. ".apiBase"
    reason: str | None = None

    def to_crd(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field_path:
            rule["fieldPath"] = self.field_path
        if self.reason:
            rule["reason"] = self.reason
        return rule


class K8sModel(BaseModel):
    """Base for every API type: camelCase field names as Kubernetes spells them, rules attached."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> K8sModel:
        for rule in self.rules:
            if not rule.check(self):
                field = (rule.field_path or "").lstrip(".")
                shown = f"{field}: {rule.message}" if field else rule.message
                raise PydanticCustomError("cel", shown, {"field": field, "message": rule.message})
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        if cls.rules:
            schema["x-kubernetes-validations"] = [rule.to_crd() for rule in cls.rules]
        return schema


def _single_node_store_with_replicas(spec: Any) -> bool:
    hc = spec.hostedConfig
    store = hc.modelStore if spec.mode == "Hosted" and hc is not None else None
    return store is not None and store.accessMode in SINGLE_NODE_ACCESS and (spec.replicas or 0) > 1


def _is_http_url(value: str | None) -> bool:
    if value is None:
        return True
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


# --- Kubernetes' own shapes (the subset a ModelAPI uses) -------------------------------------------------


class SecretKeySelector(K8sModel):
    """Selects a key of a Secret in the ModelAPI's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, description="Key in the Secret's data.")
    optional: bool | None = Field(default=None, description="Whether the Secret or its key may be absent.")


class ConfigMapKeySelector(K8sModel):
    """Selects a key of a ConfigMap in the ModelAPI's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="Key in the ConfigMap's data.")
    optional: bool | None = Field(default=None, description="Whether the ConfigMap or its key may be absent.")


class ObjectFieldSelector(K8sModel):
    """Selects a field of the pod, e.g. metadata.namespace."""

    apiVersion: str | None = Field(default=None, description="Version of the schema fieldPath is written in.")
    fieldPath: str = Field(description="Path of the field to select.")


class ResourceFieldSelector(K8sModel):
    """Selects a container's resource request or limit."""

    containerName: str | None = Field(default=None, description="Container name.")
    resource: str = Field(description="Resource to select, e.g. limits.memory.")
    divisor: int | str | None = Field(default=None, description="Output format of the exposed resource.")


class EnvVarSource(K8sModel):
    """Where an environment variable's value comes from (exactly one source)."""

    secretKeyRef: SecretKeySelector | None = Field(default=None, description="A key of a Secret.")
    configMapKeyRef: ConfigMapKeySelector | None = Field(default=None, description="A key of a ConfigMap.")
    fieldRef: ObjectFieldSelector | None = Field(default=None, description="A field of the pod.")
    resourceFieldRef: ResourceFieldSelector | None = Field(default=None, description="A container resource.")

    rules = (
        Rule(
            cel="[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef),"
            " has(self.resourceFieldRef)].filter(x, x).size() == 1",
            message="valueFrom needs exactly one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef",
            check=lambda s: sum(
                x is not None for x in (s.secretKeyRef, s.configMapKeyRef, s.fieldRef, s.resourceFieldRef)
            ) == 1,
        ),
    )


class EnvVar(K8sModel):
    """An environment variable, as in a Kubernetes container (value or valueFrom)."""

    name: str = Field(min_length=1, max_length=256, description="Name of the variable.")
    value: str | None = Field(default=None, description="Literal value.")
    valueFrom: EnvVarSource | None = Field(default=None, description="Source of the value.")

    rules = (
        Rule(
            cel="!(has(self.value) && has(self.valueFrom))",
            message="set either value or valueFrom, not both",
            check=lambda s: not (s.value is not None and s.valueFrom is not None),
        ),
    )


# --- ModelAPI spec ----------------------------------------------------------------------------------------


class ConfigYaml(K8sModel):
    """A complete LiteLLM config, given inline or from a Secret (exactly one)."""

    fromString: str | None = Field(
        default=None, max_length=262144, description="The LiteLLM config.yaml content, used as is."
    )
    fromSecretKeyRef: SecretKeySelector | None = Field(
        default=None,
        description="A Secret key holding the LiteLLM config.yaml. The Secret is mounted into the pod; the "
        "operator never reads it. Any update of the Secret rolls the pods (LiteLLM does not reload its config).",
    )

    rules = (
        Rule(
            cel="has(self.fromString) != has(self.fromSecretKeyRef)",
            message="set exactly one of fromString or fromSecretKeyRef",
            check=lambda s: (s.fromString is None) != (s.fromSecretKeyRef is None),
        ),
    )


class ProxyConfig(K8sModel):
    """LiteLLM proxy settings. configYaml: that config is used as is (apiBase and model are ignored);
    apiBase only: wildcard, any model a client names is forwarded to apiBase; apiBase and model: only that
    model, forwarded to apiBase; model only: mock, no backend, a request's mock_response is returned."""

    apiBase: str | None = Field(
        default=None,
        max_length=2048,
        description="Backend URL (http or https), e.g. http://ollama.ollama.svc:11434. Alone, it enables "
        "wildcard mode.",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="One model name, e.g. ollama/smollm2:135m. With apiBase: single-model mode; alone: mock "
        "mode.",
    )
    configYaml: ConfigYaml | None = Field(default=None, description="A complete LiteLLM config.")
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=256,
        description="Environment variables for the LiteLLM container; they win over the operator's own.",
    )

    rules = (
        Rule(
            cel="has(self.apiBase) || has(self.model) || has(self.configYaml)",
            message="set at least one of apiBase (wildcard proxy), model (mock, or single model with apiBase) "
            "or configYaml (your own LiteLLM config)",
            check=lambda s: s.apiBase is not None or s.model is not None or s.configYaml is not None,
        ),
        Rule(
            cel="!has(self.apiBase) || (isURL(self.apiBase) && url(self.apiBase).getScheme() in ['http', "
            "'https'] && url(self.apiBase).getHostname() != '')",
            message="must be an absolute http or https URL, such as http://ollama.ollama.svc:11434",
            check=lambda s: _is_http_url(s.apiBase),
            field_path=".apiBase",
        ),
    )


# A Kubernetes quantity as storage sizes are written (e.g. 20Gi, 500M, 1.5Ti).
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
# Access modes that let only one node (or one pod) mount the claim.
SINGLE_NODE_ACCESS = ("ReadWriteOnce", "ReadWriteOncePod")


class ModelStore(K8sModel):
    """A PersistentVolumeClaim the ModelAPI owns, mounted where Ollama keeps its models."""

    size: str = Field(
        max_length=32, pattern=QUANTITY_PATTERN,
        description="Requested storage, a Kubernetes quantity such as 20Gi. It can grow (if the storage class "
        "allows expansion) but not shrink.",
    )
    storageClassName: str | None = Field(
        default=None, max_length=253,
        description="StorageClass of the claim; unset: the cluster's default class. Fixed once the claim exists.",
    )
    accessMode: Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"] = Field(
        default="ReadWriteOnce",
        description="Access mode of the claim. ReadWriteOnce (default) and ReadWriteOncePod allow one replica; "
        "ReadWriteMany lets every replica share the store. Fixed once the claim exists.",
    )


class HostedConfig(K8sModel):
    """Ollama settings: the model is pulled by the pull-model init container, then served."""

    model: str = Field(
        min_length=1, max_length=256, description="Ollama model reference to pull and serve, e.g. smollm2:135m."
    )
    env: list[EnvVar] | None = Field(
        default=None, max_length=256, description="Environment variables for the Ollama containers."
    )
    modelStore: ModelStore | None = Field(
        default=None,
        description="Keep the models on a PersistentVolumeClaim named modelapi-<name>-models that the ModelAPI "
        "owns, instead of an emptyDir: a restarted or rolled pod finds the model and pulls nothing. Deleting "
        "the ModelAPI (or this field) deletes the claim; its volume then follows the StorageClass's "
        "reclaimPolicy.",
    )


class GatewayRoute(K8sModel):
    """Settings of the HTTPRoute created when the operator is configured with a Gateway."""

    timeout: str = Field(
        default=DEFAULT_ROUTE_TIMEOUT,
        max_length=32,
        description="Request timeout of the HTTPRoute (Gateway API Duration, e.g. 120s, 4m, 1h30m). 0s sets "
        "no timeout, so the Gateway's own default applies.",
    )

    rules = (
        Rule(
            cel=f"self.timeout.matches('{DURATION_PATTERN}')",
            message="must be a Gateway API duration such as 120s, 4m or 1h30m (0s for the Gateway's default)",
            check=lambda s: re.match(DURATION_PATTERN, s.timeout) is not None,
            field_path=".timeout",
        ),
    )


Mode = Literal["Proxy", "Hosted"]


class ModelAPISpec(K8sModel):
    """What the ModelAPI serves: a LiteLLM proxy (mode Proxy) or Ollama in the cluster (mode Hosted)."""

    mode: Mode = Field(description="Proxy: a LiteLLM proxy in front of other backends. Hosted: Ollama.")
    proxyConfig: ProxyConfig | None = Field(
        default=None,
        description="LiteLLM proxy settings; required when mode is Proxy (ignored otherwise). configYaml: that "
        "config is used as is (apiBase and model are ignored). apiBase only: wildcard, any model a client "
        "names is forwarded to apiBase. apiBase and model: only that model, forwarded to apiBase. model "
        "only: mock, no backend, a request's mock_response is the answer.",
    )
    hostedConfig: HostedConfig | None = Field(
        default=None,
        description="Ollama settings; required when mode is Hosted (ignored otherwise). The pull-model init "
        "container pulls the model into a shared volume, then the model-api container serves it on port 11434.",
    )
    podSpec: dict[str, Any] | None = Field(
        default=None,
        description="A partial PodSpec merged onto the generated one with strategic-merge-patch semantics "
        "(containers, initContainers, volumes and env merge by name; ports by containerPort; volumeMounts by "
        "mountPath; $patch directives honoured). The main container is named model-api.",
    )
    gatewayRoute: GatewayRoute | None = Field(default=None, description="HTTPRoute settings.")
    replicas: int | None = Field(
        default=None, ge=0, le=1000,
        description="How many pods serve the endpoint. Unset: one at first, then the Deployment's count is left "
        "to whoever scales it. Set (also by kubectl scale modelapi, or a HorizontalPodAutoscaler on the scale "
        "subresource): the operator keeps the Deployment at this count. Scaling never restarts pods. With "
        "more than one, a PodDisruptionBudget keeps at most one pod unavailable.",
    )

    rules = (
        Rule(
            cel="self.mode != 'Proxy' || has(self.proxyConfig)",
            message="proxyConfig is required when mode is Proxy",
            check=lambda s: s.mode != "Proxy" or s.proxyConfig is not None,
            field_path=".proxyConfig",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.mode != 'Hosted' || has(self.hostedConfig)",
            message="hostedConfig is required when mode is Hosted",
            check=lambda s: s.mode != "Hosted" or s.hostedConfig is not None,
            field_path=".hostedConfig",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.mode != 'Hosted' || !has(self.hostedConfig) || !has(self.hostedConfig.modelStore) || "
            "(has(self.hostedConfig.modelStore.accessMode) && self.hostedConfig.modelStore.accessMode == "
            "'ReadWriteMany') || "
            "!has(self.replicas) || self.replicas <= 1",
            message="at most 1 replica with a ReadWriteOnce or ReadWriteOncePod hostedConfig.modelStore: the "
            "pods of other nodes could not mount it (use accessMode ReadWriteMany to share the store)",
            check=lambda s: not _single_node_store_with_replicas(s),
            field_path=".replicas",
            reason="FieldValueForbidden",
        ),
    )

    def effective_timeout(self) -> str:
        return self.gatewayRoute.timeout if self.gatewayRoute else DEFAULT_ROUTE_TIMEOUT


# --- ModelAPI status ----------------------------------------------------------------------------------


Phase = Literal["Pending", "Ready", "Failed"]


class Condition(K8sModel):
    """A standard Kubernetes condition (metav1.Condition)."""
    model_config = ConfigDict(extra="ignore")  # tolerate fields a newer operator version wrote

    type: str = Field(max_length=316, description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="One CamelCase word saying why.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    lastTransitionTime: str = Field(description="When status last changed (RFC 3339).")
    observedGeneration: int | None = Field(default=None, description="The generation this was computed from.")


class DeploymentCondition(K8sModel):
    """A condition copied from the Deployment."""
    model_config = ConfigDict(extra="ignore")  # tolerate fields a newer operator version wrote

    type: str = Field(description="Available, Progressing or ReplicaFailure.")
    status: str = Field(description="True, False or Unknown.")
    reason: str | None = Field(default=None, description="Why.")
    message: str | None = Field(default=None, description="Details.")
    lastUpdateTime: str | None = Field(default=None, description="Last update.")
    lastTransitionTime: str | None = Field(default=None, description="Last status change.")


class DeploymentStatus(K8sModel):
    """Key status fields of the Deployment, for rolling-update visibility."""
    model_config = ConfigDict(extra="ignore")  # tolerate fields a newer operator version wrote

    replicas: int = Field(default=0, description="Non-terminated pods.")
    readyReplicas: int = Field(default=0, description="Pods with the Ready condition.")
    availableReplicas: int = Field(default=0, description="Available pods.")
    updatedReplicas: int = Field(default=0, description="Pods with the desired template.")
    conditions: list[DeploymentCondition] = Field(default_factory=list, description="Deployment conditions.")


class ModelAPIStatus(K8sModel):
    """What the operator observed."""
    model_config = ConfigDict(extra="ignore")  # tolerate fields a newer operator version wrote

    phase: Phase = Field(default="Pending", description="Pending, Ready or Failed.")
    ready: bool = Field(default=False, description="Whether the endpoint serves requests.")
    endpoint: str = Field(default="", description="In-cluster URL for agents.")
    model: str = Field(default="", description="The model(s) served, as shown by kubectl get.")
    message: str = Field(default="", description="What is happening or what is wrong.")
    observedGeneration: int | None = Field(default=None, description="The spec generation last acted on.")
    deployment: DeploymentStatus | None = Field(default=None, description="Mirror of the Deployment status.")
    replicas: int = Field(default=0, description="Pods running now (the scale subresource's status).")
    selector: str = Field(default="", description="Label selector of the pods (the scale subresource's, for HPA).")
    readiness: str = Field(default="", description="Ready and desired pods, as kubectl get shows them: 2/3.")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions (Ready).")


# --- The resource -----------------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads; everything else is kept but ignored."""

    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)


class ModelAPI(K8sModel):
    """A ModelAPI: one OpenAI-compatible LLM endpoint for agents in the cluster."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    apiVersion: Literal["kaos.tools/v1alpha1"] = "kaos.tools/v1alpha1"
    kind: Literal["ModelAPI"] = "ModelAPI"
    metadata: ObjectMeta
    spec: ModelAPISpec
    status: ModelAPIStatus | None = None

    rules = (
        Rule(
            cel=f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the Service "
            f"{SERVICE_PREFIX}<name> must be a DNS label of at most 63 characters; choose a shorter name",
            check=lambda s: len(s.metadata.name) <= MAX_NAME_LENGTH,
        ),
        Rule(
            cel="!self.metadata.name.contains('.')",
            message="metadata.name must not contain '.': the Service modelapi-<name> must be a DNS label; "
            "use '-' instead",
            check=lambda s: "." not in s.metadata.name,
        ),
    )


def read_modelapi(obj: Mapping[str, Any]) -> ModelAPI:
    """A stored ModelAPI as the operator reads it: its metadata and spec. Not its status, which the operator
    alone writes and reads back as the stored dict (`status.compute`'s `previous`): a status of another
    version's shape cannot make a spec unreadable, and validating it was half the cost of reading one."""
    return ModelAPI.model_validate({k: v for k, v in obj.items() if k != "status"})


def describe_validation_error(error: ValidationError) -> str:
    """The first problem, as one line that names the field (as the API server's CEL messages do)."""
    first = error.errors()[0]
    path = [str(part) for part in first["loc"]]
    message = first["msg"]
    if first["type"] == "cel":  # our rules carry their own field path and message
        ctx = first.get("ctx") or {}
        path += [p for p in str(ctx.get("field", "")).split(".") if p]
        message = str(ctx.get("message", message))
    where = ".".join(path)
    return f"{where}: {message}" if where else message
