"""When the operator yields the API server to a user's burst of changes (kaos_modelapi.yielding).
The decision is pure: fed timestamps by a clock the test moves."""

from __future__ import annotations

from kaos_modelapi.yielding import BurstYield


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def burst(y: BurstYield, clock: Clock, count: int, every: float) -> list[bool]:
    """`count` changes `every` seconds apart: for each, whether its reconcile waits for the burst."""
    held = []
    for _ in range(count):
        held.append(y.changed())
        clock.now += every
    return held


def test_a_few_modelapis_applied_are_reconciled_at_once() -> None:
    clock = Clock()
    y = BurstYield(burst=20, window=1.0, clock=clock)
    assert not any(burst(y, clock, 19, 0.01))  # (the defaults: 3 in 0.5 s)
    clock.now += 5
    assert not any(burst(y, clock, 30, 0.1))  # a steady trickle slower than the burst rate
    assert y.holding_for() == 0


def test_a_modelapi_applied_alone_is_reconciled_at_once() -> None:
    clock = Clock()
    y = BurstYield(clock=clock)
    assert not y.changed()
    assert y.holding_for() == 0


def test_a_burst_is_held_from_its_rate_until_it_has_been_quiet() -> None:
    clock = Clock()
    y = BurstYield(burst=20, window=1.0, quiet=1.5, clock=clock)
    held = burst(y, clock, 50, 0.02)  # kubectl apply -f of many: one creation every 20 ms
    assert held == [False] * 19 + [True] * 31  # from the 20th, when the rate is seen
    clock.now += 1.0
    assert 0 < y.holding_for() <= 0.5
    clock.now += 0.6
    assert y.holding_for() == 0
    assert not any(burst(y, clock, 5, 0.02))  # a few more later are not a burst again


def test_whoever_waits_sleeps_until_the_end_it_was_told_or_later() -> None:
    clock = Clock()
    y = BurstYield(burst=10, window=2.0, quiet=1.5, clock=clock)
    burst(y, clock, 10, 0.05)
    first = clock.now + y.holding_for()
    burst(y, clock, 10, 0.05)  # the burst goes on: the end moves later, never earlier
    assert clock.now + y.holding_for() > first
    clock.now = first
    assert y.holding_for() > 0  # waking at the end it was told, it looks again and sleeps on


def test_a_burst_that_outlasts_the_bound_is_released_and_not_held_again_until_quiet() -> None:
    clock = Clock()
    y = BurstYield(burst=20, window=1.0, max_hold=10.0, clock=clock)
    assert burst(y, clock, 300, 0.02)[-1]  # 6 s of creations: held
    assert 0 < y.holding_for() <= 4.0  # released at the bound at the latest
    assert not burst(y, clock, 300, 0.02)[-1]  # 12 s in all: past the bound
    assert y.holding_for() == 0
    assert not any(burst(y, clock, 1000, 0.02))  # the same burst goes on: never held again
    clock.now += 2.0  # it has been quiet once: the next burst is held again
    assert burst(y, clock, 20, 0.01)[-1]


def test_a_bound_reached_just_as_the_burst_ends_does_not_stop_the_next() -> None:
    clock = Clock()
    y = BurstYield(burst=10, window=2.0, quiet=1.5, max_hold=10.0, clock=clock)
    burst(y, clock, 10, 0.1)
    clock.now += 20  # quiet long before the bound; nobody looked in between
    assert y.holding_for() == 0
    assert burst(y, clock, 10, 0.1)[-1]


def test_the_defaults_see_a_loaded_kubectl_as_a_burst_and_a_person_not() -> None:
    clock = Clock()
    y = BurstYield(clock=clock)
    assert not any(burst(y, clock, 9, 0.5))  # kubectl apply run again and again, or a person: one every half second
    clock.now += 10
    assert burst(y, clock, 3, 0.07) == [False, False, True]  # kubectl apply -f of many on a loaded machine
    # (15 a second): held from the third


def test_a_burst_after_an_outlasted_hold_and_a_quiet_spell_nobody_saw_is_held() -> None:
    clock = Clock()
    y = BurstYield(burst=10, window=2.0, quiet=1.5, max_hold=10.0, clock=clock)
    burst(y, clock, 600, 0.05)  # 30 s of creations, the bound passes unseen (nobody looked)
    clock.now += 10  # quiet, still unseen
    assert burst(y, clock, 10, 0.05)[-1]
