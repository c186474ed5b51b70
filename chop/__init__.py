"""chop: SNIP pruning for PyTorch, as a compiler pipeline over torch.fx graphs.

    graph = chop.trace(model, example_inputs)
    chop.run(graph, "snip, mask{sparsity=0.9, scope=global}, fold", data=batches)
    chop.summary(graph)                  # the per-layer table (a picture in a notebook)
    chop.save(graph, "out", example_inputs)  # the files `chop transform` writes

The package is layered. Each layer imports only from the layers listed before it
(``tests/test_layers.py`` enforces this and the absence of import cycles):

=================  ==========================================================================
``chop.errors``    every error class (user mistakes: :class:`ChopError`; bugs:
                   :class:`InternalError`)
``chop.kernels``   tensor algorithms with no graph: exact top-k selection, the CSR linear op
``chop.ir``        the :class:`Graph` (torch.export capture, train/eval modes), its typed
                   metadata, and the rewrite helpers every pass shares (mask nodes, prunable
                   weights)
``chop.pipeline``  the pass contract, the pass manager, the registry, batches and losses
``chop.passes``    the pass library, one pass per file (the repository's ``passes/`` folder)
``chop.training``  schedules, the :class:`Pruner` step hooks, the training loop, the Hugging
                   Face callback
``chop.cli``       the ``chop`` command: config, checkpoints, data sources, outputs, reports
=================  ==========================================================================

This module only re-exports names, lazily: ``import chop`` does not import torch until a
name that needs it is used, so ``chop --help`` answers at once. Using any torch-backed name
(or importing chop after torch) also registers chop's custom ops, so ``.pt2`` files written by
the ``sparse`` export load with ``torch.export.load``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from chop.errors import (
    CheckpointError,
    ChopError,
    CollapseError,
    ConfigError,
    DataError,
    DistributedError,
    GranularityError,
    InternalError,
    LintError,
    MissingMetadataError,
    OptionError,
    OutputError,
    PassError,
    PipelineError,
    ReportError,
    TraceError,
)

__version__ = "0.1.0"

# name -> module that defines it (imported on first use)
_LAZY = {
    "Graph": "chop.ir.graph",
    "PassRecord": "chop.ir.graph",
    "trace": "chop.ir.graph",
    "Context": "chop.pipeline.pass_base",
    "Pass": "chop.pipeline.pass_base",
    "PassResult": "chop.pipeline.pass_base",
    "option": "chop.pipeline.pass_base",
    "PassManager": "chop.pipeline.manager",
    "parse_pipeline": "chop.pipeline.manager",
    "run": "chop.pipeline.manager",
    "Pruner": "chop.training.pruner",
    "Schedule": "chop.training.schedule",
    "save": "chop.cli.api",
    "summary": "chop.cli.api",
}

__all__ = [
    "ChopError", "CheckpointError", "CollapseError", "ConfigError", "DataError",
    "DistributedError", "GranularityError", "InternalError", "LintError", "MissingMetadataError",
    "OptionError", "OutputError", "PassError", "PipelineError", "ReportError", "TraceError",
    *_LAZY,
]


def _register_ops() -> None:
    importlib.import_module("chop.kernels.csr")  # registers chop::csr_linear


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        _register_ops()
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if "torch" in sys.modules:  # torch is loaded anyway: make sparse .pt2 files loadable right away
    _register_ops()
