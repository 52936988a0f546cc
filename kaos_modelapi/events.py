"""Kubernetes Events (events.k8s.io/v1) about ModelAPIs, for `kubectl describe modelapi`.

The reconciler emits an Event only when it changes something or when a ModelAPI's state changes, so a
steady cluster writes none; the recorder also drops an identical Event seen recently, so an object that
flaps or fails in a loop cannot flood the API server.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from .kube import ApiError, TerminatingNamespaces

NORMAL = "Normal"
WARNING = "Warning"
REPORTING_CONTROLLER = "kaos.tools/modelapi-controller"


class EventWriter(Protocol):
    async def create(self, obj: dict[str, Any], field_manager: str | None = None, *,
                     metadata_only: bool = False) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    action: str
    note: str


def event_object(regarding: dict[str, Any], event: Event, instance: str, now: datetime) -> dict[str, Any]:
    meta = regarding["metadata"]
    digest = hashlib.sha256(f"{meta.get('uid')}{event.reason}{event.note}{now.isoformat()}".encode())
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{digest.hexdigest()[:12]}", "namespace": meta["namespace"]},
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": instance,
        "action": event.action,
        "reason": event.reason,
        "note": event.note[:1024],
        "type": event.type,
        "regarding": {
            "apiVersion": regarding["apiVersion"], "kind": regarding["kind"], "name": meta["name"],
            "namespace": meta["namespace"], "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
    }


class Recorder:
    def __init__(
        self,
        writer: EventWriter,
        instance: str,
        log: structlog.typing.FilteringBoundLogger,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        dedup_seconds: float = 600.0,
        dedup_size: int = 4096,
        terminating: TerminatingNamespaces | None = None,
    ) -> None:
        self._writer = writer
        self._instance = instance
        self._log = log
        self._clock = clock
        self._dedup_seconds = dedup_seconds
        self._dedup_size = dedup_size
        self._recent: OrderedDict[tuple[str, str, str], datetime] = OrderedDict()
        self._terminating = terminating or TerminatingNamespaces()

    def _is_duplicate(self, key: tuple[str, str, str], now: datetime) -> bool:
        last = self._recent.get(key)
        if last is not None and (now - last).total_seconds() < self._dedup_seconds:
            return True
        self._recent[key] = now
        self._recent.move_to_end(key)
        while len(self._recent) > self._dedup_size:
            self._recent.popitem(last=False)
        return False

    async def emit(self, regarding: dict[str, Any], event: Event) -> None:
        """Best effort: an Event that cannot be written is logged, never fails a reconcile."""
        now = self._clock()
        if self._terminating.holds(regarding):
            return
        if self._is_duplicate((str(regarding["metadata"].get("uid")), event.reason, event.note), now):
            return
        try:
            await self._writer.create(event_object(regarding, event, self._instance, now), metadata_only=True)
        except ApiError as e:
            if e.is_namespace_terminating():  # the object goes with its namespace: nothing to tell
                self._log.debug("event not recorded: namespace terminating", reason=event.reason)
                self._terminating.mark(regarding["metadata"]["namespace"], now.strftime("%Y-%m-%dT%H:%M:%SZ"))
                return
            self._log.warning("event not recorded", reason=event.reason, error=str(e))
