"""The reconciler's decisions, fed objects recorded from a real API server (tests/recorded/, see record.py),
with a client that records the calls it gets instead of sending them. What the API server then does with
those calls is tested in e2e/."""

from __future__ import annotations

import asyncio
import copy
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from kaos_modelapi import controller, desired, diff, kube, runtime, status
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.controller import SECRET_REF_INDEX, UNSEEN_WRITE_SECONDS, Reconciler, secret_ref_keys
from kaos_modelapi.events import WARNING, Event, Recorder
from kaos_modelapi.informer import Change, Store, same_but_annotations, stamp
from kaos_modelapi.kube import ApiError, Obj, Resource, object_key
from kaos_modelapi.runtime import Stores, TerminalError
from kaos_modelapi.settings import GatewayRef, Settings

RECORDED = Path(__file__).parent / "recorded"
LOG = structlog.get_logger("test")
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)  # after the recording


# --- test doubles: a client that records, caches filled from recorded objects ----------------------------


class RecordingClient:
    """Stands in for KubeClient: records each write; `fail` makes the next call of a verb raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []  # (verb, "Kind/name", force)
        self.whole_answers: list[str] = []  # writes that asked for the whole object back, not its metadata
        self.events: list[Obj] = []
        self.fail: dict[str, list[ApiError]] = {}
        self.logs: dict[tuple[str, str], str] = {}  # (pod, container) -> what its log's tail reads
        self.log_reads: list[tuple[str, str, int, int]] = []
        self.statuses: list[Obj] = []
        self.deleted_uids: list[str | None] = []  # each delete's UID precondition
        self._by_type = {(r.api_version, r.kind): r for r in kube.DEFAULT_RESOURCES}

    def resource_for(self, obj: Obj) -> Resource:
        return self._by_type[(obj["apiVersion"], obj["kind"])]

    def _record(self, verb: str, obj: Obj, force: bool = False, metadata_only: bool = False) -> Obj:
        ref = f"{obj['kind']}/{obj['metadata']['name']}"
        self.calls.append((verb, ref, force))
        if not metadata_only:
            self.whole_answers.append(f"{verb} {ref}")
        pending = self.fail.get(verb) or []
        if pending:
            raise pending.pop(0)
        # What the API server answers when asked for metadata only (PartialObjectMetadata, kind stamped).
        return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": obj["metadata"]} \
            if metadata_only else obj

    async def apply(self, obj: Obj, field_manager: str, force: bool = False, *, metadata_only: bool = False) -> Obj:
        return self._record("apply", obj, force, metadata_only)

    async def apply_status(self, obj: Obj, field_manager: str, force: bool = False, *,
                           metadata_only: bool = False) -> Obj:
        self.statuses.append(obj["status"])
        return self._record("apply_status", obj, force, metadata_only)

    async def create(self, obj: Obj, field_manager: str | None = None, *, metadata_only: bool = False) -> Obj:
        if obj["kind"] == "Event":
            self.events.append(obj)
            if not metadata_only:
                self.whole_answers.append(f"create Event/{obj['metadata']['name']}")
            return obj
        return self._record("create", obj, metadata_only=metadata_only)

    async def replace(self, obj: Obj, field_manager: str, *, metadata_only: bool = False) -> Obj:
        return self._record("replace", obj, metadata_only=metadata_only)

    async def delete(self, resource: Resource, namespace: str | None, name: str, uid: str | None = None) -> None:
        self.deleted_uids.append(uid)
        self._record("delete", {"kind": resource.kind, "metadata": {"name": name}})

    async def log_tail(self, namespace: str, pod: str, container: str, lines: int, limit_bytes: int,
                       seconds: float) -> str:
        self.log_reads.append((pod, container, lines, limit_bytes))
        pending = self.fail.get("log_tail") or []
        if pending:
            raise pending.pop(0)
        return self.logs.get((pod, container), "")

    def writes(self) -> list[tuple[str, str, bool]]:
        return list(self.calls)

    def event_reasons(self) -> list[str]:
        return [e["reason"] for e in self.events]


def recorded(name: str) -> list[Obj]:
    return [o for o in yaml.safe_load_all((RECORDED / name).read_text()) if o]


def stores_of(objects: list[Obj]) -> Stores:
    stores = Stores()
    by_resource: dict[Resource, list[Obj]] = {}
    client = RecordingClient()
    for obj in objects:
        by_resource.setdefault(client.resource_for(obj), []).append(obj)
    for spec in controller.watches(Settings()).sources:
        if spec.cache.resource in stores:
            continue
        store = Store(spec.cache.indexers)
        for obj in by_resource.get(spec.cache.resource, []):
            store.apply(Change("add", None, spec.cache.transform(copy.deepcopy(obj))))
        stores.add(spec.cache.resource, store)
    return stores


def reconciler(objects: list[Obj]) -> tuple[Reconciler, RecordingClient]:
    return reconciler_over(stores_of(objects))


def reconciler_over(stores: Stores, clock: list[float] | None = None) -> tuple[Reconciler, RecordingClient]:
    """A reconciler reading `stores` (which a test may change between reconciles); `clock[0]` its monotonic time."""
    client = RecordingClient()
    recorder = Recorder(client, "test", LOG, clock=lambda: NOW)  # type: ignore[arg-type]
    monotonic = (lambda: clock[0]) if clock is not None else time.monotonic
    r = Reconciler(client, stores, Settings(), recorder, LOG, clock=lambda: NOW,  # type: ignore[arg-type]
                   monotonic=monotonic)
    return r, client


def of_kind(objects: list[Obj], kind: str) -> Obj:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def without(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] != kind]


@pytest.fixture
def converged() -> list[Obj]:
    """A mock Proxy ModelAPI the operator made Ready, with its children and pod, as the API server held them."""
    return recorded("proxy-mock.yaml")


def key(objects: list[Obj]) -> str:
    return object_key(of_kind(objects, "ModelAPI"))


def conflict() -> ApiError:
    return ApiError(409, "Conflict", 'Apply failed with 1 conflict: conflict with "kubectl-edit": .spec.replicas')


def invalid(message: str = "spec.ports[1].name: Duplicate value: \"http\"") -> ApiError:
    return ApiError(422, "Invalid", f'Service "modelapi-mock-api" is invalid: {message}')


# --- decisions -------------------------------------------------------------------------------------------


async def test_a_converged_modelapi_gets_no_write_and_no_event(converged: list[Obj]) -> None:
    r, client = reconciler(converged)
    await r.reconcile(key(converged))
    assert client.writes() == []
    assert client.events == []


async def test_an_existing_generated_secret_is_not_recreated(converged: list[Obj]) -> None:
    r, client = reconciler(without(converged, "Deployment"))
    await r.reconcile(key(converged))
    assert [c[:2] for c in client.writes()] == [("apply", "Deployment/modelapi-mock-api"),
                                                ("apply_status", "ModelAPI/mock-api")]
    assert ("create", "Secret/litellm-master-key-mock-api", False) not in client.writes()


async def test_a_missing_generated_secret_is_created_once_with_a_key(converged: list[Obj]) -> None:
    r, client = reconciler(without(converged, "Secret"))
    await r.reconcile(key(converged))
    assert ("create", "Secret/litellm-master-key-mock-api", False) in client.writes()
    assert client.events == []  # Events are for what a user acts on, not for each child written


def just_applied(objects: list[Obj]) -> list[Obj]:
    """The ModelAPI as the user just applied it: no status, no children yet."""
    modelapi = copy.deepcopy(of_kind(objects, "ModelAPI"))
    modelapi.pop("status", None)
    return [modelapi]


async def test_a_new_modelapi_gets_its_children_and_its_first_status_once_its_deployment_is_seen(
        converged: list[Obj]) -> None:
    objects = just_applied(converged)
    r, client = reconciler(objects)
    await r.reconcile(key(objects))
    assert "Deployment/modelapi-mock-api" in [name for verb, name, _ in client.writes() if verb == "apply"]
    # "Creating" alone is not written: the Deployment just applied wakes the next reconcile at once.
    assert client.statuses == []
    assert client.events == []  # being created is what the user just did: no news
    deployment = copy.deepcopy(of_kind(converged, "Deployment"))
    deployment["status"] = {}  # seen, no pod ready yet
    r, client = reconciler([*objects, deployment])
    await r.reconcile(key(objects))
    (written,) = client.statuses
    assert (written["phase"], status.ready_of(written)["reason"]) == ("Pending", "PodsNotReady")
    assert client.events == []
    client.calls.clear()
    await r.reconcile(key(objects))  # woken again (a child's event) before the cache shows that status
    assert client.writes() == []


class OverlapClient(RecordingClient):
    """Records when each write starts and ends, each taking one turn of the event loop: writes sent together
    would all start before any ends."""

    def __init__(self) -> None:
        super().__init__()
        self.timeline: list[tuple[str, str]] = []  # ("start" or "end", "Kind/name")

    async def _timed(self, obj: Obj) -> None:
        ref = f"{obj['kind']}/{obj['metadata']['name']}"
        self.timeline.append(("start", ref))
        await asyncio.sleep(0)
        self.timeline.append(("end", ref))

    async def apply(self, obj: Obj, field_manager: str, force: bool = False, *, metadata_only: bool = False) -> Obj:
        await self._timed(obj)
        return await super().apply(obj, field_manager, force, metadata_only=metadata_only)

    async def apply_status(self, obj: Obj, field_manager: str, force: bool = False, *,
                           metadata_only: bool = False) -> Obj:
        await self._timed(obj)
        return await super().apply_status(obj, field_manager, force, metadata_only=metadata_only)

    async def create(self, obj: Obj, field_manager: str | None = None, *, metadata_only: bool = False) -> Obj:
        await self._timed(obj)
        return await super().create(obj, field_manager, metadata_only=metadata_only)


async def test_a_new_states_event_is_sent_once_its_status_is_written(converged: list[Obj]) -> None:
    objects = [o for o in converged if o["kind"] != "HTTPRoute"]
    modelapi = of_kind(objects, "ModelAPI")
    modelapi["status"] = {**modelapi["status"], "phase": "Pending"}
    modelapi["status"]["conditions"] = [{**modelapi["status"]["conditions"][0], "status": "False",
                                         "reason": "PodsNotReady"}, *modelapi["status"]["conditions"][1:]]
    client = OverlapClient()
    recorder = Recorder(client, "test", LOG, clock=lambda: NOW)  # type: ignore[arg-type]
    r = Reconciler(client, stores_of(objects), Settings(), recorder, LOG, clock=lambda: NOW)  # type: ignore[arg-type]
    await r.reconcile(key(objects))
    assert client.event_reasons() == ["Available"]
    (event,) = client.events
    # One request in flight a reconcile: a burst of them needs no more connections than there are workers.
    assert client.timeline == [("start", f"ModelAPI/{modelapi['metadata']['name']}"),
                               ("end", f"ModelAPI/{modelapi['metadata']['name']}"),
                               ("start", f"Event/{event['metadata']['name']}"),
                               ("end", f"Event/{event['metadata']['name']}")]


async def test_a_child_just_applied_is_not_sent_again_before_the_cache_shows_it(converged: list[Obj]) -> None:
    objects = just_applied(converged)
    stores = stores_of(objects)
    clock = [100.0]
    r, client = reconciler_over(stores, clock)
    await r.reconcile(key(objects))
    sent = client.writes()
    assert ("apply", "Service/modelapi-mock-api", False) in sent
    # Woken again (say by the Deployment's event) before the watch brought the Service: nothing sent twice,
    # and a look again once the cache should have shown it.
    clock[0] += 0.2
    assert (await r.reconcile(key(objects))).requeue_after == pytest.approx(UNSEEN_WRITE_SECONDS - 0.2)
    assert client.writes() == sent
    # Still absent after that (deleted before the watch showed it): sent again.
    clock[0] += UNSEEN_WRITE_SECONDS
    await r.reconcile(key(objects))
    assert client.writes()[len(sent):] == sent


async def test_a_child_the_cache_showed_and_lost_is_sent_again_at_once(converged: list[Obj]) -> None:
    objects = just_applied(converged)
    stores = stores_of(objects)
    r, client = reconciler_over(stores)
    await r.reconcile(key(objects))
    caught_up = stores_of([*objects, *without(converged, "ModelAPI")])
    stores.add(kube.SERVICE, caught_up[kube.SERVICE])
    await r.reconcile(key(objects))  # the cache shows the Service
    client.calls.clear()
    stores.add(kube.SERVICE, stores_of(objects)[kube.SERVICE])  # then its deletion
    await r.reconcile(key(objects))
    assert ("apply", "Service/modelapi-mock-api", False) in client.writes()


# --- a reconcile that found nothing to write, and what comes after it -----------------------------------


def update_cached(stores: Stores, resource: Resource, name: str, edit: Any) -> None:
    """`edit` a cached object as a watch event would: a new version of it."""
    (old,) = [o for o in stores[resource].list() if o["metadata"]["name"] == name]
    new = copy.deepcopy(old)
    edit(new)
    new["metadata"]["resourceVersion"] = str(int(new["metadata"]["resourceVersion"]) + 1)
    stores[resource].apply(Change("update", old, new))


def counting_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    built: list[str] = []
    original = desired.build

    def build(m: ModelAPI, *args: Any) -> desired.Desired:
        built.append(m.metadata.name)
        return original(m, *args)

    monkeypatch.setattr(desired, "build", build)
    return built


def counters_moved(deployment: Obj) -> None:
    deployment["status"]["updatedReplicas"] = 0  # (a roll's first step)
    deployment["status"]["observedGeneration"] += 1


async def test_a_deployment_status_after_a_reconcile_that_wrote_nothing_updates_the_status_without_a_build(
        converged: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    stores = stores_of(converged)
    r, client = reconciler_over(stores)
    built = counting_builds(monkeypatch)
    await r.reconcile(key(converged))
    assert (client.writes(), built) == ([], ["mock-api"])
    update_cached(stores, kube.DEPLOYMENT, "modelapi-mock-api", counters_moved)
    await r.reconcile(key(converged))
    assert built == ["mock-api"]  # the children are as they were: nothing to build or compare again
    assert client.writes() == [("apply_status", "ModelAPI/mock-api", True)]
    assert client.statuses[-1]["deployment"]["updatedReplicas"] == 0


async def test_pods_counted_during_a_roll_are_written_as_the_counters_are_and_tell_no_event(
        converged: list[Obj]) -> None:
    stores = stores_of(converged)
    clock = [100.0]
    r, client = reconciler_over(stores, clock)
    await r.reconcile(key(converged))
    update_cached(stores, kube.DEPLOYMENT, "modelapi-mock-api", counters_moved)  # a roll begins: news
    await r.reconcile(key(converged))
    assert (len(client.statuses), client.event_reasons()) == (1, ["RollingOut"])
    assert client.statuses[-1]["message"] == "rolling out: 0 of 1 pods updated"

    def one_more_updated(deployment: Obj) -> None:
        deployment["status"].update(updatedReplicas=1, replicas=2)  # (the new pod up, the old one going)

    clock[0] += 0.3
    update_cached(stores, kube.DEPLOYMENT, "modelapi-mock-api", one_more_updated)
    assert (await r.reconcile(key(converged))).requeue_after == pytest.approx(0.7)  # put off, as counters are
    clock[0] += 1.0
    await r.reconcile(key(converged))
    assert client.statuses[-1]["message"] == "rolling out: 1 of 1 pods updated"
    assert (len(client.statuses), client.event_reasons()) == (2, ["RollingOut"])


def new_revision(deployment: Obj) -> None:
    annotations = deployment["metadata"].setdefault("annotations", {})
    annotations["deployment.kubernetes.io/revision"] = str(int(annotations.get("deployment.kubernetes.io/revision",
                                                                               "1")) + 1)


def annotate(obj: Obj) -> None:
    obj["metadata"]["annotations"] = {**(obj["metadata"].get("annotations") or {}), "note": "by hand"}


@pytest.mark.parametrize(("resource", "name", "edit", "builds"), [
    (kube.DEPLOYMENT, "modelapi-mock-api", new_revision, ["mock-api"]),
    (kube.SERVICE, "modelapi-mock-api", annotate, ["mock-api"]),
    (kube.MODELAPI, "mock-api", annotate, ["mock-api", "mock-api"]),
], ids=["the Deployment controller's revision", "a child annotated by hand", "the ModelAPI annotated"])
async def test_after_a_reconcile_that_wrote_nothing_a_childs_annotations_alone_need_no_build(
        converged: list[Obj], monkeypatch: pytest.MonkeyPatch, resource: Resource, name: str, edit: Any,
        builds: list[str]) -> None:
    """No built child sets annotations, so the diff never reads a child's; a ModelAPI's are its user's."""
    stores = stores_of(converged)
    r, client = reconciler_over(stores)
    built = counting_builds(monkeypatch)
    await r.reconcile(key(converged))
    update_cached(stores, resource, name, edit)
    await r.reconcile(key(converged))
    assert (built, client.writes()) == (builds, [])


