"""`kaos-modelapi run`: the operator process. Wires caches, queue, workers, leader election, health and
metrics together, and shuts them down in order on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from . import __version__, kube
from .cli import InputError, settings_from_args
from .controller import (
    CHILD_RESOURCES,
    SECRET_REF_INDEX,
    Caches,
    Reconciler,
    owner_key,
    pod_owner_key,
    secret_refs,
)
from .events import Recorder
from .informer import (
    DEFAULT_INDEXERS,
    EventKind,
    IndexFunc,
    Informer,
    MultiNamespaceInformer,
    StoreReader,
    informer_for_namespaces,
)
from .kube import ApiError, KubeClient, Obj, Resource, load_api_client
from .leader import LeaderElector, LeaseTiming
from .observability import Metrics, configure_logging, health_app, metrics_app, serve
from .settings import Settings
from .workqueue import ShutDown, WorkQueue

POD = Resource("", "v1", "pods", "Pod")
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=kaos-modelapi"
SHUTDOWN_GRACE_SECONDS = 20.0
ROUTE_API_RECHECK_SECONDS = 30.0
AnyInformer = Informer | MultiNamespaceInformer
Log = structlog.typing.FilteringBoundLogger


@dataclass(frozen=True)
class Options:
    kubeconfig: str | None
    namespaces: tuple[str, ...]
    settings: Settings
    workers: int
    resync_seconds: float
    metrics_address: str
    health_address: str
    leader_elect: bool
    leader_election_id: str
    leader_election_namespace: str
    lease: LeaseTiming


def options_from_args(args: argparse.Namespace) -> Options:
    try:
        lease = LeaseTiming(args.leader_elect_lease_duration, args.leader_elect_renew_deadline,
                            args.leader_elect_retry_period)
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.workers < 1:
        raise InputError("--workers must be at least 1")
    return Options(
        kubeconfig=args.kubeconfig,
        namespaces=tuple(ns.strip() for ns in args.namespaces.split(",") if ns.strip()),
        settings=settings_from_args(args),
        workers=args.workers,
        resync_seconds=args.resync_period,
        metrics_address=args.metrics_bind_address,
        health_address=args.health_probe_bind_address,
        leader_elect=args.leader_elect,
        leader_election_id=args.leader_election_id,
        leader_election_namespace=args.leader_election_namespace,
        lease=lease,
    )


def run_command(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    log = configure_logging(args.log_level, args.log_format)
    return asyncio.run(run(options, log))


# --- cache transforms: keep only what the reconciler reads -----------------------------------------------


def _strip_managed(obj: Obj) -> Obj:
    obj["metadata"].pop("managedFields", None)
    return obj


def _secret_identity(obj: Obj) -> Obj:
    """Keep a Secret's identity only. Even metadata can carry data (kubectl's last-applied annotation), so
    only the operator's own annotations are kept."""
    meta = obj["metadata"]
    keep = ("name", "namespace", "uid", "resourceVersion", "labels", "ownerReferences", "deletionTimestamp")
    identity = {k: meta[k] for k in keep if k in meta}
    ours = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("kaos.tools/")}
    if ours:
        identity["annotations"] = ours
    return {"apiVersion": "v1", "kind": "Secret", "metadata": identity}


def _pod_status_only(obj: Obj) -> Obj:
    meta = obj["metadata"]
    keep = ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {k: meta[k] for k in keep if k in meta},
            "status": obj.get("status") or {}}


def _namespace_terminating(error: Exception) -> bool:
    return isinstance(error, ApiError) and error.is_forbidden() and "being terminated" in error.message


# --- the operator ---------------------------------------------------------------------------------------


