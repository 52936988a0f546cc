"""The leader's write fence: open only while the last renewal is recent enough that nobody else can lead."""

from __future__ import annotations

from typing import Any

import structlog

from kaos_modelapi.kube import ApiError
from kaos_modelapi.leader import LeaderElector, LeaseTiming

TIMING = LeaseTiming(lease_duration=15, renew_deadline=10, retry_period=2)


class FakeLeases:
    """Stands in for KubeClient's get/create/apply of one Lease."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None

    async def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any]:
        if self.lease is None:
            raise ApiError(404, "NotFound", "no lease")
        return self.lease

    async def create(self, obj: dict[str, Any], field_manager: str) -> dict[str, Any]:
        self.lease = {**obj, "metadata": {**obj["metadata"], "resourceVersion": "1"}}
        return self.lease

    async def apply(self, obj: dict[str, Any], field_manager: str, force: bool = False) -> dict[str, Any]:
        return await self.create(obj, field_manager)


def elector(now: list[float]) -> LeaderElector:
    return LeaderElector(FakeLeases(), "ns", "lease", "me", structlog.get_logger(), TIMING,  # type: ignore[arg-type]
                         monotonic=lambda: now[0])


async def test_no_write_before_leading() -> None:
    assert not elector([0.0]).may_write()


async def test_the_fence_closes_renew_deadline_after_the_last_renewal_was_sent() -> None:
    now = [100.0]
    e = elector(now)
    await e.acquire()
    assert e.may_write()
    now[0] = 109.9
    assert e.may_write()
    now[0] = 110.0  # e.g. frozen since: a standby may take the Lease 15 s after it saw that renewal
    assert not e.may_write()
    assert await e._attempt()  # a renewal opens it again
    assert e.may_write()
