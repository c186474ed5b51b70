"""The per-layer sparsity report: a plain, JSON-ready dict.

``build_report`` describes a pruned :class:`~chop.ir.graph.Graph` (what ``report.json`` holds);
``read_report`` describes whatever ``chop report PATH`` is given: an output folder (its
``report.json``), a ``.pt2`` program or a checkpoint (sparsity counted from zero weights).

A *layer* is a weight node that has a mask, or whose role is ``linear``, ``conv`` or
``embedding``. Each layer record holds ``name`` (the parameter), ``layer`` (its module),
``op``, ``role``, ``shape``, ``numel``, ``kept``, ``sparsity``, ``pruned`` (it has a mask) and
``saliency`` (min, p50, mean, p90, max; None when no criterion ran). Quantiles use the exact
radix selection of :mod:`chop.kernels.select`, since ``torch.quantile`` fails above 2**24 elements.
"""

from __future__ import annotations

import json
import math
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from chop.errors import ReportError
from chop.ir import meta
from chop.ir.graph import Graph, view_of
from chop.kernels.select import kth_largest
from chop.passes.export.sparse import csr_weights

LAYER_ROLES = ("linear", "conv", "embedding")



def versions() -> dict[str, str]:
    """Versions of chop, torch and Python, for reproducibility."""
    return {"chop": version("chop"), "torch": torch.__version__,
            "python": platform.python_version()}


def quantile(score: torch.Tensor, q: float) -> float:
    """The lower ``q``-quantile of ``score``, exact at any size (no ``torch.quantile``)."""
    n = score.numel()
    k = n - int(q * (n - 1))  # the (n - k + 1)-th smallest is the k-th largest
    return kth_largest([score.detach().float()], k)[0]


def saliency_summary(score: torch.Tensor | None) -> dict[str, float] | None:
    """min, p50, mean, p90 and max of a saliency tensor (None passes through)."""
    if score is None or score.numel() == 0:
        return None
    s = score.detach().float()
    return {
        "min": float(s.min()), "p50": quantile(s, 0.5), "mean": float(s.mean()),
        "p90": quantile(s, 0.9), "max": float(s.max()),
    }