async def test_once_a_built_child_sets_annotations_a_change_of_any_childs_is_built_and_compared_again(
        converged: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    original = desired.build

    def build(m: ModelAPI, *args: Any) -> desired.Desired:
        built = original(m, *args)
        service = of_kind(list(built.children), "Service")
        service["metadata"]["annotations"] = {"note": "ours"}
        return built

    monkeypatch.setattr(desired, "build", build)
    stores = stores_of(converged)
    r, client = reconciler_over(stores)
    await r.reconcile(key(converged))
    assert ("apply", "Service/modelapi-mock-api", False) in client.writes()  # ("ours" was missing)
    update_cached(stores, kube.SERVICE, "modelapi-mock-api", lambda svc: svc["metadata"].update(
        annotations={"note": "ours"}))
    client.calls.clear()
    await r.reconcile(key(converged))  # now as built: nothing to write, and remembered
    assert client.writes() == []
    update_cached(stores, kube.SERVICE, "modelapi-mock-api", lambda svc: svc["metadata"].update(
        annotations={"note": "by hand"}))
    await r.reconcile(key(converged))
    assert ("apply", "Service/modelapi-mock-api", False) in client.writes()


async def test_after_a_reconcile_that_wrote_the_next_compares_what_it_built_without_building_again(
        converged: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconcile woken by its own writes coming back: a build depends on the ModelAPI (and its config
    Secret's version) alone, and neither moved."""
    objects = just_applied(converged)
    stores = stores_of(objects)
    r, client = reconciler_over(stores)
    built = counting_builds(monkeypatch)
    await r.reconcile(key(objects))
    assert ("apply", "Service/modelapi-mock-api", False) in client.writes()
    caught_up = stores_of([*objects, *without(converged, "ModelAPI")])
    for resource in (kube.CONFIGMAP, kube.SECRET, kube.DEPLOYMENT, kube.SERVICE, kube.POD):
        stores.add(resource, caught_up[resource])
    client.calls.clear()
    await r.reconcile(key(objects))
    assert [w for w in client.writes() if w[0] != "apply_status"] == []  # every child compared, as built
    assert built == ["mock-api"]
    update_cached(stores, kube.SERVICE, "modelapi-mock-api", edit_service_port)
    await r.reconcile(key(objects))  # (after one that wrote nothing: built and compared again, as before)
    assert (built, ("apply", "Service/modelapi-mock-api", False) in client.writes()) == (["mock-api"] * 2, True)


async def test_after_a_reconcile_that_wrote_a_new_spec_is_built_again(converged: list[Obj],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    objects = just_applied(converged)
    stores = stores_of(objects)
    r, client = reconciler_over(stores)
    built = counting_builds(monkeypatch)
    await r.reconcile(key(objects))
    update_cached(stores, kube.MODELAPI, "mock-api", new_model)
    client.calls.clear()
    await r.reconcile(key(objects))
    assert built == ["mock-api", "mock-api"]
    # (What the first built would not send again: the cache has yet to show it.)
    assert ("apply", "ConfigMap/litellm-config-mock-api", False) in client.writes()


def edit_service_port(service: Obj) -> None:
    service["spec"]["ports"][0]["port"] = 9000


def relabel(obj: Obj) -> None:
    obj["metadata"]["labels"] = {**obj["metadata"]["labels"], "app": "other"}


def new_model(modelapi: Obj) -> None:
    modelapi["spec"]["proxyConfig"]["model"] = "other-model"
    modelapi["metadata"]["generation"] += 1


@pytest.mark.parametrize(("resource", "name", "edit", "write"), [
    (kube.SERVICE, "modelapi-mock-api", edit_service_port, ("apply", "Service/modelapi-mock-api", False)),
    (kube.CONFIGMAP, "litellm-config-mock-api", relabel, ("apply", "ConfigMap/litellm-config-mock-api", False)),
    (kube.DEPLOYMENT, "modelapi-mock-api", relabel, ("apply", "Deployment/modelapi-mock-api", False)),
    (kube.MODELAPI, "mock-api", new_model, ("apply", "ConfigMap/litellm-config-mock-api", False)),
], ids=["a child's spec", "a child's labels", "the Deployment's labels", "the ModelAPI's spec"])
async def test_after_a_reconcile_that_wrote_nothing_any_other_change_is_built_and_compared_again(
        converged: list[Obj], resource: Resource, name: str, edit: Any, write: tuple[str, str, bool]) -> None:
    stores = stores_of(converged)
    r, client = reconciler_over(stores)
    await r.reconcile(key(converged))
    update_cached(stores, resource, name, edit)
    await r.reconcile(key(converged))
    assert write in client.writes()


async def test_after_a_reconcile_that_wrote_nothing_a_lost_child_is_made_again_and_a_stray_one_deleted(
        converged: list[Obj]) -> None:
    stores = stores_of(converged)
    r, client = reconciler_over(stores)
    await r.reconcile(key(converged))
    service = stores[kube.SERVICE].get(object_key(of_kind(converged, "Service")))
    stores[kube.SERVICE].apply(Change("delete", service, None))
    stray = copy.deepcopy(of_kind(converged, "ConfigMap"))
    stray["metadata"].update(name="litellm-config-old", uid="00000000-0000-0000-0000-000000000001")
    stores[kube.CONFIGMAP].apply(Change("add", None, controller.strip_managed(stray)))
    await r.reconcile(key(converged))
    assert {c[:2] for c in client.writes()} >= {("apply", "Service/modelapi-mock-api"),
                                                 ("delete", "ConfigMap/litellm-config-old")}


async def test_an_object_that_names_the_modelapi_as_an_owner_but_not_its_controller_is_left_alone(
        converged: list[Obj]) -> None:
    stores = stores_of(converged)
    r, client = reconciler_over(stores)
    await r.reconcile(key(converged))
    theirs = copy.deepcopy(of_kind(converged, "ConfigMap"))
    theirs["metadata"].update(name="dashboards", uid="00000000-0000-0000-0000-000000000002")
    meta = theirs["metadata"]
    meta["ownerReferences"] = [{**ref, "controller": False} for ref in meta["ownerReferences"]]
    stores[kube.CONFIGMAP].apply(Change("add", None, controller.strip_managed(theirs)))
    await r.reconcile(key(converged))
    assert ("delete", "ConfigMap/dashboards") not in {c[:2] for c in client.writes()}


def test_an_objects_stamp_moves_with_all_but_its_status_and_version(converged: list[Obj]) -> None:
    old = controller.strip_managed(copy.deepcopy(of_kind(converged, "Deployment")))
    moved = copy.deepcopy(old)
    counters_moved(moved)
    moved["metadata"]["resourceVersion"] += "0"
    assert stamp(old) == stamp(moved)
    annotated = copy.deepcopy(old)
    annotated["metadata"]["annotations"] = {**annotated["metadata"].get("annotations", {}), "a": "b"}
    assert stamp(old) != stamp(annotated) and same_but_annotations(stamp(old), stamp(annotated))
    scaled = copy.deepcopy(old)
    scaled["spec"]["replicas"] = 1.0  # (equal in Python, not in JSON)
    assert not same_but_annotations(stamp(old), stamp(scaled))


def info_lines(logs: list[dict[str, Any]]) -> list[str]:
    return [line["event"] for line in logs if line["log_level"] == "info"]


async def test_a_new_modelapi_logs_one_line_for_its_children(converged: list[Obj]) -> None:
    objects = just_applied(converged)
    r, client = reconciler(objects)
    with structlog.testing.capture_logs() as logs:
        await r.reconcile(key(objects))
    assert info_lines(logs) == ["created"]  # (its first status comes with its Deployment's watch event)
    (created,) = [line for line in logs if line["event"] == "created"]
    assert created["children"] == [name for verb, name, _ in client.writes() if verb in ("apply", "create")]
    assert len(created["children"]) >= 3  # (the recorded mock: ConfigMap, Secret, Deployment, Service)


async def test_a_status_that_only_mirrors_new_deployment_counters_is_written_but_logged_at_debug(
        converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)
    of_kind(objects, "ModelAPI")["status"]["deployment"]["conditions"][0]["lastUpdateTime"] = "2026-01-01T00:00:00Z"
    r, client = reconciler(objects)
    with structlog.testing.capture_logs() as logs:
        await r.reconcile(key(objects))
    assert client.writes() == [("apply_status", "ModelAPI/mock-api", True)]
    assert info_lines(logs) == []
    assert [line["event"] for line in logs] == ["status"]


async def test_deployment_counters_alone_are_written_at_most_once_a_second_and_a_new_state_at_once(
        converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)
    stored = of_kind(objects, "ModelAPI")["status"]
    stored["deployment"]["conditions"][0]["lastUpdateTime"] = "2026-01-01T00:00:00Z"  # the cache: counters moved
    stores = stores_of(objects)
    clock = [100.0]
    r, client = reconciler_over(stores, clock)

    def cache_holds(reason: str) -> None:  # the ModelAPI as the cache holds it, with this Ready reason
        ready = status.ready_of(stored)
        assert isinstance(ready, dict)
        ready["reason"] = reason
        metadata = of_kind(objects, "ModelAPI")["metadata"]
        metadata["resourceVersion"] = str(int(metadata["resourceVersion"]) + 1)  # (a newer version)
        stores.add(kube.MODELAPI, stores_of(objects)[kube.MODELAPI])

    assert (await r.reconcile(key(objects))).requeue_after is None
    assert len(client.statuses) == 1  # the first in a while: at once
    clock[0] += 0.3
    cache_holds(status.ready_of(stored)["reason"])  # the counters moved again
    assert (await r.reconcile(key(objects))).requeue_after == pytest.approx(0.7)  # put off
    assert len(client.statuses) == 1
    written = status.ready_of(client.statuses[-1])["reason"]
    cache_holds("PodsNotReady")  # the status to write now says something new
    assert (await r.reconcile(key(objects))).requeue_after is None
    assert len(client.statuses) == 2
    cache_holds(written)
    clock[0] += 1.0
    await r.reconcile(key(objects))
    assert len(client.statuses) == 3  # the latest counters, a second after the last write


def test_only_a_first_status_on_the_way_to_ready_is_no_news() -> None:
    def st(ready: str, reason: str) -> dict[str, Any]:
        return {"conditions": [{"type": "Ready", "status": ready, "reason": reason}]}

    for reason in ("Creating", "PodsNotReady"):
        assert status.just_created({}, st("False", reason)), reason
        assert not status.just_created(st("True", "PodsReady"), st("False", reason)), reason
    for ready, reason in (("False", "SecretNotFound"), ("False", "Unschedulable"), ("False", "InvalidConfig"),
                          ("False", "PullingModel"), ("False", "LoadingModel"), ("True", "PodsReady")):
        assert not status.just_created({}, st(ready, reason)), reason


async def test_a_new_modelapi_that_waits_for_a_missing_secret_says_so_in_an_event(converged: list[Obj]) -> None:
    objects = just_applied(converged)
    modelapi = objects[0]
    modelapi["spec"]["proxyConfig"]["env"] = [
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    r, client = reconciler(objects)
    await r.reconcile(key(objects))
    assert client.event_reasons() == ["SecretNotFound"]  # the user has something to do


async def test_a_conflict_is_taken_back_with_an_event(converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)
    of_kind(objects, "Service")["spec"]["ports"][0]["targetPort"] = 9999  # someone edited our field
    r, client = reconciler(objects)
    client.fail["apply"] = [conflict()]
    await r.reconcile(key(objects))
    assert client.writes()[:2] == [("apply", "Service/modelapi-mock-api", False),
                                   ("apply", "Service/modelapi-mock-api", True)]
    assert client.event_reasons() == ["FieldsReclaimed"]


async def test_an_invalid_hand_edited_list_is_replaced(converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)
    ports = of_kind(objects, "Service")["spec"]["ports"]
    ports.append({**ports[0], "port": 9000})  # a second "http" port, as `kubectl edit` can leave it
    r, client = reconciler(objects)
    client.fail["apply"] = [invalid()]
    await r.reconcile(key(objects))
    assert [c[:2] for c in client.writes()] == [("apply", "Service/modelapi-mock-api"),
                                                ("replace", "Service/modelapi-mock-api")]
    assert client.event_reasons() == ["FieldsReclaimed"]


async def test_no_write_asks_for_the_whole_object_back(converged: list[Obj]) -> None:
    """The reconciler reads nothing a write answers, so each asks for the metadata alone: a Deployment's spec
    and status are neither encoded by the API server nor decoded here. (The fake answers as the server does.)"""
    edited = copy.deepcopy(converged)
    of_kind(edited, "Service")["spec"]["ports"][0]["targetPort"] = 9999
    setups = [(without(converged, "Secret"), None),  # the generated Secret is created
              (without(converged, "Deployment"), None),  # a child applied, a new status and its Event
              (edited, conflict()), (edited, invalid())]  # applied with force, replaced; Events
    for objects, refusal in setups:
        r, client = reconciler(objects)
        client.fail["apply"] = [refusal] if refusal else []
        await r.reconcile(key(objects))
        assert client.writes() and client.whole_answers == []
    assert {verb for verb, _, _ in client.calls} >= {"apply", "replace"}


async def test_an_unwanted_child_is_deleted(converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)
    stale = copy.deepcopy(of_kind(objects, "ConfigMap"))
    stale["metadata"].update(name="litellm-config-old", uid="00000000-0000-0000-0000-000000000001")
    r, client = reconciler([*objects, stale])
    await r.reconcile(key(objects))
    assert client.writes() == [("delete", "ConfigMap/litellm-config-old", False)]
    assert client.deleted_uids == ["00000000-0000-0000-0000-000000000001"]  # (a same-named replacement stays)
    assert client.events == []


async def test_a_changed_status_is_written_once_and_an_unchanged_one_never(converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)
    of_kind(objects, "ModelAPI")["status"]["message"] = "stale"
    r, client = reconciler(objects)
    await r.reconcile(key(objects))
    assert client.writes() == [("apply_status", "ModelAPI/mock-api", True)]


async def test_a_status_of_another_shape_is_rewritten_and_does_not_make_the_spec_unreadable(
        converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)  # e.g. written by another version of the operator
    of_kind(objects, "ModelAPI")["status"].update(phase="Degraded", conditions="Ready")
    r, client = reconciler(objects)
    await r.reconcile(key(objects))
    assert client.writes() == [("apply_status", "ModelAPI/mock-api", True)]
    (written,) = client.statuses
    assert written["phase"] == "Ready" and written["conditions"][0]["type"] == "Ready"


async def test_a_child_the_api_server_refuses_fails_the_status_once_and_is_not_retried(
        converged: list[Obj]) -> None:
    objects = copy.deepcopy(converged)
    of_kind(objects, "ModelAPI")["spec"]["podSpec"] = {"containers": [{"name": "model-api", "image": ""}]}
    of_kind(objects, "ModelAPI")["metadata"]["generation"] += 1
    refusal = ApiError(422, "Invalid", 'Deployment.apps "modelapi-mock-api" is invalid: '
                                       "spec.template.spec.containers[0].image: Required value")
    r, client = reconciler(objects)
    client.fail["apply"] = [refusal]
    client.fail["replace"] = [refusal]
    result = await r.reconcile(key(objects))
    assert result.requeue_after is None
    verbs = [c[:2] for c in client.writes()]
    assert verbs == [("apply", "Deployment/modelapi-mock-api"), ("replace", "Deployment/modelapi-mock-api"),
                     ("apply_status", "ModelAPI/mock-api")]
    assert client.event_reasons() == ["InvalidPodSpec"]
    assert client.events[0]["type"] == "Warning"
    assert "containers[0].image: Required value" in client.events[0]["note"]

    client.calls.clear()
    await r.reconcile(key(objects))  # e.g. woken by a pod event: the same child is not sent again
    assert client.writes() == []  # nor the status, which the cache does not show yet


async def test_a_namespace_being_terminated_is_a_terminal_error_and_its_modelapis_are_left_alone(
        converged: list[Obj]) -> None:
    sibling = copy.deepcopy(of_kind(converged, "ModelAPI"))
    sibling["metadata"]["name"] = "sibling"
    r, client = reconciler([*without(converged, "Deployment"), sibling])
    client.fail["apply"] = [ApiError(403, "Forbidden", 'deployments.apps "modelapi-mock-api" is forbidden: '
                                     "unable to create new content in namespace default because it is being "
                                     "terminated", causes=("NamespaceTerminating",))]
    with pytest.raises(TerminalError):
        await r.reconcile(key(converged))
    client.calls.clear()
    await r.reconcile("default/sibling")  # it goes with the namespace: no write the server would refuse
    assert client.writes() == []


class TerminatingNamespace:
    """An Event writer for a namespace being deleted: every create is refused, as the API server does."""

    def __init__(self) -> None:
        self.attempts = 0
        self.created: list[Obj] = []

    async def create(self, obj: Obj, field_manager: str | None = None, *, metadata_only: bool = False) -> Obj:
        if obj["metadata"]["namespace"] == "default" and obj["regarding"]["uid"] != "new":
            self.attempts += 1
            raise ApiError(403, "Forbidden", "events is forbidden: unable to create new content in namespace "
                           "default because it is being terminated", causes=("NamespaceTerminating",))
        self.created.append(obj)
        return obj


async def test_events_about_a_terminating_namespace_are_refused_once_not_once_per_modelapi(
        converged: list[Obj]) -> None:
    writer = TerminatingNamespace()
    recorder = Recorder(writer, "test", LOG, clock=lambda: NOW)
    gone = Event(WARNING, "NotReady", "Reconcile", "its Deployment went away")
    for i in range(3):
        m = copy.deepcopy(of_kind(converged, "ModelAPI"))
        m["metadata"].update(name=f"m{i}", uid=f"u{i}")
        await recorder.emit(m, gone)
    assert writer.attempts == 1
    newer = copy.deepcopy(of_kind(converged, "ModelAPI"))  # a namespace of the same name made later is a new one
    newer["metadata"].update(uid="new", creationTimestamp="2999-01-01T00:00:00Z")
    await recorder.emit(newer, gone)
    assert len(writer.created) == 1


async def test_a_namespace_seen_being_deleted_gets_no_write_at_all(converged: list[Obj]) -> None:
    """The namespace controller deletes the children first (here the Deployment is gone): the reconcile that
    wakes would re-create it and write the status, and be refused. The Namespace cache already shows the
    namespace's deletionTimestamp, so nothing is sent: not the child, not the status, not an Event."""
    namespaces = {"default": {"metadata": {"name": "default", "deletionTimestamp": "2999-01-01T00:00:00Z"}}}
    terminating = kube.TerminatingNamespaces(namespaces.get)
    client = RecordingClient()
    recorder = Recorder(client, "test", LOG, clock=lambda: NOW, terminating=terminating)  # type: ignore[arg-type]
    r = Reconciler(client, stores_of(without(converged, "Deployment")), Settings(), recorder, LOG,  # type: ignore[arg-type]
                   clock=lambda: NOW, terminating=terminating)
    await r.reconcile(key(converged))
    await recorder.emit(of_kind(converged, "ModelAPI"), Event(WARNING, "NotReady", "Reconcile", "gone"))
    assert client.writes() == []
    assert client.events == []


def test_a_namespace_made_again_after_its_deletion_is_a_new_one() -> None:
    namespaces = {"a": {"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"}},
                  "b": {"metadata": {"name": "b"}}}
    terminating = kube.TerminatingNamespaces(namespaces.get)
    assert terminating.holds({"metadata": {"namespace": "a", "creationTimestamp": "2025-12-31T00:00:00Z"}})
    assert not terminating.holds({"metadata": {"namespace": "a", "creationTimestamp": "2026-01-02T00:00:00Z"}})
    assert not terminating.holds({"metadata": {"namespace": "b", "creationTimestamp": "2025-12-31T00:00:00Z"}})
    assert not terminating.holds({"metadata": {"namespace": "c", "creationTimestamp": "2025-12-31T00:00:00Z"}})


def test_only_an_operator_watching_every_namespace_caches_namespaces() -> None:
    def cached(cluster_wide: bool) -> bool:
        builder = controller.watches(Settings(), cluster_wide=cluster_wide)
        return any(w.cache.resource == kube.NAMESPACE for w in builder.sources)

    assert cached(True)
    assert not cached(False)  # a Role cannot grant listing namespaces


async def test_a_deleted_modelapi_is_left_to_the_garbage_collector(converged: list[Obj]) -> None:
    r, client = reconciler(converged)
    await r.reconcile("default/gone")
    assert client.writes() == []


# --- what the caches keep --------------------------------------------------------------------------------


def secret_as_listed() -> Obj:
    last_applied = '{"data":{"k":"c2VjcmV0"}}'
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "keys", "namespace": "a", "uid": "u", "resourceVersion": "7",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": last_applied,
                                         "kaos.tools/note": "ours"},
                         "managedFields": [{"manager": "kubectl"}]},
            "data": {"k": "c2VjcmV0"}, "stringData": {"k": "secret"}}


# --- a Hosted ModelAPI pulling its model ---------------------------------------------------------------


def hosted_pulling(converged: list[Obj]) -> list[Obj]:
    """The recorded ModelAPI turned Hosted, its Deployment as the builder makes it (not yet available), and
    a pod whose pull-model init container runs."""
    m = copy.deepcopy(of_kind(converged, "ModelAPI"))
    m["spec"] = {"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m"}}
    m.pop("status", None)
    built = desired.build(ModelAPI.model_validate(m), Settings())
    deployment = copy.deepcopy(of_kind(list(built.children), "Deployment"))
    deployment["metadata"]["uid"] = "00000000-0000-0000-0000-0000000000d1"
    deployment["status"] = {"replicas": 1, "updatedReplicas": 1, "conditions": [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}]}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "modelapi-mock-api-1-x", "namespace": m["metadata"]["namespace"],
                        "labels": desired.labels(m["metadata"]["name"])},
           "status": {"initContainerStatuses": [{"name": "pull-model", "state": {"running": {}}}]}}
    return [m, *[c for c in built.children if c["kind"] != "Deployment"], deployment, pod]


