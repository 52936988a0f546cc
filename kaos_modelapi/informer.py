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
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
only those keeps the object where it was indexed (its `stamp` is the same)."""

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


Stamp = bytes
"""What an object says but for its status and resourceVersion (see `stamp`)."""
_DIGEST_SIZE = 8


def stamp(obj: Obj) -> Stamp:
    """Two digests: of the object but for its status, resourceVersion and annotations, then of its annotations.
    Objects with equal stamps say the same but for those; the first half alone (`same_but_annotations`)
    leaves the annotations out too. Kept by the reconciler in place of what it saw, for a few dozen bytes."""
    meta = obj.get("metadata") or {}
    body = {k: v for k, v in obj.items() if k != "status" and k != "metadata"}
    body["metadata"] = {k: v for k, v in meta.items() if k != "resourceVersion" and k != "annotations"}
    return _digest(body) + _digest(meta.get("annotations"))


def same_but_annotations(old: Stamp, new: Stamp) -> bool:
    return old[:_DIGEST_SIZE] == new[:_DIGEST_SIZE]


def _digest(value: Any) -> bytes:
    # Python's own hash of the JSON (SipHash, keyed afresh by each process unless PYTHONHASHSEED is set):
    # 64 bits tell two versions of an object apart for certain enough, at a fifth of a cryptographic digest's
    # cost (1 against 5 us for a Deployment, at every watch event). Never kept beyond the process.
    return hash(orjson.dumps(value)).to_bytes(_DIGEST_SIZE, "little", signed=True)


class Packer:
    """Keeps cached objects small: each as its JSON, deflated with the first object packed as the dictionary.

    One resource's objects differ in a few names, UIDs and times; the rest (a pod template's containers,
    probes and scripts, owner references, conditions, server defaults) is the same, so against another object
    of its kind a 6 KB Deployment deflates to 100-300 bytes: a tenth of what it cost as dicts and strings,
    even with their equal parts shared. Unpacking (10 us for a Deployment) gives a new object each time: a
    reader may keep or change it. Exact: JSON in, the same JSON out (1, 1.0 and true stay apart)."""

    def __init__(self) -> None:
        self._dictionary = b""
        self._deflate: Any = None  # (zlib's Compress type is not public) primed with the dictionary, copied

    def pack(self, obj: Obj) -> bytes:
        data = orjson.dumps(obj)
        if self._deflate is None:
            self._dictionary = data
            self._deflate = zlib.compressobj(_LEVEL, zlib.DEFLATED, -_WINDOW_BITS, _MEMORY_LEVEL,
                                             zlib.Z_DEFAULT_STRATEGY, data)
        deflate = self._deflate.copy()  # (a copy skips hashing the dictionary again: half the time)
        packed: bytes = deflate.compress(data) + deflate.flush()
        return packed

    def unpack(self, packed: bytes) -> Obj:
        obj: Obj = orjson.loads(zlib.decompressobj(-_WINDOW_BITS, self._dictionary).decompress(packed))
        return obj


# Measured on the bench's objects: level 3 packs as small as 6 does, and a smaller hash table (memory level 4,
# 32 KiB: the default's is 256 KiB) sets up in a fraction of the time; raw deflate (negative window bits)
# leaves out a header and checksum nothing needs in memory.
_LEVEL = 3
_MEMORY_LEVEL = 4
_WINDOW_BITS = 15


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
    """Read side of a cache. Each object read is a new one: the reader may keep it or change it."""

    def get(self, key: str) -> Obj | None: ...

    def list(self) -> ObjList: ...

    def list_keys(self) -> KeyList: ...

    def by_index(self, index: str, value: str) -> ObjList: ...

    def keys_by_index(self, index: str, value: str) -> KeyList: ...

    def stamp(self, key: str) -> Stamp | None: ...

    def __len__(self) -> int: ...


class Store:
    """Objects keyed by "namespace/name" (or "name" when cluster-scoped), with secondary indexes; each kept
    packed (`Packer`) with its `stamp`."""

    def __init__(self, indexers: Mapping[str, IndexFunc] | None = None) -> None:
        self._packer = Packer()
        # (A tuple of bytes: the cycle collector stops tracking it, as it does every cached entry's.)
        self._entries: dict[str, tuple[bytes, Stamp]] = {}
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
        entry = self._entries.get(key)
        return None if entry is None else self._packer.unpack(entry[0])

    def list(self) -> ObjList:
        return [self._packer.unpack(packed) for packed, _ in self._entries.values()]

    def list_keys(self) -> KeyList:
        return list(self._entries)

    def by_index(self, index: str, value: str) -> ObjList:
        unpack, entries = self._packer.unpack, self._entries
        return [unpack(entries[key][0]) for key in self.keys_by_index(index, value)]

    def keys_by_index(self, index: str, value: str) -> KeyList:
        if index not in self._indices:
            raise KeyError(f"no index {index!r}; have {sorted(self._indices)}")
        keys = self._indices[index].get(value)
        if keys is None:
            return []
        return [keys] if isinstance(keys, str) else sorted(keys)

    def stamp(self, key: str) -> Stamp | None:
        """The `stamp` of the object under `key`, without unpacking it."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> dict[str, Obj]:
        return {key: self._packer.unpack(packed) for key, (packed, _) in self._entries.items()}

    def apply(self, change: Change) -> None:
        if change.new is not None:
            self._put(change.new)
        elif change.old is not None:
            self._remove(object_key(change.old))

    def _put(self, obj: Obj) -> None:
        key, mark = object_key(obj), stamp(obj)
        old = self._entries.get(key)
        self._entries[key] = (self._packer.pack(obj), mark)
        if old is not None and old[1] == mark:
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
        self._entries.pop(key, None)

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
        return [self._transform(item) for item in result.items], result.resource_version

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
                obj = self._transform(event.object)
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
        changes = watch_changes(old, event.type, obj)
        if event.resource_version:
            self._resource_version = event.resource_version
        self._dispatch(changes)


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

    def keys_by_index(self, index: str, value: str) -> KeyList:
        return [key for store in self._stores.values() for key in store.keys_by_index(index, value)]

    def stamp(self, key: str) -> Stamp | None:
        namespace, _, _ = key.partition("/")
        store = self._stores.get(namespace)
        return None if store is None else store.stamp(key)

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
