"""Paired timing on a fake clock: a background load that moves between the two sides no longer
decides the walltime speedup (WS); unstable rows are measured again and flagged."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable

import pytest

from atspeed_ray.benchmarking import (
    EXTRA_PASSES, UNSTABLE_REPEATS, UNSTABLE_SPREAD, PairTimes, Speedup, interleaved,
    paired_speedup, time_pairs,
)


class FakeMachine:
    """A clock that only moves when work runs: ``run(cost)`` takes ``cost`` x the load factor at
    the moment it starts (``load(now)``: 1 = idle, 3 = a background job takes 2/3 of the CPU)."""

    def __init__(self, load: Callable[[float], float]):
        self.now, self.load = 0.0, load

    def clock(self) -> float:
        return self.now

    def run(self, cost: float) -> float:
        self.now += cost * self.load(self.now)
        return cost


# 20 prompts: beam search costs 1-3 s (40 s in all), speculation is 1.6-2.4x faster; the true
# WS, the median of the true per-prompt ratios, is 1.9
PLAIN = [1.0 + 0.5 * (u % 5) for u in range(20)]
RATIO = [1.6 + 0.1 * ((3 * u) % 9) for u in range(20)]
TRUE_WS = statistics.median(RATIO)


def sides(machine: FakeMachine) -> tuple[Callable[[int], float], Callable[[int], float]]:
    return (lambda u: machine.run(PLAIN[u])), (lambda u: machine.run(PLAIN[u] / RATIO[u]))


def sum_then_best(machine: FakeMachine, repeat: int) -> float:
    """The scheme ``bench`` and ``evaluate`` used before: each side timed as the sum over all
    prompts, the two sides alternating, each keeping its best of ``repeat``; WS = the ratio."""
    plain, spec = sides(machine)
    best_plain = best_spec = float("inf")
    for _ in range(repeat):
        for side in ("plain", "spec"):
            t0 = machine.clock()
            for u in range(len(PLAIN)):
                (plain if side == "plain" else spec)(u)
            if side == "plain":
                best_plain = min(best_plain, machine.clock() - t0)
            else:
                best_spec = min(best_spec, machine.clock() - t0)
    return best_plain / best_spec


def first_half(now: float) -> float:
    """Busy during the first half of a one-repeat run (60 s idle: 40 of beam search, 20 of
    speculation)."""
    return 3.0 if now < 30.0 else 1.0


def periodic(now: float) -> float:
    """Another job with a cycle as long as one repeat of the old scheme, busy while its
    beam-search side runs (3 x 40 s) and idle during its speculation side: best of R cannot
    escape it."""
    spec_s = sum(p / r for p, r in zip(PLAIN, RATIO))
    return 3.0 if now % (3.0 * sum(PLAIN) + spec_s) < 3.0 * sum(PLAIN) else 1.0


@pytest.mark.parametrize("load, repeat", [(first_half, 1), (periodic, 3)])
def test_a_load_moving_between_sides_no_longer_decides_the_ratio(load, repeat):
    old = sum_then_best(FakeMachine(load), repeat)
    assert abs(old - TRUE_WS) > 0.4 * TRUE_WS  # today's scheme: the load decides
    machine = FakeMachine(load)
    plain, spec = sides(machine)
    run = paired_speedup(plain, spec, len(PLAIN), len(PLAIN), repeat, machine.clock)
    s = run.speedup
    assert s.q1 <= TRUE_WS <= s.q3 and s.q1 <= s.ws <= s.q3
    assert not s.q1 <= old <= s.q3  # the old number is outside the new spread
    assert s.ws == pytest.approx(TRUE_WS, rel=0.05)
    assert (s.prompts, s.units) == (20, 20) and not s.unstable and s.passes == 1
    row = s.fields()
    assert row["ws"] == s.ws and row["ws_q1"] == s.q1 and row["ws_q3"] == s.q3
    assert row["ws_prompts"] == 20 and row["unstable"] is False and len(row["ws_repeats"]) == repeat


def test_an_idle_machine_gives_the_true_ratio_and_its_spread():
    machine = FakeMachine(lambda now: 1.0)
    plain, spec = sides(machine)
    times, plain_out, spec_out = time_pairs(plain, spec, len(PLAIN), 2, machine.clock)
    assert times.ratios() == pytest.approx(RATIO)
    s = Speedup.of(times, prompts=20)
    assert s.ws == pytest.approx(TRUE_WS)
    assert (s.q1, s.q3) == pytest.approx(tuple(statistics.quantiles(RATIO, n=4, method="inclusive"))[::2])
    assert s.repeat_ws == pytest.approx((TRUE_WS, TRUE_WS)) and s.disagreement == pytest.approx(0)
    assert times.total("plain") == pytest.approx(sum(PLAIN))
    assert plain_out[3] == [PLAIN[3]] * 2 and spec_out[3] == [PLAIN[3] / RATIO[3]] * 2


def test_the_order_alternates_within_a_unit_and_between_units():
    calls: list[int] = []
    _, out = interleaved([lambda: calls.append(0) or "a", lambda: calls.append(1) or "b"], 3)
    assert calls == [0, 1, 1, 0, 0, 1] and out == [["a"] * 3, ["b"] * 3]
    calls.clear()
    interleaved([lambda: calls.append(0), lambda: calls.append(1), lambda: calls.append(2)], 2,
                start=1)
    assert calls == [1, 2, 0, 2, 0, 1]
    calls.clear()
    time_pairs(lambda u: calls.append(("p", u)), lambda u: calls.append(("s", u)), 2, 1)
    assert calls == [("p", 0), ("s", 0), ("s", 1), ("p", 1)]


def noisy(rng: random.Random, until: float) -> Callable[[float], float]:
    """Random spikes before ``until`` (half of the calls take 5x their cost), idle after."""
    return lambda now: 5.0 if now < until and rng.random() < 0.5 else 1.0


def test_an_unstable_row_is_measured_again_and_kept_when_it_settles():
    machine = FakeMachine(noisy(random.Random(0), until=300.0))  # noisy during the first pass only
    plain, spec = sides(machine)
    run = paired_speedup(plain, spec, len(PLAIN), len(PLAIN), 2, machine.clock)
    assert run.speedup.passes == 2 and not run.speedup.unstable
    assert run.speedup.ws == pytest.approx(TRUE_WS)


def test_a_row_that_stays_unstable_is_flagged_after_a_bounded_number_of_passes():
    machine = FakeMachine(noisy(random.Random(1), until=float("inf")))
    plain, spec = sides(machine)
    calls = []
    run = paired_speedup(lambda u: calls.append(u) or plain(u), spec, len(PLAIN), len(PLAIN), 2,
                         machine.clock)
    s = run.speedup
    assert s.unstable and s.passes == 1 + EXTRA_PASSES
    assert len(calls) == (1 + EXTRA_PASSES) * len(PLAIN) * 2
    assert s.spread > UNSTABLE_SPREAD or s.disagreement > UNSTABLE_REPEATS
    assert "unstable" in s.text() and s.fields()["unstable"] is True


def test_typical_picks_the_median_call_of_each_unit():
    times = PairTimes(plain=((3.0, 1.0, 2.0), (5.0, 4.0, 6.0)), spec=((1.0, 1.0, 1.0), (2.0, 9.0, 2.0)))
    assert times.typical("plain") == [2, 0] and times.total("plain") == 2.0 + 5.0
    assert times.ratios() == [2.0, 2.5]  # median over repeats of the pair ratios 3, 1, 2 / 2.5, 4/9, 3


def test_the_bounds_timed_beside_each_pair_are_paired_too():
    machine = FakeMachine(periodic)
    plain, spec = sides(machine)
    oracle = lambda u: machine.run(PLAIN[u] / 8.0)  # noqa: E731  one pass: 8x cheaper
    draft = lambda u: machine.run(PLAIN[u] / 8.0)  # noqa: E731
    times, _, _ = time_pairs(plain, spec, len(PLAIN), 3, machine.clock, beside=[oracle, draft])
    assert times.bound([0]) == pytest.approx(8.0) and times.bound([0, 1]) == pytest.approx(4.0)
    assert len(times.beside) == 2 and len(times.beside[0]) == 20 and len(times.beside[0][0]) == 3
