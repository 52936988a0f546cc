"""The async plumbing (kube client + informer) against the real local API server.

Uses the root conftest fixtures `api_client` (a kubernetes_asyncio ApiClient for the test cluster)
and `namespace` (a fresh namespace for the test). No fixed sleeps: everything waits for a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import structlog
from kubernetes_asyncio.client import ApiClient

from e2e.faults import Forwarder
from e2e.operator_process import crd_established
from kaos_modelapi import kube
from kaos_modelapi.informer import Backoff, Informer
from kaos_modelapi.kube import (
    CONFIGMAP,
    SECRET,
    ApiError,
    Gone,
    KubeClient,
    ListResult,
    Obj,
    Resource,
    WatchEvent,
)

pytestmark = pytest.mark.cluster

DEADLINE = 60.0
FAST_BACKOFF = Backoff(initial=0.05, factor=2, cap=0.5, jitter=0.2)
CRD = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False)
WIDGET = Resource("e2e.kaos.tools", "v1", "widgets", "Widget")
_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}-{random.randrange(16**6):06x}"


async def wait_for(cond: Callable[[], bool], within: float = DEADLINE, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def eventually(probe: Callable[[], Any], within: float = DEADLINE, what: str = "probe") -> Any:
    """Retry an async probe until it stops raising (e.g. a new CRD's API becoming served)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await probe()
        except (ApiError, AssertionError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


@dataclass
class Recorder:
    """Handler that records (kind, name, rv) plus the objects, and what the informer knew then."""

    informer: Informer | None = None
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    objects: list[Obj] = field(default_factory=list)
    lists_at: list[int] = field(default_factory=list)

    def __call__(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        o = new if new is not None else old
        assert o is not None
        self.seen.append((kind, o["metadata"]["name"], o["metadata"]["resourceVersion"]))
        self.objects.append(o)
        self.lists_at.append(self.informer.lists if self.informer else 0)

    def of(self, name: str) -> list[str]:
        return [kind for kind, n, _ in self.seen if n == name]

    def has(self, kind: str, name: str) -> bool:
        return any(k == kind and n == name for k, n, _ in self.seen)


@contextlib.asynccontextmanager
async def running(informer: Informer) -> AsyncIterator[Recorder]:
    recorder = Recorder(informer)
    informer.add_handler(recorder)
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), DEADLINE)
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def new_informer(client: Any, resource: Resource, namespace: str, **kw: Any) -> Informer:
    kw.setdefault("backoff", FAST_BACKOFF)
    return Informer(client, resource, structlog.get_logger("e2e"), namespace=namespace, **kw)


def configmap(
    namespace: str, name: str, data: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data or {}}


@pytest.fixture
def client(api_client: ApiClient) -> KubeClient:
    return KubeClient(api_client, resources=(*kube.DEFAULT_RESOURCES, CRD, WIDGET))


# -- a TCP proxy we can cut, to drop the watch connection for real ------------------------------------


@contextlib.asynccontextmanager
async def proxied(api_client: ApiClient) -> AsyncIterator[tuple[KubeClient, Forwarder]]:
    url = urlsplit(str(api_client.configuration.host))
    assert url.hostname is not None
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = Forwarder(url.hostname, port)
    local_port = await proxy.start()
    configuration = copy.deepcopy(api_client.configuration)
    # Same host name (so TLS verification still matches), our port.
    host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
    configuration.host = urlunsplit((url.scheme, f"{host}:{local_port}", url.path, "", ""))
    through_proxy = ApiClient(configuration=configuration)
    try:
        yield KubeClient(through_proxy), proxy
    finally:
        await proxy.close()
        await through_proxy.close()


# -- informer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("watch_list", [False, True], ids=["paged-list", "streaming-list"])
async def test_list_then_watch_sees_creates_updates_deletes_in_order(
    client: KubeClient, namespace: str, watch_list: bool
) -> None:
    selector = {"kaos-e2e": unique("order")}
    await client.apply(configmap(namespace, "before", {"v": "0"}, labels=selector), "e2e")
    informer = new_informer(client, CONFIGMAP, namespace, label_selector=f"kaos-e2e={selector['kaos-e2e']}",
                            watch_list=watch_list)
    async with running(informer) as rec:
        assert rec.seen[0][:2] == ("add", "before")
        for value in ("1", "2", "3"):
            await client.apply(configmap(namespace, "live", {"v": value}, labels=selector), "e2e")
        live = await client.get(CONFIGMAP, namespace, "live")
        assert await client.delete(CONFIGMAP, namespace, "live", live["metadata"]["uid"])
        await wait_for(lambda: rec.has("delete", "live"), what="the delete")
        assert rec.of("live") == ["add", "update", "update", "delete"]
        rvs = [int(rv) for _, name, rv in rec.seen if name == "live"]
        assert rvs == sorted(rvs) and len(set(rvs)) == 4, rvs
        assert [o["data"]["v"] for o in rec.objects if o["metadata"]["name"] == "live"][:3] == ["1", "2", "3"]
        assert informer.store.get(f"{namespace}/live") is None
        assert informer.store.get(f"{namespace}/before") is not None
        assert informer.lists == 1


async def test_bookmarks_arrive_and_advance_the_resource_version(client: KubeClient, namespace: str) -> None:
    label = unique("bookmark")
    # A short server-side timeout makes the server send its pre-timeout bookmark within seconds.
    informer = new_informer(client, CONFIGMAP, namespace, label_selector=f"kaos-e2e={label}", watch_timeout=(4, 4))
    async with running(informer) as rec:
        listed_rv = int(informer.resource_version)
        # Moves the configmap resourceVersion on without any event this informer would see.
        other = await client.apply(configmap(namespace, unique("unwatched")), "e2e")
        other_rv = int(other["metadata"]["resourceVersion"])
        assert other_rv > listed_rv
        await wait_for(
            lambda: informer.bookmarks > 0 and int(informer.resource_version) >= other_rv,
            what="a bookmark past the unwatched write",
        )
        assert rec.seen == []
        assert informer.lists == 1


async def test_a_dropped_connection_resumes_without_relist_or_lost_events(
    api_client: ApiClient, client: KubeClient, namespace: str
) -> None:
    label = unique("drop")
    labels = {"kaos-e2e": label}
    async with proxied(api_client) as (via_proxy, proxy):
        informer = new_informer(via_proxy, CONFIGMAP, namespace, label_selector=f"kaos-e2e={label}")
        async with running(informer) as rec:
            await client.apply(configmap(namespace, "seen", {"v": "1"}, labels=labels), "e2e")
            await wait_for(lambda: rec.has("add", "seen"), what="the first add")
            watches_before = informer.watches
            proxy.cut()
            # While the informer cannot reach the server, changes pile up behind its resourceVersion.
            await client.apply(configmap(namespace, "seen", {"v": "2"}, labels=labels), "e2e")
            brief = await client.apply(configmap(namespace, "brief", labels=labels), "e2e")
            await client.apply(configmap(namespace, "later", {"v": "1"}, labels=labels), "e2e")
            assert await client.delete(CONFIGMAP, namespace, "brief", brief["metadata"]["uid"])
            await wait_for(lambda: informer.watches > watches_before, what="a reconnect attempt")
            proxy.restore()
            await wait_for(lambda: rec.has("delete", "brief") and rec.has("add", "later"), what="missed events")
            assert rec.of("seen") == ["add", "update"]
            assert rec.of("brief") == ["add", "delete"]
            assert informer.lists == 1, "resumed from the last resourceVersion, no relist"
            seen = informer.store.get(f"{namespace}/seen")
            assert seen is not None and seen["data"] == {"v": "2"}
            assert proxy.accepted >= 2


@dataclass
class ExpireNextWatch:
    """Delegates to a real client, but while armed starts watches from resourceVersion "1": long
    compacted/evicted on any running server, so the server itself answers 410 Gone."""

    inner: KubeClient
    armed: bool = False
    gone_seen: int = 0

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        page_size: int = 500,
    ) -> ListResult:
        return await self.inner.list(resource, namespace, label_selector, metadata_only, page_size)

    async def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        timeout_seconds: int | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        rv = "1" if self.armed else resource_version
        stream = self.inner.watch(resource, namespace, rv, label_selector, metadata_only, timeout_seconds)
        try:
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    yield event
        except Gone:
            self.armed = False
            self.gone_seen += 1
            raise


