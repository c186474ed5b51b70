"""Schedule: every curve follows its formula at each pruning step and hits its target at end_step
exactly; pruning steps; the sparsity between and around them; bad settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chop.errors import OptionError
from chop.training.pruner import Pruner
from chop.training.schedule import CURVES, Schedule

FORMULAS = {  # the curves, written independently of chop.training.schedule
    "linear": lambda s0, sf, p: s0 + (sf - s0) * p,
    "cube": lambda s0, sf, p: sf + (s0 - sf) * (1 - p) ** 3,
    "cos": lambda s0, sf, p: s0 + (sf - s0) * (1 - math.cos(math.pi * p / 2)),
    "exp": lambda s0, sf, p: 1 - (1 - s0) * ((1 - sf) / (1 - s0)) ** p,
}


def test_the_curves():
    assert set(CURVES) == set(FORMULAS) and Schedule(0.5).curve == "cube"


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize(("start", "end", "freq", "s0"), [(0, 10, 3, 0.0), (5, 25, 4, 0.2)])
def test_schedule_follows_the_formula_and_ends_exactly_on_target(curve, start, end, freq, s0):
    target = 0.97
    schedule = Schedule(target, curve, start, end, freq, s0)
    steps = schedule.pruning_steps()
    assert steps[0] == start and steps[-1] == end
    assert steps[:-1] == list(range(start, end, freq))
    for step in range(end + 5):
        last = max([t for t in steps if t <= step], default=None)
        if last is None:
            expected = s0
        elif last == end:
            expected = target
        else:
            expected = FORMULAS[curve](s0, target, (last - start) / (end - start))
        assert schedule.sparsity_at(step) == pytest.approx(expected, abs=1e-12)
    assert schedule.sparsity_at(end) == target  # exactly, not approximately
    values = [schedule.sparsity_at(t) for t in steps]
    assert values == sorted(values)


def test_pruning_steps_and_the_last_one_at_or_before_a_step():
    schedule = Schedule(0.9, "linear", start_step=2, end_step=9, frequency=3)
    assert schedule.pruning_steps() == [2, 5, 8, 9]  # end_step always prunes
    assert [s for s in range(12) if schedule.is_pruning_step(s)] == [2, 5, 8, 9]
    assert [schedule.last_pruning_step(s) for s in range(12)] == [
        None, None, 2, 2, 2, 5, 5, 5, 8, 9, 9, 9]


def test_the_sparsity_holds_between_pruning_steps():
    schedule = Schedule(0.8, "linear", start_step=0, end_step=8, frequency=4, initial=0.4)
    assert [schedule.sparsity_at(s) for s in range(10)] == pytest.approx(
        [0.4] * 4 + [0.6] * 4 + [0.8] * 2)


def test_start_equal_to_end_prunes_once_to_the_target():
    schedule = Schedule(0.75, "cos", start_step=3, end_step=3, initial=0.1)
    assert schedule.pruning_steps() == [3]
    assert [schedule.is_pruning_step(s) for s in range(5)] == [False, False, False, True, False]
    assert [schedule.sparsity_at(s) for s in range(5)] == [0.1, 0.1, 0.1, 0.75, 0.75]
    assert Schedule(0.5).pruning_steps() == [0] and Schedule(0.5).sparsity_at(0) == 0.5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"curve": "sigmoid"}, r"unknown curve 'sigmoid'; use one of exp, cos, cube, linear"),
    ({"start_step": 5, "end_step": 2}, r"need 0 <= start_step <= end_step, got start_step=5, end_step=2"),
    ({"start_step": -1}, r"need 0 <= start_step"),
    ({"frequency": 0}, r"frequency=0 must be at least 1"),
    ({"frequency": 2.5}, r"frequency=2\.5 must be a whole number of steps"),
    ({"end_step": 10.0}, r"end_step=10\.0 must be a whole number of steps"),
    ({"start_step": True}, r"start_step=True must be a whole number of steps"),
    ({"initial": 0.99}, r"initial sparsity 0.99 is above the target 0.9"),
    ({"initial": -0.1}, r"initial sparsity -0.1 is out of range; it must be in \[0, 1\)"),
    ({"initial": None}, r"initial sparsity None is not a number; give one in \[0, 1\)"),
    ({"initial": "0.1"}, r"initial sparsity '0.1' is not a number"),
])
def test_schedule_rejects_bad_settings(kwargs, message):
    with pytest.raises(OptionError, match=r"^schedule: " + message):
        Schedule(0.9, **kwargs)


@pytest.mark.parametrize("target", [1.0, -0.5])
def test_target_must_be_in_range(target):
    with pytest.raises(OptionError, match=r"target sparsity .* is out of range"):
        Schedule(target)


def test_a_pruner_without_a_target_says_so():
    """Pruner(model, None) passed mask's check (its sparsity may be None) and failed comparing
    None in the schedule, a TypeError."""
    with pytest.raises(OptionError, match=r"^schedule: target sparsity None is not a number"):
        Pruner(torch.nn.Linear(4, 4), None)


def test_numpy_integers_are_steps():
    schedule = Schedule(0.5, "linear", start_step=np.int64(0), end_step=np.int32(4),
                        frequency=np.int64(2))
    assert schedule.pruning_steps() == [0, 2, 4] and type(schedule.end_step) is int
