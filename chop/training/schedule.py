"""Sparsity schedules for pruning during training (INC's exp/cos/cube/linear curves)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

from chop.errors import OptionError

Curve = Literal["exp", "cos", "cube", "linear"]
CURVES = ("exp", "cos", "cube", "linear")


@dataclass(frozen=True)
class Schedule:
    """Sparsity over training steps, from ``initial`` at ``start_step`` to ``target`` at
    ``end_step``, changing every ``frequency`` steps.

    With progress p = (t − start_step) / (end_step − start_step) at a pruning step t, s_0 =
    ``initial`` and s_f = ``target``, the sparsity is:

    - ``linear``: s = s_0 + (s_f − s_0)·p
    - ``cube`` (Zhu & Gupta 2017): s = s_f + (s_0 − s_f)·(1 − p)³ — fast early, slow late
    - ``cos``: s = s_0 + (s_f − s_0)·(1 − cos(p·π/2))
    - ``exp``: s = 1 − (1 − s_0)·((1 − s_f)/(1 − s_0))^p — the density shrinks by the same
      factor at every step (keep^(t/T), as ``iterative-snip``)

    Pruning steps are start_step, start_step + frequency, … and always end_step; between them the
    sparsity of the last pruning step holds. The sparsity is exactly ``target`` (no rounding of
    1 − cos(π/2) and the like) from end_step on, and ``initial`` before start_step (where the
    :class:`Pruner` prunes nothing). With start_step == end_step the model is pruned once, to
    ``target``.
    """

    target: float
    curve: Curve = "cube"
    start_step: int = 0
    end_step: int = 0
    frequency: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        if self.curve not in CURVES:
            raise OptionError(
                f"schedule: unknown curve {self.curve!r}; use one of {', '.join(CURVES)}"
            )
        for key in ("start_step", "end_step", "frequency"):  # numpy's integers too
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise OptionError(f"schedule: {key}={value!r} must be a whole number of steps")
            object.__setattr__(self, key, int(value))
        for key in ("target", "initial"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise OptionError(f"schedule: {key} sparsity {value!r} is not a number; give "
                                  "one in [0, 1), e.g. 0.9")
            if not 0.0 <= value < 1.0:
                raise OptionError(
                    f"schedule: {key} sparsity {value} is out of range; it must be in [0, 1)"
                )
        if self.initial > self.target:
            raise OptionError(
                f"schedule: initial sparsity {self.initial} is above the target {self.target}; "
                "a schedule only raises sparsity"
            )
        if not 0 <= self.start_step <= self.end_step:
            raise OptionError(
                f"schedule: need 0 <= start_step <= end_step, got start_step={self.start_step}, "
                f"end_step={self.end_step}"
            )
        if self.frequency < 1:
            raise OptionError(f"schedule: frequency={self.frequency} must be at least 1")

    def is_pruning_step(self, step: int) -> bool:
        """True at start_step, every ``frequency`` steps after it, and at end_step."""
        if step == self.end_step:
            return True
        return self.start_step <= step < self.end_step and (
            (step - self.start_step) % self.frequency == 0
        )

    def pruning_steps(self) -> list[int]:
        """Every pruning step, in order."""
        steps = list(range(self.start_step, self.end_step, self.frequency))
        return steps + [self.end_step]

    def last_pruning_step(self, step: int) -> int | None:
        """The latest pruning step at or before ``step`` (None before start_step)."""
        if step < self.start_step:
            return None
        if step >= self.end_step:
            return self.end_step
        return self.start_step + (step - self.start_step) // self.frequency * self.frequency

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at ``step`` (that of the latest pruning step)."""
        last = self.last_pruning_step(step)
        if last is None:
            return self.initial
        if last >= self.end_step:
            return self.target
        p = (last - self.start_step) / (self.end_step - self.start_step)
        s0, sf = self.initial, self.target
        if self.curve == "linear":
            return s0 + (sf - s0) * p
        if self.curve == "cube":
            return sf + (s0 - sf) * (1.0 - p) ** 3
        if self.curve == "cos":
            return s0 + (sf - s0) * (1.0 - math.cos(p * math.pi / 2))
        return 1.0 - (1.0 - s0) * ((1.0 - sf) / (1.0 - s0)) ** p
