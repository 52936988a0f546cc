"""The bench's limit client (e2e/bench/limit.py): when a ModelAPI event shows that its status was lost.

Two status writes of one ModelAPI can be in flight at once and land in either order; the client writes again
when the newest version it has seen (event or answer, by resourceVersion) shows another status than the one
it wrote last, and none of its writes of it is in flight. Pure rules, no API server: the writes themselves are exercised
against the real one by e2e/test_bench.py and `make bench`.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from e2e.bench import manifests
from e2e.bench.client import Api
from e2e.bench.limit import LimitClient, mark_of
from kaos_modelapi.settings import Settings


def event(version: int, phase: str | None, generation: int = 1, reason: str = "") -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "m", "resourceVersion": str(version), "generation": generation}}
    if phase is not None:
        obj["status"] = {"phase": phase, "observedGeneration": generation,
                         "conditions": [{"type": "Ready", "reason": reason}]}
    return obj


def client() -> LimitClient:
    return LimitClient(Api("https://127.0.0.1:1", ssl.create_default_context(), {}), "ns", Settings())


def test_mark_tells_phase_rolling_and_generation() -> None:
    assert mark_of(None) is None and mark_of({}) is None
    assert mark_of(event(1, "Ready", 3)["status"]) == ("Ready", 3)
    assert mark_of(event(1, "Pending", 2, "RollingOut")["status"]) == ("Pending-rolling", 2)


def test_an_older_write_that_landed_last_is_written_again() -> None:
    c = client()
    c._note(event(10, "Ready"))  # the Ready write, sent second, landed first
    c._note(event(11, "Pending"))  # the Pending write, sent first, landed last
    assert c._lost("m", ("Ready", 1))
    c._note(event(12, "Ready"))  # written again
    assert not c._lost("m", ("Ready", 1))


def test_no_rewrite_for_a_stale_event_or_while_a_write_is_in_flight() -> None:
    c = client()
    c._note(event(8, "Ready"))  # the answer to the Ready write
    c._note(event(5, "Pending"))  # the event of the earlier Pending write, seen late: old news
    assert not c._lost("m", ("Ready", 1))
    c._note(event(9, "Pending"))
    c.in_flight["m"] = 1  # its answer will be checked
    assert not c._lost("m", ("Ready", 1))
    c.in_flight["m"] = 0
    assert c._lost("m", ("Ready", 1))
    assert not client()._lost("m", ("Ready", 1))  # nothing seen yet: nothing known


async def test_a_pending_write_that_lands_over_the_ready_one_is_written_again() -> None:
    """The Pending write (sent first) is answered last, over the Ready one, and the event that shows it came
    while it was in flight: the status written last (Ready) is written again."""
    c = client()
    obj = {**manifests.modelapi(0, "ns", prefix="m"), "metadata": {"name": "m", "namespace": "ns", "uid": "u",
                                                                   "generation": 1, "resourceVersion": "5"}}
    c.modelapis["m"], c.applied_generation["m"] = obj, 1
    gates = [asyncio.Event(), asyncio.Event()]
    sent: list[str] = []
    version = iter(range(10, 20))

    async def apply(body: dict[str, Any], manager: str, **_: Any) -> dict[str, Any]:
        sent.append(body["status"]["phase"])
        if len(sent) <= len(gates):
            await gates[len(sent) - 1].wait()
        return event(next(version), body["status"]["phase"])

    c.api.apply = apply  # type: ignore[method-assign]
    pending = asyncio.create_task(c._status("m"))
    await asyncio.sleep(0)
    c.deployments["m"] = {"spec": {"replicas": 1}, "status": {
        "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1,
        "conditions": [{"type": "Available", "status": "True"}]}}
    ready = asyncio.create_task(c._status("m"))
    await asyncio.sleep(0)
    gates[1].set()
    await ready  # answered first (version 10)
    c._note(event(11, "Pending"))  # the Pending write's event, while it is still in flight
    await c._status("m")  # (what the event wakes: nothing known yet)
    gates[0].set()
    await pending  # answered last (version 11)
    assert sent == ["Pending", "Ready", "Ready"]
    assert c.stored["m"][1] == ("Ready", 1)
