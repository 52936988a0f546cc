"""The ModelAPI controller: what wakes a reconcile (`watches`), what the caches keep, and the reconciler.

A reconcile reads only the caches, builds the desired children (`desired.build`, pure), applies those that
differ from the cache with server-side apply, deletes the children no longer wanted, and applies the status
(`status.compute`, pure) when it changed. Its contract is controller-runtime's (`runtime.Result`,
`runtime.TerminalError`): what only the user can fix ends in a Failed status and no retry.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pydantic
import structlog

from . import desired, diff, kube, status
from .api import ModelAPI, describe_validation_error, read_modelapi
from .desired import Desired, SpecError
from .events import NORMAL, WARNING, Event, Recorder
from .informer import Stamp, StoreReader, same_but_annotations, stamp
from .kube import ApiError, KubeClient, Obj, Resource, TerminatingNamespaces, key_for, object_key
from .runtime import Builder, CacheSpec, Result, Stores, TerminalError, changed_beyond_version
from .settings import Settings

NAME = "modelapi"
FIELD_MANAGER = "kaos-modelapi"
# Kinds the operator creates, in apply order (config before the pods that mount it).
CHILD_RESOURCES: tuple[Resource, ...] = (
    kube.CONFIGMAP, kube.SECRET, kube.PVC, kube.DEPLOYMENT, kube.SERVICE, kube.PDB, kube.HTTPROUTE,
)
SECRET_REF_INDEX = "secretRefs"
# The tail of a pull-model log read for its progress: a few lines (the progress filter prints one a percent,
# Ollama's server a few while it pulls), bounded in bytes, and quick: a node that does not answer only
# costs the progress in the message.
PULL_LOG_LINES = 40
PULL_LOG_BYTES = 32 * 1024
PULL_LOG_TIMEOUT = 5.0
POD_OWNER_INDEX = "modelapi"
CONTROLLER_UID_INDEX = "controller"
# A status that only copies the Deployment's moving counters is written at most once a second per ModelAPI
# (the latest then): a pod starting or a roll moves them several times within a second, and each write was
# a request, a watch event and a reconcile. A new state (Ready, its reason, a generation) is written at once.
MIRROR_INTERVAL_SECONDS = 1.0
# A child just applied is not sent again while the cache has not caught up with it (a reconcile woken by
# another child's event can run before the watch brings the first), for at most this long: then the cache is
# believed (e.g. the child was deleted before the watch showed it) and the reconcile, requeued, sends it again.
UNSEEN_WRITE_SECONDS = 5.0
# The statuses last written, kept to be compared with until the cache shows them: a ModelAPI's own status
# event wakes no reconcile, so the last one would stay; the most recent ones are enough (the cache lags by
# milliseconds, and dozens of status writes a second are a busy operator's).
STATUSES_KEPT = 64
Log = structlog.typing.FilteringBoundLogger


# --- what the caches keep: only what the reconciler reads -------------------------------------------------


# Set by the API server on every child, never by `desired.build` and never read: the diff compares only what
# desired sets, so a field it never sets can be left out of the cache (tests/test_controller.py checks that
# every child the builder makes survives the transform). Each is a value of its own (a time, an IP), which
# packing an object against another of its kind (informer.Packer) cannot shrink.
SERVER_ASSIGNED = {"Service": ("clusterIP", "clusterIPs")}
# The one child whose status the reconciler reads (status.py). The others' (an HTTPRoute's, written by the
# Gateway's controller; a PodDisruptionBudget's, at every pod that turns ready or goes; a claim's) are left out
# of the cache: never read, they cost memory and, each time they moved, a reconcile that found nothing to do.
STATUS_READ = frozenset({"Deployment"})


def strip_managed(obj: Obj) -> Obj:
    meta = obj["metadata"]
    meta.pop("managedFields", None)
    meta.pop("creationTimestamp", None)
    kind = obj.get("kind", "")
    spec = obj.get("spec") or {}
    for key in SERVER_ASSIGNED.get(kind, ()):
        spec.pop(key, None)
    if kind not in STATUS_READ:
        obj.pop("status", None)
    return obj


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def modelapi_cached(obj: Obj) -> Obj:
    """A ModelAPI without what the reconciler never reads: managedFields, and the copy of the whole object
    that `kubectl apply` keeps in an annotation (as large as the spec itself)."""
    meta = obj["metadata"]
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return obj


def secret_identity(obj: Obj) -> Obj:
    """Keep a Secret's identity only. Even metadata can carry data (kubectl's last-applied annotation), so
    only the operator's own annotations are kept."""
    meta = obj["metadata"]
    keep = ("name", "namespace", "uid", "resourceVersion", "labels", "ownerReferences", "deletionTimestamp")
    identity = {k: meta[k] for k in keep if k in meta}
    ours = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("kaos.tools/")}
    if ours:
        identity["annotations"] = ours
    return {"apiVersion": "v1", "kind": "Secret", "metadata": identity}


