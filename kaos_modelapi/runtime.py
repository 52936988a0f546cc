"""The generic controller machinery, after controller-runtime. Knows nothing of ModelAPIs.

- `Builder` says, in one place, what wakes a reconcile: `for_` the primary resource (its own key),
  `owns` a child resource (the key of its controlling owner), `watches` any resource through a mapping
  function. Each names the `CacheSpec` its informer is made from; a resource watched twice shares one cache.
- `Controller` turns those events into keys on a `WorkQueue` and runs a `Reconciler` on them, under
  controller-runtime's contract: a `Result` may ask for a requeue after a delay; an ordinary exception
  means retry with the queue's backoff; a `TerminalError` means no retry until something wakes the key again.
- `Stores` holds the caches by resource, for mapping functions and reconcilers to read.

The `Manager` (in `operator.py`) makes the informers, wires the handlers and starts everything in order.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from .informer import DEFAULT_INDEXERS, EventKind, Handler, IndexFunc, StoreReader, Transform, drop_managed_fields
from .kube import ApiError, Obj, Resource, controller_ref, key_for, object_key
from .observability import Metrics
from .workqueue import ShutDown, WorkQueue
from .yielding import BurstYield

Log = structlog.typing.FilteringBoundLogger
SHUTDOWN_GRACE_SECONDS = 20.0


@dataclass(frozen=True)
class Result:
    """What a successful reconcile asks for: nothing, or another look after `requeue_after` seconds."""

    requeue_after: float | None = None


class TerminalError(Exception):
    """A failure that retrying cannot mend (only the user, or the object's deletion, can): the key is not
    retried. The reconciler decides this, not the code around it."""


class Reconciler(Protocol):
    async def reconcile(self, key: str) -> Result: ...


@dataclass(frozen=True)
class CacheSpec:
    """How one resource is cached: what is listed and watched, and what of each object is kept."""

    resource: Resource
    label_selector: str | None = None
    transform: Transform = drop_managed_fields
    metadata_only: bool = False
    indexers: Mapping[str, IndexFunc] = field(default_factory=lambda: DEFAULT_INDEXERS)
    # The API may be absent (a CRD not installed): the cache starts once the cluster serves it.
    optional: bool = False


class Stores:
    """The caches by resource. A resource whose API the cluster does not serve (yet) has none."""

    def __init__(self) -> None:
        self._stores: dict[Resource, StoreReader] = {}

    def get(self, resource: Resource) -> StoreReader | None:
        return self._stores.get(resource)

    def __getitem__(self, resource: Resource) -> StoreReader:
        return self._stores[resource]

    def __contains__(self, resource: object) -> bool:
        return resource in self._stores

    def objects(self, resource: Resource) -> list[Obj]:
        store = self._stores.get(resource)
        return store.list() if store is not None else []

    def add(self, resource: Resource, store: StoreReader) -> None:
        self._stores[resource] = store


def changed_beyond_version(kind: EventKind, old: Obj | None, new: Obj | None) -> bool:
    """A predicate: an update wakes only if the cached object changed in more than its resourceVersion (what
    the cache's transform keeps is what the reconcile reads; a change to the rest is a new version of the
    same projection). Not for an object whose version is itself read (a Secret's, for a config roll)."""
    if kind != "update" or old is None or new is None:
        return True
    return _without_version(old) != _without_version(new)


def users_change(kind: EventKind, old: Obj | None, new: Obj | None) -> bool:
    """A creation, or a new generation (a spec change): what a user's `kubectl apply` makes."""
    if kind == "add":
        return True
    return kind == "update" and old is not None and new is not None \
        and old["metadata"].get("generation") != new["metadata"].get("generation")


def _without_version(obj: Obj) -> Obj:
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}}


def settled(obj: Obj) -> bool:
    """The object's status says its current spec was acted on (API conventions' observedGeneration): a pass
    over everything (a start, a resync) only checks it, after the objects that still need work."""
    generation = obj["metadata"].get("generation")
    return generation is not None and (obj.get("status") or {}).get("observedGeneration") == generation


