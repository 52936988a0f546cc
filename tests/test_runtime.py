"""The controller's workers: keys from the queue to the reconciler, without starving the event loop."""

from __future__ import annotations

import asyncio
import itertools

import structlog
from prometheus_client import CollectorRegistry

from kaos_modelapi import kube
from kaos_modelapi.observability import Metrics
from kaos_modelapi.runtime import Builder, CacheSpec, Result, Stores
from kaos_modelapi.yielding import BurstYield


class Instant:
    """A reconciler that never suspends (what a reconcile of a converged object is: nothing to write)."""

    def __init__(self) -> None:
        self.done: list[str] = []

    async def reconcile(self, key: str) -> Result:
        self.done.append(key)
        return Result()


async def test_between_any_two_reconciles_that_write_nothing_the_event_loop_runs_everything_else() -> None:
    """A pass of reconciles that never suspend (a resync of a converged set) must not hold the event loop (watch
    events, /metrics); and one worker pauses at a time: with 16 each pausing on their own, 16 such reconciles
    ran between two passes of the loop, and an answer a user's reconcile awaited waited behind as many."""
    reconciler = Instant()
    ctrl = Builder("t").for_(CacheSpec(kube.MODELAPI)).complete(
        reconciler, workers=16, resync_seconds=3600, metrics=Metrics(CollectorRegistry(), "t"),
        log=structlog.get_logger("test"))
    for i in range(200):
        ctrl.queue.add(f"ns/m{i}")
    seen: list[int] = []  # reconciles done, at each pass of the loop

    async def other_task() -> None:  # e.g. a watch event, or a /metrics request
        while len(reconciler.done) < 200:
            seen.append(len(reconciler.done))
            await asyncio.sleep(0)

    runner = asyncio.create_task(ctrl.run(Stores()))
    await asyncio.wait_for(other_task(), 10)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert max(b - a for a, b in itertools.pairwise(seen)) == 1


class Slow:
    """A reconciler that writes (suspends a while), counting how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.done: list[str] = []

    async def reconcile(self, key: str) -> Result:
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.005)
        self.running -= 1
        self.done.append(key)
        return Result()

    async def until(self, count: int) -> None:
        while len(self.done) < count:
            await asyncio.sleep(0.001)


def modelapi_at(name: str, generation: int, labels: dict[str, str] | None = None) -> kube.Obj:
    return {"metadata": {"namespace": "ns", "name": name, "generation": generation, "labels": labels or {}}}


async def test_a_burst_waits_until_it_has_passed_while_other_work_goes_on() -> None:
    reconciler = Slow()
    ctrl = Builder("t").for_(CacheSpec(kube.MODELAPI)).complete(
        reconciler, workers=4, resync_seconds=3600, metrics=Metrics(CollectorRegistry(), "t"),
        log=structlog.get_logger("test"))
    ctrl.yielding = BurstYield(quiet=0.3)
    during: list[str] = []  # what was reconciled while the burst was held
    reconcile = reconciler.reconcile

    async def noting(key: str) -> Result:
        if ctrl.yielding.holding_for() > 0:
            during.append(key)
        return await reconcile(key)

    reconciler.reconcile = noting  # type: ignore[method-assign]
    (watch,) = ctrl.watches
    enqueue = ctrl.handler(watch, Stores())
    runner = asyncio.create_task(ctrl.run(Stores()))
    await asyncio.sleep(0)
    for i in range(60):  # kubectl apply -f of 60 ModelAPIs: each a watch event "add", all at once
        enqueue("add", None, modelapi_at(f"m{i}", 1))
    # Meanwhile a change that is not a new spec (a label): reconciled at once, as is the rest of the world.
    enqueue("update", modelapi_at("other", 3), modelapi_at("other", 3, {"team": "a"}))
    await asyncio.wait_for(reconciler.until(1), 10)
    assert reconciler.done == ["ns/other"]
    await asyncio.wait_for(reconciler.until(61), 10)
    assert during == ["ns/other"]  # none of the burst's
    assert sorted(reconciler.done[1:]) == sorted(f"ns/m{i}" for i in range(60))
    assert reconciler.most > 1  # then by every worker

    # A burst of spec changes (a new generation each) is held the same way.
    await asyncio.wait_for(_until_not_holding(ctrl.yielding), 10)
    during.clear()
    for i in range(60):
        enqueue("update", modelapi_at(f"m{i}", 1), modelapi_at(f"m{i}", 2))
    await asyncio.wait_for(reconciler.until(121), 10)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert during == []
    assert sorted(reconciler.done[61:]) == sorted(f"ns/m{i}" for i in range(60))


async def _until_not_holding(y: BurstYield) -> None:
    while y.holding_for() > 0:
        await asyncio.sleep(0.01)


def modelapi(name: str, generation: int, observed: int | None) -> kube.Obj:
    status = {} if observed is None else {"status": {"observedGeneration": observed}}
    return {"metadata": {"namespace": "ns", "name": name, "generation": generation}, **status}


async def test_a_start_reconciles_what_changed_while_no_operator_ran_before_the_settled_rest() -> None:
    reconciler = Instant()
    primary = CacheSpec(kube.MODELAPI)
    ctrl = Builder("t").for_(primary).owns(CacheSpec(kube.DEPLOYMENT)).complete(
        reconciler, workers=1, resync_seconds=3600, metrics=Metrics(CollectorRegistry(), "t"),
        log=structlog.get_logger("test"))
    modelapis, deployments = ctrl.watches
    stores = Stores()
    on_modelapi, on_deployment = ctrl.handler(modelapis, stores), ctrl.handler(deployments, stores)
    # The caches' initial lists, in the server's order: settled ModelAPIs first, their children, then the
    # ones created or edited while the operator was down (no status yet; a new generation).
    for i in range(3):
        on_modelapi("add", None, modelapi(f"settled-{i}", 1, 1))
        child = {"metadata": {"namespace": "ns", "name": f"settled-{i}", "ownerReferences": [
            {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "name": f"settled-{i}", "controller": True}]}}
        on_deployment("add", None, child)
    on_modelapi("add", None, modelapi("created", 1, None))
    on_modelapi("add", None, modelapi("edited", 3, 2))
    runner = asyncio.create_task(ctrl.run(stores))

    async def all_five() -> None:
        while len(reconciler.done) < 5:
            await asyncio.sleep(0)

    await asyncio.wait_for(all_five(), 10)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert reconciler.done == ["ns/created", "ns/edited", "ns/settled-0", "ns/settled-1", "ns/settled-2"]