def pod_status_only(obj: Obj) -> Obj:
    """What the status builder reads of a pod (status.py), and nothing else: each container's name, image,
    readiness and state (the reason and exit code of each), and the PodScheduled condition while it says the
    pod is not scheduled. Not its phase, its other conditions (each flips on the way to Ready, and a pod
    update that changed only those woke a reconcile that could only find what it left), the state messages,
    IPs, times, container IDs and restart counts that make every pod's status one of a kind.
    (tests/test_controller.py checks that the status computed from transformed pods is the same.)"""
    meta = obj["metadata"]
    keep = ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp")
    status = obj.get("status") or {}
    kept: dict[str, Any] = {}
    unscheduled = [_only(c, ("type", "status", "reason", "message")) for c in status.get("conditions") or ()
                   if c.get("type") == "PodScheduled" and c.get("status") == "False"]
    if unscheduled:
        kept["conditions"] = unscheduled
    for key in ("initContainerStatuses", "containerStatuses"):
        if key in status:
            kept[key] = [_container_status(c) for c in status[key]]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {k: meta[k] for k in keep if k in meta}, "status": kept}


def _only(obj: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: obj[k] for k in keys if k in obj}


_STATE_KEYS = ("reason", "exitCode")


def _container_status(status: Mapping[str, Any]) -> dict[str, Any]:
    kept = _only(status, ("name", "image", "ready"))
    for key in ("state", "lastState"):
        if key in status:
            kept[key] = {k: _only(v or {}, _STATE_KEYS) for k, v in (status[key] or {}).items()}
    return kept


def secret_ref_keys(obj: Obj) -> list[str]:
    """Index function: a ModelAPI -> the keys of the Secrets it references, so that a Secret event finds
    its ModelAPIs without scanning them all. An object the models cannot read references nothing."""
    try:
        m = read_modelapi(obj)
    except pydantic.ValidationError:
        return []
    return sorted({key_for(m.metadata.namespace, ref.name) for ref in desired.secret_refs(m)})


def pod_modelapi_keys(obj: Obj) -> list[str]:
    """Index function: a pod -> the key of the ModelAPI it serves (its label), so a reconcile finds its pods
    without scanning every pod of the cluster (a scan made a cold converge quadratic in N)."""
    name = desired.labelled_modelapi(obj)
    return [] if name is None else [key_for(obj["metadata"].get("namespace"), name)]


def controlling_modelapi_uid(obj: Obj) -> list[str]:
    """Index function: a child -> the UID of the ModelAPI that controls it, so that a reconcile finds its
    children (and their stamps) by key, unpacking none that it does not read."""
    owner = desired.controlling_modelapi(obj)
    return [] if owner is None else [owner[1]]


CHILD_INDEXERS = {CONTROLLER_UID_INDEX: controlling_modelapi_uid}


def owned(resource: Resource, optional: bool = False) -> CacheSpec:
    return CacheSpec(resource, desired.MANAGED_SELECTOR, strip_managed, indexers=CHILD_INDEXERS, optional=optional)


