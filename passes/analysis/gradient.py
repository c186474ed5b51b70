"""``gradient``: saliency |g| with g = ∂L/∂w (Intel Neural Compressor's ``gradient`` criterion).

Unlike SNIP it ignores the weight's magnitude: it keeps the weights the loss is most sensitive
to per unit change. It is ``snip`` without the factor w: over several batches |Σ_b g_b| by
default, Σ_b |g_b| as an option; one forward and backward per batch; the model is left
bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from chop.passes.analysis.snip import Snip
from chop.pipeline.pass_base import option


@dataclass(frozen=True)
class Gradient(Snip):
    """Gradient criterion: saliency |∂L/∂w| from `batches` batches of data."""

    name: ClassVar[str] = "gradient"
    times_weight: ClassVar[bool] = False

    accumulate: Literal["abs-of-sum", "sum-of-abs"] = option(
        "abs-of-sum", "over batches: |Σ g| or Σ |g|"
    )


gradient_saliency = Gradient.compute