async def test_a_pull_shows_its_progress_and_is_looked_at_again_while_it_runs(converged: list[Obj]) -> None:
    objects = hosted_pulling(converged)
    r, client = reconciler(objects)
    client.logs[("modelapi-mock-api-1-x", "pull-model")] = "pull-model: pulling smollm2:135m\n" \
        "pull-model: progress 42% 57 MB/135 MB\n"
    result = await r.reconcile(key(objects))
    assert result.requeue_after == status.PULL_POLL_SECONDS
    assert client.log_reads == [("modelapi-mock-api-1-x", "pull-model", controller.PULL_LOG_LINES,
                                 controller.PULL_LOG_BYTES)]
    (written,) = client.statuses
    assert (written["phase"], written["message"]) == ("Pending", "pulling model smollm2:135m: 42% (57/135 MB)")
    assert client.event_reasons() == ["PullingModel"]


async def test_the_log_is_read_at_most_once_a_poll_period_however_often_the_pull_wakes(
        converged: list[Obj]) -> None:
    objects = hosted_pulling(converged)
    client = RecordingClient()
    client.logs[("modelapi-mock-api-1-x", "pull-model")] = "pull-model: progress 42% 57 MB/135 MB\n"
    now = [NOW]
    recorder = Recorder(client, "test", LOG, clock=lambda: now[0])  # type: ignore[arg-type]
    r = Reconciler(client, stores_of(objects), Settings(), recorder, LOG,  # type: ignore[arg-type]
                   clock=lambda: now[0])
    for _ in range(3):  # e.g. a status write and pod events between two requeues
        await r.reconcile(key(objects))
    assert len(client.log_reads) == 1
    assert client.statuses[-1]["message"] == "pulling model smollm2:135m: 42% (57/135 MB)"
    now[0] += timedelta(seconds=status.PULL_POLL_SECONDS)  # the requeue
    await r.reconcile(key(objects))
    assert len(client.log_reads) == 2


