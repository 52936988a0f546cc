"""`kaos-modelapi run`: the operator process, a generic manager after controller-runtime's.

The `Manager` knows nothing of ModelAPIs: it makes one informer per cached resource from its controllers'
watch declarations (`runtime.Builder`), wires their events to the controllers' queues, and runs the
runnables in order, stopping them in reverse:

    metrics and health servers -> caches (until all have listed) -> leader election -> controllers

A cache whose API the cluster does not serve yet (an optional CRD) is started once it appears. `run`
composes the process: the API client, the metrics, the ModelAPI controller and the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
import uvloop
from prometheus_client import CollectorRegistry

from . import __version__, controller
from .events import Recorder
from .informer import Backoff, Informer, MultiNamespaceInformer, informer_for_namespaces
from .kube import NAMESPACE, ApiError, ConfigError, KubeClient, Obj, Resource, TerminatingNamespaces, load_api_client
from .leader import LeaderElector, LeaseTiming
from .memory import release_periodically, set_imports_aside, settle_collector
from .observability import Metrics, configure_logging, health_app, metrics_app, serve
from .runtime import CacheSpec, Controller, Stores
from .settings import Settings

OPTIONAL_API_RECHECK_SECONDS = 30.0
PREFLIGHT_TIMEOUT_SECONDS = 30.0
STARTUP_BACKOFF = Backoff(initial=0.5, cap=5.0)
T = TypeVar("T")
AnyInformer = Informer | MultiNamespaceInformer
Log = structlog.typing.FilteringBoundLogger


class StartupError(Exception):
    """The operator cannot start; the message says what to do (printed as one line, exit 1)."""


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
    kube_api_in_flight: int  # (cli.KUBE_API_IN_FLIGHT)
    kube_api_qps: float = 0.0  # none: API Priority and Fairness (cli.py)
    kube_api_burst: int = 200
    watch_timeout: int = 300  # seconds; each watch lasts a random time between this and twice this
    log_level: str = "info"
    log_format: str = "json"


class Manager:
    """Caches shared by controllers, and the order in which everything starts and stops."""

    def __init__(self, client: KubeClient, namespaces: tuple[str, ...], log: Log, watch_timeout: int = 300) -> None:
        self.client = client
        self.watch_timeout = watch_timeout
        self.namespaces = namespaces
        self.log = log
        self.stores = Stores()
        self.controllers: list[Controller] = []
        self._specs: dict[Resource, CacheSpec] = {}
        self._informers: dict[Resource, AnyInformer] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = False
        self._rng = random.Random()

    def add(self, ctrl: Controller) -> None:
        for spec in ctrl.caches():
            known = self._specs.setdefault(spec.resource, spec)
            if known != spec:
                raise ValueError(f"{spec.resource.plural} is cached twice in different ways")
        self.controllers.append(ctrl)

    def synced(self) -> bool:
        """Every cache has listed once (what /readyz reports)."""
        return self._synced

    # --- caches -----------------------------------------------------------------------------------------

    async def preflight(self) -> None:
        """One small list per cache before any informer starts, so that what would only retry forever in
        the informers (a missing CRD, RBAC that forbids a list, an unreachable server) stops the start with
        a StartupError instead. A server that answers it is busy or not ready yet is asked again."""
        deadline = asyncio.get_running_loop().time() + PREFLIGHT_TIMEOUT_SECONDS
        try:
            async with asyncio.timeout_at(deadline):
                # At once, not one after another: each is a round trip before the first reconcile. Every
                # answer is awaited, and the first problem in the caches' order is the one reported, so the
                # message does not depend on which answer came first.
                results = await asyncio.gather(*(self._check(s, deadline) for s in self._specs.values()),
                                               return_exceptions=True)
        except TimeoutError:
            raise StartupError(f"the API server did not answer within {PREFLIGHT_TIMEOUT_SECONDS:.0f} s "
                               "(check the kubeconfig's server and the network)") from None
        if problem := next((r for r in results if isinstance(r, BaseException)), None):
            raise problem

    def _namespaces_of(self, resource: Resource) -> tuple[str, ...]:
        return self.namespaces if resource.namespaced else ()  # a cluster-scoped resource: one cache

    def namespace(self, name: str) -> Obj | None:
        """The cached Namespace (None without a Namespace cache: an operator limited to some namespaces)."""
        store = self.stores.get(NAMESPACE)
        return None if store is None else store.get(name)

    async def _check(self, spec: CacheSpec, deadline: float) -> None:
        for namespace in self._namespaces_of(spec.resource) or (None,):
            try:
                await self._while_busy(functools.partial(self.client.check_list, spec.resource, namespace,
                                                         spec.label_selector, spec.metadata_only), deadline)
            except ApiError as e:
                if spec.optional and e.is_not_found():
                    return  # its watcher starts the cache once the API is installed
                raise StartupError(_startup_problem(spec.resource, namespace, e)) from None

    async def _while_busy(self, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """`call()`, made again while the API server answers that it is busy or not ready (429, 5xx: e.g.
        "storage is (re)initializing" for a resource whose CRD was just installed, or a server starting),
        after the wait it asks for or a backoff; the last such answer is raised when the next try would
        come after `deadline` (the loop's time). Not an unreachable server: that is the kubeconfig's."""
        loop, attempt = asyncio.get_running_loop(), 0
        while True:
            try:
                return await call()
            except ApiError as e:
                if not e.is_retryable() or e.is_transport():
                    raise
                delay = max(STARTUP_BACKOFF.delay(attempt, self._rng), e.wait_asked())
                if loop.time() + delay > deadline:
                    raise
                attempt += 1
                self.log.info("the API server is not ready; asking again", error=str(e), retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    def _start_informer(self, spec: CacheSpec) -> AnyInformer:
        def make(namespace: str | None) -> Informer:
            return Informer(self.client, spec.resource, self.log, namespace=namespace,
                            label_selector=spec.label_selector, metadata_only=spec.metadata_only,
                            transform=spec.transform, indexers=spec.indexers,
                            watch_list=True,
                            watch_timeout=(self.watch_timeout, 2 * self.watch_timeout))

        informer = informer_for_namespaces(self._namespaces_of(spec.resource), make)
        for ctrl in self.controllers:
            for watch in ctrl.watches:
                if watch.cache.resource == spec.resource:
                    informer.add_handler(ctrl.handler(watch, self.stores))
        self._informers[spec.resource] = informer
        self._tasks.append(asyncio.create_task(informer.run()))
        return informer

    async def start_caches(self) -> None:
        """Start every cache whose API is served and wait until all have listed, so the first reconciles
        already see every child (an optional one included)."""
        optional = [s for s in self._specs.values() if s.optional]
        deadline = asyncio.get_running_loop().time() + PREFLIGHT_TIMEOUT_SECONDS
        try:
            served = await asyncio.gather(*(self._while_busy(functools.partial(self.client.serves, s.resource),
                                                             deadline) for s in optional))
        except ApiError as e:
            raise StartupError(f"cannot tell which optional APIs the cluster serves: {e}") from None
        for spec in self._specs.values():
            if not spec.optional or served[optional.index(spec)]:
                self.stores.add(spec.resource, self._start_informer(spec).store)
        await asyncio.gather(*(i.synced.wait() for i in self._informers.values()))
        self._synced = True
        self.log.info("caches synced", objects={r.plural: len(i.store) for r, i in self._informers.items()},
                      since_start_s=since_process_start())

    async def _await_optional_api(self, spec: CacheSpec) -> None:
        """Without the API, reconciles say so; once it is installed, start its cache and catch up."""
        self.log.warning(f"no {spec.resource.plural}.{spec.resource.group} API in the cluster; "
                         "its objects are not created until it is installed")
        while not await self._serves_yet(spec.resource):
            await asyncio.sleep(OPTIONAL_API_RECHECK_SECONDS)
        informer = self._start_informer(spec)
        await informer.synced.wait()
        self.stores.add(spec.resource, informer.store)
        self.log.info(f"{spec.resource.plural}.{spec.resource.group} API found: catching up")
        for ctrl in self.controllers:
            ctrl.enqueue_all(self.stores)

    async def _serves_yet(self, resource: Resource) -> bool:
        """Whether the API is installed now; a failed discovery is "not yet" (the waiter must not end)."""
        try:
            return await self.client.serves(resource)
        except ApiError as e:
            self.log.warning(f"cannot tell whether the {resource.plural}.{resource.group} API is installed; "
                             f"looking again in {OPTIONAL_API_RECHECK_SECONDS:.0f} s", error=str(e))
            return False

    async def stop_caches(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- controllers ------------------------------------------------------------------------------------

    def on_leadership(self, leading: bool) -> None:
        if not leading:
            for ctrl in self.controllers:
                ctrl.writes_allowed = False

    async def run_controllers(self) -> None:
        """Run every controller until cancelled, with the watchers of missing optional APIs."""
        missing = [s for s in self._specs.values() if s.resource not in self._informers]
        waiters = [asyncio.create_task(self._await_optional_api(s)) for s in missing]
        try:
            await asyncio.gather(*(ctrl.run(self.stores) for ctrl in self.controllers))
        finally:
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)


def _startup_problem(resource: Resource, namespace: str | None, e: ApiError) -> str:
    what = f"{resource.plural}.{resource.group or 'core'}"
    where = f"in namespace {namespace}" if namespace else "cluster-wide"
    if e.is_transport():
        return f"cannot reach the API server: {e.message} (check the kubeconfig's server and the network)"
    if e.is_unauthorized():
        return f"the API server refused the credentials: {e.message} (check the kubeconfig or ServiceAccount token)"
    if e.is_forbidden():
        return (f"RBAC forbids listing {what} {where}: {e.message} (grant get/list/watch as the Helm chart or "
                "config/rbac/role.yaml do)")
    if e.is_not_found() and resource.group == "kaos.tools":
        return ("the ModelAPI CRD (modelapis.kaos.tools) is not installed: "
                "kubectl apply -f config/crd/bases/ (or install the Helm chart)")
    return f"cannot list {what} {where}: {e}"


def since_process_start() -> float | None:
    """Seconds since this process started (its start-up phases in the log: imports, config, caches)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # not Linux
    return round(uptime - ticks / os.sysconf("SC_CLK_TCK"), 2)


async def _serve(app: Any, address: str, flag: str) -> Any:
    try:
        return await serve(app, address)
    except (OSError, ValueError) as e:
        raise StartupError(f"{flag} {address}: {e.strerror if isinstance(e, OSError) and e.strerror else e} "
                           '(choose a free address, or "0" to turn the server off)') from None


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


def run_command(options: Options) -> int:
    log = configure_logging(options.log_level, options.log_format)
    set_imports_aside()
    try:
        # uvloop: the event loop and its TLS transport in C (libuv), where most of the operator's CPU
        # goes (requests and watch streams): 15% less CPU per ModelAPI on a cold converge.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run(options, log))
    except ConfigError as e:
        raise StartupError(str(e)) from None


async def run(options: Options, log: Log) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    metrics = Metrics(registry, controller.NAME)
    api_client = await load_api_client(options.kubeconfig)
    client = KubeClient(api_client, on_response=metrics.on_response, qps=options.kube_api_qps,
                        burst=options.kube_api_burst, max_in_flight=options.kube_api_in_flight)
    metrics.track_waiting(lambda: client.lane.waiting)
    identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    manager = Manager(client, options.namespaces, log, options.watch_timeout)
    # One view of the namespaces being deleted, for the reconciler's writes and the recorder's Events.
    terminating = TerminatingNamespaces(manager.namespace)
    recorder = Recorder(client, identity, log, terminating=terminating)
    reconciler = controller.Reconciler(client, manager.stores, options.settings, recorder, log,
                                       terminating=terminating)
    manager.add(controller.watches(options.settings, cluster_wide=not options.namespaces).complete(
        reconciler, workers=options.workers, resync_seconds=options.resync_seconds, metrics=metrics, log=log))
    metrics.count_modelapis(lambda: manager.stores.objects(controller.MODELAPIS.resource))
    runners: list[Any] = []
    elector = None
    lost = False
    trimmer: asyncio.Task[None] | None = None
    try:
        runners.append(await _serve(metrics_app(registry), options.metrics_address, "--metrics-bind-address"))
        runners.append(await _serve(health_app(manager.synced), options.health_address,
                                    "--health-probe-bind-address"))
        log.info("starting", version=__version__, namespaces=list(options.namespaces) or "all",
                 leader_elect=options.leader_elect, identity=identity, since_start_s=since_process_start())
        if await _until_signalled(stop, manager.preflight()):
            return 0
        if await _until_signalled(stop, manager.start_caches()):
            return 0
        settle_collector()
        trimmer = asyncio.create_task(release_periodically())  # what the imports and the first lists freed
        if options.leader_elect:
            def on_change(leading: bool) -> None:
                metrics.leader.labels(options.leader_election_id).set(int(leading))
                manager.on_leadership(leading)

            elector = LeaderElector(client.unfenced(), options.leader_election_namespace,
                                    options.leader_election_id, identity, log, options.lease, on_change=on_change)
            client.set_write_fence(elector.may_write)  # no write unless the Lease is surely ours
            metrics.leader.labels(options.leader_election_id).set(0)
            result: list[bool] = []

            async def lead() -> None:
                result.append(await elector.run_while_leading(manager.run_controllers))

            await _until_signalled(stop, lead())
            lost = bool(result and result[0])
        else:
            await _until_signalled(stop, manager.run_controllers())
    finally:
        log.info("shutting down")
        if trimmer is not None:
            trimmer.cancel()
        await manager.stop_caches()
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