class Operator:
    def __init__(self, options: Options, client: KubeClient, metrics: Metrics, log: Log) -> None:
        self.options = options
        self.client = client
        self.metrics = metrics
        self.log = log
        self.queue: WorkQueue[str] = WorkQueue(metrics=metrics)
        self.informers: dict[str, AnyInformer] = {}
        self._informer_tasks: list[asyncio.Task[None]] = []
        secrets: StoreReader = self._informer("secrets", kube.SECRET, None, _secret_identity,
                                              metadata_only=True).store
        children: dict[Resource, StoreReader] = {
            r: self._informer(r.plural, r, MANAGED_SELECTOR, _strip_managed).store
            for r in CHILD_RESOURCES if r not in (kube.HTTPROUTE, kube.SECRET)
        }
        # One Secret cache, metadata only: it answers both "does the referenced Secret exist" and "is our
        # generated key Secret there", and never holds Secret data.
        children[kube.SECRET] = secrets
        self.caches = Caches(
            modelapis=self._informer("modelapis", kube.MODELAPI, None, _strip_managed,
                                     indexers={SECRET_REF_INDEX: secret_refs}).store,
            children=children,
            secrets=secrets,
            pods=self._informer("pods", POD, MANAGED_SELECTOR, _pod_status_only).store,
        )
        self._wire_handlers()
        identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.recorder = Recorder(client, identity, log)
        self.reconciler = Reconciler(client, self.caches, options.settings, self.recorder, log)
        self.identity = identity
        self.writes_allowed = True
        metrics.count_modelapis(self.caches.modelapis.list)
        metrics.max_concurrent.labels("modelapi").set(options.workers)

    def _informer(self, name: str, resource: Resource, selector: str | None,
                  transform: Callable[[Obj], Obj], metadata_only: bool = False,
                  indexers: Mapping[str, IndexFunc] = DEFAULT_INDEXERS) -> AnyInformer:
        def make(namespace: str | None) -> Informer:
            return Informer(self.client, resource, self.log, namespace=namespace, label_selector=selector,
                            metadata_only=metadata_only, transform=transform, indexers=indexers)

        informer = informer_for_namespaces(self.options.namespaces, make)
        self.informers[name] = informer
        return informer

    def _enqueue_via(self, key_of: Callable[[Obj], str | None]) -> Callable[[EventKind, Obj | None, Obj | None], None]:
        def handler(kind: EventKind, old: Obj | None, new: Obj | None) -> None:
            obj = new if new is not None else old
            key = key_of(obj) if obj is not None else None
            if key is not None:
                self.queue.add(key)
        return handler

    def _on_secret(self, kind: EventKind, old: Obj | None, new: Obj | None) -> None:
        obj = new if new is not None else old
        if obj is None:
            return
        if (key := owner_key(obj)) is not None:
            self.queue.add(key)
        # Existence matters to every ModelAPI that references it, and the version to one mounting its config.
        meta = obj["metadata"]
        for modelapi in self.caches.modelapis.by_index(SECRET_REF_INDEX, f"{meta['namespace']}/{meta['name']}"):
            self.queue.add(f"{meta['namespace']}/{modelapi['metadata']['name']}")

    def _wire_handlers(self) -> None:
        def modelapi_key(o: Obj) -> str:
            return f"{o['metadata']['namespace']}/{o['metadata']['name']}"

        self.informers["modelapis"].add_handler(self._enqueue_via(modelapi_key))
        for resource in CHILD_RESOURCES:
            if resource.plural in self.informers and resource is not kube.SECRET:
                self.informers[resource.plural].add_handler(self._enqueue_via(owner_key))
        self.informers["pods"].add_handler(self._enqueue_via(pod_owner_key))
        self.informers["secrets"].add_handler(self._on_secret)

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    def enqueue_all(self) -> None:
        for obj in self.caches.modelapis.list():
            self.queue.add(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}")

    def _start(self, informer: AnyInformer) -> None:
        self._informer_tasks.append(asyncio.create_task(informer.run()))

    async def _route_api_installed(self) -> bool:
        namespace = self.options.namespaces[0] if self.options.namespaces else None
        try:
            await self.client.list(kube.HTTPROUTE, namespace, MANAGED_SELECTOR, page_size=1)
        except ApiError as e:
            if e.is_not_found():
                return False
            raise
        return True

    def _add_route_informer(self) -> AnyInformer:
        informer = self._informer("httproutes", kube.HTTPROUTE, MANAGED_SELECTOR, _strip_managed)
        informer.add_handler(self._enqueue_via(owner_key))
        return informer

    async def start_caches(self) -> None:
        """Start every cache and wait until all have listed. The HTTPRoute cache is among them when the
        cluster has the Gateway API, so the first reconciles already see the routes."""
        if self.options.settings.gateway is not None and await self._route_api_installed():
            self.caches.children[kube.HTTPROUTE] = self._add_route_informer().store
        for informer in self.informers.values():
            self._start(informer)
        await asyncio.gather(*(i.synced.wait() for i in self.informers.values()))
        self.log.info("caches synced", objects={n: len(i.store) for n, i in self.informers.items()})

    async def watch_route_api(self) -> None:
        """Without the Gateway API, ModelAPIs say so; once it is installed, start its cache and catch up."""
        if self.options.settings.gateway is None or kube.HTTPROUTE in self.caches.children:
            return
        self.log.warning("no HTTPRoute API in the cluster; routes are not created until it is installed")
        while not await self._route_api_installed():
            await asyncio.sleep(ROUTE_API_RECHECK_SECONDS)
        informer = self._add_route_informer()
        self._start(informer)
        await informer.synced.wait()
        self.caches.children[kube.HTTPROUTE] = informer.store
        self.log.info("HTTPRoute API found: creating routes")
        self.enqueue_all()

    async def resync(self) -> None:
        while True:
            await asyncio.sleep(self.options.resync_seconds)
            self.enqueue_all()

    async def worker(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            await self._process(key)

    async def _process(self, key: str) -> None:
        started = time.monotonic()
        log = self.log.bind(modelapi=key, reconcile_id=uuid.uuid4().hex[:12])
        self.metrics.active_workers.labels("modelapi").inc()
        try:
            outcome = await self.reconciler.reconcile(key, log)
        except Exception as e:  # one ModelAPI failing must never stop the others
            if _namespace_terminating(e):  # its ModelAPI goes with it: nothing left to do
                log.debug("namespace terminating; dropping", error=str(e))
                self.queue.forget(key)
                return
            self.metrics.reconcile_total.labels("modelapi", "error").inc()
            self.metrics.reconcile_errors.labels("modelapi").inc()
            log.warning("reconcile failed; retrying with backoff", error=str(e) or type(e).__name__,
                        retries=self.queue.num_requeues(key))
            self.queue.add_rate_limited(key)
        else:
            self.metrics.reconcile_total.labels("modelapi", "success").inc()
            self.queue.forget(key)
            if outcome.applied or outcome.deleted or outcome.status_written:
                log.debug("reconciled", applied=outcome.applied, deleted=outcome.deleted, phase=outcome.phase)
        finally:
            self.queue.done(key)
            self.metrics.active_workers.labels("modelapi").dec()
            self.metrics.reconcile_time.labels("modelapi").observe(time.monotonic() - started)

    def on_leadership(self, leading: bool) -> None:
        self.metrics.leader.labels(self.options.leader_election_id).set(int(leading))
        if not leading:
            self.writes_allowed = False

    async def run_workers(self) -> None:
        """Reconcile until cancelled. On a shutdown, in-flight reconciles finish first; after a lost
        leadership they are cancelled at once, since another process may be writing already."""
        self.enqueue_all()
        workers = [asyncio.create_task(self.worker()) for _ in range(self.options.workers)]
        background = [asyncio.create_task(self.resync()), asyncio.create_task(self.watch_route_api())]
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

    async def stop_caches(self) -> None:
        for task in self._informer_tasks:
            task.cancel()
        await asyncio.gather(*self._informer_tasks, return_exceptions=True)


async def _until_signalled(stop: asyncio.Event, main: Coroutine[Any, Any, Any]) -> bool:
    """Run `main` until it ends or `stop` is set; True when it was stopped by a signal."""
    task = asyncio.ensure_future(main)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return stop.is_set()


async def run(options: Options, log: Log) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    api_client = await load_api_client(options.kubeconfig)
    client = KubeClient(api_client, on_response=metrics.on_response)
    operator = Operator(options, client, metrics, log)
    runners = [await serve(metrics_app(registry), options.metrics_address),
               await serve(health_app(operator.synced), options.health_address)]
    log.info("starting", version=__version__, namespaces=list(options.namespaces) or "all",
             leader_elect=options.leader_elect, identity=operator.identity)
    elector = None
    lost = False
    try:
        if await _until_signalled(stop, operator.start_caches()):
            return 0
        if options.leader_elect:
            elector = LeaderElector(client, options.leader_election_namespace, options.leader_election_id,
                                    operator.identity, log, options.lease, on_change=operator.on_leadership)
            metrics.leader.labels(options.leader_election_id).set(0)
            result: list[bool] = []

            async def lead() -> None:
                result.append(await elector.run_while_leading(operator.run_workers))

            await _until_signalled(stop, lead())
            lost = bool(result and result[0])
        else:
            await _until_signalled(stop, operator.run_workers())
    finally:
        log.info("shutting down")
        await operator.stop_caches()
        if elector is not None and not lost:
            await elector.release()
        for runner in runners:
            if runner is not None:
                await runner.cleanup()
        await api_client.close()
    if lost:
        log.error("leadership lost: exiting so that a fresh process can stand for election")
        return 1
    return 0