async def test_a_log_that_cannot_be_read_costs_only_the_progress(converged: list[Obj]) -> None:
    objects = hosted_pulling(converged)
    r, client = reconciler(objects)
    client.fail["log_tail"] = [ApiError(403, "Forbidden", "pods \"x\" is forbidden")]
    result = await r.reconcile(key(objects))
    assert result.requeue_after == status.PULL_POLL_SECONDS
    assert [s["message"] for s in client.statuses] == ["pulling model smollm2:135m"]


async def test_no_log_is_read_unless_a_model_is_pulled(converged: list[Obj]) -> None:
    r, client = reconciler(converged)
    assert (await r.reconcile(key(converged))).requeue_after is None
    objects = hosted_pulling(converged)
    objects[-1]["status"]["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 0}}
    r, client = reconciler(objects)
    assert (await r.reconcile(key(objects))).requeue_after is None
    assert client.log_reads == []


async def test_a_scale_up_shows_the_new_pods_pull_and_looks_at_it_again(converged: list[Obj]) -> None:
    objects = hosted_pulling(converged)
    deployment = of_kind(objects, "Deployment")
    deployment["spec"]["replicas"] = 2  # e.g. `kubectl scale`: one pod serves, the new one pulls the model
    deployment["status"].update(replicas=2, updatedReplicas=2, readyReplicas=1, availableReplicas=1)
    pulling = objects[-1]
    serving = copy.deepcopy(pulling)
    serving["metadata"]["name"] = "modelapi-mock-api-1-y"
    serving["status"] = {"initContainerStatuses": [{"name": "pull-model", "state": {"terminated": {"exitCode": 0}}}],
                         "containerStatuses": [{"name": "model-api", "state": {"running": {}}, "ready": True}]}
    r, client = reconciler([*objects, serving])
    client.logs[("modelapi-mock-api-1-x", "pull-model")] = "pull-model: progress 42% 57 MB/135 MB\n"
    result = await r.reconcile(key(objects))
    assert result.requeue_after == status.PULL_POLL_SECONDS
    assert [read[:2] for read in client.log_reads] == [("modelapi-mock-api-1-x", "pull-model")]
    (written,) = client.statuses
    assert (written["phase"], written["message"]) == (
        "Ready", "1 of 2 pods ready; pulling model smollm2:135m: 42% (57/135 MB)")


async def test_a_store_added_to_a_running_hosted_modelapi_moves_its_deployment_to_recreate(
        converged: list[Obj]) -> None:
    objects = hosted_pulling(converged)
    deployment = of_kind(objects, "Deployment")
    # As the API server defaulted it when the Deployment was made without a strategy.
    deployment["spec"]["strategy"] = {"type": "RollingUpdate",
                                      "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
    of_kind(objects, "ModelAPI")["spec"]["hostedConfig"]["modelStore"] = {"size": "20Gi"}
    r, client = reconciler(objects)
    applied: list[Obj] = []
    original = client.apply

    async def keep(obj: Obj, field_manager: str, force: bool = False, *, metadata_only: bool = False) -> Obj:
        applied.append(copy.deepcopy(obj))
        return await original(obj, field_manager, force, metadata_only=metadata_only)

    client.apply = keep  # type: ignore[method-assign]
    await r.reconcile(key(objects))
    strategies = [o["spec"].get("strategy") for o in applied if o["kind"] == "Deployment"]
    assert strategies == [deployment["spec"]["strategy"], {"type": "Recreate"}]
    assert [o["kind"] for o in applied] == ["PersistentVolumeClaim", "Deployment", "Deployment"]


def test_the_secret_cache_keeps_identity_and_never_data() -> None:
    kept = controller.secret_identity(secret_as_listed())
    assert "c2VjcmV0" not in repr(kept) and "secret\"" not in repr(kept)
    assert kept["metadata"] == {"name": "keys", "namespace": "a", "uid": "u", "resourceVersion": "7",
                                "annotations": {"kaos.tools/note": "ours"}}
    assert controller.SECRETS.metadata_only  # the data is not even sent to the operator


def test_the_pod_cache_keeps_status_and_identity_only() -> None:
    waiting = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "a", "labels": {"modelapi": "m"},
                                                           "managedFields": [{}], "annotations": {"big": "x"}},
           "spec": {"containers": [{"name": "c", "env": [{"name": "K", "value": "v"}]}]},
           "status": {"phase": "Running", "podIP": "10.0.0.1", "startTime": "t", "qosClass": "BestEffort",
                      "conditions": [{"type": "Ready", "status": "False", "reason": "r", "lastTransitionTime": "t"},
                                     {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                      "message": "0/1 nodes", "lastTransitionTime": "t"}],
                      "containerStatuses": [{"name": "c", "image": "i", "imageID": "sha", "containerID": "id",
                                             "ready": False, "restartCount": 3, "started": False, "state": waiting,
                                             "lastState": {"terminated": {"exitCode": 1, "startedAt": "t"}}}]}}
    assert controller.pod_status_only(pod) == {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "a", "labels": {"modelapi": "m"}},
        "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": "0/1 nodes"}],
                   "containerStatuses": [{"name": "c", "image": "i", "ready": False,
                                          "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                          "lastState": {"terminated": {"exitCode": 1}}}]}}


def _container(name: str, state: dict[str, Any], ready: bool = False, last: dict[str, Any] | None = None,
               image: str = "img") -> dict[str, Any]:
    return {"name": name, "image": image, "imageID": "sha", "containerID": "id", "ready": ready, "restartCount": 2,
            "started": ready, "state": state, "lastState": last or {}}


def _cond(type_: str, status_: str, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    c = {"type": type_, "status": status_, "lastProbeTime": None, "lastTransitionTime": "2026-11-27T17:11:52Z"}
    return {**c, **({"reason": reason} if reason else {}), **({"message": message} if message else {})}


# Pod statuses on every road a pod takes (kubelet's spelling): scheduled or not, pulling, loading, failing.
POD_STATUSES: list[dict[str, Any]] = [
    {"phase": "Pending", "conditions": [_cond("PodScheduled", "False", "Unschedulable", "0/1 nodes are available")]},
    {"phase": "Pending", "conditions": [_cond("PodScheduled", "True"), _cond("Initialized", "False"),
                                        _cond("Ready", "False", "ContainersNotReady", "containers with unready")],
     "initContainerStatuses": [_container("pull-model", {"running": {"startedAt": "t"}})],
     "containerStatuses": [_container("model-api", {"waiting": {"reason": "PodInitializing"}})]},
    {"phase": "Running", "podIP": "10.0.0.9", "conditions": [_cond("PodScheduled", "True"), _cond("Ready", "False")],
     "initContainerStatuses": [_container("pull-model", {"terminated": {"exitCode": 0, "reason": "Completed",
                                                                        "message": "done"}})],
     "containerStatuses": [_container("model-api", {"running": {"startedAt": "t"}})]},
    {"phase": "Pending", "conditions": [_cond("PodScheduled", "True")],
     "initContainerStatuses": [_container("pull-model", {"waiting": {"reason": "CrashLoopBackOff", "message": "m"}},
                                          last={"terminated": {"exitCode": 3, "reason": "Error", "message": "x"}})]},
    {"phase": "Pending", "conditions": [_cond("PodScheduled", "True")],
     "containerStatuses": [_container("model-api", {"waiting": {"reason": "ImagePullBackOff", "message": "no"}},
                                      image="nowhere/x:1")]},
    {"phase": "Running", "conditions": [_cond("PodScheduled", "True"), _cond("ContainersReady", "False")],
     "containerStatuses": [_container("model-api", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}})]},
    {"phase": "Running", "reason": "Evicted", "message": "m",
     "conditions": [_cond("PodScheduled", "True"), _cond("Ready", "True")],
     "containerStatuses": [_container("model-api", {"running": {"startedAt": "t"}}, ready=True)]},
]


@pytest.mark.parametrize("mode", ["Proxy", "Hosted"])
@pytest.mark.parametrize("pod_status", POD_STATUSES)
def test_the_status_computed_from_cached_pods_is_the_one_computed_from_whole_pods(
        converged: list[Obj], mode: str, pod_status: dict[str, Any]) -> None:
    """The pod cache's transform drops only what status.py never reads: a pod change the cache does not keep
    could not have changed the status (and so wakes no reconcile)."""
    objects = hosted_pulling(converged)
    m = ModelAPI.model_validate(objects[0] if mode == "Hosted" else of_kind(converged, "ModelAPI"))
    built = desired.build(m, Settings())
    deployment = of_kind(objects, "Deployment")
    pod = {**of_kind(objects, "Pod"), "spec": {"nodeName": "n"}, "status": copy.deepcopy(pod_status)}
    whole = status.compute(m, built, status.Observed(deployment, (pod,)), "now")
    cached = status.compute(m, built, status.Observed(deployment, (controller.pod_status_only(copy.deepcopy(pod)),)),
                            "now")
    assert cached == whole


def test_a_pod_update_that_changes_only_what_the_status_never_reads_wakes_nothing() -> None:
    before = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "a", "resourceVersion": "1"},
              "status": {"phase": "Pending", "conditions": [_cond("PodScheduled", "True")],
                         "containerStatuses": [_container("model-api", {"running": {"startedAt": "t"}})]}}
    after = copy.deepcopy(before)
    after["metadata"]["resourceVersion"] = "2"
    after["status"]["phase"] = "Running"
    after["status"]["conditions"] += [_cond("Initialized", "True"), _cond("PodReadyToStartContainers", "True")]
    old, new = controller.pod_status_only(before), controller.pod_status_only(after)
    assert not runtime.changed_beyond_version("update", old, new)
    unscheduled = copy.deepcopy(before)
    unscheduled["status"]["conditions"] = [_cond("PodScheduled", "False", "Unschedulable", "0/1 nodes")]
    assert runtime.changed_beyond_version("update", old, controller.pod_status_only(unscheduled))


