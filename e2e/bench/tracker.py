"""Watch timestamps of the ModelAPIs of one namespace and of their Deployments.

Nothing here is specific to this operator: a ModelAPI is Ready when its status says so (`ready: true`,
`phase: Ready` or a `Ready` condition that is True) for its current generation (when the status carries
`observedGeneration`), and a Deployment is rolled out when its controller has observed its generation and all
its replicas are updated and available.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from e2e.bench.client import Api, Obj, path


def is_ready(obj: Obj) -> bool:
    st = obj.get("status") or {}
    observed = st.get("observedGeneration")
    if observed is not None and observed < obj["metadata"].get("generation", 0):
        return False
    if st.get("ready") is True or st.get("phase") == "Ready":
        return True
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def rolled_out(dep: Obj) -> bool:
    st, spec = dep.get("status") or {}, dep.get("spec") or {}
    wanted = spec.get("replicas", 1)
    available = any(c.get("type") == "Available" and c.get("status") == "True" for c in st.get("conditions") or [])
    return (st.get("observedGeneration", 0) >= dep["metadata"].get("generation", 0) and available
            and st.get("updatedReplicas", 0) == wanted and st.get("availableReplicas", 0) >= wanted
            and st.get("replicas", 0) == wanted)


def _status_current(obj: Obj) -> bool:
    """A status written for the object's current generation (when the status says which)."""
    st = obj.get("status") or {}
    observed = st.get("observedGeneration")
    return bool(st) and (observed is None or observed >= obj["metadata"].get("generation", 0))


def _owner(obj: Obj) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "ModelAPI" and ref.get("controller"):
            return str(ref["name"])
    return None


@dataclass
class Times:
    status: float | None = None  # first event with a status
    ready: float | None = None  # first event Ready for the current generation
    deployment: float | None = None  # its Deployment first seen
    rolled: float | None = None  # its Deployment rolled out (for the generation being tracked)
    ready_after_rolled: float | None = None  # first ModelAPI event Ready at or after `rolled`


@dataclass
class Tracker:
    api: Api
    namespace: str
    times: dict[str, Times] = field(default_factory=dict)
    modelapis: dict[str, Obj] = field(default_factory=dict)
    deployment_generation: dict[str, int] = field(default_factory=dict)  # roll only past these (update)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        ready = [asyncio.Event(), asyncio.Event()]
        self._tasks = [
            asyncio.create_task(self.api.watch(path("ModelAPI", self.namespace), self._modelapi, ready[0])),
            asyncio.create_task(self.api.watch(path("Deployment", self.namespace), self._deployment, ready[1])),
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 120)
        except BaseException:  # (it never lists, or the run is stopped: the watches go too)
            await self.stop()
            raise

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def reset(self, deployments: list[Obj]) -> None:
        """Track anew (an update): a Deployment counts as rolled out only past its generation now."""
        self.times = {}
        for dep in deployments:
            name = _owner(dep)
            if name is not None:
                self.deployment_generation[name] = dep["metadata"].get("generation", 0)

    def _t(self, name: str) -> Times:
        return self.times.setdefault(name, Times())

    def _modelapi(self, kind: str, obj: Obj, now: float) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.modelapis.pop(name, None)
            return
        self.modelapis[name] = obj
        t = self._t(name)
        if t.status is None and _status_current(obj):
            t.status = now
        if is_ready(obj):
            if t.ready is None:
                t.ready = now
            if t.rolled is not None and t.ready_after_rolled is None:
                t.ready_after_rolled = now

    def _deployment(self, kind: str, obj: Obj, now: float) -> None:
        name = _owner(obj)
        if name is None or kind == "DELETED":
            return
        t = self._t(name)
        if t.deployment is None:
            t.deployment = now
        past = obj["metadata"].get("generation", 0) > self.deployment_generation.get(name, 0)
        if past and t.rolled is None and rolled_out(obj):
            t.rolled = now
            m = self.modelapis.get(name)
            if m is not None and is_ready(m) and t.ready_after_rolled is None and self._status_newer(m, obj):
                t.ready_after_rolled = now

    @staticmethod
    def _status_newer(m: Obj, dep: Obj) -> bool:
        """Whether the ModelAPI's status already mirrors this rolled-out Deployment (written before we saw it)."""
        mirror = ((m.get("status") or {}).get("deployment")) or {}
        st = dep.get("status") or {}
        return bool(mirror) and mirror.get("updatedReplicas") == st.get("updatedReplicas") and \
            mirror.get("availableReplicas") == st.get("availableReplicas")

    # --- what the scenarios ask ---------------------------------------------------------------------------

    def count(self, attr: str) -> int:
        return sum(1 for t in self.times.values() if getattr(t, attr) is not None)

    def last(self, attr: str) -> float:
        values: list[float | None] = [getattr(t, attr) for t in self.times.values()]
        return max(v for v in values if v is not None)

    def propagation_ms(self) -> list[float]:
        """Deployment rolled out -> ModelAPI Ready, per ModelAPI, in ms (0 when the status came first)."""
        return sorted(max(0.0, (t.ready_after_rolled - t.rolled) * 1000) for t in self.times.values()
                      if t.rolled is not None and t.ready_after_rolled is not None)

    async def until(self, check: Any, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            await asyncio.sleep(0.1)
        return time.monotonic()