MODELAPIS = CacheSpec(kube.MODELAPI, transform=modelapi_cached, indexers={SECRET_REF_INDEX: secret_ref_keys})
# One Secret cache, metadata only, never any data: it answers "does a referenced Secret exist, at which
# version" and "is our generated key Secret there".
SECRETS = CacheSpec(kube.SECRET, transform=secret_identity, metadata_only=True, indexers=CHILD_INDEXERS)
PODS = CacheSpec(kube.POD, desired.MANAGED_SELECTOR, pod_status_only,
                 indexers={POD_OWNER_INDEX: pod_modelapi_keys})


def namespace_lifecycle(obj: Obj) -> Obj:
    meta = obj["metadata"]
    keep = ("name", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp")
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {k: meta[k] for k in keep if k in meta}}


# Namespaces, metadata only: a namespace being deleted is seen (its deletionTimestamp) before the namespace
# controller deletes the children in it, whose deletion would otherwise wake reconciles that write there and
# are refused (kube.TerminatingNamespaces).
NAMESPACES = CacheSpec(kube.NAMESPACE, transform=namespace_lifecycle, metadata_only=True, indexers={})


def nothing_to_wake(_: Obj, __: Stores) -> tuple[str, ...]:
    return ()  # a namespace's deletion wakes nothing: the reconciles its objects' deletion wakes read the cache


# --- what wakes a reconcile ------------------------------------------------------------------------------


def not_only_status(kind: str, old: Obj | None, new: Obj | None) -> bool:
    """A ModelAPI update wakes its reconcile unless only its status (and so its resourceVersion) changed:
    each status the reconciler writes comes back as such an update, and would cost a reconcile that can
    only find everything as it left it. (Labels and annotations do count: they change no generation.)"""
    if kind != "update" or old is None or new is None:
        return True
    return old.get("spec") != new.get("spec") or _identity_meta(old) != _identity_meta(new)


def _identity_meta(obj: Obj) -> dict[str, Any]:
    return {k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "managedFields")}


def modelapis_using_secret(secret: Obj, stores: Stores) -> Iterable[str]:
    """Existence matters to every ModelAPI that references a Secret, and its version to one mounting its
    config."""
    users = stores[kube.MODELAPI].by_index(SECRET_REF_INDEX, object_key(secret))
    return (object_key(m) for m in users)


def modelapi_of_pod(pod: Obj, _: Stores) -> Iterable[str]:
    return pod_modelapi_keys(pod)


def watches(settings: Settings, cluster_wide: bool = True) -> Builder:
    """Everything that wakes the reconcile of a ModelAPI, in one place (and the Namespace cache, which wakes
    nothing: only an operator that watches every namespace may list them)."""
    builder = (
        Builder(NAME)
        .for_(MODELAPIS, not_only_status)
        # (A child's update wakes its owner only if more than its version changed: e.g. not one that changed
        # only managedFields, which the cache drops.)
        .owns(owned(kube.CONFIGMAP), changed_beyond_version)
        .owns(SECRETS)  # the generated master key
        .owns(owned(kube.DEPLOYMENT), changed_beyond_version)
        .owns(owned(kube.SERVICE), changed_beyond_version)
        .owns(owned(kube.PDB), changed_beyond_version)  # only with more than one replica
        .owns(owned(kube.PVC), changed_beyond_version)  # Hosted with a model store only
        .watches(SECRETS, modelapis_using_secret)  # the user's Secrets it mounts or reads env from
        # Pod states feed the status; pods are the ReplicaSet's, found by label. The scheduler's binding (spec)
        # and metadata edits change nothing the cache keeps but the version: no reconcile.
        .watches(PODS, modelapi_of_pod, changed_beyond_version)
    )
    if settings.gateway is not None:  # routes only when a Gateway is configured, once the CRD is installed
        builder.owns(owned(kube.HTTPROUTE, optional=True), changed_beyond_version)
    if cluster_wide:
        builder.watches(NAMESPACES, nothing_to_wake)
    return builder


# --- what the reconciler reads ---------------------------------------------------------------------------


