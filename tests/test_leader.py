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
        self.writes = 0

    async def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any]:
        if self.lease is None:
            raise ApiError(404, "NotFound", "no lease")
        return self.lease

    async def create(self, obj: dict[str, Any], field_manager: str) -> dict[str, Any]:
        self.writes += 1
        self.lease = {**obj, "metadata": {**obj["metadata"], "resourceVersion": "1"}}
        return self.lease

    async def apply(self, obj: dict[str, Any], field_manager: str, force: bool = False) -> dict[str, Any]:
        return await self.create(obj, field_manager)


def elector(now: list[float], leases: FakeLeases | None = None) -> LeaderElector:
    return LeaderElector(leases or FakeLeases(), "ns", "lease", "me", structlog.get_logger(),  # type: ignore[arg-type]
                         TIMING, monotonic=lambda: now[0])


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


async def test_a_leader_frozen_while_renewing_sends_no_renewal_once_thawed() -> None:
    """SIGSTOPped between a renewal's GET and its write, past the renew deadline: once thawed it writes nothing,
    not even the renewal (which the Lease's resourceVersion would have refused if a standby had taken it)."""
    now, leases = [100.0], FakeLeases()
    e = elector(now, leases)
    await e.acquire()
    written = leases.writes
    real_get = leases.get

    async def frozen_get(*args: Any) -> dict[str, Any]:
        lease = await real_get(*args)
        now[0] += 16  # frozen past the lease duration while the answer waited
        return lease

    leases.get = frozen_get  # type: ignore[method-assign]
    assert not await e._attempt()
    assert leases.writes == written
    assert not e.may_write()