async def gone_from_the_beginning(client: KubeClient, namespace: str) -> Gone:
    """A watch from resourceVersion 1 gets 410 Gone once the API server's watch cache has dropped the first
    ConfigMap event: when its buffer is full and that event is older than the cache's freshness window
    (75 s). A long-lived cluster got there long ago; on a fresh one, each try writes a burst of ConfigMap
    updates to push the window along, and the tries go on until the server says Gone."""
    writes = itertools.count()

    async def watch_from_the_beginning() -> Gone:
        try:
            async with contextlib.aclosing(
                client.watch(CONFIGMAP, namespace, resource_version="1", timeout_seconds=2)
            ) as events:
                async for _ in events:
                    pass
        except Gone as gone:
            return gone
        for n in itertools.islice(writes, 20):
            await client.apply(configmap(namespace, "churn", {"n": str(n)}), "e2e")
        raise AssertionError("the watch from resourceVersion 1 ended without 410 Gone (still in the watch cache)")

    gone: Gone = await eventually(watch_from_the_beginning, within=720, what="410 Gone for resourceVersion 1")
    return gone


async def test_the_server_answers_an_expired_resource_version_with_gone(client: KubeClient, namespace: str) -> None:
    assert (await gone_from_the_beginning(client, namespace)).is_gone()


