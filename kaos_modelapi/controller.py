"""The ModelAPI reconciler: caches in, server-side applies out.

Level-triggered, in controller-runtime's sense: `reconcile(key)` looks only at the current state in the
caches (never at which event fired), builds the desired state with the pure builder, applies the children
that differ, deletes the ones no longer wanted, and applies the status when it changed. Running it again on
a converged object writes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pydantic
import structlog

from . import desired, diff, kube, status
from .api import ModelAPI
from .cli import describe_validation_error
from .desired import Desired, SpecError
from .events import NORMAL, WARNING, Event, Recorder
from .informer import OWNER_UID_INDEX, StoreReader
from .kube import ApiError, KubeClient, Resource
from .settings import Settings

FIELD_MANAGER = "kaos-modelapi"
# Kinds the operator creates, in apply order (config before the pods that mount it).
CHILD_RESOURCES: tuple[Resource, ...] = (
    kube.CONFIGMAP, kube.SECRET, kube.DEPLOYMENT, kube.SERVICE, kube.HTTPROUTE,
)

Obj = dict[str, Any]


@dataclass
class Caches:
    """What the reconciler reads. `children` maps each child Resource to its cache; a Resource whose API is
    missing from the cluster (no HTTPRoute CRD) has no entry."""

    modelapis: StoreReader
    children: dict[Resource, StoreReader]
    secrets: StoreReader  # metadata only
    pods: StoreReader

    def owned(self, resource: Resource, namespace: str, uid: str) -> list[Obj]:
        store = self.children.get(resource)
        if store is None:
            return []
        return [o for o in store.by_index(OWNER_UID_INDEX, uid)
                if o["metadata"].get("namespace") == namespace and _owner_uid(o) == uid]

    def pods_of(self, namespace: str, name: str) -> tuple[Obj, ...]:
        return tuple(self.pods.select({"modelapi": name}, namespace))

    def secret_exists(self, namespace: str, name: str) -> bool:
        return self.secrets.get(f"{namespace}/{name}") is not None

    def secret_version(self, namespace: str, name: str | None) -> str | None:
        secret = self.secrets.get(f"{namespace}/{name}") if name else None
        return secret["metadata"].get("resourceVersion") if secret else None


def _owner_uid(obj: Obj) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "ModelAPI":
            return str(ref.get("uid"))
    return None


def owner_key(obj: Obj) -> str | None:
    """The ModelAPI key a child event should wake, via its controller owner reference."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "ModelAPI":
            return f"{obj['metadata']['namespace']}/{ref['name']}"
    return None


def pod_owner_key(pod: Obj) -> str | None:
    name = (pod["metadata"].get("labels") or {}).get("modelapi")
    return f"{pod['metadata']['namespace']}/{name}" if name else None


