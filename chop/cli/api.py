"""What the command line shows and writes, for Python users: :func:`save` and :func:`summary`.

::

    graph = chop.trace(model, example_inputs)
    chop.run(graph, "snip, mask{sparsity=0.9}", data=batches)
    chop.summary(graph)                        # the per-layer table (a picture in a notebook)
    chop.save(graph, "out", batches[0][0])     # the files chop transform writes

:func:`save` goes through the same :class:`~chop.cli.outputs.Output` as the CLI: OUTDIR is
written atomically with its manifest, an existing non-empty OUTDIR is refused unless ``force``
(and then replaced only when it holds chop's own outputs), and every model file is loaded back
and checked against the graph. Given a transformers model, it also writes ``hf/``.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path
from typing import Any

from torch import nn

from chop.cli.hf import Folder, task_of, write_folder
from chop.cli.outputs import Output, check_outdir, write_outputs
from chop.cli.report import build_report
from chop.cli.viz import layer_graph, render_fragment
from chop.ir.graph import Graph
from chop.ir.masks import mask_nodes, mask_of

log = logging.getLogger("chop")


def save(graph: Graph, outdir: str | Path, inputs: Any, *, model: nn.Module | None = None,
         tokenizer: Any = None, force: bool = False) -> dict[str, Any]:
    """Write the files ``chop transform`` writes for ``graph`` into ``outdir`` and return the
    report (``report.json``).

    Args:
        graph: the pruned graph; masks still in it are folded into the written weights (in a
            copy: ``graph`` is left as it is).
        outdir: the output folder; it must not exist or be empty, unless ``force``.
        inputs: one batch's inputs (a tensor, a tuple, or a dict of keyword inputs): the
            example ``model.pt2`` is exported with; every file is checked on their first two
            samples (16 positions of a dynamic sequence), as the export passes check.
        model: the traced model: ``weights.safetensors`` is checked by loading it into a copy
            of it; a transformers model (with ``save_pretrained``) is also written as
            ``hf/``, with ``tokenizer`` when given.
        force: replace an OUTDIR that holds only chop's own earlier outputs.
    """
    out = check_outdir(Path(outdir), [], force=force)
    report = build_report(graph)
    graph = graph.copy()
    masks = {str(a.target) for n in mask_nodes(graph) for a in n.all_input_nodes
             if a.op == "get_attr" and a.target != mask_of(n)}  # folded away when written
    keys = list(model.state_dict()) if model is not None else [
        k for k in graph.module.state_dict() if not k.endswith("_guards_fn") and k not in masks]
    extra = None
    if model is not None and hasattr(model, "save_pretrained"):
        folder = Folder(Path(), model, tokenizer, copy.deepcopy(model.config),
                        task_of(type(model).__name__), {})

        def extra(tmp: Path, state: dict, reshaped: bool, sample: Any, expected: Any
                  ) -> dict[str, Any]:
            why = write_folder(folder, state, reshaped, tmp / "hf", sample, expected)
            if why is not None:  # asked for (a transformers model), so said
                log.warning("hf/ was not written: %s", why)
            return {"hf": {"written": why is None, **({"reason": why} if why else {})}}

    with Output(out, force=force, shown=Path(outdir)) as reserved:
        write_outputs(graph, report, reserved, inputs, keys, model, extra)
    return report


class Summary:
    """The per-layer sparsity of a graph: ``print`` it (or show it with rich) for the table
    ``chop transform`` prints; a notebook shows the layer graph and the per-layer bars
    (``_repr_html_``). ``report`` is the dict ``report.json`` holds."""

    def __init__(self, graph: Graph):
        self.report = build_report(graph)
        self._graph = graph

    def __rich__(self) -> Any:
        from chop.cli.display import layer_table

        return layer_table(self.report)

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=120, color_system=None).print(self.__rich__())
        return buffer.getvalue()

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return render_fragment(self.report, layer_graph(self._graph, self.report["layers"]))


def summary(graph: Graph) -> Summary:
    """The per-layer summary of ``graph`` (see :class:`Summary`)."""
    return Summary(graph)
