"""An asyncio work queue of hashable keys, after client-go's util/workqueue.

Semantics (the ones a level-triggered controller relies on):

* A key is queued at most once, however many times it is added before a worker takes it ("dirty" set).
* A key is never handed to two workers at once: while it is processing, further adds only mark it
  dirty, and ``done`` puts it back in the queue, so the worker that picks it up next sees the newest state.
* ``add_after`` parks a key until its time has come (the earliest request wins), and
  ``add_rate_limited`` does the same with the delay its rate limiter gives: by default client-go's
  (the larger of a per-key exponential backoff that ``forget`` resets and an overall token bucket, so an
  API outage does not retry every key at full speed).
* ``add(key, low_priority=True)`` (controller-runtime's priority queue, two levels): a key that only needs a
  look (a start's or a resync's pass over everything already settled) is handed out after every ordinary key;
  an ordinary add of a key waiting at low priority moves it up.
* After ``shutdown`` no new keys are accepted and ``get`` raises ``ShutDown``, even if keys are still
  queued: a level-triggered controller loses nothing by dropping them, because whoever runs next
  lists everything again. (client-go instead hands out the remaining keys; we stop sooner.)

Time comes from an injected ``Clock`` so tests can step it; metrics go to an optional injected
``QueueMetrics`` so the shipping code can attach controller-runtime's ``workqueue_*`` series.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
K_contra = TypeVar("K_contra", bound=Hashable, contravariant=True)

DEFAULT_BASE_DELAY = 0.005
DEFAULT_MAX_DELAY = 1000.0
DEFAULT_QPS = 10.0
DEFAULT_BURST = 100


class ShutDown(Exception):
    """Raised by ``WorkQueue.get`` once the queue is shut down."""


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """A monotonic clock that can also call back at a point in its own time."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """The running event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)


class QueueMetrics(Protocol):
    """Hooks for workqueue_* metrics; every method must be cheap and must not raise."""

    def depth_changed(self, depth: int) -> None: ...

    def added(self) -> None: ...

    def queue_latency(self, seconds: float) -> None: ...

    def work_duration(self, seconds: float) -> None: ...

    def retried(self) -> None: ...


class RateLimiter(Protocol[K_contra]):
    def when(self, key: K_contra) -> float:
        """How long to wait before retrying ``key``; counts one more failure."""
        ...

    def forget(self, key: K_contra) -> None: ...

    def num_requeues(self, key: K_contra) -> int: ...


def exponential_delay(failures: int, base: float, cap: float) -> float:
    """``base * 2**failures``, capped; pure so the growth and the cap are testable on their own."""
    try:
        delay = base * 2.0**failures
    except OverflowError:
        return cap
    return min(delay, cap)


class ExponentialFailureRateLimiter(Generic[K]):
    """Per-key exponential backoff, like client-go's ItemExponentialFailureRateLimiter."""

    def __init__(self, base_delay: float = DEFAULT_BASE_DELAY, max_delay: float = DEFAULT_MAX_DELAY) -> None:
        if base_delay <= 0 or max_delay < base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")
        self._base = base_delay
        self._cap = max_delay
        self._failures: dict[K, int] = {}

    def when(self, key: K) -> float:
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        return exponential_delay(failures, self._base, self._cap)

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        return self._failures.get(key, 0)


class BucketRateLimiter:
    """An overall token bucket, like client-go's BucketRateLimiter: ``burst`` retries at once, then ``qps``
    per second. Each call reserves a token, so the delays of a burst of failures grow one token apart."""

    def __init__(self, qps: float = DEFAULT_QPS, burst: int = DEFAULT_BURST,
                 now: Callable[[], float] = time.monotonic) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("need qps > 0 and burst >= 1")
        self._qps = qps
        self._burst = float(burst)
        self._now = now
        self._tokens = float(burst)
        self._last: float | None = None  # read the clock first when needed: a loop clock needs a running loop

    def when(self, key: Hashable) -> float:
        now = self._now()
        refill = 0.0 if self._last is None else (now - self._last) * self._qps
        self._tokens = min(self._burst, self._tokens + refill) - 1.0
        self._last = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self._qps

    def forget(self, key: Hashable) -> None:
        pass

    def num_requeues(self, key: Hashable) -> int:
        return 0


