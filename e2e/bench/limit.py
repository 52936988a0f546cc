"""The limit: the same children and statuses as the operator, written by a minimal client.

No informer caches, no work queue with deduplication or backoff, no diff: a watch on the namespace's ModelAPIs
and one on its Deployments feed a plain FIFO that `workers` tasks (the operator's --workers) drain. A ModelAPI
whose generation is new gets every child `kaos_modelapi.desired` builds (server-side apply; the generated
master-key Secret created once), then its status; a Deployment that has rolled out writes its ModelAPI's status
when the phase or the generation it reports changes. What the operator cannot beat is this client's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from e2e.bench.client import Api, ApiError, Obj, path
from e2e.bench.tracker import rolled_out
from kaos_modelapi import desired, status
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.settings import Settings

MANAGER = "kaos-bench-limit"


@dataclass
class LimitClient:
    api: Api
    namespace: str
    settings: Settings
    workers: int = 4
    queue: asyncio.Queue[tuple[str, Obj]] = field(default_factory=asyncio.Queue)
    modelapis: dict[str, Obj] = field(default_factory=dict)  # the last watch event of each: the object itself
    deployments: dict[str, Obj] = field(default_factory=dict)
    applied_generation: dict[str, int] = field(default_factory=dict)
    written: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (phase, generation) written
    secrets_made: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        self._tasks += [
            asyncio.create_task(self.api.watch(path("ModelAPI", self.namespace), self._on_modelapi)),
            asyncio.create_task(self.api.watch(path("Deployment", self.namespace), self._on_deployment)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _on_modelapi(self, kind: str, obj: Obj, _: float) -> None:
        if kind != "DELETED":
            self.modelapis[obj["metadata"]["name"]] = obj
            self.queue.put_nowait(("modelapi", obj))

    def _on_deployment(self, kind: str, obj: Obj, _: float) -> None:
        name = obj["metadata"].get("labels", {}).get("modelapi")
        if kind != "DELETED" and name:
            self.deployments[name] = obj
            # Only a rolled-out Deployment changes what the status says (Pending -> Ready); its other events
            # (replicas created, pods pending) would only be computed and dropped.
            if rolled_out(obj):
                self.queue.put_nowait(("deployment", obj))

    async def _worker(self) -> None:
        while True:
            what, obj = await self.queue.get()
            try:
                if what == "modelapi":
                    await self._children(obj)
                else:
                    await self._status(obj["metadata"]["labels"]["modelapi"])
            except ApiError as e:
                self.errors.append(str(e))

    async def _children(self, obj: Obj) -> None:
        meta = obj["metadata"]
        name, generation = meta["name"], meta.get("generation", 0)
        if self.applied_generation.get(name, -1) >= generation:
            return
        self.applied_generation[name] = generation
        m = ModelAPI.model_validate(obj)
        built = desired.build(m, self.settings)
        generated = {g.secret: g.key for g in built.generated}
        for child in built.children:
            child_name = child["metadata"]["name"]
            if child["kind"] == "Secret" and child_name in generated:
                if child_name not in self.secrets_made:
                    self.secrets_made.add(child_name)
                    body = dict(child, stringData={generated[child_name]: secrets.token_urlsafe(32)})
                    await self.api.create(body)
                continue
            await self.api.apply(child, MANAGER)
        await self._status(name)

    async def _status(self, name: str) -> None:
        obj = self.modelapis.get(name)
        if obj is None or self.applied_generation.get(name) is None:
            return
        m = ModelAPI.model_validate(obj)
        built = desired.build(m, self.settings)
        observed = status.Observed(self.deployments.get(name))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        new = status.compute(m, built, observed, now, obj.get("status"))
        mark = (new["phase"] + ("" if new["conditions"][0]["reason"] != "RollingOut" else "-rolling"),
                m.metadata.generation or 0)
        if self.written.get(name) == mark:
            return
        self.written[name] = mark
        body: dict[str, Any] = {"apiVersion": obj["apiVersion"], "kind": "ModelAPI",
                                "metadata": {"name": name, "namespace": self.namespace}, "status": new}
        await self.api.apply(body, MANAGER, status=True)
