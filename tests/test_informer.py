"""Informer and Store logic against a scripted list/watch fake (the real server is in e2e/)."""

from __future__ import annotations

import asyncio
import copy
import random
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import structlog

from kaos_modelapi.informer import (
    OWNER_UID_INDEX,
    Backoff,
    Change,
    Informer,
    MultiNamespaceInformer,
    Packer,
    Store,
    chain,
    drop_managed_fields,
    informer_for_namespaces,
    label_index,
    relist_changes,
)
from kaos_modelapi.kube import SECRET, ApiError, Gone, ListResult, Obj, Resource, WatchEvent

END = object()


def obj(name: str, rv: str, uid: str | None = None, ns: str = "ns", **meta: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": ns,
            "resourceVersion": rv,
            "uid": uid or f"uid-{name}",
            **meta,
        },
    }


def bookmark(rv: str) -> WatchEvent:
    return WatchEvent("BOOKMARK", {"kind": "Secret", "apiVersion": "v1", "metadata": {"resourceVersion": rv}})


@dataclass
class FakeKube:
    """Lists come from `lists`; each watch call gets its own channel the test feeds."""

    lists: deque[ListResult | ApiError] = field(default_factory=deque)
    list_calls: int = 0
    watch_rvs: list[str | None] = field(default_factory=list)
    streams: list[asyncio.Queue[Any]] = field(default_factory=list)
    closed: int = 0

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        page_size: int = 500,
    ) -> ListResult:
        self.list_calls += 1
        result = self.lists.popleft()
        if isinstance(result, ApiError):
            raise result
        return result

    async def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        timeout_seconds: int | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        self.watch_rvs.append(resource_version)
        channel: asyncio.Queue[Any] = asyncio.Queue()
        self.streams.append(channel)
        try:
            while True:
                item = await channel.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed += 1

    def stream(self, index: int = -1) -> asyncio.Queue[Any]:
        return self.streams[index]


@dataclass
class Recorder:
    seen: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def __call__(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        def rv(o: Obj | None) -> str | None:
            return None if o is None else f"{o['metadata']['name']}@{o['metadata']['resourceVersion']}"

        self.seen.append((kind, rv(old), rv(new)))


async def wait_until(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0)


@dataclass
class Harness:
    kube: FakeKube
    informer: Informer
    rec: Recorder
    task: asyncio.Task[None]
    delays: list[float]

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def start(kube: FakeKube, **kw: Any) -> Harness:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0)

    informer = Informer(
        kube,
        SECRET,
        structlog.get_logger(),
        namespace="ns",
        rng=random.Random(1),
        sleep=sleep,
        **kw,
    )
    rec = Recorder()
    informer.add_handler(rec)
    task = asyncio.create_task(informer.run())
    return Harness(kube, informer, rec, task, delays)


async def test_initial_list_fills_store_tells_handlers_and_sets_synced() -> None:
    kube = FakeKube(lists=deque([ListResult([obj("a", "5", managedFields=[{"manager": "x"}]), obj("b", "6")], "10")]))
    h = await start(kube)
    await asyncio.wait_for(h.informer.synced.wait(), 5)
    assert h.rec.seen == [("add", None, "a@5"), ("add", None, "b@6")]
    a = h.informer.store.get("ns/a")
    assert a is not None and "managedFields" not in a["metadata"]
    await wait_until(lambda: kube.watch_rvs == ["10"])
    await h.stop()
    assert kube.closed == 1, "cancelling run() closes the watch stream"


