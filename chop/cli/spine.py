"""The steps every ``chop`` command shares, in the order they run.

1. :func:`prepare` — read and validate the config, and check the output folder: everything that
   can fail fast fails before anything slow;
2. :func:`load_model` — load the checkpoint safely and build the model it belongs to;
3. :func:`load_data` — the configured batches;
4. :func:`capture` — trace the model (or wrap a ``.pt2`` program) into a :class:`Graph`;
5. :func:`run_pipeline` — the config's passes, through the pass manager;
6. :func:`write` — build the report and write every output file atomically.

``chop transform`` is these six steps; ``chop train`` puts training between 5 and 6
(:mod:`chop.cli.commands`). Each step raises a :class:`~chop.errors.ChopError` that names what
is wrong and how to fix it; nothing is written before step 6.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chop.cli.checkpoint import Checkpoint, load_checkpoint, load_into
from chop.cli.config import Config, load_config
from chop.cli.datasets import load_batches
from chop.cli.models import build_model
from chop.cli.outputs import check_outdir, default_outdir, write_outputs
from chop.cli.report import build_report
from chop.errors import CheckpointError, ChopError, ConfigError
from chop.ir.graph import Graph, trace_inputs
from chop.pipeline.manager import PassManager
from chop.pipeline.pass_base import Pass

log = logging.getLogger("chop")


def _ignore(*args: Any) -> None:
    return None


@dataclass
class Hooks:
    """Progress callbacks of a command (the CLI's display; no-ops by default).

    Attributes:
        on_stage: ``on_stage(description)`` as each step starts.
        track: wraps a long loop, see :class:`~chop.pipeline.pass_base.Context`.
        on_pass: ``on_pass(pass, index, count)`` before each pass.
        on_epoch: ``on_epoch(record)`` after each training epoch.
    """

    on_stage: Callable[[str], None] = _ignore
    track: Callable[[Iterable, int | None, str], Iterable] | None = None
    on_pass: Callable[[Pass, int, int], None] | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None


@dataclass
class Result:
    """What a command produced."""

    outdir: Path
    report: dict[str, Any]
    graph: Graph


@dataclass
class Loaded:
    """A checkpoint and the model built from it (None when the checkpoint is a ``.pt2``)."""

    checkpoint: Checkpoint
    model: nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)


def prepare(config_path: str | Path, overrides: Sequence[str], outdir: str | Path | None,
            suffix: str, inputs: Sequence[Path], *, force: bool) -> tuple[Config, Path]:
    """Step 1: the validated config and the checked output folder (default: a new
    ``<config stem><suffix>`` folder next to the config). ``inputs`` are never overwritten."""
    config = load_config(config_path, overrides)
    out = Path(outdir) if outdir is not None else default_outdir(config.path, suffix)
    return config, check_outdir(out, [config.path, *inputs], force=force)


def load_model(config: Config, path: Path, *, trust: bool) -> Loaded:
    """Step 2: the checkpoint at ``path`` and the model to trace — built from ``[model]`` and
    loaded, or the checkpoint's own (a pickled module, trusted)."""
    ckpt = load_checkpoint(path, trust=trust)
    info = {"path": str(ckpt.path), "sha256": ckpt.sha256, "kind": ckpt.kind}
    if ckpt.state_dict is None:
        if config.model is not None:
            log.warning(
                "%s: [model] is not used: checkpoint %s is a %s that carries its own model",
                config.path, ckpt.path, "torch.export program" if ckpt.program else "module",
            )
        return Loaded(ckpt, ckpt.module, info)
    if config.model is None:
        raise ConfigError(
            f"{config.path}: checkpoint {ckpt.path} is a state dict, so the config needs a "
            "[model] section with source = \"module:callable\" (or a built-in model name) to "
            "build the model it belongs to"
        )
    model = build_model(config.model, config.folder)
    load_into(model, ckpt.state_dict, ckpt.path)
    return Loaded(ckpt, model, info)


def load_data(config: Config) -> list[tuple[Any, Any]]:
    """Step 3: the ``[data]`` batches; errors are prefixed with the config and section."""
    try:
        return load_batches(config.data, config.folder)
    except ChopError as e:
        raise type(e)(f"{config.path}: [data]: {e}") from e


def capture(loaded: Loaded, config: Config, inputs: Any) -> tuple[Graph, list[str]]:
    """Step 4: the graph to run the pipeline on, and the state-dict keys of the model it came
    from (``weights.safetensors`` keeps exactly these)."""
    if loaded.checkpoint.program is not None:
        graph = program_graph(loaded.checkpoint, config)
        return graph, list(graph.module.state_dict())
    if loaded.model is None:
        raise CheckpointError(f"checkpoint {loaded.checkpoint.path} holds no model to trace")
    return trace_inputs(loaded.model, inputs), list(loaded.model.state_dict())


def run_pipeline(config: Config, graph: Graph, batches: list, hooks: Hooks) -> None:
    """Step 5: the config's passes on ``graph``, reporting progress through ``hooks``."""
    PassManager(config.passes).run(graph, batches, track=hooks.track, on_pass=hooks.on_pass)


def write(graph: Graph, config: Config, out: Path, example: Any, keys: Sequence[str],
          model: nn.Module | None, **context: Any) -> Result:
    """Step 6: the report (with ``context``: checkpoint, data, train…) and every output file."""
    report = build_report(
        graph, config={"path": str(config.path), "overrides": config.overrides}, **context
    )
    write_outputs(graph, report, out, example, keys, model)
    return Result(out, report, graph)


def program_graph(ckpt: Checkpoint, config: Config) -> Graph:
    """A graph over a ``.pt2`` program's module; its batch size must fit the data's."""
    if ckpt.program is None:
        raise CheckpointError(f"{ckpt.path} is not a torch.export program")
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
