"""The commands: ``chop transform`` and ``chop train``, each the shared spine
(:mod:`chop.cli.spine`) with its own middle.

``chop transform CONFIG CKPT``: prepare, load the model, load the data, capture, run the
pipeline, write.

``chop train CONFIG CKPT_OR_OUTDIR`` trains a (masked) model on the configured data, keeping its
masks, and writes the same files. The model comes from either

- an OUTDIR of ``chop transform`` (``masks.safetensors`` with ``weights.safetensors`` or
  ``model.pt2``): rebuilt from ``[model]`` and ``weights.safetensors`` when the config has a
  ``[model]`` (BatchNorm and dropout then train as usual), else the ``model.pt2`` program (which
  was exported in eval mode: BatchNorm statistics and dropout stay in eval mode); the pipeline
  is not run again; or
- a checkpoint: the config's pipeline runs first, exactly as in ``chop transform``.

Either way the masks are ``mul(weight, mask)`` nodes while training (a ``fold`` in the pipeline
is undone for training), so pruned weights get zero gradient and stay zero. ``[train]`` (see
:class:`~chop.training.loop.TrainSpec`) sets the optimizer, epochs, eval split and the optional
pruning schedule. Training uses every sample of ``[data] source`` (a ``"module:callable"``
source: its first ``[data] batches`` batches), split once into train and eval sets with
``seed``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chop.cli import spine
from chop.cli.checkpoint import load_checkpoint
from chop.cli.config import Config
from chop.cli.datasets import load_samples
from chop.cli.outputs import Output
from chop.cli.spine import Hooks, Loaded, Result
from chop.errors import CheckpointError, DataError
from chop.ir.graph import Graph
from chop.ir.masks import insert_mask, restore_masks
from chop.training.loop import split, take_samples, train_graph

log = logging.getLogger("chop")


def transform(
    config_path: str | Path,
    checkpoint_path: str | Path,
    *,
    outdir: str | Path | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    trust_checkpoint: bool = False,
    hooks: Hooks | None = None,
) -> Result:
    """Run ``chop transform``; see the module doc."""
    hooks = hooks or Hooks()
    hooks.on_stage("reading the config")
    path = Path(checkpoint_path)
    config, out = spine.prepare(config_path, overrides, outdir, "-out", [path], force=force)
    with out:  # OUTDIR locked, its temporary folder made: an unwritable place fails here
        hooks.on_stage("loading the checkpoint")
        loaded = spine.load_model(config, path, trust=trust_checkpoint)
        hooks.on_stage("loading data")
        batches = spine.load_data(config, targets=any(p.data_batches() for p in config.passes))
        hooks.on_stage("tracing")
        example = batches[0][0]
        graph, keys = spine.capture(loaded, config, example)
        spine.run_pipeline(config, graph, batches, hooks)
        hooks.on_stage("writing outputs")
        return spine.write(
            graph, config, out, example, keys, loaded.model, checkpoint=loaded.info,
            data={"source": config.data.source, "batch_size": config.data.batch_size,
                  "batches": config.data.batches, "shuffle": config.data.shuffle},
        )


def train(
    config_path: str | Path,
    source: str | Path,
    *,
    outdir: str | Path | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    trust_checkpoint: bool = False,
    hooks: Hooks | None = None,
) -> Result:
    """Run ``chop train``; see the module doc."""
    hooks = hooks or Hooks()
    hooks.on_stage("reading the config")
    path = Path(source)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass a checkpoint file or a chop transform OUTDIR"
        )
    config, out = spine.prepare(config_path, overrides, outdir, "-trained-out", [path],
                                force=force)
    with out:  # OUTDIR locked, its temporary folder made: an unwritable place fails here
        return _train(config, path, out, trust_checkpoint, hooks)


def _train(config: Config, path: Path, out: Output, trust: bool, hooks: Hooks) -> Result:
    spec = config.train
    batch_size = spec.batch_size or config.data.batch_size

    hooks.on_stage("loading data")
    try:
        inputs, targets = load_samples(config.data, config.folder)
        spine.class_targets(targets)
        train_set, eval_set = split(inputs, targets, spec.eval_fraction, spec.seed)
        example = take_samples(train_set[0], torch.arange(min(2, len(train_set[1]))))
    except DataError as e:
        raise DataError(f"{config.path}: [data]: {e}") from e

    hooks.on_stage("loading the model")
    if path.is_dir():
        graph, keys, loaded = _from_outdir(path, config, example, trust)
    else:
        loaded = spine.load_model(config, path, trust=trust)
        hooks.on_stage("loading data")
        batches = spine.load_data(config)
        hooks.on_stage("tracing")
        graph, keys = spine.capture(loaded, config, batches[0][0])
        spine.run_pipeline(config, graph, batches, hooks)
        restore_masks(graph)  # a fold in the pipeline: train with the masks again

    hooks.on_stage("training")
    records = train_graph(graph, train_set, eval_set, spec, batch_size, track=hooks.track,
                          on_epoch=hooks.on_epoch)

    hooks.on_stage("writing outputs")
    return spine.write(
        graph, config, out, example, keys, loaded.model, checkpoint=loaded.info,
        data={"source": config.data.source, "train_samples": len(train_set[1]),
              "eval_samples": len(eval_set[1]) if eval_set is not None else 0},
        train={**dataclasses.asdict(spec), "batch_size": batch_size, "history": records},
    )


def _from_outdir(folder: Path, config: Config, inputs: Any, trust: bool
                 ) -> tuple[Graph, list[str], Loaded]:
    """The masked graph of a ``chop transform`` OUTDIR, its state-dict keys, and what it was
    loaded from (the report's checkpoint entry says ``"kind": "outdir"``)."""
    from safetensors.torch import load_file

    masks_file = folder / "masks.safetensors"
    weights, program = folder / "weights.safetensors", folder / "model.pt2"
    if not masks_file.is_file() or not (weights.is_file() or program.is_file()):
        raise CheckpointError(
            f"{folder} is a folder but not a chop transform OUTDIR (it needs masks.safetensors "
            "and weights.safetensors or model.pt2); pass an OUTDIR or a checkpoint file"
        )
    if config.model is not None and weights.is_file():
        loaded = spine.load_model(config, weights, trust=trust)
        graph, keys = spine.capture(loaded, config, inputs)
    else:
        loaded = Loaded(load_checkpoint(program, trust=trust))
        graph, keys = spine.capture(loaded, config, inputs)
        graph.train()
        log.warning(
            "%s was exported in eval mode: BatchNorm statistics and dropout stay in eval mode "
            "while training; add a [model] section to %s to train them", program, config.path,
        )
    loaded.info = {"path": str(folder), "sha256": loaded.checkpoint.sha256, "kind": "outdir"}
    try:
        masks = load_file(masks_file)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read {masks_file}: {e}") from e
    names = {n.target for n in graph.weight_nodes()}
    for name, mask in masks.items():
        if name not in names:
            raise CheckpointError(
                f"{masks_file} masks {name!r}, which the model has no parameter for (its "
                f"parameters: {', '.join(sorted(names)[:5])}…); use the config the OUTDIR was "
                "made with"
            )
        insert_mask(graph, graph.weight_node(name), mask.to(torch.bool))
    graph.recompile()
    return graph, keys, loaded