async def test_watch_events_apply_in_order_and_bookmarks_only_advance_rv() -> None:
    kube = FakeKube(lists=deque([ListResult([], "10")]))
    h = await start(kube)
    await wait_until(lambda: len(kube.streams) == 1)
    s = kube.stream()
    for event in [
        WatchEvent("ADDED", obj("a", "11")),
        WatchEvent("MODIFIED", obj("a", "12")),
        bookmark("15"),
        WatchEvent("MODIFIED", obj("a", "16")),
        WatchEvent("DELETED", obj("a", "17")),
        bookmark("20"),
    ]:
        s.put_nowait(event)
    await wait_until(lambda: h.informer.resource_version == "20")
    assert h.rec.seen == [
        ("add", None, "a@11"),
        ("update", "a@11", "a@12"),
        ("update", "a@12", "a@16"),
        ("delete", "a@17", None),
    ]
    assert h.informer.bookmarks == 2
    assert len(h.informer.store) == 0
    await h.stop()


async def test_a_watch_that_ends_resumes_from_the_last_rv_without_relisting() -> None:
    kube = FakeKube(lists=deque([ListResult([], "10")]))
    h = await start(kube)
    await wait_until(lambda: len(kube.streams) == 1)
    kube.stream().put_nowait(bookmark("33"))
    kube.stream().put_nowait(END)
    await wait_until(lambda: len(kube.streams) == 2)
    assert kube.watch_rvs == ["10", "33"]
    assert kube.list_calls == 1
    assert h.delays == [], "a clean end that delivered events re-watches at once"
    await h.stop()


async def test_a_broken_watch_backs_off_and_resumes_from_the_last_rv() -> None:
    kube = FakeKube(lists=deque([ListResult([], "10")]))
    h = await start(kube, backoff=Backoff(initial=1, factor=2, cap=3, jitter=0))
    for i in range(4):
        await wait_until(lambda i=i: len(kube.streams) == i + 1)  # type: ignore[misc]
        kube.stream().put_nowait(ApiError(0, "ServerDisconnectedError", "gone away"))
    await wait_until(lambda: len(kube.streams) == 5)
    assert h.delays == [1, 2, 3, 3], "backoff grows and is capped"
    kube.stream().put_nowait(WatchEvent("ADDED", obj("a", "11")))
    kube.stream().put_nowait(ApiError(500, "InternalError", "boom"))
    await wait_until(lambda: len(kube.streams) == 6)
    assert h.delays[-1] == 1, "a watch that delivered events resets the backoff"
    assert kube.watch_rvs == ["10"] * 5 + ["11"]
    assert kube.list_calls == 1
    await h.stop()


async def test_an_error_event_is_a_broken_watch() -> None:
    kube = FakeKube(lists=deque([ListResult([], "10")]))
    h = await start(kube)
    await wait_until(lambda: len(kube.streams) == 1)
    kube.stream().put_nowait(WatchEvent("ERROR", {"kind": "Status", "code": 500, "message": "x"}))
    await wait_until(lambda: len(kube.streams) == 2)
    assert kube.list_calls == 1
    await h.stop()


async def test_gone_relists_and_emits_the_differences() -> None:
    kube = FakeKube(
        lists=deque(
            [
                ListResult([obj("keep", "1"), obj("change", "2"), obj("vanish", "3"), obj("replace", "4")], "10"),
                ListResult(
                    [
                        obj("keep", "1"),
                        obj("change", "12"),
                        obj("replace", "13", uid="new"),
                        obj("new", "14"),
                    ],
                    "20",
                ),
            ]
        )
    )
    h = await start(kube)
    await wait_until(lambda: len(kube.streams) == 1)
    h.rec.seen.clear()
    kube.stream().put_nowait(Gone(410, "Expired", "too old resource version: 10 (15)"))
    await wait_until(lambda: len(kube.streams) == 2)
    assert kube.list_calls == 2
    assert kube.watch_rvs == ["10", "20"]
    assert h.rec.seen == [
        ("update", "change@2", "change@12"),
        ("delete", "replace@4", None),
        ("add", None, "replace@13"),
        ("add", None, "new@14"),
        ("delete", "vanish@3", None),
    ]
    assert sorted(h.informer.store.list_keys()) == ["ns/change", "ns/keep", "ns/new", "ns/replace"]
    assert h.informer.lists == 2
    await h.stop()


