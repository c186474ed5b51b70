"""``chop transform``: config + checkpoint -> pruned model and reports in OUTDIR.

The steps, in order (each raises a :class:`~chop.errors.ChopError` subclass that says what,
where and how to fix it; nothing is written until every step before the writing succeeded):

1. read and validate the config (:mod:`chop.config`) — before anything slow;
2. validate OUTDIR (:func:`chop.save.check_outdir`) — never the input's folder;
3. load the checkpoint safely (:mod:`chop.checkpoint`) and build the model (:mod:`chop.models`);
4. load the batches (:mod:`chop.datasets`);
5. trace with :func:`chop.trace` (or wrap a ``.pt2`` program) and run the pipeline with the
   :class:`~chop.manager.PassManager`, forwarding its ``track``/``on_pass`` progress hooks;
6. build the report (:mod:`chop.report`) and write the outputs (:mod:`chop.save`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chop.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_into
from chop.config import Config, ConfigError, load_config
from chop.datasets import load_batches
from chop.errors import ChopError
from chop.graph import Graph, trace
from chop.manager import PassManager
from chop.models import build_model
from chop.pass_base import Pass
from chop.report import build_report
from chop.save import check_outdir, default_outdir, write_outputs

log = logging.getLogger("chop")


@dataclass
class Result:
    """What :func:`transform` produced."""

    outdir: Path
    report: dict[str, Any]
    graph: Graph


def _noop(description: str) -> None:
    return None


def transform(
    config_path: str | Path,
    checkpoint_path: str | Path,
    *,
    outdir: str | Path | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    trust_checkpoint: bool = False,
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
    on_pass: Callable[[Pass, int, int], None] | None = None,
    on_stage: Callable[[str], None] = _noop,
) -> Result:
    """Run ``chop transform``; see the module doc. ``on_stage(description)`` is called as each
    step starts, ``track``/``on_pass`` are :meth:`PassManager.run`'s progress hooks."""
    on_stage("reading the config")
    config = load_config(config_path, overrides)
    ckpt_path = Path(checkpoint_path)
    out = Path(outdir) if outdir is not None else default_outdir(config.path)
    out = check_outdir(out, [config.path, ckpt_path], force=force)

    on_stage("loading the checkpoint")
    ckpt = load_checkpoint(ckpt_path, trust=trust_checkpoint)
    model = build(config, ckpt)

    on_stage("loading data")
    try:
        batches = load_batches(config.data, config.folder)
    except ChopError as e:
        raise type(e)(f"{config.path}: [data]: {e}") from None
    inputs = batches[0][0]

    on_stage("tracing")
    if ckpt.program is not None:
        graph = program_graph(ckpt, config)
        keys = list(graph.module.state_dict())
    else:
        assert model is not None
        graph = trace_inputs(model, inputs)
        keys = list(model.state_dict())

    PassManager(config.passes).run(graph, batches, track=track, on_pass=on_pass)

    on_stage("writing outputs")
    report = build_report(
        graph,
        config={"path": str(config.path), "overrides": config.overrides},
        checkpoint={"path": str(ckpt.path), "sha256": ckpt.sha256, "kind": ckpt.kind},
        data={"source": config.data.source, "batch_size": config.data.batch_size,
              "batches": config.data.batches, "shuffle": config.data.shuffle},
    )
    write_outputs(graph, report, out, inputs, keys, model)
    return Result(out, report, graph)


def build(config: Config, ckpt: Checkpoint) -> nn.Module | None:
    """The model to trace: built from ``[model]`` and loaded, or the checkpoint's own."""
    if ckpt.state_dict is None:
        if config.model is not None:
            log.warning(
                "%s: [model] is not used: checkpoint %s is a %s that carries its own model",
                config.path, ckpt.path, "torch.export program" if ckpt.program else "module",
            )
        return ckpt.module
    if config.model is None:
        raise ConfigError(
            f"{config.path}: checkpoint {ckpt.path} is a state dict, so the config needs a "
            "[model] section with source = \"module:callable\" (or a built-in model name) to "
            "build the model it belongs to"
        )
    model = build_model(config.model, config.folder)
    load_into(model, ckpt.state_dict, ckpt.path)
    return model


def trace_inputs(model: nn.Module, inputs: Any) -> Graph:
    """Trace ``model`` on one batch's inputs (a tensor, a tuple/list, or a dict of kwargs)."""
    if isinstance(inputs, dict):
        return trace(model, (), kwargs=inputs)
    return trace(model, tuple(inputs) if isinstance(inputs, (tuple, list)) else inputs)


def program_graph(ckpt: Checkpoint, config: Config) -> Graph:
    """A graph over a ``.pt2`` program's module; its batch size must fit the data's."""
    assert ckpt.program is not None
    module = ckpt.program.module()
    for node in module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if (isinstance(value, torch.Tensor) and value.dim() > 0
                and isinstance(value.shape[0], int) and value.shape[0] != config.data.batch_size):
            raise CheckpointError(
                f"{ckpt.path} was exported with a fixed batch size of {value.shape[0]} (input "
                f"{node.name}); set [data] batch_size = {value.shape[0]} in {config.path}, or "
                "re-export it with a dynamic batch dimension"
            )
    return Graph(module, training=False, name=ckpt.path.stem)