class Caches:
    """The reconciler's view of the caches. A child Resource whose API is missing from the cluster (no
    HTTPRoute CRD) has no store."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    @property
    def modelapis(self) -> StoreReader:
        return self.stores[kube.MODELAPI]

    def child(self, resource: Resource) -> StoreReader | None:
        return self.stores.get(resource)

    def owned_keys(self, resource: Resource, namespace: str, uid: str) -> list[str]:
        store = self.stores.get(resource)
        if store is None:
            return []
        inside = f"{namespace}/"  # (an owner reference across namespaces is not one the garbage collector honours)
        return [key for key in store.keys_by_index(CONTROLLER_UID_INDEX, uid) if key.startswith(inside)]

    def owned_stamps(self, namespace: str, uid: str, resources: Iterable[Resource]) -> list[Stamp]:
        return [mark for resource in resources for key in self.owned_keys(resource, namespace, uid)
                if (mark := self.stores[resource].stamp(key)) is not None]

    def pods_of(self, namespace: str, name: str) -> tuple[Obj, ...]:
        return tuple(self.stores[kube.POD].by_index(POD_OWNER_INDEX, key_for(namespace, name)))

    def secret_version(self, namespace: str, name: str | None) -> str | None:
        secret = self.stores[kube.SECRET].get(key_for(namespace, name)) if name else None
        return secret["metadata"].get("resourceVersion") if secret else None


# --- the reconciler --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one reconcile did, for logs."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    status_written: bool = False
    requeue_after: float | None = None  # a status write put off, a write the cache has not shown yet, a pull

    def look_again_in(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass
class Context:
    """One reconcile: the object as cached, the logger bound to it, and what was done."""

    obj: Obj
    log: Log
    outcome: Outcome = field(default_factory=Outcome)

    @property
    def key(self) -> str:
        return object_key(self.obj)


class ChildRefused(Exception):
    """The API server refused a child as invalid: the spec is the user's to fix, retrying cannot help."""

    def __init__(self, child: Mapping[str, Any], message: str) -> None:
        super().__init__(message)
        self.reason = "InvalidPodSpec" if child["kind"] == "Deployment" else f"Invalid{child['kind']}"
        self.message = f"the API server refused {_ref(child)}: {message}"


@dataclass(frozen=True)
class Unseen:
    """A child applied over the cached version `over` (None: there was none), not yet in the cache."""

    child: Obj
    over: str | None
    at: float


@dataclass(frozen=True, slots=True)
class Verified:
    """A reconcile that found every child as built and wrote none: the stamps of what it saw (the ModelAPI,
    then each child it owns, as cached), the config Secret's version it built with, and what it built but the
    children.

    While the caches hold the same, a build and a diff would find the same again, so a reconcile woken by a
    Deployment's or a pod's status (most of them) only computes the status. "The same" is equal stamps: the
    same objects but for their status and resourceVersion. Anything else (an edit, a new child) only costs a
    full reconcile."""

    seen: tuple[Stamp, ...]
    config_version: str | None
    built: Desired
    # Whether a built child sets annotations: if none does, the diff never reads a child's, and a change of
    # them alone (the Deployment controller's revision, a user's `kubectl annotate`) needs no build.
    annotated: bool

    def holds(self, seen: tuple[Stamp, ...], config_version: str | None) -> bool:
        if config_version != self.config_version or len(seen) != len(self.seen) or self.seen[0] != seen[0]:
            return False
        if self.annotated:
            return self.seen[1:] == seen[1:]
        return all(map(same_but_annotations, self.seen[1:], seen[1:]))


@dataclass(frozen=True, slots=True)
class Built:
    """What a reconcile that wrote some children built, from which ModelAPI (its stamp) and config Secret
    version. The next reconcile (most often woken by those very writes coming back through the watches) diffs
    the cache against it without building again while the ModelAPI says what it said and the Secret is at that
    version: a build depends on nothing else (and the settings, fixed for the process's life)."""

    source: Stamp
    config_version: str | None
    built: Desired

    def holds(self, source: Stamp, config_version: str | None) -> bool:
        return config_version == self.config_version and self.source == source


def _version(obj: Obj | None) -> str | None:
    return obj["metadata"].get("resourceVersion") if obj is not None else None