async def test_a_failing_list_is_retried_with_backoff_and_synced_waits_for_it() -> None:
    kube = FakeKube(
        lists=deque([ApiError(0, "ClientConnectorError", "refused"), ApiError(503, "ServiceUnavailable", "x")])
    )
    h = await start(kube, backoff=Backoff(initial=1, factor=2, cap=30, jitter=0))
    await wait_until(lambda: kube.list_calls == 2 and len(h.delays) == 2)
    assert not h.informer.synced.is_set()
    kube.lists.append(ListResult([obj("a", "1")], "5"))
    await asyncio.wait_for(h.informer.synced.wait(), 5)
    assert h.delays == [1, 2]
    await h.stop()


async def test_a_list_or_watch_refused_with_retry_after_waits_at_least_that_long() -> None:
    kube = FakeKube(lists=deque([ApiError(429, "TooManyRequests", "slow down", retry_after=7.0),
                                 ListResult([obj("a", "1")], "5")]))
    h = await start(kube, backoff=Backoff(initial=1, factor=2, cap=30, jitter=0))
    await asyncio.wait_for(h.informer.synced.wait(), 5)
    await wait_until(lambda: len(kube.streams) == 1)
    kube.stream().put_nowait(ApiError(503, "ServiceUnavailable", "busy", retry_after=0.5))
    await wait_until(lambda: len(kube.streams) == 2)
    assert h.delays == [7.0, 1]  # the server's wait when longer than the backoff's, else the backoff's
    await h.stop()


async def test_a_failing_handler_does_not_stop_the_others_or_the_informer() -> None:
    kube = FakeKube(lists=deque([ListResult([obj("a", "1")], "5")]))

    def broken(kind: str, old: Obj | None, new: Obj | None) -> None:
        raise RuntimeError("handler bug")

    informer = Informer(
        kube,
        SECRET,
        structlog.get_logger(),
        namespace="ns",
        sleep=lambda _: asyncio.sleep(0),
    )
    informer.add_handler(broken)
    rec = Recorder()
    informer.add_handler(rec)
    task = asyncio.create_task(informer.run())
    await wait_until(lambda: len(kube.streams) == 1)
    kube.stream().put_nowait(WatchEvent("MODIFIED", obj("a", "6")))
    await wait_until(lambda: len(rec.seen) == 2)
    assert rec.seen == [("add", None, "a@1"), ("update", "a@1", "a@6")]
    assert kube.list_calls == 1 and len(kube.streams) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_late_handler_is_told_about_existing_objects() -> None:
    kube = FakeKube(lists=deque([ListResult([obj("a", "1"), obj("b", "2")], "5")]))
    h = await start(kube)
    await asyncio.wait_for(h.informer.synced.wait(), 5)
    late = Recorder()
    h.informer.add_handler(late)
    assert late.seen == [("add", None, "a@1"), ("add", None, "b@2")]
    await h.stop()


async def test_transform_hook_can_drop_more_than_managed_fields() -> None:
    def drop_data(o: Obj) -> Obj:
        return {k: v for k, v in o.items() if k != "data"}

    secret = {**obj("a", "1", managedFields=[{}]), "data": {"k": "djE="}}
    kube = FakeKube(lists=deque([ListResult([secret], "5")]))
    h = await start(kube, transform=chain(drop_managed_fields, drop_data))
    await asyncio.wait_for(h.informer.synced.wait(), 5)
    cached = h.informer.store.get("ns/a")
    assert cached is not None
    assert "data" not in cached and "managedFields" not in cached["metadata"]
    assert "data" in secret and "managedFields" in secret["metadata"], "the transform does not mutate"
    await h.stop()