class MaxOfRateLimiter(Generic[K]):
    """The longest delay of several limiters (each one counts the failure), like client-go's."""

    def __init__(self, *limiters: RateLimiter[K]) -> None:
        if not limiters:
            raise ValueError("need at least one rate limiter")
        self._limiters = limiters

    def when(self, key: K) -> float:
        return max([limiter.when(key) for limiter in self._limiters])

    def forget(self, key: K) -> None:
        for limiter in self._limiters:
            limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        return max(limiter.num_requeues(key) for limiter in self._limiters)


def default_rate_limiter(now: Callable[[], float] = time.monotonic) -> MaxOfRateLimiter[Any]:
    """client-go's DefaultControllerRateLimiter: 5 ms doubling to 1000 s per key, at most 10/s overall
    after a burst of 100."""
    return MaxOfRateLimiter(ExponentialFailureRateLimiter(), BucketRateLimiter(now=now))


@dataclass(order=True)
class _Waiting(Generic[K]):
    ready_at: float
    seq: int
    key: K = field(compare=False)


class WorkQueue(Generic[K]):
    """A deduplicating, delaying, rate-limited queue of keys for asyncio workers.

    Typical worker::

        while True:
            try:
                key = await queue.get()
            except ShutDown:
                return
            try:
                await reconcile(key)
            except Exception:
                queue.add_rate_limited(key)
            else:
                queue.forget(key)
            finally:
                queue.done(key)
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        rate_limiter: RateLimiter[K] | None = None,
        metrics: QueueMetrics | None = None,
    ) -> None:
        self._clock: Clock = clock if clock is not None else LoopClock()
        self._limiter: RateLimiter[K] = rate_limiter if rate_limiter is not None else default_rate_limiter(
            self._clock.now)
        self._metrics = metrics
        self._queue: deque[K] = deque()
        # Dirty keys whose every add since they were last handed out was low priority.
        self._low_pending: set[K] = set()
        # The low-priority line: entries (key, ticket), live while _low_queued holds that ticket for the key
        # (moving a key up or handing it out drops its ticket, so no entry is ever searched for).
        self._low: deque[tuple[K, int]] = deque()
        self._low_queued: dict[K, int] = {}
        self._dirty: set[K] = set()
        # key -> when it started processing (for work duration and unfinished-work gauges)
        self._processing: dict[K, float] = {}
        # key -> when it was first added since it last left the queue (for queue latency)
        self._added_at: dict[K, float] = {}
        self._getters: deque[asyncio.Future[None]] = deque()
        self._drained: list[asyncio.Future[None]] = []
        self._waiting: list[_Waiting[K]] = []
        self._waiting_ready_at: dict[K, float] = {}
        self._seq = itertools.count()
        self._timer: TimerHandle | None = None
        self._timer_at: float | None = None
        self._shutting_down = False

    # -- adding ---------------------------------------------------------------------------------

    def add(self, key: K, low_priority: bool = False) -> None:
        if self._shutting_down:
            return
        if key in self._dirty:
            if not low_priority and key in self._low_pending:
                self._low_pending.discard(key)
                if self._low_queued.pop(key, None) is not None:
                    self._queue.append(key)  # moved up; its entry in the low line is dead
                    self._wake_one()
            return
        self._dirty.add(key)
        if low_priority:
            self._low_pending.add(key)
        self._added_at.setdefault(key, self._clock.now())
        if self._metrics is not None:
            self._metrics.added()
        if key in self._processing:
            # done() re-queues it, so one key never runs on two workers at once.
            return
        self._enqueue(key)

    def add_after(self, key: K, delay: float) -> None:
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        ready_at = self._clock.now() + delay
        current = self._waiting_ready_at.get(key)
        if current is not None and current <= ready_at:
            return  # an earlier wake-up is already booked; the key will run then
        self._waiting_ready_at[key] = ready_at
        heapq.heappush(self._waiting, _Waiting(ready_at, next(self._seq), key))
        self._arm_timer()

    def add_rate_limited(self, key: K, at_least: float = 0.0) -> None:
        """Queue `key` again after its rate limiter's delay, or `at_least` seconds if that is longer (the
        API server's Retry-After: it said when to come back)."""
        if self._shutting_down:
            return
        if self._metrics is not None:
            self._metrics.retried()
        self.add_after(key, max(self._limiter.when(key), at_least))

    def forget(self, key: K) -> None:
        self._limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        return self._limiter.num_requeues(key)

    # -- taking ---------------------------------------------------------------------------------

    async def get(self) -> K:
        """Wait for a key and mark it processing; the caller must call ``done(key)`` afterwards."""
        while True:
            if self._shutting_down:
                raise ShutDown
            if self._ready():
                return self._take()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._discard_getter(waiter)
                # A wake-up meant for us must not be lost with us.
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise

    def done(self, key: K) -> None:
        started = self._processing.pop(key, None)
        if started is None:
            return
        if self._metrics is not None:
            self._metrics.work_duration(self._clock.now() - started)
        if key in self._dirty and not self._shutting_down:
            self._enqueue(key)
        if not self._processing:
            self._resolve_all(self._drained)

    # -- stopping -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting keys and make every ``get`` raise ``ShutDown``; in-flight work goes on."""
        if self._shutting_down:
            return
        self._shutting_down = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        self._waiting.clear()
        self._waiting_ready_at.clear()
        self._resolve_all(self._getters)

    async def shut_down_with_drain(self) -> None:
        """Shut down, then wait until every key handed out has been ``done``."""
        self.shutdown()
        if not self._processing:
            return
        drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drained.append(drained)
        try:
            await asyncio.shield(drained)
        finally:
            if drained in self._drained:
                self._drained.remove(drained)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def __len__(self) -> int:
        """Keys ready to be handed out (client-go's Len; excludes processing and waiting keys)."""
        return len(self._queue) + len(self._low_queued)

    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    def unfinished_work(self) -> tuple[float, float]:
        """(total seconds of work in flight, longest single one) for the unfinished-work gauges."""
        now = self._clock.now()
        ages = [now - started for started in self._processing.values()]
        return (sum(ages), max(ages, default=0.0))

    # -- internals ------------------------------------------------------------------------------

    def _enqueue(self, key: K) -> None:
        if key in self._low_pending:
            ticket = next(self._seq)
            self._low_queued[key] = ticket
            self._low.append((key, ticket))
        else:
            self._queue.append(key)
        self._depth_changed()
        self._wake_one()

    def _ready(self) -> bool:
        while self._low and self._low_queued.get(self._low[0][0]) != self._low[0][1]:
            self._low.popleft()  # a dead entry: its key was moved up
        return bool(self._queue or self._low)

    def _take(self) -> K:
        key = self._queue.popleft() if self._queue else self._low.popleft()[0]
        self._low_queued.pop(key, None)
        self._low_pending.discard(key)
        now = self._clock.now()
        self._dirty.discard(key)
        self._processing[key] = now
        added = self._added_at.pop(key, now)
        if self._metrics is not None:
            self._metrics.queue_latency(now - added)
        self._depth_changed()
        return key

    def _depth_changed(self) -> None:
        if self._metrics is not None:
            self._metrics.depth_changed(len(self))

    def _wake_one(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _discard_getter(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._getters.remove(waiter)

    @staticmethod
    def _resolve_all(futures: deque[asyncio.Future[None]] | list[asyncio.Future[None]]) -> None:
        while futures:
            future = futures.pop()
            if not future.done():
                future.set_result(None)

    def _arm_timer(self) -> None:
        """Keep exactly one timer, set for the earliest waiting key."""
        if not self._waiting:
            return
        earliest = self._waiting[0].ready_at
        if self._timer_at is not None and self._timer_at <= earliest:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = earliest
        self._timer = self._clock.call_at(earliest, self._on_timer)

    def _on_timer(self) -> None:
        # The event loop may fire a timer up to its clock resolution early, so trust what we armed for.
        due = max(self._clock.now(), self._timer_at or 0.0)
        self._timer = None
        self._timer_at = None
        while self._waiting and self._waiting[0].ready_at <= due:
            entry = heapq.heappop(self._waiting)
            # Entries superseded by an earlier booking for the same key are stale.
            if self._waiting_ready_at.get(entry.key) == entry.ready_at:
                del self._waiting_ready_at[entry.key]
                self.add(entry.key)
        self._arm_timer()
