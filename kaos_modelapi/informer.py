"""Informers: list+watch one resource into a local Store and tell handlers what changed, in order.

Modelled on client-go's tools/cache (Reflector + Store/Indexer + shared-informer handlers), but on
one asyncio task: the reflector applies each change to the store and then calls the handlers
synchronously, so a handler always sees the store already holding what it is told about, and
changes to one object reach every handler in the order the server made them.

Resilience, as in the Reflector:

* list, then watch from the list's resourceVersion with bookmarks on;
* when a watch ends (server timeout) or breaks (connection lost, error event), watch again from
  the last resourceVersion seen (events and bookmarks both advance it) -- no relist, nothing missed;
* when the server says that resourceVersion is gone (410), list again and emit the difference
  against the store (adds, updates, and deletes for whatever vanished meanwhile), so no delete is lost;
* capped, jittered exponential backoff on failures; ``run()`` is cancel-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import is_
from typing import Any, Literal, Protocol

import orjson
from structlog.typing import FilteringBoundLogger

from kaos_modelapi.kube import (
    ApiError,
    Gone,
    ListResult,
    Obj,
    Resource,
    WatchEvent,
    WatchEventType,
    error_from_status,
    object_key,
)

EventKind = Literal["add", "update", "delete"]
Handler = Callable[[EventKind, Obj | None, Obj | None], None]
"""(kind, old, new): add has old=None; delete has new=None and old = the object's last state."""
Transform = Callable[[Obj], Obj]
IndexFunc = Callable[[Obj], Iterable[str]]
"""An object's values in a secondary index. It reads no status and no resourceVersion: an update that changes
only those keeps the object where it was indexed (`unchanged`)."""

ObjList = list[Obj]
KeyList = list[str]

OWNER_UID_INDEX = "owner-uid"


# -- pure helpers -----------------------------------------------------------------------------------


