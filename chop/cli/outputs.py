"""Write the outputs of ``chop transform`` into OUTDIR, atomically, and check them.

Files (see :func:`write_outputs`): ``model.pt2``, ``weights.safetensors``,
``masks.safetensors``, ``report.json``, ``sparsity.html``, ``graph.dot``.

Everything is written into a temporary folder next to OUTDIR (same parent, so the final
``rename`` is atomic) and renamed into place only when every file is written and checked: an
interrupted or failed run leaves nothing in OUTDIR. Nothing is written outside that temporary
folder and OUTDIR, and an OUTDIR that holds (or is) one of the inputs is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chop.cli.viz import layer_graph, render_html, to_dot
from chop.errors import InternalError, OutputError
from chop.ir import meta
from chop.ir.graph import Graph, dynamic_shapes
from chop.ir.masks import is_masked
from chop.passes.export.fold import fold_masks
from chop.pipeline.batches import call, check_same_outputs

log = logging.getLogger("chop")

FILES = ("model.pt2", "weights.safetensors", "masks.safetensors", "report.json",
         "sparsity.html", "graph.dot")



def default_outdir(config: Path, suffix: str = "-out") -> Path:
    """A new folder next to the config: ``<stem><suffix>``, or ``…-2``, ``-3``… if taken."""
    base = config.parent / f"{config.stem}{suffix}"
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_outdir(outdir: Path, inputs: Sequence[Path], *, force: bool = False) -> Path:
    """Validate OUTDIR before any work; returns it resolved.

    Refuses a file, a non-empty folder (unless ``force``: it is replaced at the end), and — even
    with ``force`` — a folder that is or contains one of ``inputs``.
    """
    out = outdir.expanduser().resolve()
    for path in inputs:
        p = path.expanduser().resolve()
        if p == out or out in p.parents:
            raise OutputError(
                f"output folder {outdir} holds the input {path}; writing there would overwrite "
                "it. Choose another folder with -o"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {outdir} is a file; pass a folder with -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(
            f"output folder {outdir} already exists and is not empty; choose another folder "
            "with -o, or pass --force to replace it"
        )
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename,
    on any failure (or Ctrl-C) it is deleted and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "out")
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_program(graph: Graph, inputs: Any) -> torch.export.ExportedProgram:
    """``graph.module`` exported in eval mode with a dynamic batch (as :func:`chop.trace` marks
    it), so the program runs without chop and accepts any batch size."""
    args, kwargs = (((), inputs) if isinstance(inputs, dict)
                    else (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}))
    with graph.mode(batch_norm=False, dropout=False):
        try:
            return torch.export.export(
                graph.module, args, kwargs,
                dynamic_shapes=dynamic_shapes(graph.module, args, kwargs),
            )
        except Exception as e:  # the pruned graph is chop's own making: failing to export is a bug
            raise InternalError(
                f"re-exporting the pruned {graph.name} failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}; this is a bug in chop, please "
                "report it with the model and the pipeline"
            ) from e


def masks_of(graph: Graph) -> dict[str, torch.Tensor]:
    """The bool mask of every pruned parameter, keyed by its original name."""
    return {
        n.target: meta.entries(n)["mask"].contiguous()
        for n in graph.weight_nodes() if "mask" in meta.entries(n)
    }


def write_outputs(
    graph: Graph,
    report: dict[str, Any],
    out: Path,
    inputs: Any,
    keys: Sequence[str],
    model: nn.Module | None = None,
) -> None:
    """Write every output file of ``graph`` into ``out`` atomically, checking each model file.

    Args:
        graph: the pruned graph; masks still in it are folded first (``fold``), so weights
            are stored pruned and without mask buffers.
        report: the report dict (``report.json``, the HTML page).
        out: OUTDIR, already validated with :func:`check_outdir`.
        inputs: one batch's inputs: the export's example and the check's input.
        keys: the original state-dict keys, in order: ``weights.safetensors`` holds exactly
            these, so it loads into the original model class with ``strict=True``. After
            ``shrink`` or ``sparse``, which change shapes and storage, it holds the graph's own
            state dict instead, and that check is skipped (``model.pt2`` is still checked).
        model: the original model, if there is one: ``weights.safetensors`` is checked by
            loading it into a copy and comparing outputs.
    """
    from safetensors.torch import load_file, save_file

    with torch.no_grad(), graph.mode(batch_norm=False, dropout=False):
        expected = call(graph.module, inputs)
    masks = masks_of(graph)
    if is_masked(graph):
        fold_masks(graph)
    state = graph.module.state_dict()
    reshaped = [r.name for r in graph.history if r.reshaped]
    if reshaped:  # shrunk tensors / CSR buffers: the graph's own state dict, not the model's
        keys, model = [k for k in state if not k.endswith("_guards_fn")], None
        log.info("%s changed the parameters' shapes or storage: weights.safetensors holds the "
                 "graph's own state dict; load model.pt2 to run it", ", ".join(reshaped))
    missing = [k for k in keys if k not in state]
    if missing:
        raise OutputError(f"the pruned graph lost parameters {missing[:5]}; this is a bug in chop")
    weights = {k: state[k].detach().clone().contiguous() for k in keys}
    program = export_program(graph, inputs)
    layers = layer_graph(graph, report["layers"])

    with atomic_dir(out) as tmp:
        torch.export.save(program, tmp / "model.pt2")
        save_file(weights, tmp / "weights.safetensors")
        save_file(masks, tmp / "masks.safetensors")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "sparsity.html").write_text(render_html(report, layers), encoding="utf-8")
        (tmp / "graph.dot").write_text(to_dot(layers, report.get("model", "model")), "utf-8")
        with torch.no_grad():
            check_same_outputs("model.pt2", call(torch.export.load(tmp / "model.pt2").module(), inputs),
                        expected)
            if model is not None:
                copy = _copy(model)
                if copy is not None:
                    copy.load_state_dict(load_file(tmp / "weights.safetensors"), strict=True)
                    check_same_outputs("weights.safetensors", call(copy.eval(), inputs), expected)
    log.info("wrote %s", ", ".join(FILES))


def _copy(model: nn.Module) -> nn.Module | None:
    import copy

    try:
        return copy.deepcopy(model)
    except (TypeError, RuntimeError, AttributeError, copy.Error) as e:  # e.g. unpicklable state
        log.warning("cannot copy %s to check weights.safetensors against it (%s: %s); "
                    "model.pt2 is still checked", type(model).__name__, type(e).__name__, e)
        return None