MapFunc = Callable[[Obj, Stores], Iterable[str]]
"""An object -> the keys of the primary objects it should wake (controller-runtime's MapFunc)."""


Predicate = Callable[[EventKind, Obj | None, Obj | None], bool]
"""Whether an event (kind, old, new) is worth a reconcile at all (controller-runtime's predicates)."""


@dataclass(frozen=True)
class Watch:
    cache: CacheSpec
    map: MapFunc
    predicate: Predicate | None = None


def _own_key(obj: Obj, _: Stores) -> Iterable[str]:
    return (object_key(obj),)


def owner_keys(owner: Resource) -> MapFunc:
    """Map a child to its controlling owner of type `owner` (EnqueueRequestForOwner, controller only)."""

    def map_to_owner(obj: Obj, _: Stores) -> Iterable[str]:
        ref = controller_ref(obj, owner.group, owner.kind)
        return () if ref is None else (key_for(obj["metadata"].get("namespace"), str(ref["name"])),)

    return map_to_owner


class Builder:
    """`Builder("modelapi").for_(...).owns(...).watches(..., map_fn)`: every source of reconciles."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.primary: CacheSpec | None = None
        self.sources: list[Watch] = []

    def for_(self, cache: CacheSpec, predicate: Predicate | None = None) -> Builder:
        self.primary = cache
        self.sources.append(Watch(cache, _own_key, predicate))
        return self

    def owns(self, cache: CacheSpec, predicate: Predicate | None = None) -> Builder:
        if self.primary is None:
            raise ValueError("call for_() before owns()")
        self.sources.append(Watch(cache, owner_keys(self.primary.resource), predicate))
        return self

    def watches(self, cache: CacheSpec, map_fn: MapFunc, predicate: Predicate | None = None) -> Builder:
        self.sources.append(Watch(cache, map_fn, predicate))
        return self

    def complete(self, reconciler: Reconciler, *, workers: int, resync_seconds: float, metrics: Metrics,
                 log: Log) -> Controller:
        if self.primary is None:
            raise ValueError("a controller needs for_()")
        return Controller(self.name, self.primary, tuple(self.sources), reconciler, workers=workers,
                          resync_seconds=resync_seconds, metrics=metrics, log=log)


class Controller:
    """Keys from watch events onto a work queue; `workers` reconciles at a time, never two for one key."""

    def __init__(self, name: str, primary: CacheSpec, watches: tuple[Watch, ...], reconciler: Reconciler, *,
                 workers: int, resync_seconds: float, metrics: Metrics, log: Log) -> None:
        self.name = name
        self.primary = primary
        self.watches = watches
        self.queue: WorkQueue[str] = WorkQueue(metrics=metrics)
        self._reconciler = reconciler
        self._workers = workers
        self._resync_seconds = resync_seconds
        self._metrics = metrics
        self._log = log
        self.writes_allowed = True
        # What a user creates or changes waits until they have stopped for a moment (a burst, until it has
        # passed): their requests are not kept waiting behind the operator's writes. Held keys, in order.
        self.yielding = BurstYield()
        self._held: dict[str, None] = {}
        self._held_changed = asyncio.Event()
        self._running = False
        self._turn = asyncio.Lock()  # (see _worker)
        metrics.track_unfinished_work(self.queue.unfinished_work)
        metrics.track_held(lambda: len(self._held))
        metrics.max_concurrent.labels(name).set(workers)

    def caches(self) -> Iterator[CacheSpec]:
        return (w.cache for w in self.watches)

    def handler(self, watch: Watch, stores: Stores) -> Handler:
        def enqueue(kind: EventKind, old: Obj | None, new: Obj | None) -> None:
            obj = new if new is not None else old
            if obj is None or (watch.predicate is not None and not watch.predicate(kind, old, new)):
                return
            primary = watch.cache == self.primary
            # (The initial list's adds come before run(): what exists is not a user's burst.)
            if primary and self._running and users_change(kind, old, new) and self.yielding.changed():
                self._hold(watch.map(obj, stores))
                return
            # The initial list only says what exists: a settled object, or a child, needs a look, after
            # whatever was changed while no operator ran (controller-runtime's low priority for it).
            low = not self._running and (not primary or settled(obj))
            for key in watch.map(obj, stores):
                self.queue.add(key, low_priority=low)

        return enqueue

    def _hold(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._held[key] = None
        self._held_changed.set()

    async def _release_held(self) -> None:
        """Once a hold has ended, queue what it created or changed, behind the work that came meanwhile (an
        object created before it turning Ready is told at once, not after the whole burst)."""
        while True:
            await self._held_changed.wait()
            while (wait := self.yielding.holding_for()) > 0:
                await asyncio.sleep(wait)
            self._held_changed.clear()
            held, self._held = self._held, {}
            if len(held) > 1:  # (a change made alone is not news)
                self._log.info("a burst of changes has passed: reconciling what it created or changed",
                               keys=len(held))
            for key in held:
                self.queue.add(key, low_priority=True)

    def enqueue_all(self, stores: Stores) -> None:
        """Every primary object (a start, a resync): the settled ones after any other work."""
        for obj in stores.objects(self.primary.resource):
            self.queue.add(object_key(obj), low_priority=settled(obj))

    async def run(self, stores: Stores) -> None:
        """Reconcile until cancelled. On a shutdown, in-flight reconciles finish first; after a lost
        leadership (`writes_allowed` False) they are cancelled at once, since another process may write."""
        self.enqueue_all(stores)
        self._running = True
        workers = [asyncio.create_task(self._worker()) for _ in range(self._workers)]
        background = [asyncio.create_task(self._resync(stores)), asyncio.create_task(self._release_held())]
        try:
            await asyncio.wait(workers)  # not gather: a cancellation here must not cancel the workers
        finally:
            self.queue.shutdown()
            for task in background:
                task.cancel()
            if self.writes_allowed:
                await asyncio.wait(workers, timeout=SHUTDOWN_GRACE_SECONDS)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, *background, return_exceptions=True)

    async def _resync(self, stores: Stores) -> None:
        while True:
            await asyncio.sleep(self._resync_seconds)
            self.enqueue_all(stores)

    async def _worker(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            # Reconciles start one at a time, each after a pass of the event loop. One that writes nothing never
            # suspends, nor does get() while keys are queued: without a pause, a resync of a converged set held
            # the loop for the whole pass (watch events, and so readiness, waited behind it, and /metrics and
            # /healthz timed out). With each worker pausing on its own (sleep(0)), every worker ran one such
            # reconcile per pass of the loop, and each answer a user's reconcile awaited queued behind 15 of
            # them (a new ModelAPI's first status came 0.4 s after the caches of a restart with 1000 settled
            # ModelAPIs had synced; 0.1-0.2 s with turns).
            async with self._turn:
                await asyncio.sleep(0)
            await self._process(key)

    async def _process(self, key: str) -> None:
        started = time.monotonic()
        self._metrics.reconcile_started()
        result: str | None = None  # (None: cancelled, at shutdown; counted as no result)
        terminal = False
        # Every log line of this reconcile carries its key and id, however deep it is written.
        with structlog.contextvars.bound_contextvars(**{self.name: key, "reconcile_id": uuid.uuid4().hex[:12]}):
            try:
                outcome = await self._reconciler.reconcile(key)
            except TerminalError as e:
                result, terminal = "error", True
                self._log.info("reconcile failed for good; not retrying", error=str(e))
                self.queue.forget(key)
            except Exception as e:  # one object failing must never stop the others
                result = "error"
                self._log.warning("reconcile failed; retrying with backoff", error=str(e) or type(e).__name__,
                                  retries=self.queue.num_requeues(key))
                self.queue.add_rate_limited(key, at_least=e.wait_asked() if isinstance(e, ApiError) else 0.0)
            else:
                self.queue.forget(key)
                if outcome.requeue_after is not None:
                    result = "requeue_after"
                    self.queue.add_after(key, outcome.requeue_after)
                else:
                    result = "success"
            finally:
                self.queue.done(key)
                seconds = time.monotonic() - started
                self._metrics.reconcile_ended(result, seconds, terminal=terminal)
                self._log.debug("reconciled", result=result, seconds=round(seconds, 4))