def test_store_indexes_follow_updates_and_deletes() -> None:
    store = Store({OWNER_UID_INDEX: lambda o: [r["uid"] for r in o["metadata"].get("ownerReferences", [])],
                   "app": label_index("app")})  # fmt: skip
    owned = obj("a", "1", ownerReferences=[{"uid": "owner-1"}], labels={"app": "x"})
    store.apply(Change("add", None, owned))
    store.apply(Change("add", None, obj("b", "1", ns="other", labels={"app": "x", "tier": "db"})))
    assert [o["metadata"]["name"] for o in store.by_index(OWNER_UID_INDEX, "owner-1")] == ["a"]
    assert [o["metadata"]["name"] for o in store.by_index("app", "x")] == ["a", "b"]
    moved = obj("a", "2", ownerReferences=[{"uid": "owner-2"}])
    store.apply(Change("update", owned, moved))
    assert store.by_index(OWNER_UID_INDEX, "owner-1") == []
    assert store.by_index(OWNER_UID_INDEX, "owner-2") == [moved]
    assert [o["metadata"]["name"] for o in store.by_index("app", "x")] == ["b"]
    store.apply(Change("delete", moved, None))
    assert store.by_index(OWNER_UID_INDEX, "owner-2") == []
    assert store.get("ns/a") is None
    with pytest.raises(KeyError):
        store.by_index("nope", "x")


def test_store_indexes_agree_with_a_scan_through_any_sequence_of_changes() -> None:
    """Values named by one object, by several, twice by the same one, by none: whatever was put, replaced and
    removed, `by_index` answers what a scan of the objects would."""
    def groups(o: Obj) -> list[str]:
        return o["metadata"].get("labels", {}).get("groups", "").split()

    rng = random.Random(7)
    store = Store({"group": groups})
    live: dict[str, Obj] = {}
    for version in range(2000):
        name = f"o{rng.randrange(12)}"
        old = live.get(name)
        if old is not None and rng.random() < 0.3:
            store.apply(Change("delete", old, None))
            del live[name]
        else:
            labels = {"groups": " ".join(rng.choices("abc", k=rng.randrange(4)))}  # (may repeat, may be empty)
            new = obj(name, str(version), labels=labels)
            store.apply(Change("update" if old else "add", old, new))
            live[name] = new
        for value in "abcd":
            expected = [live[n] for n in sorted(live) if value in groups(live[n])]
            assert store.by_index("group", value) == expected, (version, value)


def test_an_update_of_the_status_alone_keeps_the_indexes_without_asking_the_index_functions() -> None:
    asked: list[str] = []

    def by_app(o: Obj) -> list[str]:
        asked.append(o["metadata"]["resourceVersion"])
        return [o["metadata"].get("labels", {}).get("app", "")]

    store = Store({"app": by_app})
    first = {**obj("a", "1", labels={"app": "x"}), "status": {}}
    store.apply(Change("add", None, first))
    ready = {**copy.deepcopy(first), "status": {"ready": True}}
    ready["metadata"]["resourceVersion"] = "2"
    store.apply(Change("update", first, ready))
    assert (store.by_index("app", "x"), asked) == ([ready], ["1"])
    relabelled = copy.deepcopy(ready)
    relabelled["metadata"].update(resourceVersion="3", labels={"app": "y"})
    store.apply(Change("update", ready, relabelled))
    assert (store.by_index("app", "x"), store.by_index("app", "y"), asked) == ([], [relabelled], ["1", "3"])


def test_relist_changes_ignores_unchanged_objects() -> None:
    old = {"ns/a": obj("a", "1")}
    assert relist_changes(old, [obj("a", "1")]) == []


def test_backoff_is_capped_with_jitter() -> None:
    rng = random.Random(3)
    backoff = Backoff(initial=1, factor=2, cap=10, jitter=0.5)
    delays = [backoff.delay(n, rng) for n in range(8)]
    assert all(1 <= d <= 10 for d in delays)
    assert delays[-1] == 10
    assert Backoff(initial=1, cap=10).delay(10_000, rng) == 10


