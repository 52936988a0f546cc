"""When the operator yields the API server to a user's burst of creations (kaos_modelapi.yielding)."""

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


def test_an_endless_burst_is_not_held_for_ever() -> None:
    clock = Clock()
    y = BurstYield(4, burst=20, window=1.0, max_hold=10.0, clock=clock)
    burst(y, clock, 20, 0.01)
    assert y.allowed() == 1
    burst(y, clock, 1000, 0.02)  # 20 s of creations
    assert y.allowed() == 4


def test_the_defaults_see_a_loaded_kubectl_as_a_burst_and_a_person_not() -> None:
    clock = Clock()
    y = BurstYield(4, clock=clock)
    burst(y, clock, 9, 0.5)  # kubectl apply of a few files, or a person: a creation every half second
    assert y.allowed() == 4
    clock.now += 10
    burst(y, clock, 12, 0.07)  # kubectl apply -f of many on a loaded machine: 15 a second
    assert y.allowed() == 1


def test_one_worker_is_never_reduced() -> None:
    clock = Clock()
    y = BurstYield(1, clock=clock)
    burst(y, clock, 100, 0.001)
    assert y.allowed() == 1
