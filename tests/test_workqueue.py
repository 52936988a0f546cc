"""Unit tests for the work queue: no server, no fixed sleeps (time is a fake clock we step)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kaos_modelapi.workqueue import (
    BucketRateLimiter,
    ExponentialFailureRateLimiter,
    MaxOfRateLimiter,
    ShutDown,
    WorkQueue,
    exponential_delay,
)


@dataclass
class _Timer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeClock:
    t: float = 1000.0
    timers: list[_Timer] = field(default_factory=list)

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(when, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in time order (a timer may arm another)."""
        target = self.t + seconds
        while True:
            live = (t for t in self.timers if not t.cancelled and t.when <= target)
            due = sorted(live, key=lambda t: t.when)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.t = max(self.t, timer.when)
            timer.callback()
        self.t = target


@dataclass
class RecordingMetrics:
    depths: list[int] = field(default_factory=list)
    adds: int = 0
    latencies: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    retries: int = 0

    def depth_changed(self, depth: int) -> None:
        self.depths.append(depth)

    def added(self) -> None:
        self.adds += 1

    def queue_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def work_duration(self, seconds: float) -> None:
        self.durations.append(seconds)

    def retried(self) -> None:
        self.retries += 1


async def wait_until(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0)


async def settle() -> None:
    """Let every ready task run until none is runnable any more (bounded)."""
    for _ in range(20):
        await asyncio.sleep(0)


def new_queue(clock: FakeClock | None = None, **kw: object) -> tuple[WorkQueue[str], FakeClock]:
    clock = clock or FakeClock()
    return WorkQueue[str](clock=clock, **kw), clock  # type: ignore[arg-type]


async def test_adds_of_one_key_queue_it_once_in_first_add_order() -> None:
    q, _ = new_queue()
    for key in ["a", "b", "a", "c", "b", "a"]:
        q.add(key)
    assert len(q) == 3
    assert [await q.get(), await q.get(), await q.get()] == ["a", "b", "c"]
    assert len(q) == 0


async def test_a_key_in_processing_is_not_handed_to_a_second_worker() -> None:
    q, _ = new_queue()
    q.add("a")
    assert await q.get() == "a"
    q.add("a")
    q.add("a")
    assert len(q) == 0, "a processing key is only marked dirty"
    second = asyncio.create_task(q.get())
    await settle()
    assert not second.done()
    q.done("a")
    assert await asyncio.wait_for(second, 5) == "a"
    q.done("a")
    assert len(q) == 0


async def test_done_without_readd_does_not_requeue() -> None:
    q, _ = new_queue()
    q.add("a")
    key = await q.get()
    q.done(key)
    assert len(q) == 0
    assert q.processing() == frozenset()


async def test_readd_while_processing_runs_once_more_after_done() -> None:
    q, _ = new_queue()
    q.add("a")
    q.add("b")
    assert await q.get() == "a"
    q.add("a")
    q.done("a")
    assert [await q.get(), await q.get()] == ["b", "a"]


async def test_low_priority_keys_come_after_every_ordinary_one_and_an_ordinary_add_moves_one_up() -> None:
    q, _ = new_queue()
    for key in ["settled-1", "settled-2", "settled-3"]:
        q.add(key, low_priority=True)
    q.add("new")
    q.add("settled-2")  # a real change to a settled one: it goes with the ordinary keys
    q.add("settled-3", low_priority=True)  # a second low add changes nothing
    assert len(q) == 4
    assert [await q.get() for _ in range(4)] == ["new", "settled-2", "settled-1", "settled-3"]
    assert len(q) == 0


async def test_a_key_added_at_low_priority_while_processing_keeps_the_priority_of_its_adds() -> None:
    q, _ = new_queue()
    q.add("a", low_priority=True)
    assert await q.get() == "a"
    q.add("a", low_priority=True)
    q.add("b")
    q.done("a")
    q.add("c")
    assert [await q.get(), await q.get(), await q.get()] == ["b", "c", "a"]
    q.add("a", low_priority=True)  # processing: only marked dirty
    q.add("a")  # ...and raised before it is queued again
    q.add("d", low_priority=True)
    q.done("a")
    assert [await q.get(), await q.get()] == ["a", "d"]


@pytest.mark.parametrize("low_share", [0.0, 0.5])
async def test_concurrent_workers_never_share_a_key_and_see_the_last_add(low_share: float) -> None:
    q, _ = new_queue()
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(5)]
    active: set[str] = set()
    processed_after_last_add: set[str] = set()
    last_add_seen: dict[str, int] = {}
    generation = {k: 0 for k in keys}
    overlaps: list[str] = []

    async def worker() -> None:
        while True:
            try:
                key = await q.get()
            except ShutDown:
                return
            if key in active:
                overlaps.append(key)
            active.add(key)
            seen = generation[key]
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            active.discard(key)
            last_add_seen[key] = seen
            q.done(key)

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    for _ in range(300):
        key = rng.choice(keys)
        generation[key] += 1
        q.add(key, low_priority=rng.random() < low_share)
        if rng.random() < 0.5:
            await asyncio.sleep(0)
    await wait_until(lambda: len(q) == 0 and not q.processing())
    for key in keys:
        if last_add_seen.get(key) == generation[key]:
            processed_after_last_add.add(key)
    await q.shut_down_with_drain()
    await asyncio.wait_for(asyncio.gather(*workers), 5)
    assert overlaps == []
    assert processed_after_last_add == set(keys), "every key's newest add was processed"


