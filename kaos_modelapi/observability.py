"""Metrics, logs and health endpoints, named the way controller-runtime names them so that existing
dashboards, alerts and habits carry over."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PHASES = ("Pending", "Ready", "Failed")
# controller-runtime's buckets for reconcile and workqueue durations.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
            1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60)
_QUEUE_BUCKETS = tuple(10.0**e for e in range(-8, 2))


class _PhaseCollector(Collector):
    """ModelAPIs by phase, counted from the cache at scrape time (so it can never drift from it)."""

    def __init__(self, list_modelapis: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self._list = list_modelapis

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = dict.fromkeys(PHASES, 0)
        for obj in self._list():
            phase = (obj.get("status") or {}).get("phase") or "Pending"
            counts[phase] = counts.get(phase, 0) + 1
        family = GaugeMetricFamily("kaos_modelapi_modelapis", "ModelAPIs by status phase", labels=["phase"])
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry, controller: str) -> None:
        """Series for one controller, whose work queue bears its name (as in controller-runtime)."""
        self.registry = registry
        self._queue = controller
        c = ["controller"]
        self.reconcile_total = Counter("controller_runtime_reconcile_total", "Reconciliations by result",
                                       [*c, "result"], registry=registry)
        self.reconcile_errors = Counter("controller_runtime_reconcile_errors_total", "Reconciliation errors",
                                        c, registry=registry)
        self.terminal_errors = Counter("controller_runtime_terminal_reconcile_errors_total",
                                       "Reconciliation errors that are not retried", c, registry=registry)
        self.reconcile_time = Histogram("controller_runtime_reconcile_time_seconds", "Time per reconciliation",
                                        c, buckets=_BUCKETS, registry=registry)
        self.max_concurrent = Gauge("controller_runtime_max_concurrent_reconciles", "Worker count", c,
                                    registry=registry)
        self.active_workers = Gauge("controller_runtime_active_workers", "Workers reconciling now", c,
                                    registry=registry)
        q = ["name"]
        self.depth = Gauge("workqueue_depth", "Current depth of the workqueue", q, registry=registry)
        self.adds = Counter("workqueue_adds_total", "Adds handled by the workqueue", q, registry=registry)
        self.queue_duration = Histogram("workqueue_queue_duration_seconds", "Time a key waits in the queue",
                                        q, buckets=_QUEUE_BUCKETS, registry=registry)
        self.work_time = Histogram("workqueue_work_duration_seconds", "Time processing a key", q,
                                       buckets=_QUEUE_BUCKETS, registry=registry)
        self.retries = Counter("workqueue_retries_total", "Retries handled by the workqueue", q,
                               registry=registry)
        self.unfinished = Gauge("workqueue_unfinished_work_seconds",
                                "Seconds of work in progress not yet observed by work_duration", q, registry=registry)
        self.longest = Gauge("workqueue_longest_running_processor_seconds",
                             "Seconds the longest running processor has been running", q, registry=registry)
        self.held = Gauge("kaos_modelapi_burst_held", "Keys created or changed in a user's burst, queued once it "
                          "has passed", q, registry=registry)
        # Requests are few at once (--kube-api-in-flight); those waiting for a place are what a slow API server
        # or a burst shows as first, before reconciles take longer.
        self.waiting = Gauge("kaos_modelapi_api_requests_waiting", "Requests to the API server waiting for one of "
                             "the places in flight (--kube-api-in-flight)", registry=registry)
        self.requests = Counter("rest_client_requests_total", "API server requests by status code and method",
                                ["code", "method"], registry=registry)
        self.leader = Gauge("leader_election_master_status", "1 when this process is the leader", ["name"],
                            registry=registry)
        # Each series of this controller bound once: `labels()` looks it up under a lock, about ten times a
        # reconcile otherwise.
        self._results = {result: self.reconcile_total.labels(controller, result)
                         for result in ("success", "error", "requeue", "requeue_after")}
        self._errors = self.reconcile_errors.labels(controller)
        self._terminal = self.terminal_errors.labels(controller)
        self._time = self.reconcile_time.labels(controller)
        self._active = self.active_workers.labels(controller)
        self._depth = self.depth.labels(controller)
        self._adds = self.adds.labels(controller)
        self._queue_duration = self.queue_duration.labels(controller)
        self._work_time = self.work_time.labels(controller)
        self._retries = self.retries.labels(controller)
        self._requests: dict[tuple[str, int], Counter] = {}

    def track_unfinished_work(self, unfinished_work: Callable[[], tuple[float, float]]) -> None:
        """Read the queue's in-flight work when scraped: (total seconds, longest single one)."""
        self.unfinished.labels(self._queue).set_function(lambda: unfinished_work()[0])
        self.longest.labels(self._queue).set_function(lambda: unfinished_work()[1])

    def track_held(self, held: Callable[[], int]) -> None:
        self.held.labels(self._queue).set_function(held)

    def track_waiting(self, waiting: Callable[[], int]) -> None:
        self.waiting.set_function(waiting)

    def count_modelapis(self, list_modelapis: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self.registry.register(_PhaseCollector(list_modelapis))

    def on_response(self, method: str, code: int) -> None:
        series = self._requests.get((method, code))
        if series is None:
            series = self._requests[method, code] = self.requests.labels(str(code), method.upper())
        series.inc()

    def reconcile_started(self) -> None:
        self._active.inc()

    def reconcile_ended(self, result: str | None, seconds: float, *, terminal: bool = False) -> None:
        """`result` as controller-runtime counts it: success, error, requeue or requeue_after; None for a
        reconcile cancelled at shutdown, which counts in none of them."""
        self._active.dec()
        self._time.observe(seconds)
        if result is None:
            return
        self._results[result].inc()
        if result == "error":
            self._errors.inc()
            if terminal:
                self._terminal.inc()

    # The work queue's QueueMetrics hooks.
    def depth_changed(self, depth: int) -> None:
        self._depth.set(depth)

    def added(self) -> None:
        self._adds.inc()

    def queue_latency(self, seconds: float) -> None:
        self._queue_duration.observe(seconds)

    def work_duration(self, seconds: float) -> None:
        self._work_time.observe(seconds)

    def retried(self) -> None:
        self._retries.inc()


def configure_logging(level: str, fmt: str) -> structlog.typing.FilteringBoundLogger:
    """JSON lines for machines, colour-free console lines for people (`make dev`)."""
    renderer: Any = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    factory: Any = structlog.PrintLoggerFactory(file=sys.stderr)
    if fmt == "json":  # orjson, written as bytes: the stdlib encoder was most of a log line's cost
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("kaos-modelapi")
    return logger


def metrics_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def health_app(is_ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ok")
        return web.Response(status=503, text="caches not synced")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def parse_bind_address(address: str) -> tuple[str, int] | None:
    """controller-runtime's convention: ":8080" binds all interfaces, "0" disables the server."""
    if address in ("", "0"):
        return None
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


async def serve(app: web.Application, address: str) -> web.AppRunner | None:
    bind = parse_bind_address(address)
    if bind is None:
        return None
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, bind[0], bind[1]).start()
    return runner
