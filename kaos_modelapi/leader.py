"""Leader election on a coordination.k8s.io/v1 Lease, with client-go's timing rules.

Only the leader reconciles (writes). A candidate takes the Lease when its holder has not renewed it for a
full lease duration, measured on the candidate's own clock from when it last saw the record change (so clock
skew between nodes does not matter). The leader renews every retry period and gives up, before the Lease can
expire, once renew_deadline has passed without a successful renewal: it then stops writing at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from . import kube
from .kube import ApiError, KubeClient

_FIELD_MANAGER = "kaos-modelapi-leader-election"


@dataclass(frozen=True)
class LeaseTiming:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("leader election needs lease duration > renew deadline > retry period > 0")


def _micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(namespace: str, name: str, identity: str, timing: LeaseTiming, now: datetime,
               previous: dict[str, Any] | None) -> dict[str, Any]:
    """The Lease as the leader `identity` writes it; keeps acquireTime and counts transitions."""
    spec = (previous or {}).get("spec") or {}
    ours = spec.get("holderIdentity") == identity
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if previous is not None:
        meta["resourceVersion"] = previous["metadata"]["resourceVersion"]  # compare-and-swap
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": int(timing.lease_duration),
            "acquireTime": spec.get("acquireTime") if ours and spec.get("acquireTime") else _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if ours or previous is None else 1),
        },
    }


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        log: structlog.typing.FilteringBoundLogger,
        timing: LeaseTiming = LeaseTiming(),
        on_change: Callable[[bool], None] = lambda leading: None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._name = name
        self.identity = identity
        self._log = log.bind(lease=f"{namespace}/{name}", identity=identity)
        self._timing = timing
        self._on_change = on_change
        self._monotonic = monotonic
        self._wall = wall
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._leading = False
        self._renewed_at = 0.0  # when the last successful acquire or renewal was sent

    def may_write(self) -> bool:
        """Whether this process still holds the Lease for sure: it is leading and its last renewal was sent
        less than renew_deadline ago. A candidate takes over only a full lease_duration after it saw that
        renewal, so writes stop before anyone else can lead, even if this process was frozen in between
        and has not yet noticed (the client's write fence)."""
        return self._leading and self._monotonic() - self._renewed_at < self._timing.renew_deadline

    async def _try_acquire_or_renew(self) -> bool:
        try:
            lease = await self._client.get(kube.LEASE, self._namespace, self._name)
        except ApiError as e:
            if not e.is_not_found():
                raise
            await self._client.create(lease_body(self._namespace, self._name, self.identity, self._timing,
                                                 self._wall(), None), _FIELD_MANAGER)
            return True
        spec = lease.get("spec") or {}
        record = (str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or ""))
        if record != self._observed:
            self._observed, self._observed_at = record, self._monotonic()
        held_by_other = record[0] not in ("", self.identity)
        if held_by_other and self._monotonic() - self._observed_at < self._timing.lease_duration:
            return False
        if self._leading and not self.may_write():
            # A leader past renew_deadline without a renewal (frozen while this attempt was under way) has given
            # the Lease up, as client-go's does: it writes nothing more, not even the renewal.
            return False
        body = lease_body(self._namespace, self._name, self.identity, self._timing, self._wall(), lease)
        await self._client.apply(body, _FIELD_MANAGER, force=True)
        return True

    async def _attempt(self) -> bool:
        sent = self._monotonic()
        try:
            held = await asyncio.wait_for(self._try_acquire_or_renew(), self._timing.retry_period)
        except (ApiError, TimeoutError) as e:
            self._log.warning("lease attempt failed", error=str(e) or type(e).__name__)
            return False
        if held:
            self._renewed_at = sent
        return held

    async def acquire(self) -> None:
        """Return once this process holds the Lease."""
        self._log.info("waiting for leadership")
        while True:
            if await self._attempt():
                break
            await asyncio.sleep(self._timing.retry_period)
        self._log.info("became leader")
        self._leading = True
        self._on_change(True)

    async def hold(self) -> None:
        """Renew until a renewal has failed for renew_deadline; return then (leadership is lost)."""
        last_renewed = self._monotonic()
        while self._monotonic() - last_renewed < self._timing.renew_deadline:
            await asyncio.sleep(self._timing.retry_period)
            if await self._attempt():
                last_renewed = self._monotonic()
            elif self._observed and self._observed[0] not in ("", self.identity):
                break  # someone else holds it now: stop at once
        self._leading = False
        self._log.warning("leadership lost")
        self._on_change(False)

    async def run_while_leading(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Acquire, then run `work` until it returns or leadership is lost (then it is cancelled).
        Returns True when leadership was lost."""
        await self.acquire()
        work_task = asyncio.ensure_future(work())
        hold_task = asyncio.ensure_future(self.hold())
        done, _ = await asyncio.wait({work_task, hold_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in (work_task, hold_task):
            task.cancel()
        await asyncio.gather(work_task, hold_task, return_exceptions=True)
        return hold_task in done

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown so a standby takes over without waiting for expiry."""
        try:
            lease = await self._client.get(kube.LEASE, self._namespace, self._name)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            body = lease_body(self._namespace, self._name, "", self._timing, self._wall(), lease)
            body["spec"]["leaseDurationSeconds"] = 1
            await self._client.apply(body, _FIELD_MANAGER, force=True)
        except ApiError as e:
            self._log.warning("could not release the lease", error=str(e))
