"""Kubernetes Events (events.k8s.io/v1) about ModelAPIs, for `kubectl describe modelapi`.

The reconciler emits an Event only when it changes something or when a ModelAPI's state changes, so a
steady cluster writes none. The recorder also drops an Event that repeats the last one told about the same
thing (a warning a reconcile finds again), and, as client-go's spam filter, lets an object have a burst of
Events and then one every few minutes, so an object that flaps or fails in a loop cannot flood the API server.
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
    # What the Event tells the news of; an Event is dropped as a repeat only of the last one about the same thing
    # (its reason when unset). A ModelAPI's states are one thing: Available after a roll is news again, however
    # recently the one before the roll was told.
    about: str | None = None

    @property
    def topic(self) -> str:
        return self.about or self.reason


@dataclass(slots=True)
class _Told:
    """What the recorder has told about one object: the last note on each topic, and its spam filter's tokens."""
    notes: dict[str, tuple[str, str, datetime]]  # topic -> (reason, note, when)
    tokens: float
    at: datetime


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
        repeat_seconds: float = 600.0,
        burst: int = 25,
        refill_seconds: float = 300.0,
        objects_kept: int = 4096,
        terminating: TerminatingNamespaces | None = None,
    ) -> None:
        self._writer = writer
        self._instance = instance
        self._log = log
        self._clock = clock
        self._repeat_seconds = repeat_seconds
        self._burst = burst
        self._refill_seconds = refill_seconds
        self._objects_kept = objects_kept
        self._told: OrderedDict[str, _Told] = OrderedDict()  # by the object's UID, least recently told first
        self._terminating = terminating or TerminatingNamespaces()

    def _may_tell(self, uid: str, event: Event, now: datetime) -> bool:
        """Whether `event` is news and the object still has a token; if so, it is taken as told."""
        told = self._told.get(uid)
        if told is None:
            told = self._told[uid] = _Told({}, float(self._burst), now)
        last = told.notes.get(event.topic)
        if last is not None and last[:2] == (event.reason, event.note) \
                and (now - last[2]).total_seconds() < self._repeat_seconds:
            return False
        tokens = min(float(self._burst), told.tokens + (now - told.at).total_seconds() / self._refill_seconds)
        told.tokens, told.at = tokens, now
        if tokens < 1:
            self._log.debug("event not recorded: too many about this object", reason=event.reason)
            return False
        told.tokens -= 1
        told.notes[event.topic] = (event.reason, event.note, now)
        self._told.move_to_end(uid)
        while len(self._told) > self._objects_kept:
            self._told.popitem(last=False)
        return True

    async def emit(self, regarding: dict[str, Any], event: Event) -> None:
        """Best effort: an Event that cannot be written is logged, never fails a reconcile."""
        now = self._clock()
        if self._terminating.holds(regarding):
            return
        if not self._may_tell(str(regarding["metadata"].get("uid")), event, now):
            return
        try:
            await self._writer.create(event_object(regarding, event, self._instance, now), metadata_only=True)
        except ApiError as e:
            if e.is_namespace_terminating():  # the object goes with its namespace: nothing to tell
                self._log.debug("event not recorded: namespace terminating", reason=event.reason)
                self._terminating.mark(regarding["metadata"]["namespace"], now.strftime("%Y-%m-%dT%H:%M:%SZ"))
                return
            self._log.warning("event not recorded", reason=event.reason, error=str(e))
