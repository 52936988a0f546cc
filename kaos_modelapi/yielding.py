"""Yield the API server to a user who is creating objects in a burst (`kubectl apply -f` of many).

On a small control plane the operator and the API server share the CPU: while a user's `kubectl apply`
creates ModelAPIs one after another, every one wakes a reconcile that makes several writes, and with all
workers busy the user's own sequential requests wait behind them (make bench, N=1000: 16 s without the
operator, 68 s with it). The work has to be done anyway and the machine is saturated either way, so doing
it once the user's burst has passed costs the converge little and gives the user their apply back.

`BurstYield` sees the creations of primary objects (watch events after the initial list): from `burst`
creations within `window` seconds (10 in 2 s: kubectl creates one every 15-70 ms on this 2-core
machine, a person far fewer) until `quiet` seconds pass without one, only `reduced` workers
reconcile (by default one: the queue still drains, in order, and a single ModelAPI applied alone is never
delayed). It never holds longer than `max_hold` seconds in a row, so an endless trickle of creations still
gets every worker now and then.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class BurstYield:
    def __init__(self, workers: int, *, burst: int = 10, window: float = 2.0, quiet: float = 1.5,
                 reduced: int = 1, max_hold: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.reduced = max(1, min(reduced, workers))
        self._burst = burst
        self._window = window
        self._quiet = quiet
        self._max_hold = max_hold
        self._clock = clock
        self._recent: deque[float] = deque(maxlen=burst)
        self._holding_since: float | None = None
        self._last_created = float("-inf")

    def created(self) -> None:
        """A primary object was created by someone (a watch event, not the initial list)."""
        now = self._clock()
        self._last_created = now
        self._recent.append(now)
        if self._holding_since is None and len(self._recent) == self._burst \
                and now - self._recent[0] <= self._window:
            self._holding_since = now

    def holding_for(self) -> float:
        """Seconds until every worker may run again (0: now)."""
        if self._holding_since is None:
            return 0.0
        now = self._clock()
        end = min(self._last_created + self._quiet, self._holding_since + self._max_hold)
        if now >= end:
            self._holding_since = None
            self._recent.clear()
            return 0.0
        return end - now

    def allowed(self) -> int:
        """How many workers may reconcile now."""
        return self.reduced if self.holding_for() > 0 else self.workers