def _ref(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _digest(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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
        stores: Stores,
        settings: Settings,
        recorder: Recorder,
        log: Log,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        terminating: TerminatingNamespaces | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._caches = Caches(stores)
        self._settings = settings
        self._recorder = recorder
        self._log = log
        self._clock = clock
        # key -> (digest of a child the API server refused, its message): not sent again until it changes.
        self._refused: dict[str, tuple[str, str]] = {}
        self._terminating = terminating or TerminatingNamespaces()
        # key -> (when, pod, progress) of the last pull log read: other events (pod, Deployment, status writes)
        # wake a pulling ModelAPI between the requeues too, and reuse it rather than read the log again.
        self._pull_reads: dict[str, tuple[datetime, str, status.PullProgress | None]] = {}
        self._monotonic = monotonic
        self._status_written_at: dict[str, float] = {}  # key -> when its status was last written
        self._unseen: dict[str, dict[str, Unseen]] = {}  # key -> child ref -> a write the cache lags behind
        # key -> (the ModelAPI's resourceVersion, the status written over it), the last STATUSES_KEPT.
        self._status_unseen: OrderedDict[str, tuple[str | None, dict[str, Any]]] = OrderedDict()
        self._verified: dict[str, Verified] = {}  # key -> its last reconcile that found nothing to write
        self._built: dict[str, Built] = {}  # key -> what its last reconcile built, when that one wrote

    async def reconcile(self, key: str) -> Result:
        obj = self._caches.modelapis.get(key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self._refused.pop(key, None)
            self._pull_reads.pop(key, None)
            self._status_written_at.pop(key, None)
            self._unseen.pop(key, None)
            self._status_unseen.pop(key, None)
            self._verified.pop(key, None)
            self._built.pop(key, None)
            return Result()  # owner references let the garbage collector remove the children
        namespace = obj["metadata"]["namespace"]
        if self._terminating.holds(obj):
            return Result()
        ctx = Context(obj, self._log.bind(generation=obj["metadata"].get("generation")))
        try:
            await self._reconcile(ctx)
        except ApiError as e:
            if e.is_namespace_terminating():  # the ModelAPI goes with its namespace: nothing left to do
                self._terminating.mark(namespace, self._now())
                raise TerminalError(f"namespace {namespace} is being terminated") from e
            raise
        finally:
            _log_writes(ctx)  # (what was written before a failure)
        return Result(requeue_after=ctx.outcome.requeue_after)

    async def _reconcile(self, ctx: Context) -> None:
        try:
            m = read_modelapi(ctx.obj)
        except pydantic.ValidationError as e:
            error = SpecError("InvalidSpec", f"spec is invalid: {describe_validation_error(e)}")
            await self._write_status(ctx, status.unreadable(ctx.obj, error, self._now()), self._stored_status(ctx))
            return
        built, warnings = await self._converge(ctx, m)
        observed = await self._with_pull_progress(ctx, m, built, self._observe(m, built, warnings))
        stored = self._stored_status(ctx)
        new = status.compute(m, built, observed, self._now(), stored)
        if not status.only_creating(stored, new):
            await self._write_status(ctx, new, stored)

    async def _converge(self, ctx: Context, m: ModelAPI) -> tuple[Desired | SpecError, tuple[str, ...]]:
        """Build the children and apply those the caches show differ, delete those no longer wanted; or, while
        the caches hold what the last reconcile that found nothing to write saw (`Verified`), only say what it
        built. Returns what was built (a SpecError: what the user must fix) and warnings for the status."""
        config_version = self._caches.secret_version(m.metadata.namespace, desired.config_secret(m))
        seen = (stamp(ctx.obj), *self._caches.owned_stamps(m.metadata.namespace, m.metadata.uid, CHILD_RESOURCES))
        verified = self._verified.pop(ctx.key, None)
        if verified is not None and verified.holds(seen, config_version):
            self._verified[ctx.key] = replace(verified, seen=seen)  # (the cache's latest: the old ones can go)
            return verified.built, ()
        last = self._built.pop(ctx.key, None)
        if last is not None and last.holds(seen[0], config_version):
            built: Desired | SpecError = last.built
        else:
            built = _build(m, self._settings, config_version)
        if isinstance(built, SpecError):
            return built, ()
        try:
            warnings = await self._apply_children(ctx, built)
            await self._delete_stale(ctx, m, built)
        except ChildRefused as e:
            _log_writes(ctx)
            return SpecError(e.reason, e.message), ()
        if not warnings and self._nothing_written(ctx):
            annotated = any("annotations" in child["metadata"] for child in built.children)
            self._verified[ctx.key] = Verified(seen, config_version, replace(built, children=(), generated=()),
                                               annotated)
        else:
            self._built[ctx.key] = Built(seen[0], config_version, built)
        _log_writes(ctx)
        return built, warnings

    def _nothing_written(self, ctx: Context) -> bool:
        """Whether this reconcile found every child as built: nothing written, nothing put off."""
        out = ctx.outcome
        return not (out.created or out.updated or out.deleted or ctx.key in self._unseen)

    def _now(self) -> str:
        return self._clock().strftime("%Y-%m-%dT%H:%M:%SZ")

    # --- children ---------------------------------------------------------------------------------------

    async def _apply_children(self, ctx: Context, built: Desired) -> tuple[str, ...]:
        warnings = []
        generated = {g.secret: g.key for g in built.generated}
        for child in built.children:
            resource = self._client.resource_for(child)
            store = self._caches.child(resource)
            if store is None:
                warnings.append(f"{child['kind']} {child['metadata']['name']} not created: the cluster has no "
                                f"{resource.plural}.{resource.group} API (install the Gateway API CRDs)")
                continue
            name = child["metadata"]["name"]
            live = store.get(key_for(child["metadata"]["namespace"], name))
            key = generated.get(name) if child["kind"] == "Secret" else None
            await self._apply_child(ctx, child, live, key)
        self._refused.pop(ctx.key, None)
        if warnings:
            await self._recorder.emit(ctx.obj, Event(WARNING, "GatewayAPIMissing", "Reconcile", warnings[0]))
        return tuple(warnings)

    async def _apply_child(self, ctx: Context, child: Obj, live: Obj | None, generated_key: str | None) -> None:
        if generated_key is not None and live is not None:
            child = diff.metadata_only(child)
        if self._cache_behind(ctx, child, live):
            return
        if generated_key is not None and live is None:
            await self._create_generated_secret(child, generated_key)
        elif diff.needs_apply(child, live):
            if (handover := diff.strategy_handover(child, live)) is not None:
                await self._apply_unless_refused(ctx, handover, live)
            await self._apply_unless_refused(ctx, child, live)
        else:
            return
        self._unseen.setdefault(ctx.key, {})[_ref(child)] = Unseen(child, _version(live), self._monotonic())
        (ctx.outcome.created if live is None else ctx.outcome.updated).append(_ref(child))
        # Events are for what a user acts on (a roll, a state change, an error), not for every child written.
        if child["kind"] == "Deployment" and live is not None and (rolled := _config_hash(child)) != _config_hash(live):
            await self._recorder.emit(ctx.obj, Event(NORMAL, "ConfigRolled", "Update",
                                                     f"pod template changed (config {rolled}): rolling {_ref(child)}"))

    def _cache_behind(self, ctx: Context, child: Obj, live: Obj | None) -> bool:
        """Whether `child` is what this reconciler applied over `live` moments ago, the cache not showing it
        yet: sending it again would change nothing (the watch event on its way wakes the next reconcile)."""
        sent = self._unseen.get(ctx.key, {})
        unseen = sent.get(_ref(child))
        if unseen is None:
            return False
        left = unseen.at + UNSEEN_WRITE_SECONDS - self._monotonic()
        if left > 0 and unseen.over == _version(live) and unseen.child == child:
            ctx.outcome.look_again_in(left)
            return True
        del sent[_ref(child)]  # the cache has caught up (or is believed now)
        if not sent:
            del self._unseen[ctx.key]
        return False

    async def _apply_unless_refused(self, ctx: Context, child: Obj, live: Obj | None) -> None:
        """Apply, or raise ChildRefused when the API server refuses the child as invalid (it will again
        until the spec changes, so the same child is not sent twice)."""
        remembered = self._refused.get(ctx.key)  # (the digest only when needed: it serializes the child)
        if remembered is not None and remembered[0] == _digest(child):
            raise ChildRefused(child, remembered[1])
        try:
            await self._apply(ctx, child, live)
        except ApiError as e:
            if not e.is_invalid():
                raise
            self._refused[ctx.key] = (_digest(child), e.message)
            raise ChildRefused(child, e.message) from e

    async def _apply(self, ctx: Context, child: Obj, live: Obj | None) -> None:
        try:
            await self._apply_taking_fields_back(ctx, child)
        except ApiError as e:
            if not (e.is_invalid() and live is not None):
                raise
            # Apply merges list items by key, so a hand-edited port stays beside ours (a duplicate "http"):
            # only a replace of the whole object removes it. (If ours is what is invalid, this fails too.)
            await self._client.replace(diff.overlay(live, child), FIELD_MANAGER, metadata_only=True)
            ctx.log.info("replaced hand-edited lists", child=_ref(child), error=e.message)
            await self._recorder.emit(ctx.obj, Event(WARNING, "FieldsReclaimed", "Update",
                                                     f"{_ref(child)}: replaced lists edited by hand ({e.message})"))

    async def _apply_taking_fields_back(self, ctx: Context, child: Obj) -> None:
        try:
            await self._client.apply(child, FIELD_MANAGER, metadata_only=True)
        except ApiError as e:
            if not e.is_conflict():
                raise
            # Someone else (kubectl edit, another controller) took fields we own: take them back.
            ctx.log.info("taking fields back", child=_ref(child), conflict=e.message)
            await self._client.apply(child, FIELD_MANAGER, force=True, metadata_only=True)
            await self._recorder.emit(ctx.obj, Event(WARNING, "FieldsReclaimed", "Update",
                                                     f"{_ref(child)}: reverted changes by {_conflict_managers(e)}"))

    async def _create_generated_secret(self, child: Obj, data_key: str) -> None:
        body = dict(child, stringData={data_key: secrets.token_urlsafe(32)})
        try:
            await self._client.create(body, FIELD_MANAGER, metadata_only=True)
        except ApiError as e:
            if not e.is_already_exists():  # the cache was behind: the next event brings it
                raise

    async def _delete_stale(self, ctx: Context, m: ModelAPI, built: Desired) -> None:
        """Delete the children it controls that were not built. Found by key ("namespace/name"): a child
        is unpacked only to be deleted (for its UID), not at every reconcile that writes."""
        wanted = {_ref(c) for c in built.children}
        namespace = m.metadata.namespace
        for resource in CHILD_RESOURCES:
            for key in self._caches.owned_keys(resource, namespace, m.metadata.uid):
                name = key.partition("/")[2]
                ref = f"{resource.kind}/{name}"
                if ref in wanted or (child := self._caches.stores[resource].get(key)) is None:
                    continue
                await self._client.delete(resource, namespace, name, child["metadata"].get("uid"))
                ctx.outcome.deleted.append(ref)

    # --- status -----------------------------------------------------------------------------------------

    def _observe(self, m: ModelAPI, built: Desired | SpecError, warnings: tuple[str, ...]) -> status.Observed:
        ns, name = m.metadata.namespace, m.metadata.name
        deployment = self._caches.stores[kube.DEPLOYMENT].get(key_for(ns, desired.workload_name(name)))
        if deployment is not None and controlling_modelapi_uid(deployment) != [m.metadata.uid]:
            deployment = None
        missing: tuple[desired.SecretRef, ...] = ()
        if isinstance(built, Desired):
            missing = tuple(r for r in built.secret_refs if self._caches.secret_version(ns, r.name) is None)
        return status.Observed(deployment, self._caches.pods_of(ns, name), missing, warnings)

    async def _with_pull_progress(self, ctx: Context, m: ModelAPI, built: Desired | SpecError,
                                  observed: status.Observed) -> status.Observed:
        """Add the progress of the pull the status will report, read from the tail of its log at most once
        a PULL_POLL_SECONDS (never logged: only the parsed progress is kept)."""
        pod = status.pulling_pod(m, built, observed)
        if pod is None:
            self._pull_reads.pop(ctx.key, None)
            return observed
        # Nothing in the API changes while a pull goes on: look at its progress again a little later.
        ctx.outcome.look_again_in(status.PULL_POLL_SECONDS)
        now, last = self._clock(), self._pull_reads.get(ctx.key)
        # (a requeue comes back after PULL_POLL_SECONDS, give or take the timer: it always reads)
        if last is not None and last[1] == pod and (now - last[0]).total_seconds() < 0.9 * status.PULL_POLL_SECONDS:
            progress = last[2]
        else:
            progress = await self._read_pull_progress(ctx, m.metadata.namespace, pod)
            self._pull_reads[ctx.key] = (now, pod, progress)
        return replace(observed, pulls={pod: progress}) if progress is not None else observed

    async def _read_pull_progress(self, ctx: Context, namespace: str, pod: str) -> status.PullProgress | None:
        try:
            tail = await self._client.log_tail(namespace, pod, desired.INIT_CONTAINER, PULL_LOG_LINES,
                                               PULL_LOG_BYTES, PULL_LOG_TIMEOUT)
        except ApiError as e:  # no progress this time; the pull itself is unaffected
            ctx.log.debug("pull progress unread", pod=pod, code=e.status, reason=e.reason)
            return None
        return status.parse_progress(tail)

    def _stored_status(self, ctx: Context) -> dict[str, Any]:
        """The ModelAPI's status as stored: the one this reconciler wrote last while the cache has not shown it
        yet (a reconcile woken by a child's event can come first, and wrote it again), else the cached one."""
        unseen = self._status_unseen.get(ctx.key)
        if unseen is not None:
            if unseen[0] == _version(ctx.obj):
                return unseen[1]
            del self._status_unseen[ctx.key]  # the cache has caught up
        return ctx.obj.get("status") or {}

    async def _write_status(self, ctx: Context, new: dict[str, Any], old: dict[str, Any]) -> None:
        if new == old:
            return
        now = self._monotonic()
        if status.mirror_only(old, new):
            wait = self._status_written_at.get(ctx.key, -MIRROR_INTERVAL_SECONDS) + MIRROR_INTERVAL_SECONDS - now
            if wait > 0:
                ctx.outcome.look_again_in(wait)
                return
        meta = ctx.obj["metadata"]
        await self._client.apply_status(
            {"apiVersion": ctx.obj["apiVersion"], "kind": ctx.obj["kind"],
             "metadata": {"name": meta["name"], "namespace": meta["namespace"]}, "status": new},
            FIELD_MANAGER, force=True, metadata_only=True)  # the status is ours alone
        # At info only a new state (Ready's status, reason or message): not a copy of the Deployment's counters.
        changed = status.ready_changed(old, new)
        if changed and not status.just_created(old, new):
            # After the status, not beside it: sent together, a burst of reconciles held twice the requests in
            # flight, and opened that many more connections to the API server (each ~130 KiB resident until it
            # idles out), for a wait of a millisecond or two. (A failed status write is retried, Event and all.)
            await self._recorder.emit(ctx.obj, Event(NORMAL if new["phase"] != "Failed" else WARNING,
                                                     new["conditions"][0]["reason"], "Reconcile", new["message"],
                                                     about="Ready"))
        ctx.outcome.status_written = True
        self._status_written_at[ctx.key] = now
        self._status_unseen[ctx.key] = (_version(ctx.obj), new)
        self._status_unseen.move_to_end(ctx.key)
        if len(self._status_unseen) > STATUSES_KEPT:
            self._status_unseen.popitem(last=False)
        (ctx.log.info if changed else ctx.log.debug)("status", phase=new["phase"], message=new["message"])


def _log_writes(ctx: Context) -> None:
    """One line a reconcile for the children it wrote, not one a child (that was most of a cold converge's
    log); each is logged once."""
    for verb, refs in (("created", ctx.outcome.created), ("updated", ctx.outcome.updated),
                       ("deleted", ctx.outcome.deleted)):
        if refs:
            ctx.log.info(verb, children=list(refs))
            refs.clear()


def _build(m: ModelAPI, settings: Settings, config_secret_version: str | None) -> Desired | SpecError:
    try:
        return desired.build(m, settings, config_secret_version)
    except SpecError as e:
        return e