async def test_an_expired_resource_version_relists_and_emits_the_missed_delete(
    api_client: ApiClient, client: KubeClient, namespace: str
) -> None:
    await gone_from_the_beginning(client, namespace)  # so that the armed watch below really expires
    label = unique("expire")
    labels = {"kaos-e2e": label}
    await client.apply(configmap(namespace, "keep", labels=labels), "e2e")
    doomed = await client.apply(configmap(namespace, "doomed", labels=labels), "e2e")
    async with proxied(api_client) as (via_proxy, proxy):
        expiring = ExpireNextWatch(via_proxy)
        informer = new_informer(expiring, CONFIGMAP, namespace, label_selector=f"kaos-e2e={label}")
        async with running(informer) as rec:
            assert sorted(rec.of("keep") + rec.of("doomed")) == ["add", "add"]
            proxy.cut()
            assert await client.delete(CONFIGMAP, namespace, "doomed", doomed["metadata"]["uid"])
            await client.apply(configmap(namespace, "keep", {"changed": "yes"}, labels=labels), "e2e")
            await client.apply(configmap(namespace, "newcomer", labels=labels), "e2e")
            expiring.armed = True
            proxy.restore()
            await wait_for(lambda: rec.has("delete", "doomed"), what="the missed delete")
            await wait_for(lambda: rec.has("add", "newcomer") and len(rec.of("keep")) == 2, what="relist diff")
            assert expiring.gone_seen == 1
            assert informer.lists == 2
            deleted_at = rec.seen.index(next(s for s in rec.seen if s[:2] == ("delete", "doomed")))
            assert rec.lists_at[deleted_at] == 2, "the delete came from the relist, not a watch event"
            assert rec.of("doomed") == ["add", "delete"]
            assert rec.of("keep") == ["add", "update"]
            keep = informer.store.get(f"{namespace}/keep")
            assert keep is not None and keep["data"] == {"changed": "yes"}
            # ...and the informer is watching again from the relist: new events still arrive.
            await client.apply(configmap(namespace, "after", labels=labels), "e2e")
            await wait_for(lambda: rec.has("add", "after"), what="events after the relist")


async def test_label_selector_filters_and_relabelling_moves_objects_in_and_out(
    client: KubeClient, namespace: str
) -> None:
    label = unique("sel")
    informer = new_informer(client, CONFIGMAP, namespace, label_selector=f"kaos-e2e={label}")
    async with running(informer) as rec:
        await client.apply(configmap(namespace, "inside", labels={"kaos-e2e": label}), "e2e")
        await client.apply(configmap(namespace, "outside", labels={"kaos-e2e": "other"}), "e2e")
        await wait_for(lambda: rec.has("add", "inside"))
        await client.apply(configmap(namespace, "outside", labels={"kaos-e2e": label}), "e2e")
        await wait_for(lambda: rec.has("add", "outside"), what="relabelled object entering")
        await client.apply(configmap(namespace, "inside", labels={"kaos-e2e": "gone"}), "e2e")
        await wait_for(lambda: rec.has("delete", "inside"), what="relabelled object leaving")
        assert [k for k, _, _ in rec.seen] == ["add", "add", "delete"]
        assert informer.store.list_keys() == [f"{namespace}/outside"]
        assert {o["metadata"]["labels"]["kaos-e2e"] for o in rec.objects} >= {label}