def layer_record(
    name: str, op: str, role: str, weight: torch.Tensor,
    mask: torch.Tensor | None = None, saliency: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One layer's entry; ``kept`` counts the non-zero weights the mask (if any) keeps: a
    weight already zero before pruning is not counted as kept (a ``weight`` on the meta device,
    a CSR layer's stand-in, counts its mask)."""
    numel = weight.numel()
    if weight.is_meta:
        kept = int(mask.sum())
    else:
        nonzero = weight != 0
        kept = int(torch.count_nonzero(nonzero if mask is None else nonzero & mask.bool()))
    return {
        "name": name,
        "layer": name.rpartition(".")[0] or name,
        "op": op,
        "role": role,
        "shape": list(weight.shape),
        "numel": numel,
        "kept": kept,
        "sparsity": 1.0 - kept / numel if numel else 0.0,
        "pruned": mask is not None,
        "saliency": saliency_summary(saliency),
    }


def graph_layers(graph: Graph, *, matrices: bool = False) -> list[dict[str, Any]]:
    """Layer records of every masked or weight-bearing (linear/conv/embedding) weight node and
    of every weight the ``sparse`` export stored as CSR (its mask rebuilt from the indices);
    with ``matrices``, also of every other floating-point parameter of 2 or more dimensions
    (a foreign ``.pt2`` may use weights through ops chop does not classify, e.g. a mask mul)."""
    layers = []
    for node in graph.weight_nodes():
        entry = meta.entries(node)
        weight = graph.parameter(node)
        extra = matrices and weight.is_floating_point() and weight.dim() >= 2
        if "mask" in entry or entry.get("role") in LAYER_ROLES or extra:
            record = layer_record(
                node.target, entry.get("op", "other"), entry.get("role", "other"),
                graph.parameter(node).detach(), entry.get("mask"), entry.get("saliency"),
            )
            if "effective" in entry:  # the collapse pass ran: kept weights on an in->out path
                record["effective"] = int(entry["effective"].sum())
            layers.append(record)
    for name, (_, mask) in csr_weights(graph).items():
        layers.append(layer_record(name, "linear", "linear", torch.empty(mask.shape,
                                                                         device="meta"), mask))
    return layers


def totals(layers: list[dict[str, Any]], parameters: int, nonzero: int) -> dict[str, Any]:
    """Sums over ``layers``, plus the whole model's parameter and non-zero counts."""
    numel = sum(layer["numel"] for layer in layers)
    kept = sum(layer["kept"] for layer in layers)
    return {
        "layers": len(layers),
        "numel": numel,
        "kept": kept,
        "sparsity": 1.0 - kept / numel if numel else 0.0,
        "parameters": parameters,
        "nonzero": nonzero,
    }


def _graph_counts(graph: Graph) -> tuple[int, int]:
    """All parameters of the graph, and how many are non-zero once masks apply (a weight
    stored as CSR counts with its dense size and its stored non-zero values)."""
    parameters = nonzero = 0
    for node in graph.weight_nodes():
        weight = graph.parameter(node).detach()
        mask = meta.entries(node).get("mask")
        parameters += weight.numel()
        nonzero += int(torch.count_nonzero(weight if mask is None else weight * mask))
    for node, mask in csr_weights(graph).values():
        parameters += mask.numel()
        nonzero += int(torch.count_nonzero(graph.module.get_buffer(node.args[1].target)))
    return parameters, nonzero


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: tensors as their value or shape, NaN and infinities
    (a constant score's rank correlation, an inf weight's saliency) as null, which JSON has."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item()) if value.numel() == 1 else list(value.shape)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def to_json(report: dict[str, Any]) -> str:
    """``report`` as strict JSON text (no ``NaN``/``Infinity``, which JSON parsers refuse)."""
    return json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"


def not_pruned(layers: list[dict[str, Any]]) -> list[str]:
    """Warnings for an output that is not pruned: no layer has a mask, or every mask keeps
    every weight (``sparsity = 0.0``)."""
    masked = [layer for layer in layers if layer["pruned"]]
    if not masked:
        return ["not pruned: no pass of the pipeline made masks, so every weight is kept; add "
                "a mask pass after a criterion, e.g. passes = [\"snip\", \"mask\", \"fold\"]"]
    if all(layer["kept"] == layer["numel"] for layer in masked):
        return ["not pruned: the masks keep every weight (sparsity 0.0); raise the mask "
                "pass's sparsity, e.g. [passes.mask] sparsity = 0.9"]
    return []


def build_report(graph: Graph, **context: Any) -> dict[str, Any]:
    """The report of a pruned graph: model name, ``context`` (config, checkpoint, data…), the
    pipeline with every option and its time (from ``graph.history``), layers, totals,
    ``warnings`` (e.g. the output is not pruned), versions."""
    layers = graph_layers(graph)
    return _jsonable({
        "model": graph.name,
        **context,
        "pipeline": [
            {"name": r.name, "options": r.options, "seconds": r.seconds,
             "modified": r.modified, "info": r.info}
            for r in graph.history
        ],
        "layers": layers,
        "totals": totals(layers, *_graph_counts(graph)),
        # a shrink that removed channels pruned the model, whatever its masks keep now (also
        # the shrink that made a trained OUTDIR: its pipeline is the checkpoint's)
        "warnings": [] if any(r.name == "shrink" and r.modified for r in graph.history)
        or "shrink" in context.get("checkpoint", {}).get("pipeline", ()) else not_pruned(layers),
        "versions": versions(),
    })


def _zeros_are_pruned(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without masks (a .pt2 or a checkpoint), a layer with zero weights counts as pruned."""
    for layer in layers:
        layer["pruned"] = layer["kept"] < layer["numel"]
    return layers


_STATISTICS = (".running_mean", ".running_var")  # BatchNorm's buffers, by torch's names


def _parameters_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point parameters of a state dict: each tensor once under its first name (a
    tied embedding and LM head are saved as two names of one tensor) and no BatchNorm running
    statistics (buffers, not parameters)."""
    seen, kept = set(), {}
    for key, value in state.items():
        if not value.is_floating_point() or key.endswith(_STATISTICS):
            continue
        view = view_of(value)
        if value.numel() == 0 or view not in seen:
            seen.add(view)
            kept[key] = value
    return kept


def _state_dict_report(path: Path, state: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    ops = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
    state = _parameters_of(state)
    layers = _zeros_are_pruned([
        layer_record(k, ops.get(v.dim(), "other"), "conv" if v.dim() > 2 else "linear", v)
        for k, v in state.items() if v.dim() >= 2
    ])
    floats = list(state.values())
    counts = (sum(v.numel() for v in floats), sum(int(torch.count_nonzero(v)) for v in floats))
    return {"model": name, "source": str(path), "layers": layers, "totals": totals(layers, *counts)}


def read_report(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """The report of an output folder, a ``report.json``, a ``.pt2`` or a checkpoint
    (``trust`` as in :func:`~chop.cli.checkpoint.load_checkpoint`)."""
    from chop.cli.checkpoint import (
        load_checkpoint,  # checkpoint imports nothing from here
    )

    path = Path(path)
    if not path.exists():
        raise ReportError(
            f"{path} does not exist; pass a chop transform output folder, a report.json, a "
            ".pt2 or a checkpoint"
        )
    if path.is_dir():
        path = path / "report.json"
        if not path.is_file():
            raise ReportError(
                f"{path.parent} has no report.json; pass a chop transform output folder, a "
                ".pt2 or a checkpoint"
            )
    if path.suffix == ".json":
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # nested past Python's stack
            raise ReportError(f"cannot read report {path}: {str(e)[:200]}") from e
        if not isinstance(report, dict) or "layers" not in report:
            raise ReportError(f"{path} is not a chop report (it has no \"layers\")")
        return report
    ckpt = load_checkpoint(path, trust=trust)
    if ckpt.program is not None:
        graph = Graph(ckpt.program.module(), training=False, name=path.stem)
        layers = _zeros_are_pruned(graph_layers(graph, matrices=True))
        return {"model": path.stem, "source": str(path), "layers": layers,
                "totals": totals(layers, *_graph_counts(graph))}
    state = ckpt.state_dict if ckpt.state_dict is not None else dict(
        ckpt.module.named_parameters())
    return _state_dict_report(path, state, path.stem)
