"""chop.kernels.timing: median_seconds calls warmup + repeats times, times only the repeats with
time.perf_counter, runs under no_grad and returns the median."""

from __future__ import annotations

import pytest
import torch

from chop.kernels import timing


class FakeClock:
    """perf_counter that advances by the next scripted duration on each call to ``fn``."""

    def __init__(self, durations):
        self.now = 100.0
        self.durations = list(durations)
        self.calls = 0

    def perf_counter(self) -> float:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        if self.durations:
            self.now += self.durations.pop(0)


def test_median_of_the_timed_calls_after_the_warmup(monkeypatch):
    warmup = [50.0, 60.0]  # slow first calls: never counted
    timed = [0.3, 0.1, 0.9, 0.2, 0.5]
    clock = FakeClock(warmup + timed)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    assert timing.median_seconds(clock.fn, repeats=5, warmup=2) == pytest.approx(0.3)
    assert clock.calls == 7


def test_even_repeats_average_the_middle_two(monkeypatch):
    clock = FakeClock([1.0, 4.0, 2.0, 8.0])
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    assert timing.median_seconds(clock.fn, repeats=4, warmup=0) == pytest.approx(3.0)
    assert clock.calls == 4


def test_defaults_call_three_warmups_and_twenty_repeats(monkeypatch):
    clock = FakeClock([7.0] * 3 + [0.25] * 20)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    assert timing.median_seconds(clock.fn) == pytest.approx(0.25)
    assert clock.calls == 23


def test_runs_without_autograd_and_measures_real_time():
    modes = []

    def fn():
        modes.append(torch.is_grad_enabled())

    seconds = timing.median_seconds(fn, repeats=3, warmup=1)
    assert modes == [False] * 4
    assert 0 <= seconds < 0.1
    assert torch.is_grad_enabled()  # restored afterwards


def test_interleaved_calls_each_function_in_turn_and_divides_by_inner(monkeypatch):
    """Warmups of each first, then rounds that call every function inner=2 times in a row, in
    an order that changes from round to round: every function follows every other one at some
    point (a fixed or rotated order makes one always follow the same one). The samples are the
    2-call spans divided by 2, and the medians (or minima) are per function."""
    now = [0.0]
    durations = {"a": [9.0, 9.0] + [0.3, 0.5] + [0.1, 0.1] * 10,
                 "b": [9.0, 9.0] + [2.0, 2.0] * 11,
                 "c": [9.0, 9.0] + [1.0, 5.0] + [0.5, 0.5] * 10}
    order = []

    def call(name):
        def fn():
            order.append(name)
            now[0] += durations[name].pop(0)
        return fn

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    result = timing.interleaved_seconds({n: call(n) for n in "abc"}, repeats=11, warmup=2,
                                        inner=2)
    assert order[:6] == ["a", "a", "b", "b", "c", "c"]  # warmups, in the given order
    rounds = [order[6 + 6 * r: 12 + 6 * r] for r in range(11)]
    assert all(sorted(r) == ["a", "a", "b", "b", "c", "c"] and r[0::2] == r[1::2] for r in rounds)
    follows = {(r[2 * i], r[2 * i + 2]) for r in rounds for i in range(2)}
    assert follows == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert len({tuple(r) for r in rounds}) > 2
    assert result == {"a": pytest.approx(0.1), "b": pytest.approx(2.0), "c": pytest.approx(0.5)}
    durations.update(a=[1.0] + [3.0, 0.2, 4.0], b=[1.0] + [0.5, 9.0, 2.0], c=[1.0] * 4)
    result = timing.interleaved_seconds({n: call(n) for n in "abc"}, repeats=3, warmup=1,
                                        statistic="min")
    assert result == {"a": pytest.approx(0.2), "b": pytest.approx(0.5), "c": pytest.approx(1.0)}