def test_children_are_cached_without_managed_fields() -> None:
    obj = {"metadata": {"name": "x", "managedFields": [{"manager": "m"}], "creationTimestamp": "t"}}
    assert controller.strip_managed(obj) == {"metadata": {"name": "x"}}
    service = {"kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIP": "10.96.0.1", "type": "ClusterIP",
                                                                     "clusterIPs": ["10.96.0.1"]}}
    assert controller.strip_managed(service)["spec"] == {"type": "ClusterIP"}


def test_a_childs_status_is_cached_only_for_the_deployment_whose_status_is_read() -> None:
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "modelapi-m", "resourceVersion": "1"}, "spec": {"rules": [{}]}}
    accepted = {**route, "metadata": {**route["metadata"], "resourceVersion": "2"}, "status": {"parents": [{
        "parentRef": {"name": "gw"}, "controllerName": "example.com/gateway", "conditions": [
            {"type": "Accepted", "status": "True", "lastTransitionTime": NOW, "observedGeneration": 1}]}]}}
    budget = {"kind": "PodDisruptionBudget", "metadata": {"name": "modelapi-m", "resourceVersion": "1"},
              "spec": {"maxUnavailable": 1}, "status": {"currentHealthy": 1, "desiredHealthy": 1}}
    healthier = {**budget, "metadata": {**budget["metadata"], "resourceVersion": "2"},
                 "status": {"currentHealthy": 2, "desiredHealthy": 1}}
    owned = controller.owned(kube.HTTPROUTE).transform
    # What the Gateway's controller writes, and a pod turning ready, move no field a reconcile reads: no wake.
    for old, new in ((route, accepted), (budget, healthier)):
        cached_old, cached_new = owned(copy.deepcopy(old)), owned(copy.deepcopy(new))
        assert "status" not in cached_new
        assert not runtime.changed_beyond_version("update", cached_old, cached_new)
    deployment = {"kind": "Deployment", "metadata": {"name": "d"}, "status": {"readyReplicas": 1}}
    assert owned(copy.deepcopy(deployment))["status"] == {"readyReplicas": 1}


