"""One module per op family; importing this package registers every rule (add new families
here)."""

from chop.passes.analysis.flow.rules import (  # noqa: F401
    attention,
    concat,
    elementwise,
    gather,
    norms,
    pooling,
    producers,
    shape,
)