def test_exponential_delay_doubles_from_base_and_caps() -> None:
    assert [exponential_delay(n, 0.005, 1000.0) for n in range(4)] == [0.005, 0.01, 0.02, 0.04]
    assert exponential_delay(17, 0.005, 1000.0) == 655.36
    assert exponential_delay(18, 0.005, 1000.0) == 1000.0
    assert exponential_delay(100_000, 0.005, 1000.0) == 1000.0  # no OverflowError


def test_rate_limiter_counts_per_key_and_forget_resets() -> None:
    limiter = ExponentialFailureRateLimiter[str](base_delay=0.1, max_delay=0.5)
    assert [limiter.when("a") for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert limiter.when("b") == 0.1, "keys back off independently"
    assert limiter.num_requeues("a") == 5
    limiter.forget("a")
    assert limiter.num_requeues("a") == 0
    assert limiter.when("a") == 0.1


def test_rate_limiter_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        ExponentialFailureRateLimiter[str](base_delay=0, max_delay=1)
    with pytest.raises(ValueError):
        ExponentialFailureRateLimiter[str](base_delay=2, max_delay=1)


def test_bucket_allows_a_burst_then_spaces_retries_at_its_rate() -> None:
    now = [0.0]
    bucket = BucketRateLimiter(qps=10.0, burst=3, now=lambda: now[0])
    assert [bucket.when(k) for k in "abc"] == [0.0, 0.0, 0.0]
    assert [round(bucket.when(k), 6) for k in "def"] == [0.1, 0.2, 0.3], "each retry reserves the next token"
    now[0] = 10.0  # tokens refill up to the burst, no further
    assert [bucket.when(k) for k in "ghi"] == [0.0, 0.0, 0.0]
    assert bucket.when("j") > 0


def test_default_limiter_is_the_slower_of_per_key_backoff_and_the_overall_bucket() -> None:
    now = [0.0]
    limiter = MaxOfRateLimiter[str](ExponentialFailureRateLimiter(base_delay=0.005, max_delay=1000.0),
                                    BucketRateLimiter(qps=10.0, burst=100, now=lambda: now[0]))
    delays = [limiter.when(f"key-{i}") for i in range(200)]  # an API outage: every key fails at once
    assert delays[:100] == [0.005] * 100, "the first burst retries after the per-key backoff"
    assert round(delays[199], 6) == 10.0, "then at most 10 retries a second overall"
    assert limiter.num_requeues("key-0") == 1
    limiter.forget("key-0")
    assert limiter.num_requeues("key-0") == 0


async def test_add_rate_limited_waits_the_backoff_and_grows() -> None:
    metrics = RecordingMetrics()
    q, clock = new_queue(metrics=metrics)
    q.add_rate_limited("a")
    assert len(q) == 0
    clock.advance(0.004)
    assert len(q) == 0
    clock.advance(0.001)
    assert len(q) == 1
    assert await q.get() == "a"
    q.done("a")
    q.add_rate_limited("a")
    clock.advance(0.009)
    assert len(q) == 0
    clock.advance(0.001)
    assert len(q) == 1
    assert q.num_requeues("a") == 2
    assert metrics.retries == 2


async def test_default_backoff_is_capped_at_1000_seconds() -> None:
    q, clock = new_queue()
    for _ in range(30):
        q.add_rate_limited("a")
        clock.advance(1000.0)
        assert await q.get() == "a"
        q.done("a")
    q.add_rate_limited("a")
    clock.advance(999.999)
    assert len(q) == 0
    clock.advance(0.001)
    assert len(q) == 1


async def test_configurable_backoff() -> None:
    q, clock = new_queue(rate_limiter=ExponentialFailureRateLimiter[str](base_delay=1.0, max_delay=3.0))
    delays = []
    for _ in range(4):
        q.add_rate_limited("a")
        start = clock.now()
        while len(q) == 0:
            clock.advance(0.5)
        delays.append(clock.now() - start)
        await q.get()
        q.done("a")
    assert delays == [1.0, 2.0, 3.0, 3.0]


async def test_forget_resets_the_backoff() -> None:
    q, clock = new_queue()
    for _ in range(3):
        q.add_rate_limited("a")
    assert q.num_requeues("a") == 3
    q.forget("a")
    assert q.num_requeues("a") == 0
    clock.advance(0.005)
    assert len(q) == 1, "the earliest booking (5 ms) still stands"
    await q.get()
    q.done("a")
    q.add_rate_limited("a")
    clock.advance(0.005)
    assert len(q) == 1, "after forget the next retry is back at the base delay"


async def test_add_after_holds_the_key_until_due() -> None:
    q, clock = new_queue()
    q.add_after("a", 10)
    q.add_after("b", 5)
    clock.advance(4.9)
    assert len(q) == 0
    clock.advance(0.1)
    assert len(q) == 1
    clock.advance(5)
    assert [await q.get(), await q.get()] == ["b", "a"]


async def test_add_after_earliest_booking_wins_and_queues_once() -> None:
    q, clock = new_queue()
    q.add_after("a", 10)
    q.add_after("a", 2)
    q.add_after("a", 20)
    clock.advance(2)
    assert len(q) == 1
    assert await q.get() == "a"
    q.done("a")
    clock.advance(100)
    assert len(q) == 0, "superseded bookings do not fire again"


async def test_add_after_non_positive_delay_adds_now() -> None:
    q, _ = new_queue()
    q.add_after("a", 0)
    q.add_after("b", -1)
    assert len(q) == 2


async def test_add_after_of_a_queued_key_does_not_duplicate_it() -> None:
    q, clock = new_queue()
    q.add("a")
    q.add_after("a", 1)
    clock.advance(1)
    assert len(q) == 1


async def test_blocked_get_wakes_when_a_delayed_key_becomes_due() -> None:
    q, clock = new_queue()
    getter = asyncio.create_task(q.get())
    q.add_after("a", 3)
    await settle()
    assert not getter.done()
    clock.advance(3)
    assert await asyncio.wait_for(getter, 5) == "a"


async def test_add_after_works_on_the_real_loop_clock() -> None:
    q = WorkQueue[str]()
    q.add_after("a", 0.01)
    assert await asyncio.wait_for(q.get(), 5) == "a"


async def test_shutdown_wakes_getters_and_refuses_new_work() -> None:
    q, clock = new_queue()
    getters = [asyncio.create_task(q.get()) for _ in range(3)]
    await settle()
    q.add_after("late", 1)
    q.shutdown()
    for getter in getters:
        with pytest.raises(ShutDown):
            await asyncio.wait_for(getter, 5)
    q.add("a")
    q.add_rate_limited("b")
    clock.advance(10)
    assert len(q) == 0
    with pytest.raises(ShutDown):
        await q.get()
    assert q.shutting_down


async def test_get_after_shutdown_raises_even_with_keys_queued() -> None:
    q, _ = new_queue()
    q.add("a")
    q.shutdown()
    with pytest.raises(ShutDown):
        await q.get()


async def test_shut_down_with_drain_waits_for_in_flight_keys() -> None:
    q, _ = new_queue()
    q.add("a")
    q.add("b")
    a = await q.get()
    b = await q.get()
    drain = asyncio.create_task(q.shut_down_with_drain())
    await settle()
    assert not drain.done()
    q.done(a)
    await settle()
    assert not drain.done()
    q.done(b)
    await asyncio.wait_for(drain, 5)


async def test_shut_down_with_drain_returns_at_once_when_idle() -> None:
    q, _ = new_queue()
    await asyncio.wait_for(q.shut_down_with_drain(), 5)


async def test_a_cancelled_getter_passes_its_wakeup_on() -> None:
    q, _ = new_queue()
    first = asyncio.create_task(q.get())
    second = asyncio.create_task(q.get())
    await settle()
    q.add("a")  # wakes `first`...
    first.cancel()  # ...which is cancelled before it can take the key
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) == "a"


