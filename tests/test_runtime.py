"""The controller's workers: keys from the queue to the reconciler, without starving the event loop."""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CollectorRegistry

from kaos_modelapi import kube
from kaos_modelapi.observability import Metrics
from kaos_modelapi.runtime import Builder, CacheSpec, Result, Stores


class Instant:
    """A reconciler that never suspends (what a reconcile of a converged object is: nothing to write)."""

    def __init__(self) -> None:
        self.done: list[str] = []

    async def reconcile(self, key: str) -> Result:
        self.done.append(key)
        return Result()


async def test_a_pass_of_reconciles_that_write_nothing_lets_other_tasks_run() -> None:
    reconciler = Instant()
    ctrl = Builder("t").for_(CacheSpec(kube.MODELAPI)).complete(
        reconciler, workers=2, resync_seconds=3600, metrics=Metrics(CollectorRegistry(), "t"),
        log=structlog.get_logger("test"))
    for i in range(200):
        ctrl.queue.add(f"ns/m{i}")
    ticks: list[int] = []

    async def other_task() -> None:  # e.g. a watch event, or a /metrics request
        while len(reconciler.done) < 200:
            ticks.append(len(reconciler.done))
            await asyncio.sleep(0)

    runner = asyncio.create_task(ctrl.run(Stores()))
    await asyncio.wait_for(other_task(), 10)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert len(reconciler.done) == 200
    assert any(0 < t < 200 for t in ticks), "the other task only ran before or after the whole pass"