@pytest.mark.parametrize("watch_list", [False, True], ids=["paged-list", "streaming-list"])
async def test_metadata_only_secrets_never_carry_data(client: KubeClient, namespace: str, watch_list: bool) -> None:
    label = unique("meta")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds", "namespace": namespace, "labels": {"kaos-e2e": label}},
        "stringData": {"token": "s3cr3t"},
    }
    await client.apply(secret, "e2e")
    # No transform at all: whatever is in the cache is exactly what the server sent.
    informer = new_informer(
        client,
        SECRET,
        namespace,
        label_selector=f"kaos-e2e={label}",
        metadata_only=True,
        transform=lambda o: o,
        watch_list=watch_list,
    )
    async with running(informer) as rec:
        await client.apply({**secret, "stringData": {"token": "r0tated"}}, "e2e")
        await wait_for(lambda: rec.has("update", "creds"), what="the metadata-only update")
        for obj in [*rec.objects, *informer.store.list()]:
            assert "data" not in obj and "stringData" not in obj
            assert (obj["apiVersion"], obj["kind"]) == ("v1", "Secret")
            assert obj["metadata"]["uid"] and obj["metadata"]["labels"] == {"kaos-e2e": label}
    listed = await client.list(SECRET, namespace, label_selector=f"kaos-e2e={label}", metadata_only=True)
    assert [o["metadata"]["name"] for o in listed.items] == ["creds"]
    assert "data" not in listed.items[0] and listed.items[0]["kind"] == "Secret"
    assert (await client.get(SECRET, namespace, "creds"))["data"], "a full get does return data"


async def test_managed_fields_are_dropped_from_the_cache(client: KubeClient, namespace: str) -> None:
    label = unique("mf")
    await client.apply(configmap(namespace, "mf", {"a": "b"}, labels={"kaos-e2e": label}), "e2e")
    assert (await client.get(CONFIGMAP, namespace, "mf"))["metadata"]["managedFields"]
    informer = new_informer(client, CONFIGMAP, namespace, label_selector=f"kaos-e2e={label}")
    async with running(informer) as rec:
        await client.apply(configmap(namespace, "mf", {"a": "c"}, labels={"kaos-e2e": label}), "e2e")
        await wait_for(lambda: rec.has("update", "mf"))
        cached = informer.store.get(f"{namespace}/mf")
        assert cached is not None and cached["data"] == {"a": "c"}
        assert all("managedFields" not in o["metadata"] for o in [*rec.objects, cached])


# -- kube client: server-side apply and friends ------------------------------------------------------


def _managers_of(obj: Obj, field_path: str) -> set[str]:
    return {
        entry["manager"]
        for entry in obj["metadata"].get("managedFields", [])
        if field_path in str(entry.get("fieldsV1", {}))
    }


async def test_apply_is_idempotent_and_force_takes_a_field_back(client: KubeClient, namespace: str) -> None:
    first = await client.apply(configmap(namespace, "ssa", {"owned": "by-a"}), "e2e-a")
    again = await client.apply(configmap(namespace, "ssa", {"owned": "by-a"}), "e2e-a")
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"], "no-op apply"

    with pytest.raises(ApiError) as conflict:
        await client.apply(configmap(namespace, "ssa", {"owned": "by-b"}), "e2e-b")
    assert conflict.value.is_conflict()
    assert "e2e-a" in conflict.value.message

    taken = await client.apply(configmap(namespace, "ssa", {"owned": "by-b"}), "e2e-b", force=True)
    assert taken["data"] == {"owned": "by-b"}
    assert _managers_of(taken, "f:owned") == {"e2e-b"}

    with pytest.raises(ApiError) as back:
        await client.apply(configmap(namespace, "ssa", {"owned": "by-a"}), "e2e-a")
    assert back.value.is_conflict()
    retaken = await client.apply(configmap(namespace, "ssa", {"owned": "by-a"}), "e2e-a", force=True)
    assert retaken["data"] == {"owned": "by-a"}
    assert _managers_of(retaken, "f:owned") == {"e2e-a"}


async def test_apply_drops_fields_a_manager_no_longer_applies(client: KubeClient, namespace: str) -> None:
    await client.apply(configmap(namespace, "shrink", {"keep": "1", "drop": "2"}), "e2e")
    shrunk = await client.apply(configmap(namespace, "shrink", {"keep": "1"}), "e2e")
    assert shrunk["data"] == {"keep": "1"}


