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
    """Two warmups of each first, then rounds that call each function inner=2 times in turn,
    starting one function later each round (a a b b, b b a a, a a b b): the samples of a are
    its 2-call spans divided by 2, and the medians are per function."""
    order = []
    clock = FakeClock([9.0, 9.0, 9.0, 9.0]  # warmups: a, a, b, b
                      + [0.1, 0.3, 2.0, 2.0]  # round 1: a, a, b, b
                      + [1.0, 3.0, 0.2, 0.2]  # round 2: b, b, a, a
                      + [0.4, 0.4, 5.0, 5.0])  # round 3: a, a, b, b
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)

    def call(name):
        def fn():
            order.append(name)
            clock.fn()
        return fn

    result = timing.interleaved_seconds({"a": call("a"), "b": call("b")}, repeats=3, warmup=2,
                                        inner=2)
    assert order == ["a", "a", "b", "b"] * 2 + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert result == {"a": pytest.approx(0.2), "b": pytest.approx(2.0)}  # medians of the rounds
    clock.durations = [1.0, 1.0] + [3.0, 0.5, 9.0, 2.0, 0.2, 4.0]  # a b, b a, a b
    result = timing.interleaved_seconds({"a": clock.fn, "b": clock.fn}, repeats=3, warmup=1,
                                        statistic="min")
    assert result == {"a": pytest.approx(0.2), "b": pytest.approx(0.5)}