BUILDER_VARIANTS = [
    {"mode": "Proxy", "proxyConfig": {"apiBase": "http://b:1"}, "replicas": 2},
    {"mode": "Proxy", "proxyConfig": {"model": "m", "env": [{"name": "A", "value": "1"}]},
     "gatewayRoute": {"timeout": "30s"},
     "podSpec": {"containers": [{"name": "model-api", "imagePullPolicy": "Always", "terminationMessagePath": "/t",
                                 "resources": {"requests": {"cpu": "50m"}}}],
                 "securityContext": {"runAsUser": 1000}, "tolerations": [{"operator": "Exists"}]}},
    {"mode": "Proxy", "proxyConfig": {"configYaml": {"fromSecretKeyRef": {"name": "s", "key": "k"}}}},
    {"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m", "modelStore": {"size": "1Gi"}}},
]


@pytest.mark.parametrize("spec", BUILDER_VARIANTS)
def test_every_field_the_builder_sets_survives_the_child_cache(spec: dict[str, Any]) -> None:
    """The diff compares the cached child with what the builder wants: the cache must keep every field the
    builder sets, or the operator would write it again and again (and miss a change someone makes to it)."""
    m = ModelAPI.model_validate({"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
                                 "metadata": {"name": "m", "namespace": "ns", "uid": "u"}, "spec": spec})
    built = desired.build(m, Settings(gateway=GatewayRef("gw", "gw-ns")), "1")
    assert {c["kind"] for c in built.children} >= {"Deployment", "Service", "HTTPRoute"}
    for child in built.children:
        live = copy.deepcopy(child)
        live["metadata"].update(uid="x", resourceVersion="1", creationTimestamp="t", managedFields=[{}])
        cached = controller.strip_managed(live)
        assert not diff.needs_apply(child, cached), child["kind"]


