"""When the operator yields the API server to a user's changes (kaos_modelapi.yielding).
The decision is pure: fed timestamps by a clock the test moves."""

from __future__ import annotations

import pytest

from kaos_modelapi.yielding import BurstYield


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def burst(y: BurstYield, clock: Clock, count: int, every: float) -> list[bool]:
    """`count` changes `every` seconds apart: for each, whether its reconcile waits."""
    held = []
    for _ in range(count):
        held.append(y.changed())
        clock.now += every
    return held


def test_a_modelapi_applied_alone_waits_only_a_moment() -> None:
    clock = Clock()
    y = BurstYield(settle=0.2, quiet=0.5, clock=clock)
    assert y.changed()
    assert y.holding_for() == pytest.approx(0.2)
    clock.now += 0.2
    assert y.holding_for() == 0


def test_changes_a_person_makes_a_few_tenths_of_a_second_apart_each_wait_only_a_moment() -> None:
    clock = Clock()
    y = BurstYield(settle=0.2, quiet=0.5, clock=clock)
    for _ in range(10):
        assert y.changed()
        assert y.holding_for() == pytest.approx(0.2)
        clock.now += 0.3  # (nobody looked: the hold ends by itself)
        assert y.holding_for() == 0


def test_a_burst_is_held_from_its_first_change_until_it_has_been_quiet() -> None:
    clock = Clock()
    y = BurstYield(settle=0.2, quiet=1.5, clock=clock)
    assert all(burst(y, clock, 50, 0.02))  # kubectl apply -f of many: one creation every 20 ms
    clock.now += 1.0
    assert 0 < y.holding_for() <= 0.5
    clock.now += 0.6
    assert y.holding_for() == 0
    clock.now += 5
    y.changed()
    assert y.holding_for() == pytest.approx(0.2)  # a change alone later waits a moment again, not the quiet


def test_whoever_waits_sleeps_until_the_end_it_was_told_or_later() -> None:
    clock = Clock()
    y = BurstYield(quiet=1.5, clock=clock)
    y.changed()
    first = clock.now + y.holding_for()
    clock.now += 0.1
    burst(y, clock, 10, 0.05)  # more come: a burst, the end moves later, never earlier
    assert clock.now + y.holding_for() > first
    clock.now = first
    assert y.holding_for() > 0  # waking at the end it was told, it looks again and sleeps on


def test_a_burst_that_outlasts_the_bound_is_released_and_not_held_again_until_quiet() -> None:
    clock = Clock()
    y = BurstYield(max_hold=10.0, clock=clock)
    assert burst(y, clock, 300, 0.02)[-1]  # 6 s of creations: held
    assert 0 < y.holding_for() <= 4.0  # released at the bound at the latest
    assert not burst(y, clock, 300, 0.02)[-1]  # 12 s in all: past the bound
    assert y.holding_for() == 0
    assert not any(burst(y, clock, 1000, 0.02))  # the same burst goes on: never held again
    clock.now += 2.0  # it has been quiet once: the next change is held again
    assert burst(y, clock, 20, 0.01)[-1]


def test_a_bound_reached_just_as_the_burst_ends_does_not_stop_the_next() -> None:
    clock = Clock()
    y = BurstYield(quiet=1.5, max_hold=10.0, clock=clock)
    burst(y, clock, 10, 0.1)
    clock.now += 20  # quiet long before the bound; nobody looked in between
    assert y.holding_for() == 0
    assert burst(y, clock, 10, 0.1)[-1]


def test_a_burst_after_an_outlasted_hold_and_a_quiet_spell_nobody_saw_is_held() -> None:
    clock = Clock()
    y = BurstYield(quiet=1.5, max_hold=10.0, clock=clock)
    burst(y, clock, 600, 0.05)  # 30 s of creations, the bound passes unseen (nobody looked)
    clock.now += 10  # quiet, still unseen
    assert burst(y, clock, 10, 0.05)[-1]