async def test_metrics_hooks_see_depth_adds_latency_duration() -> None:
    metrics = RecordingMetrics()
    q, clock = new_queue(metrics=metrics)
    q.add("a")
    q.add("a")
    q.add("b")
    assert metrics.adds == 2
    assert metrics.depths == [1, 2]
    clock.advance(2)
    key = await q.get()
    assert metrics.latencies == [2.0]
    assert metrics.depths[-1] == 1
    clock.advance(3)
    assert q.unfinished_work() == (3.0, 3.0)
    q.done(key)
    assert metrics.durations == [3.0]
    assert q.unfinished_work() == (0.0, 0.0)


async def test_add_rate_limited_waits_at_least_what_the_server_asked() -> None:
    q, clock = new_queue()
    q.add_rate_limited("a", at_least=2.0)  # the backoff alone would be 5 ms
    clock.advance(1.999)
    assert len(q) == 0
    clock.advance(0.001)
    assert len(q) == 1


def test_the_wait_a_server_asks_for_is_capped() -> None:
    from kaos_modelapi.kube import MAX_RETRY_AFTER, ApiError

    assert ApiError(429, "TooManyRequests", "slow down", retry_after=3.0).wait_asked() == 3.0
    assert ApiError(500, "InternalError", "later", retry_after=1e9).wait_asked() == MAX_RETRY_AFTER
    assert ApiError(500, "InternalError", "no hint").wait_asked() == 0.0