def _uid(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("uid")


def _rv(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def drop_managed_fields(obj: Obj) -> Obj:
    """managedFields is often the bulk of an object and we never read it from the cache."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def chain(*transforms: Transform) -> Transform:
    def apply(obj: Obj) -> Obj:
        for transform in transforms:
            obj = transform(obj)
        return obj

    return apply


def owner_uids(obj: Obj) -> KeyList:
    """Index function: children -> the UIDs of their owners (e.g. the owning ModelAPI)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return [str(ref["uid"]) for ref in refs if ref.get("uid")]


def label_index(label: str) -> IndexFunc:
    """Index function on one label's value."""

    def index(obj: Obj) -> KeyList:
        value = ((obj.get("metadata") or {}).get("labels") or {}).get(label)
        return [] if value is None else [str(value)]

    return index


def matches_labels(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class Interner:
    """Shares equal parts of cached objects (hash-consing), so N similar objects cost little more than one.

    The cached children of N ModelAPIs differ in a few names, UIDs and timestamps; the rest (a pod template's
    containers, probes and scripts, the owner references all children of one ModelAPI carry, conditions,
    server defaults) is the same, value for value, in many objects. Each dict, list, string and integer of an
    object put in a cache is replaced by an equal one already held, if any: strings by `sys.intern`, integers
    by a table of their own, dicts and lists by a table keyed by a hash of their parts (parts first, so equal
    parents have identical parts). Every part of a dict or list is then one of a kind for its value (but a
    float, compared by identity and so rarely shared), so the hash and the check for a hash collision (the
    same keys in the same order, identical values) both go by identity alone, in C: a start interns every
    object of its initial lists before the first reconcile. Sound because cached objects are read-only
    (`StoreReader`); values stay plain dicts and lists, so every reader and the diff see exactly what the
    server sent. Table entries nothing else holds any more are dropped whenever the table has grown by a
    quarter since the last sweep."""

    def __init__(self, min_sweep: int = 2048) -> None:
        self._table: dict[int, Any] = {}
        self._ints: dict[int, int] = {}  # (an int's type is exact here: a bool is never one of them)
        self._min_sweep = min_sweep
        self._sweep_at = min_sweep

    def __len__(self) -> int:
        return len(self._table)

    def __call__(self, obj: Obj, previous: Obj | None = None) -> Obj:
        """`obj`, its parts replaced in place by shared equal ones (the object itself is not shared). A part
        equal to the same part of `previous` (the cached version it replaces, or another cached object of its
        resource) is taken from there, compared as a whole in C, and a part that differs is walked beside the
        same part of `previous`: an update of a status costs only the status, and a new Deployment like the
        last one costs only its names. (Equal here is `==` and the same JSON: `==` alone takes 1, 1.0 and true
        for one another, which the diff tells apart.)"""
        if previous is None:
            previous = {}
        for key, value in obj.items():
            if key == "metadata" and type(value) is dict:
                like = previous.get(key)  # (its name, UID and resourceVersion make it one of a kind)
                self._share_parts(value, like if type(like) is dict else None)
            else:
                shared = self._share(value, previous.get(key))
                if shared is not value:
                    obj[key] = shared
        if len(self._table) >= self._sweep_at:
            self.sweep()
        return obj

    def _share(self, value: Any, like: Any = None) -> Any:
        kind = type(value)
        if like is not None and type(like) is kind and like == value and (
                kind is str or kind is int or orjson.dumps(like) == orjson.dumps(value)):
            return like  # (== takes 1, 1.0 and true for one another; their JSON does not)
        if kind is str:
            return sys.intern(value)
        if kind is dict:
            return self._share_dict(value, like if type(like) is dict else None)
        if kind is list:
            return self._share_list(value, like if type(like) is list else None)
        if kind is int:
            return self._ints.setdefault(value, value)
        return value  # None, True and False are one of a kind already; a float is kept as it is

    def _share_dict(self, value: dict[str, Any], like: dict[str, Any] | None = None) -> Any:
        self._share_parts(value, like)
        held = self._table.setdefault(hash((0, *value, *map(id, value.values()))), value)
        if held is value or (type(held) is dict and len(held) == len(value) and list(held) == list(value)
                             and all(map(is_, held.values(), value.values()))):
            return held
        return value  # (a hash collision: not shared)

    def _share_parts(self, value: dict[str, Any], like: dict[str, Any] | None = None) -> None:
        shared: Any
        if like is not None:
            for key, item in value.items():
                shared = self._share(item, like.get(key))
                if shared is not item:
                    value[key] = shared
            return
        # (`_share` written out: this loop runs for every dict of every object the caches take in)
        ints = self._ints
        for key, item in value.items():
            kind = type(item)
            if kind is str:
                shared = sys.intern(item)
            elif kind is dict:
                shared = self._share_dict(item)
            elif kind is list:
                shared = self._share_list(item)
            elif kind is int:
                shared = ints.setdefault(item, item)
            else:
                continue
            if shared is not item:
                value[key] = shared  # (replacing a value while iterating is allowed: the keys do not change)

    def _share_list(self, value: list[Any], like: list[Any] | None = None) -> Any:
        n = 0 if like is None else len(like)
        for i, item in enumerate(value):
            shared = self._share(item, like[i] if i < n else None)  # type: ignore[index]
            if shared is not item:
                value[i] = shared
        held = self._table.setdefault(hash((1, *map(id, value))), value)
        if held is value or (type(held) is list and len(held) == len(value) and all(map(is_, held, value))):
            return held
        return value  # (a hash collision: not shared)

    def sweep(self) -> None:
        """Drop the entries only the table holds. Newest first: an entry was put after its parts, so a dropped
        parent releases its parts before they are looked at."""
        table = self._table
        for digest in reversed(list(table)):
            if sys.getrefcount(table[digest]) <= 2:  # the table's reference and the argument's
                del table[digest]
        ints = self._ints
        # An int's references: the table's key and value, the list's, the loop's and the argument's.
        for number in [n for n in ints if sys.getrefcount(n) <= _INT_ONLY_IN_TABLE]:
            del ints[number]
        # Dead entries hold whole parts: sweep again once a quarter more has been added (amortized O(1) a part).
        self._sweep_at = len(table) + max(self._min_sweep, len(table) // 4)


_INT_ONLY_IN_TABLE = 4  # what sys.getrefcount says of an int in the sweep's comprehension that nothing else holds


@dataclass(frozen=True)
class Change:
    kind: EventKind
    old: Obj | None
    new: Obj | None


def relist_changes(old: Mapping[str, Obj], items: Iterable[Obj]) -> list[Change]:
    """What a fresh list means against what we had: adds and updates in list order, then
    deletes for what vanished. A same-named object with a new UID is a delete plus an add, so
    nobody mistakes a replacement for the object they owned."""
    changes: list[Change] = []
    seen: set[str] = set()
    for new in items:
        key = object_key(new)
        seen.add(key)
        changes.extend(_upsert_changes(old.get(key), new, only_if_changed=True))
    changes.extend(Change("delete", obj, None) for key, obj in old.items() if key not in seen)
    return changes


def watch_changes(old: Obj | None, event_type: WatchEventType, obj: Obj) -> list[Change]:
    if event_type == "DELETED":
        return [Change("delete", obj, None)]
    if event_type in ("ADDED", "MODIFIED"):
        return _upsert_changes(old, obj, only_if_changed=False)
    raise ValueError(f"not an object event: {event_type}")


def _upsert_changes(old: Obj | None, new: Obj, only_if_changed: bool) -> list[Change]:
    if old is None:
        return [Change("add", None, new)]
    if _uid(old) != _uid(new):
        return [Change("delete", old, None), Change("add", None, new)]
    if only_if_changed and _rv(old) == _rv(new):
        return []
    return [Change("update", old, new)]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter (client-go's wait.Backoff, roughly)."""

    initial: float = 0.8
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return min(self.cap, base * (1.0 + self.jitter * rng.random()))


# -- store ------------------------------------------------------------------------------------------


class StoreReader(Protocol):
    """Read side of a cache. Objects are shared with every reader: treat them as read-only."""

    def get(self, key: str) -> Obj | None: ...

    def list(self) -> ObjList: ...

    def list_keys(self) -> KeyList: ...

    def by_index(self, index: str, value: str) -> ObjList: ...

    def select(self, labels: Mapping[str, str], namespace: str | None = None) -> ObjList: ...

    def __len__(self) -> int: ...


def unchanged(old: Obj, new: Obj) -> bool:
    """Whether a cached object says what it said before, but for its status and resourceVersion. Parts are
    compared by identity: sound because cached objects are read-only, and what an update left as it was is
    the very object it was (Interner: a status update costs only the status). Equal but not the same (a
    relist without an Interner, a test's new object) reads as changed."""
    if old is new:
        return True
    if old.keys() != new.keys() or old["metadata"].keys() != new["metadata"].keys():
        return False
    return (all(v is new[k] for k, v in old.items() if k != "status" and k != "metadata")
            and all(v is new["metadata"][k] for k, v in old["metadata"].items() if k != "resourceVersion"))


class Store:
    """Objects keyed by "namespace/name" (or "name" when cluster-scoped), with secondary indexes."""

    def __init__(self, indexers: Mapping[str, IndexFunc] | None = None) -> None:
        self._objects: dict[str, Obj] = {}
        self._indexers = dict(indexers or {})
        # index -> value -> the keys of the objects it gave that value: one key as itself (most values, an
        # owner's UID, name one object), several as a set. A set for every value was a third of what a cached
        # child cost beyond the object itself (about 2 KiB per ModelAPI at N=1000).
        self._indices: dict[str, dict[str, str | set[str]]] = {name: {} for name in self._indexers}
        # key -> the values each index function gave when the object was put (none kept for an object that
        # got none): removing or replacing it need not run them again (one, the ModelAPI's Secret references,
        # validates the whole object).
        self._indexed: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}

    def get(self, key: str) -> Obj | None:
        return self._objects.get(key)

    def list(self) -> ObjList:
        return list(self._objects.values())

    def list_keys(self) -> KeyList:
        return list(self._objects)

    def by_index(self, index: str, value: str) -> ObjList:
        if index not in self._indices:
            raise KeyError(f"no index {index!r}; have {sorted(self._indices)}")
        keys = self._indices[index].get(value)
        if keys is None:
            return []
        return [self._objects[keys]] if isinstance(keys, str) else [self._objects[key] for key in sorted(keys)]

    def select(self, labels: Mapping[str, str], namespace: str | None = None) -> ObjList:
        return [
            obj
            for obj in self._objects.values()
            if matches_labels(obj, labels)
            and (namespace is None or (obj.get("metadata") or {}).get("namespace") == namespace)
        ]

    def __len__(self) -> int:
        return len(self._objects)

    def snapshot(self) -> dict[str, Obj]:
        return dict(self._objects)

    def apply(self, change: Change) -> None:
        if change.new is not None:
            self._put(change.new)
        elif change.old is not None:
            self._remove(object_key(change.old))

    def _put(self, obj: Obj) -> None:
        key = object_key(obj)
        old = self._objects.get(key)
        self._objects[key] = obj
        if old is not None and unchanged(old, obj):
            return  # (a status moved: most updates of pods and Deployments, every status a ModelAPI is written)
        self._unindex(key)
        indexed = tuple((name, values) for name, index_func in self._indexers.items()
                        if (values := tuple(index_func(obj))))
        for name, values in indexed:
            index = self._indices[name]
            for value in values:
                keys = index.setdefault(value, key)
                if isinstance(keys, set):
                    keys.add(key)
                elif keys != key:
                    index[value] = {keys, key}
        if indexed:
            self._indexed[key] = indexed

    def _remove(self, key: str) -> None:
        self._unindex(key)
        self._objects.pop(key, None)

    def _unindex(self, key: str) -> None:
        for name, values in self._indexed.pop(key, ()):
            index = self._indices[name]
            for value in values:
                keys = index.get(value)
                if keys == key:
                    del index[value]
                elif isinstance(keys, set):
                    keys.discard(key)
                    if len(keys) == 1:
                        index[value] = keys.pop()


# -- informer ---------------------------------------------------------------------------------------


class ListWatcher(Protocol):
    """The part of KubeClient an informer needs (a seam for tests and wrappers)."""

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        page_size: int = 500,
    ) -> ListResult: ...

    def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        timeout_seconds: int | None = None,
        initial_events: bool = False,
    ) -> AsyncGenerator[WatchEvent, None]: ...


class InformerLike(Protocol):
    @property
    def store(self) -> StoreReader: ...

    @property
    def synced(self) -> asyncio.Event: ...

    def add_handler(self, handler: Handler) -> None: ...

    async def run(self) -> None: ...


DEFAULT_INDEXERS: Mapping[str, IndexFunc] = {OWNER_UID_INDEX: owner_uids}
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


class Informer:
    """List+watch one resource (optionally one namespace / label selector / metadata only)."""

    def __init__(
        self,
        kube: ListWatcher,
        resource: Resource,
        logger: FilteringBoundLogger,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        transform: Transform = drop_managed_fields,
        indexers: Mapping[str, IndexFunc] = DEFAULT_INDEXERS,
        interner: Interner | None = None,
        watch_timeout: tuple[int, int] = (300, 600),
        watch_list: bool = False,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._kube = kube
        self._resource = resource
        self._namespace = namespace
        self._label_selector = label_selector
        self._metadata_only = metadata_only
        self._transform = transform
        self._interner = interner
        # The object last put in the cache: a new object (none cached under its key) takes the parts equal to
        # its parts from there, since one resource's objects differ in few of them (see Interner).
        self._last: Obj | None = None
        self._watch_timeout = watch_timeout
        # List by a streaming watch (sendInitialEvents) when the server allows it: objects arrive and are
        # transformed one at a time instead of in pages of 500 full objects (the peak memory of a start),
        # in one request whatever their number. None once the server refused it: plain lists from then on.
        self._watch_list: bool | None = watch_list
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._store = Store(indexers)
        self._synced = asyncio.Event()
        self._handlers: list[Handler] = []
        self._resource_version = ""
        self._log = logger.bind(
            resource=resource.plural, group=resource.group, namespace=namespace or "*",
            selector=label_selector, metadata_only=metadata_only,
        )  # fmt: skip
        self.lists = 0
        """How many lists have completed (1 + relists); for tests and debugging."""
        self.watches = 0
        """How many watch requests have been started."""
        self.bookmarks = 0
        self._events_seen = 0

    @property
    def store(self) -> Store:
        return self._store

    @property
    def synced(self) -> asyncio.Event:
        """Set once the first list is in the store (and handlers have been told about it)."""
        return self._synced

    @property
    def resource_version(self) -> str:
        """The last resourceVersion seen, from a list, an event or a bookmark."""
        return self._resource_version

    def add_handler(self, handler: Handler) -> None:
        """Register a handler; it is first told about everything already in the store, as adds.

        Handlers run on the informer's task: they must be quick and must not block (typically
        they enqueue a key). An exception in a handler is logged and does not stop the informer."""
        self._handlers.append(handler)
        for obj in self._store.list():
            self._call(handler, Change("add", None, obj))

    async def run(self) -> None:
        """List and watch until cancelled."""
        self._log.info("informer starting")
        try:
            reason = "initial"
            while True:
                await self._list(reason)
                await self._watch_until_expired()
                reason = "resourceVersion expired"
        finally:
            self._log.info("informer stopped", resource_version=self._resource_version)

    async def _list(self, reason: str) -> None:
        attempt = 0
        while True:
            try:
                items, resource_version = await (self._stream_list() if self._watch_list else self._page_list())
                break
            except ApiError as err:
                if self._watch_list and err.status in (400, 422):  # a server without WatchList
                    self._log.info("streaming lists refused; listing", error=str(err))
                    self._watch_list = None
                    continue
                delay = max(self._backoff.delay(attempt, self._rng), err.wait_asked())
                attempt += 1
                self._log.warning("list failed", error=str(err), status=err.status, retry_in=round(delay, 3))
                await self._sleep(delay)
        self.lists += 1
        changes = relist_changes(self._store.snapshot(), items)
        self._resource_version = resource_version
        self._log.info(
            "listed", reason=reason, objects=len(items), changes=len(changes),
            resource_version=resource_version, streamed=bool(self._watch_list),
        )  # fmt: skip
        self._dispatch(changes)
        self._synced.set()

    async def _page_list(self) -> tuple[list[Obj], str]:
        result = await self._kube.list(self._resource, self._namespace, self._label_selector, self._metadata_only)
        return [self._cached(item) for item in result.items], result.resource_version

    async def _stream_list(self) -> tuple[list[Obj], str]:
        """Everything there is, by a watch that sends it first; the stream is closed at the bookmark that
        ends the initial events, and the ordinary watch resumes from its resourceVersion."""
        self.watches += 1
        stream = self._kube.watch(
            self._resource, self._namespace, label_selector=self._label_selector,
            metadata_only=self._metadata_only, timeout_seconds=self._rng.randint(*self._watch_timeout),
            initial_events=True,
        )  # fmt: skip
        objects: dict[str, Obj] = {}
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if event.type == "ERROR":
                    raise error_from_status(int(event.object.get("code") or 500), event.object)
                if event.type == "BOOKMARK":
                    annotations = event.object.get("metadata", {}).get("annotations") or {}
                    if annotations.get(INITIAL_EVENTS_END) == "true":
                        return list(objects.values()), event.resource_version or ""
                    continue
                obj = self._cached(event.object)
                if event.type == "DELETED":
                    objects.pop(object_key(obj), None)
                else:
                    objects[object_key(obj)] = obj
        raise ApiError(0, "StreamEnded", "the streaming list ended before its initial events did")

    async def _watch_until_expired(self) -> None:
        attempt = 0
        while True:
            seen_before = self._events_seen
            try:
                await self._watch_once()
                if self._events_seen == seen_before:
                    # An empty, clean end is odd (a proxy cutting idle streams?); do not spin.
                    await self._sleep(self._backoff.delay(0, self._rng))
                attempt = 0
            except Gone as err:
                self._log.info("watch expired; relisting", resource_version=self._resource_version, message=err.message)
                return
            except ApiError as err:
                if self._events_seen != seen_before:
                    attempt = 0
                delay = max(self._backoff.delay(attempt, self._rng), err.wait_asked())
                attempt += 1
                self._log.warning(
                    "watch broke; resuming", error=str(err), status=err.status,
                    resource_version=self._resource_version, retry_in=round(delay, 3),
                )  # fmt: skip
                await self._sleep(delay)

    async def _watch_once(self) -> None:
        self.watches += 1
        timeout = self._rng.randint(*self._watch_timeout)
        stream = self._kube.watch(
            self._resource,
            self._namespace,
            resource_version=self._resource_version,
            label_selector=self._label_selector,
            metadata_only=self._metadata_only,
            timeout_seconds=timeout,
        )
        # aclosing: if we are cancelled mid-stream the connection is closed now, not at GC time.
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                self._events_seen += 1
                self._handle(event)

    def _handle(self, event: WatchEvent) -> None:
        if event.type == "ERROR":
            raise error_from_status(int(event.object.get("code") or 500), event.object)
        if event.type == "BOOKMARK":
            self.bookmarks += 1
            if event.resource_version:
                self._resource_version = event.resource_version
            return
        obj = self._transform(event.object)
        old = self._store.get(object_key(obj))
        if event.type != "DELETED" and self._interner is not None:  # (a deleted object is not kept)
            obj = self._last = self._interner(obj, old or self._last)
        changes = watch_changes(old, event.type, obj)
        if event.resource_version:
            self._resource_version = event.resource_version
        self._dispatch(changes)

    def _cached(self, obj: Obj) -> Obj:
        """An object as the store keeps it: transformed, then its parts shared with the other cached objects."""
        obj = self._transform(obj)
        if self._interner is None:
            return obj
        self._last = self._interner(obj, self._store.get(object_key(obj)) or self._last)
        return self._last

    def _dispatch(self, changes: Sequence[Change]) -> None:
        for change in changes:
            self._store.apply(change)
            for handler in list(self._handlers):
                self._call(handler, change)

    def _call(self, handler: Handler, change: Change) -> None:
        try:
            handler(change.kind, change.old, change.new)
        except Exception:
            obj = change.new if change.new is not None else change.old
            self._log.exception("event handler failed", change=change.kind, key=object_key(obj or {}))


# -- several namespaces -----------------------------------------------------------------------------


class CompositeStore:
    """One StoreReader over per-namespace stores."""

    def __init__(self, stores: Mapping[str, StoreReader]) -> None:
        self._stores = dict(stores)

    def get(self, key: str) -> Obj | None:
        namespace, _, _ = key.partition("/")
        store = self._stores.get(namespace)
        return None if store is None else store.get(key)

    def list(self) -> ObjList:
        return [obj for store in self._stores.values() for obj in store.list()]

    def list_keys(self) -> KeyList:
        return [key for store in self._stores.values() for key in store.list_keys()]

    def by_index(self, index: str, value: str) -> ObjList:
        return [obj for store in self._stores.values() for obj in store.by_index(index, value)]

    def select(self, labels: Mapping[str, str], namespace: str | None = None) -> ObjList:
        stores = self._stores.values() if namespace is None else [self._stores.get(namespace)]
        return [obj for store in stores if store is not None for obj in store.select(labels, namespace)]

    def __len__(self) -> int:
        return sum(len(store) for store in self._stores.values())


class MultiNamespaceInformer:
    """Several namespaced informers behind one InformerLike."""

    def __init__(self, informers: Mapping[str, Informer]) -> None:
        if not informers:
            raise ValueError("need at least one namespace")
        self._informers = dict(informers)
        self._store = CompositeStore({ns: inf.store for ns, inf in self._informers.items()})
        self._synced = asyncio.Event()

    @property
    def store(self) -> CompositeStore:
        return self._store

    @property
    def synced(self) -> asyncio.Event:
        return self._synced

    @property
    def informers(self) -> Mapping[str, Informer]:
        return self._informers

    def add_handler(self, handler: Handler) -> None:
        for informer in self._informers.values():
            informer.add_handler(handler)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for informer in self._informers.values():
                group.create_task(informer.run())
            await asyncio.gather(*(informer.synced.wait() for informer in self._informers.values()))
            self._synced.set()


def informer_for_namespaces(
    namespaces: Sequence[str] | None, make: Callable[[str | None], Informer]
) -> Informer | MultiNamespaceInformer:
    """One informer per namespace, or a single cluster-wide one when ``namespaces`` is empty/None.

    ``make(namespace)`` builds each, e.g.
    ``lambda ns: Informer(kube, SECRET, log, namespace=ns, metadata_only=True)``."""
    unique = list(dict.fromkeys(namespaces or []))
    if not unique:
        return make(None)
    if len(unique) == 1:
        return make(unique[0])
    return MultiNamespaceInformer({ns: make(ns) for ns in unique})