def test_modelapis_are_cached_without_kubectls_copy_of_the_object() -> None:
    obj = {"metadata": {"name": "x", "managedFields": [{}], "annotations": {
        controller.LAST_APPLIED: '{"spec": {}}', "team": "a"}}, "spec": {"mode": "Proxy"}}
    assert controller.MODELAPIS.transform(obj) == {"metadata": {"name": "x", "annotations": {"team": "a"}},
                                                   "spec": {"mode": "Proxy"}}


# --- what wakes a reconcile ------------------------------------------------------------------------------


def test_a_modelapi_whose_status_alone_changed_wakes_no_reconcile() -> None:
    old = {"metadata": {"name": "m", "resourceVersion": "1", "labels": {"a": "b"}}, "spec": {"mode": "Proxy"},
           "status": {"phase": "Pending"}}
    status_only = {**old, "metadata": {**old["metadata"], "resourceVersion": "2"}, "status": {"phase": "Ready"}}
    relabelled = {**old, "metadata": {**old["metadata"], "resourceVersion": "3", "labels": {"a": "c"}}}
    respecced = {**old, "metadata": {**old["metadata"], "resourceVersion": "4"}, "spec": {"mode": "Hosted"}}
    wake = controller.not_only_status
    assert not wake("update", old, status_only)
    assert wake("update", old, relabelled) and wake("update", old, respecced)
    assert wake("add", None, old) and wake("delete", old, None)
    primary = controller.watches(Settings()).sources[0]
    assert primary.cache == controller.MODELAPIS and primary.predicate is controller.not_only_status