def referenced_secrets(modelapi: Obj) -> set[str]:
    """Secret names a ModelAPI's pods need (for waking it when one appears), read from the raw spec."""
    spec = modelapi.get("spec") or {}
    config = spec.get("proxyConfig") or spec.get("hostedConfig") or {}
    names = {((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") for e in config.get("env") or []}
    names.add(((config.get("configYaml") or {}).get("fromSecretKeyRef") or {}).get("name"))
    return {n for n in names if n}


@dataclass
class Outcome:
    """What one reconcile did, for logs and metrics."""

    applied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    status_written: bool = False
    phase: str = ""


def _ref(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _config_hash(deployment: Mapping[str, Any] | None) -> str | None:
    if deployment is None:
        return None
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    return annotations.get(desired.CONFIG_HASH_ANNOTATION)


def _conflict_managers(err: ApiError) -> str:
    return err.message.split("conflict", 1)[-1].strip(" :") or "another field manager"


class Reconciler:
    def __init__(
        self,
        client: KubeClient,
        caches: Caches,
        settings: Settings,
        recorder: Recorder,
        log: structlog.typing.FilteringBoundLogger,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        self._caches = caches
        self._settings = settings
        self._recorder = recorder
        self._log = log
        self._clock = clock

    async def reconcile(self, key: str, log: structlog.typing.FilteringBoundLogger | None = None) -> Outcome:
        obj = self._caches.modelapis.get(key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return Outcome()  # owner references let the garbage collector remove the children
        log = (log or self._log.bind(modelapi=key)).bind(generation=obj["metadata"].get("generation"))
        outcome = Outcome()
        try:
            m = ModelAPI.model_validate(obj)
        except pydantic.ValidationError as e:
            error = SpecError("InvalidSpec", f"spec is invalid: {describe_validation_error(e)}")
            await self._write_status(obj, None, error, status.Observed(), outcome, log)
            return outcome
        config_version = self._caches.secret_version(m.metadata.namespace, desired.config_secret(m))
        built = _build(m, self._settings, config_version)
        warnings: tuple[str, ...] = ()
        if isinstance(built, Desired):
            warnings = await self._apply_children(obj, m, built, outcome, log)
            await self._delete_stale(obj, m, built, outcome, log)
        observed = self._observe(m, built, warnings)
        await self._write_status(obj, m, built, observed, outcome, log)
        return outcome

    # --- children ---------------------------------------------------------------------------------------

    async def _apply_children(
        self, obj: Obj, m: ModelAPI, built: Desired, outcome: Outcome, log: structlog.typing.FilteringBoundLogger
    ) -> tuple[str, ...]:
        warnings = []
        for child in built.children:
            resource = self._client.resource_for(child)
            store = self._caches.children.get(resource)
            if store is None:
                warnings.append(f"{child['kind']} {child['metadata']['name']} not created: the cluster has no "
                                f"{resource.plural}.{resource.group} API (install the Gateway API CRDs)")
                continue
            live = store.get(f"{m.metadata.namespace}/{child['metadata']['name']}")
            if await self._apply_child(obj, child, live, log):
                outcome.applied.append(_ref(child))
        if warnings:
            await self._recorder.emit(obj, Event(WARNING, "GatewayAPIMissing", "Reconcile", warnings[0]))
        return tuple(warnings)

    async def _apply_child(
        self, obj: Obj, child: Obj, live: Obj | None, log: structlog.typing.FilteringBoundLogger
    ) -> bool:
        generated_key = (child["metadata"].get("annotations") or {}).get(desired.GENERATE_KEY_ANNOTATION)
        if generated_key is not None:
            if live is None:
                await self._create_generated_secret(child, generated_key)
                await self._recorder.emit(obj, Event(NORMAL, "Created", "Create", f"created {_ref(child)}"))
                log.info("created", child=_ref(child))
                return True
            child = diff.metadata_only(child)
        if not diff.needs_apply(child, live):
            return False
        await self._apply(obj, child, live, log)
        verb = "created" if live is None else "updated"
        log.info(verb, child=_ref(child))
        if child["kind"] == "Deployment" and live is not None and _config_hash(child) != _config_hash(live):
            await self._recorder.emit(obj, Event(NORMAL, "ConfigRolled", "Update",
                                                 f"pod template changed: rolling {_ref(child)}"))
        else:
            await self._recorder.emit(obj, Event(NORMAL, verb.capitalize(), verb[:-1].capitalize(),
                                                 f"{verb} {_ref(child)}"))
        return True

    async def _apply(
        self, obj: Obj, child: Obj, live: Obj | None, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        try:
            await self._apply_taking_fields_back(obj, child, log)
        except ApiError as e:
            if not (e.is_invalid() and live is not None):
                raise
            # Apply merges list items by key, so a hand-edited port stays beside ours (a duplicate "http"):
            # only a replace of the whole object removes it.
            log.info("replacing hand-edited lists", child=_ref(child), error=e.message)
            await self._client.replace(diff.overlay(live, child), FIELD_MANAGER)
            await self._recorder.emit(obj, Event(WARNING, "FieldsReclaimed", "Update",
                                                 f"{_ref(child)}: replaced lists edited by hand ({e.message})"))

    async def _apply_taking_fields_back(self, obj: Obj, child: Obj, log: structlog.typing.FilteringBoundLogger) -> None:
        try:
            await self._client.apply(child, FIELD_MANAGER)
        except ApiError as e:
            if not e.is_conflict():
                raise
            # Someone else (kubectl edit, another controller) took fields we own: take them back.
            log.info("taking fields back", child=_ref(child), conflict=e.message)
            await self._client.apply(child, FIELD_MANAGER, force=True)
            await self._recorder.emit(obj, Event(WARNING, "FieldsReclaimed", "Update",
                                                 f"{_ref(child)}: reverted changes by {_conflict_managers(e)}"))

    async def _create_generated_secret(self, child: Obj, data_key: str) -> None:
        body = dict(child, stringData={data_key: secrets.token_urlsafe(32)})
        try:
            await self._client.create(body, FIELD_MANAGER)
        except ApiError as e:
            if not e.is_already_exists():  # the cache was behind: the next event brings it
                raise

    async def _delete_stale(
        self, obj: Obj, m: ModelAPI, built: Desired, outcome: Outcome, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        wanted = {_ref(c) for c in built.children}
        for resource in CHILD_RESOURCES:
            for child in self._caches.owned(resource, m.metadata.namespace, m.metadata.uid):
                ref = f"{resource.kind}/{child['metadata']['name']}"
                if ref in wanted:
                    continue
                await self._client.delete(resource, m.metadata.namespace, child["metadata"]["name"],
                                          child["metadata"].get("uid"))
                outcome.deleted.append(ref)
                log.info("deleted", child=ref)
                await self._recorder.emit(obj, Event(NORMAL, "Deleted", "Delete", f"deleted {ref}: no longer needed"))

    # --- status -----------------------------------------------------------------------------------------

    def _observe(self, m: ModelAPI, built: Desired | SpecError, warnings: tuple[str, ...]) -> status.Observed:
        ns, name = m.metadata.namespace, m.metadata.name
        deployment_store = self._caches.children[kube.DEPLOYMENT]
        deployment = deployment_store.get(f"{ns}/{desired.workload_name(name)}")
        if deployment is not None and _owner_uid(deployment) != m.metadata.uid:
            deployment = None
        missing: tuple[desired.SecretRef, ...] = ()
        if isinstance(built, Desired):
            missing = tuple(r for r in built.secret_refs if not self._caches.secret_exists(ns, r.name))
        return status.Observed(deployment, self._caches.pods_of(ns, name), missing, warnings)

    async def _write_status(
        self,
        obj: Obj,
        m: ModelAPI | None,
        built: Desired | SpecError,
        observed: status.Observed,
        outcome: Outcome,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        now = self._clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        new = status.compute(m, built, observed, now) if m is not None else _invalid_status(obj, built, now)
        outcome.phase = new["phase"]
        old = obj.get("status") or {}
        if new == old:
            return
        await self._client.apply_status(
            {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
             "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"]},
             "status": new},
            FIELD_MANAGER, force=True)  # the status is ours alone
        outcome.status_written = True
        log.info("status", phase=new["phase"], message=new["message"])
        if _ready_changed(old, new):
            kind = NORMAL if new["phase"] != "Failed" else WARNING
            reason = new["conditions"][0]["reason"]
            await self._recorder.emit(obj, Event(kind, reason, "Reconcile", new["message"]))


def _build(m: ModelAPI, settings: Settings, config_secret_version: str | None) -> Desired | SpecError:
    try:
        return desired.build(m, settings, config_secret_version)
    except SpecError as e:
        return e


def _ready_condition(st: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    for c in st.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status"), c.get("reason"), c.get("message")
    return None, None, None


def _ready_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return _ready_condition(old) != _ready_condition(new)


def _invalid_status(obj: Obj, error: Desired | SpecError, now: str) -> dict[str, Any]:
    """Status for an object the models cannot read (e.g. stored by an older CRD version)."""
    message = error.message if isinstance(error, SpecError) else "invalid spec"
    generation = obj["metadata"].get("generation")
    conditions = (obj.get("status") or {}).get("conditions") or []
    old: dict[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
    if old.get("status") == "False":
        now = old.get("lastTransitionTime", now)
    return {
        "phase": "Failed", "ready": False, "endpoint": "", "model": "", "message": message,
        "observedGeneration": generation,
        "conditions": [{"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": message,
                        "lastTransitionTime": now, "observedGeneration": generation}],
    }


SECRET_REF_INDEX = "secretRefs"


def secret_refs(modelapi: Obj) -> list[str]:
    """Index function: a ModelAPI -> the "namespace/name" keys of the Secrets it references, so a Secret
    event finds its ModelAPIs without scanning them all."""
    namespace = modelapi["metadata"].get("namespace")
    return [f"{namespace}/{name}" for name in sorted(referenced_secrets(modelapi))]