@pytest.fixture
async def widgets(client: KubeClient) -> AsyncIterator[Resource]:
    """A throwaway CRD with a status subresource (SSA on /status needs one)."""
    crd: Obj = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{WIDGET.plural}.{WIDGET.group}"},
        "spec": {
            "group": WIDGET.group,
            "scope": "Namespaced",
            "names": {
                "plural": WIDGET.plural,
                "singular": "widget",
                "kind": WIDGET.kind,
                "listKind": "WidgetList",
            },
            "versions": [
                {
                    "name": WIDGET.version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }
    await client.apply(crd, "e2e")

    async def established() -> None:
        got = await client.get(CRD, None, crd["metadata"]["name"])
        assert crd_established(got), got.get("status")

    await eventually(established, what="the CRD to be established")
    yield WIDGET


async def test_apply_status_goes_to_the_status_subresource(
    client: KubeClient, namespace: str, widgets: Resource
) -> None:
    widget = {
        "apiVersion": widgets.api_version,
        "kind": widgets.kind,
        "metadata": {"name": "w", "namespace": namespace},
        "spec": {"size": 1},
        "status": {"phase": "ignored on the main resource"},
    }
    created = await eventually(lambda: client.apply(widget, "e2e"), what="the widget API to be served")
    assert "status" not in created
    status = {
        "apiVersion": widgets.api_version,
        "kind": widgets.kind,
        "metadata": {"name": "w", "namespace": namespace},
        "status": {"phase": "Ready"},
    }
    updated = await client.apply_status(status, "e2e-status")
    assert updated["status"] == {"phase": "Ready"}
    assert updated["spec"] == {"size": 1}
    same = await client.apply_status(status, "e2e-status")
    assert same["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"], "no-op status apply"
    with pytest.raises(ApiError) as conflict:
        await client.apply_status({**status, "status": {"phase": "Other"}}, "someone-else")
    assert conflict.value.is_conflict()
    forced = await client.apply_status({**status, "status": {"phase": "Other"}}, "someone-else", force=True)
    assert forced["status"] == {"phase": "Other"}


async def test_writes_asked_for_metadata_only_answer_with_the_metadata_alone(
    client: KubeClient, namespace: str, widgets: Resource
) -> None:
    """What the reconciler's writes ask for: the API server honours the Accept header on an apply, a status
    apply, a create and a replace, writes the whole object and answers with its metadata (the new version)."""
    applied = await client.apply(configmap(namespace, "meta", {"k": "v"}), "e2e", metadata_only=True)
    stored = await client.get(CONFIGMAP, namespace, "meta")
    assert (applied["kind"], "data" in applied, stored["data"]) == ("ConfigMap", False, {"k": "v"})
    assert applied["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
    replaced = await client.replace({**stored, "data": {"k": "w"}}, "e2e", metadata_only=True)
    assert "data" not in replaced
    assert (await client.get(CONFIGMAP, namespace, "meta"))["data"] == {"k": "w"}
    created = await client.create(configmap(namespace, "meta-made", {"k": "v"}), "e2e", metadata_only=True)
    assert "data" not in created and created["metadata"]["uid"]

    widget = {"apiVersion": widgets.api_version, "kind": widgets.kind,
              "metadata": {"name": "w", "namespace": namespace}}
    await eventually(lambda: client.apply({**widget, "spec": {"size": 1}}, "e2e"), what="the widget API to be served")
    status = await client.apply_status({**widget, "status": {"phase": "Ready"}}, "e2e", metadata_only=True)
    assert (status["kind"], "spec" in status, "status" in status) == (widgets.kind, False, False)
    assert (await client.get(widgets, namespace, "w"))["status"] == {"phase": "Ready"}


async def test_delete_honours_the_uid_precondition_and_404_is_success(client: KubeClient, namespace: str) -> None:
    created = await client.apply(configmap(namespace, "del"), "e2e")
    assert not await client.delete(CONFIGMAP, namespace, "del", "00000000-0000-0000-0000-000000000000")
    assert (await client.get(CONFIGMAP, namespace, "del"))["metadata"]["uid"] == created["metadata"]["uid"]
    assert await client.delete(CONFIGMAP, namespace, "del", created["metadata"]["uid"])
    assert not await client.delete(CONFIGMAP, namespace, "del", created["metadata"]["uid"])
    with pytest.raises(ApiError) as missing:
        await client.get(CONFIGMAP, namespace, "del")
    assert missing.value.is_not_found()


async def test_create_then_already_exists_and_on_response_counts(api_client: ApiClient, namespace: str) -> None:
    calls: list[tuple[str, int]] = []
    counted = KubeClient(api_client, on_response=lambda method, code: calls.append((method, code)))
    await counted.create(configmap(namespace, "made"), field_manager="e2e")
    with pytest.raises(ApiError) as exists:
        await counted.create(configmap(namespace, "made"))
    assert exists.value.is_already_exists()
    with pytest.raises(ApiError):
        await counted.get(CONFIGMAP, namespace, "nope")
    assert calls == [("POST", 201), ("POST", 409), ("GET", 404)]