def test_a_pod_or_child_update_wakes_only_when_more_than_its_version_changed() -> None:
    pod = controller.PODS.transform({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "1", "labels": {"modelapi": "m"}},
        "spec": {"nodeName": ""}, "status": {"phase": "Pending"}})
    bound = controller.PODS.transform({**pod, "metadata": {**pod["metadata"], "resourceVersion": "2"},
                                       "spec": {"nodeName": "node-1"}})  # the scheduler's binding
    running = {**bound, "metadata": {**bound["metadata"], "resourceVersion": "3"}, "status": {"phase": "Running"}}
    wake = runtime.changed_beyond_version
    assert not wake("update", pod, bound)
    assert wake("update", bound, running) and wake("add", None, pod) and wake("delete", pod, None)
    predicates = {(w.cache.resource.kind, w.cache.metadata_only): w.predicate
                  for w in controller.watches(Settings()).sources}
    assert predicates[("Pod", False)] is wake and predicates[("Deployment", False)] is wake
    assert predicates[("Secret", True)] is None  # a Secret's version is read: a changed config rolls the pods


def modelapi(name: str, namespace: str, proxy_config: dict[str, Any]) -> Obj:
    return {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
            "spec": {"mode": "Proxy", "proxyConfig": proxy_config}}


def test_a_secret_finds_the_modelapis_that_reference_it_in_its_own_namespace() -> None:
    env = {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k"}}}
    config = {"configYaml": {"fromSecretKeyRef": {"name": "routes", "key": "config.yaml"}}, "env": [env]}
    store = Store({SECRET_REF_INDEX: secret_ref_keys})
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


def test_the_secret_index_follows_a_spec_change_and_not_a_status_write() -> None:
    env = {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k"}}}
    user = modelapi("user", "a", {"model": "m", "env": [env]})
    user["metadata"].update(uid="u-1", generation=1)
    store = Store({SECRET_REF_INDEX: secret_ref_keys})
    store.apply(Change("add", None, user))
    written = copy.deepcopy(user)
    written["metadata"]["resourceVersion"] = "2"
    written["status"] = {"phase": "Pending"}
    store.apply(Change("update", user, written))
    assert [o["metadata"]["name"] for o in store.by_index(SECRET_REF_INDEX, "a/keys")] == ["user"]
    changed = copy.deepcopy(written)
    changed["metadata"].update(resourceVersion="3", generation=2)
    changed["spec"]["proxyConfig"]["env"] = [{**env, "valueFrom": {"secretKeyRef": {"name": "new", "key": "k"}}}]
    store.apply(Change("update", written, changed))
    assert store.by_index(SECRET_REF_INDEX, "a/keys") == []
    assert [o["metadata"]["name"] for o in store.by_index(SECRET_REF_INDEX, "a/new")] == ["user"]


def wakes(obj: Obj, objects: list[Obj]) -> set[str]:
    """The keys every watch declared in controller.watches() enqueues for an event on `obj`."""
    stores = stores_of(objects)
    return {k for w in controller.watches(Settings()).sources if w.cache.resource.kind == obj["kind"]
            for k in w.map(obj, stores)}


def test_children_and_pods_wake_their_modelapi(converged: list[Obj]) -> None:
    for kind in ("ConfigMap", "Secret", "Deployment", "Service", "Pod", "ModelAPI"):
        assert wakes(of_kind(converged, kind), converged) == {"default/mock-api"}, kind


def test_a_referenced_secret_wakes_its_users_and_an_unrelated_one_nobody() -> None:
    env = {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k"}}}
    objects = [modelapi("user", "a", {"model": "m", "env": [env]}), modelapi("other", "a", {"model": "m"})]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": "a"}}
    assert wakes(secret, objects) == {"a/user"}
    assert wakes({**secret, "metadata": {"name": "unrelated", "namespace": "a"}}, objects) == set()
