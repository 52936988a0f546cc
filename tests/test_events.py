"""Which Events the recorder writes: what `kubectl describe modelapi` shows a user."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from kaos_modelapi.events import NORMAL, WARNING, Event, Recorder

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


class Writer:
    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []

    async def create(self, obj: dict[str, Any], field_manager: str | None = None, *,
                     metadata_only: bool = False) -> dict[str, Any]:
        self.written.append(obj)
        return obj


def modelapi(uid: str = "u1") -> dict[str, Any]:
    return {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI",
            "metadata": {"name": f"m-{uid}", "namespace": "a", "uid": uid, "resourceVersion": "1"}}


def state(reason: str, note: str) -> Event:
    return Event(NORMAL, reason, "Reconcile", note, about="Ready")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def recorder() -> tuple[Recorder, Writer, Clock]:
    writer, clock = Writer(), Clock()
    return Recorder(writer, "test", structlog.get_logger("test"), clock=clock), writer, clock


def said(writer: Writer) -> list[str]:
    return [e["reason"] for e in writer.written]


async def test_a_roll_ends_with_available_however_recently_it_was_available_before() -> None:
    rec, writer, clock = recorder()
    await rec.emit(modelapi(), state("Available", "1 of 1 pods ready"))
    clock.now += timedelta(seconds=30)
    await rec.emit(modelapi(), Event(NORMAL, "ConfigRolled", "Update", "pod template changed (config a1)"))
    await rec.emit(modelapi(), state("RollingOut", "rolling out: 0 of 1 pods updated"))
    clock.now += timedelta(seconds=5)
    await rec.emit(modelapi(), state("Available", "1 of 1 pods ready"))
    assert said(writer) == ["Available", "ConfigRolled", "RollingOut", "Available"]


async def test_each_roll_is_told() -> None:
    rec, writer, _ = recorder()
    for config in ("a1", "b2"):
        await rec.emit(modelapi(), Event(NORMAL, "ConfigRolled", "Update", f"pod template changed (config {config})"))
    assert said(writer) == ["ConfigRolled", "ConfigRolled"]


async def test_a_warning_every_reconcile_finds_again_is_told_once_between_state_changes() -> None:
    rec, writer, clock = recorder()
    missing = Event(WARNING, "GatewayAPIMissing", "Reconcile", "HTTPRoute modelapi-m not created")
    for step in ("PodsNotReady", "Available"):
        for _ in range(3):
            await rec.emit(modelapi(), missing)
            clock.now += timedelta(seconds=1)
        await rec.emit(modelapi(), state(step, step))
    assert said(writer) == ["GatewayAPIMissing", "PodsNotReady", "Available"]
    clock.now += timedelta(minutes=11)  # still missing, a while later: said again
    await rec.emit(modelapi(), missing)
    assert said(writer)[-1] == "GatewayAPIMissing"


async def test_an_object_that_flaps_gets_a_burst_then_one_event_every_few_minutes() -> None:
    rec, writer, clock = recorder()
    for i in range(40):
        await rec.emit(modelapi(), state("Available" if i % 2 else "PodsNotReady", f"flip {i % 2}"))
        clock.now += timedelta(seconds=1)
    assert len(writer.written) == 25
    await rec.emit(modelapi("other"), state("Available", "1 of 1 pods ready"))  # others are not held back
    assert len(writer.written) == 26
    clock.now += timedelta(minutes=5)
    await rec.emit(modelapi(), state("PodsNotReady", "flip 0"))
    await rec.emit(modelapi(), state("Available", "flip 1"))
    assert len(writer.written) == 27
