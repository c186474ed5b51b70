"""chop: SNIP pruning for PyTorch, as a compiler pipeline over torch.fx graphs.

    graph = chop.trace(model, example_inputs)
    chop.run(graph, "snip, mask{sparsity=0.9, scope=global}, fold", data=batches)
"""

from chop.errors import (
    ChopError,
    DataError,
    LintError,
    MissingMetadataError,
    OptionError,
    PassError,
    PipelineError,
    TraceError,
)
from chop.graph import Graph, PassRecord, trace
from chop.manager import PassManager, parse_pipeline, run
from chop.pass_base import Context, Pass, PassResult, option
from chop import sparse_ops  # noqa: F401  registers chop::csr_linear, so sparse .pt2 files load

__version__ = "0.1.0"

__all__ = [
    "ChopError", "Context", "DataError", "Graph", "LintError", "MissingMetadataError",
    "OptionError", "Pass", "PassError", "PassManager", "PassRecord", "PassResult",
    "PipelineError", "TraceError", "option", "parse_pipeline", "run", "trace",
]
