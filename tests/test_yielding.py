"""When the operator yields the API server to a user's burst of creations (kaos_modelapi.yielding).
The decision is pure: fed timestamps by a clock the test moves."""

from __future__ import annotations

from kaos_modelapi.yielding import BurstYield


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def burst(y: BurstYield, clock: Clock, count: int, every: float) -> None:
    for _ in range(count):
        y.created()
        clock.now += every


def test_a_few_modelapis_applied_get_every_worker() -> None:
    clock = Clock()
    y = BurstYield(4, burst=20, window=1.0, clock=clock)
    burst(y, clock, 19, 0.01)  # (the defaults: 10 in 2 s)
    assert y.allowed() == 4
    clock.now += 5
    burst(y, clock, 30, 0.1)  # a steady trickle slower than the burst rate
    assert y.allowed() == 4


def test_a_modelapi_applied_alone_is_reconciled_at_once() -> None:
    clock = Clock()
    y = BurstYield(4, clock=clock)
    y.created()
    assert y.allowed() == 4
    assert y.holding_for() == 0


def test_a_burst_gets_one_worker_until_it_has_been_quiet() -> None:
    clock = Clock()
    y = BurstYield(4, burst=20, window=1.0, quiet=1.5, clock=clock)
    burst(y, clock, 50, 0.02)  # kubectl apply -f of many: one creation every 20 ms
    assert y.allowed() == 1
    clock.now += 1.0
    assert y.allowed() == 1
    assert 0 < y.holding_for() <= 0.5
    clock.now += 0.6
    assert y.allowed() == 4
    burst(y, clock, 5, 0.02)  # a few more later are not a burst again
    assert y.allowed() == 4


def test_a_worker_set_aside_sleeps_until_the_end_it_was_told_or_later() -> None:
    clock = Clock()
    y = BurstYield(4, burst=10, window=2.0, quiet=1.5, clock=clock)
    burst(y, clock, 10, 0.05)
    first = clock.now + y.holding_for()
    burst(y, clock, 10, 0.05)  # the burst goes on: the end moves later, never earlier
    assert clock.now + y.holding_for() > first
    clock.now = first
    assert y.allowed() == 1  # a worker waking at the end it was told looks again and sleeps on


def test_a_burst_that_goes_on_past_the_deferral_gets_one_worker_then_every_worker() -> None:
    clock = Clock()
    y = BurstYield(4, burst=20, window=1.0, defer=5.0, max_hold=10.0, clock=clock)
    burst(y, clock, 20, 0.01)
    assert y.allowed() == 0
    assert 0 < y.holding_for() <= 5.0  # worker 0 wakes when the deferral ends
    burst(y, clock, 300, 0.02)  # 6 s of creations
    assert y.allowed() == 1  # the queue drains, slowly
    assert 0 < y.holding_for() <= 4.0  # the others wake at the bound
    burst(y, clock, 300, 0.02)  # 12 s in all: past the bound
    assert y.allowed() == 4
    burst(y, clock, 1000, 0.02)  # the same burst goes on: never held again
    assert y.allowed() == 4
    clock.now += 2.0  # it has been quiet once: the next burst is held again
    burst(y, clock, 20, 0.01)
    assert y.allowed() == 0


def test_no_worker_at_all_when_asked() -> None:
    clock = Clock()
    y = BurstYield(4, defer=5.0, reduced=0, max_hold=10.0, clock=clock)
    burst(y, clock, 200, 0.04)  # 8 s of creations
    assert y.allowed() == 0


def test_a_bound_reached_just_as_the_burst_ends_does_not_stop_the_next() -> None:
    clock = Clock()
    y = BurstYield(4, burst=10, window=2.0, quiet=1.5, max_hold=10.0, clock=clock)
    burst(y, clock, 10, 0.1)
    clock.now += 20  # quiet long before the bound; nobody looked in between
    assert y.allowed() == 4
    burst(y, clock, 10, 0.1)
    assert y.allowed() == 1


def test_the_defaults_see_a_loaded_kubectl_as_a_burst_and_a_person_not() -> None:
    clock = Clock()
    y = BurstYield(4, clock=clock)
    burst(y, clock, 9, 0.5)  # kubectl apply of a few files, or a person: a creation every half second
    assert y.allowed() == 4
    clock.now += 10
    burst(y, clock, 12, 0.07)  # kubectl apply -f of many on a loaded machine: 15 a second
    assert y.allowed() == 1


def test_a_burst_after_an_outlasted_hold_and_a_quiet_spell_nobody_saw_is_held() -> None:
    clock = Clock()
    y = BurstYield(4, burst=10, window=2.0, quiet=1.5, max_hold=10.0, clock=clock)
    burst(y, clock, 600, 0.05)  # 30 s of creations, the bound passes unseen (no worker looked)
    clock.now += 10  # quiet, still unseen
    burst(y, clock, 10, 0.05)
    assert y.allowed() == 1