async def test_multi_namespace_informer_is_one_store_and_one_synced() -> None:
    kubes = {"n1": FakeKube(lists=deque([ListResult([obj("a", "1", ns="n1")], "5")])),
             "n2": FakeKube(lists=deque([ListResult([obj("b", "2", ns="n2")], "6")]))}  # fmt: skip

    def make(ns: str | None) -> Informer:
        assert ns is not None
        return Informer(kubes[ns], SECRET, structlog.get_logger(), namespace=ns)

    multi = informer_for_namespaces(["n1", "n2", "n1"], make)
    assert isinstance(multi, MultiNamespaceInformer)
    assert sorted(multi.informers) == ["n1", "n2"]
    rec = Recorder()
    multi.add_handler(rec)
    task = asyncio.create_task(multi.run())
    await asyncio.wait_for(multi.synced.wait(), 5)
    assert sorted(multi.store.list_keys()) == ["n1/a", "n2/b"]
    assert multi.store.get("n2/b") is not None and multi.store.get("n3/b") is None
    assert len(multi.store) == 2
    assert multi.store.by_index(OWNER_UID_INDEX, "nobody") == []
    assert sorted(rec.seen) == [("add", None, "a@1"), ("add", None, "b@2")]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(k.closed == 1 for k in kubes.values())


def test_informer_for_no_namespaces_is_cluster_wide_and_one_is_plain() -> None:
    made: list[str | None] = []

    def make(ns: str | None) -> Informer:
        made.append(ns)
        return Informer(FakeKube(), SECRET, structlog.get_logger(), namespace=ns)

    assert isinstance(informer_for_namespaces(None, make), Informer)
    assert isinstance(informer_for_namespaces(["only"], make), Informer)
    assert made == [None, "only"]


def template(image: str = "img:1", port: Any = 8080) -> dict[str, Any]:
    return {"containers": [{"name": "c", "image": image, "ports": [{"containerPort": port}],
                            "securityContext": {"allowPrivilegeEscalation": False}, "resources": {}}]}


@pytest.mark.parametrize("other", [True, 8080.0, "8080", None, 2**63, -1.5e-7, "\u00e9\U0001f600"])
def test_a_packed_object_unpacks_to_the_same_json(other: Any) -> None:
    packer = Packer()
    first = {**obj("a", "1"), "spec": template()}
    assert packer.unpack(packer.pack(first)) == first
    odd = {**obj("b", "1"), "spec": {"replicas": 1, **template(port=other)}}
    back = packer.unpack(packer.pack(odd))
    assert orjson.dumps(back) == orjson.dumps(odd), "values, their types and the server's key order are kept"


def test_objects_like_the_first_pack_small_and_each_read_is_a_new_object() -> None:
    packer = Packer()
    first = {**obj("a", "1", labels={"app": "x"}), "spec": template()}
    packer.pack(first)
    like = {**obj("b", "7", labels={"app": "x"}), "spec": template(image="img:2")}
    packed = packer.pack(like)
    assert len(packed) < len(orjson.dumps(like)) / 4
    store = Store()
    store.apply(Change("add", None, like))
    read = store.get("ns/b")
    assert read == like and read is not like and store.get("ns/b") is not read


async def test_an_update_changes_only_its_object_in_the_cache() -> None:
    a, b = {**obj("a", "1"), "spec": template()}, {**obj("b", "1"), "spec": template()}
    kube = FakeKube(lists=deque([ListResult([a, b], "5")]))
    h = await start(kube)
    await asyncio.wait_for(h.informer.synced.wait(), 5)
    cached_b = h.informer.store.get("ns/b")
    await wait_until(lambda: len(kube.streams) == 1)
    kube.stream().put_nowait(WatchEvent("MODIFIED", {**obj("a", "6"), "spec": template("img:2")}))
    await wait_until(lambda: h.informer.resource_version == "6")
    new_a, still_b = h.informer.store.get("ns/a"), h.informer.store.get("ns/b")
    assert new_a is not None and new_a["spec"] == template("img:2")
    assert still_b == cached_b and still_b is not None and still_b["spec"] == template("img:1")
    await h.stop()
