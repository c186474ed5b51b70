"""The commands: ``chop transform`` and ``chop train``, each the shared spine
(:mod:`chop.cli.spine`) with its own middle.

``chop transform CONFIG CKPT``: prepare, load the model, load the data, capture, measure the
metric on the held-out batches, run the pipeline, measure again, write. Under ``torchrun``
(``rank``/``world`` from :mod:`chop.cli.ranks`) every rank runs the pipeline on the same data,
the criteria score each rank's share of the batches and sum over the ranks, and rank 0 alone
measures and writes.

``chop train CONFIG CKPT_OR_OUTDIR`` trains a (masked) model on the configured data, keeping its
masks, and writes the same files. The model comes from either

- an OUTDIR of ``chop transform`` (``masks.safetensors`` with ``weights.safetensors`` or
  ``model.pt2``): rebuilt from ``[model]`` and ``weights.safetensors`` when the config has a
  ``[model]`` (BatchNorm and dropout then train as usual), else the ``model.pt2`` program (which
  was exported in eval mode: BatchNorm statistics and dropout stay in eval mode; also after
  ``shrink``, whose shapes ``[model]`` does not build); the pipeline is not run again (the
  OUTDIR of a ``sparse`` or ``fold-bn`` export, made for inference, is refused); or
- a checkpoint: the config's pipeline runs first, exactly as in ``chop transform``.

Either way the masks are ``mul(weight, mask)`` nodes while training (a ``fold`` in the pipeline
is undone for training), so pruned weights get zero gradient and stay zero. ``[train]`` (see
:class:`~chop.training.loop.TrainSpec`) sets the optimizer, epochs, eval split and the optional
pruning schedule. Training uses every sample of ``[data] source`` (a ``"module:callable"``
source: its first ``[data] batches`` batches), split once into train and eval sets with
``seed``; each epoch reports the task metric on the eval set. A model folder (or the OUTDIR of
one, through its ``hf/``) trains and writes ``hf/`` like ``chop transform``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from chop.cli import hf, spine
from chop.cli.checkpoint import load_checkpoint
from chop.cli.config import Config
from chop.cli.datasets import load_samples
from chop.cli.outputs import Output
from chop.cli.spine import Hooks, Loaded, Result
from chop.errors import CheckpointError, ConfigError, DataError
from chop.ir.graph import Graph
from chop.ir.masks import insert_mask, is_mask_of, restore_masks
from chop.passes.export.channels_last import to_channels_last
from chop.passes.export.sparse import csr_weights
from chop.passes.transform.iterative_snip import IterativeSnip
from chop.passes.transform.mask import Mask
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
    rank: int = 0,
    world: int = 1,
) -> Result:
    """Run ``chop transform``; see the module doc. On a rank other than 0 nothing is written
    and the result's report is empty."""
    hooks = hooks or Hooks()
    hooks.on_stage("reading the config")
    path = Path(checkpoint_path)
    config, out = spine.prepare(config_path, overrides, outdir, "-out", [path], force=force)
    with out if rank == 0 else nullcontext():  # OUTDIR locked, its temporary folder made
        hooks.on_stage("loading the checkpoint")
        loaded = spine.load_model(config, path, trust=trust_checkpoint)
        hooks.on_stage("loading data")
        scoring = any(p.data_batches() for p in config.passes)
        batches, held = spine.load_data(config, targets=scoring, encode=loaded.encode(config),
                                        loss=config.loss)
        loss = spine.loss_of(config, loaded, needed=scoring or any(
            t is not None for _, t in held))
        metric = spine.metric_of(config, loaded)
        hooks.on_stage("tracing")
        example = batches[0][0]
        graph, keys = spine.capture(loaded, config, example)
        if rank == 0:
            hooks.on_stage("measuring the model before pruning")
            before = spine.measure(config, graph, held, metric, loss)
        spine.run_pipeline(config, graph, batches, hooks, loss, shared_data=world > 1)
        if rank != 0:
            return Result(out.path, {}, graph)
        hooks.on_stage("measuring the pruned model")
        after = spine.measure(config, graph, held, metric, loss)
        hooks.on_stage("writing outputs")
        return spine.write(
            graph, config, out, example, keys, loaded, checkpoint=loaded.info,
            data={"source": config.data.source, "batch_size": config.data.batch_size,
                  "batches": config.data.batches, "shuffle": config.data.shuffle,
                  **({"ranks": world} if world > 1 else {})},
            **spine.metrics_entry(before, after, held, metric),
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
        raise hf.not_local(path)
    config, out = spine.prepare(config_path, overrides, outdir, "-trained-out", [path],
                                force=force)
    if "sparse" in [p.name for p in config.passes] and not path.is_dir():
        raise ConfigError(f"{config.path}: [pipeline] passes: {_INFERENCE_ONLY}; train with a "
                          "pipeline without sparse, then apply sparse to the trained model")
    with out:  # OUTDIR locked, its temporary folder made: an unwritable place fails here
        return _train(config, path, out, trust_checkpoint, hooks)


_INFERENCE_ONLY = ("sparse is an export for inference: its CSR layers have no weights to train, "
                   "so chop train would train everything else and leave them as they are")


def _train(config: Config, path: Path, out: Output, trust: bool, hooks: Hooks) -> Result:
    spec = config.train
    batch_size = spec.batch_size or config.data.batch_size

    hooks.on_stage("loading the model")
    outdir = path.is_dir() and not hf.is_folder(path)
    loaded = _outdir_model(path, config, trust) if outdir else spine.load_model(
        config, path, trust=trust)
    hooks.on_stage("loading data")
    encode = loaded.encode(config)
    try:
        inputs, targets = load_samples(config.data, config.folder, encode)
        if config.loss is None:
            spine.class_targets(targets)
        train_set, eval_set = split(inputs, targets, spec.eval_fraction, spec.seed)
        example = take_samples(train_set[0], torch.arange(min(2, len(train_set[1]))))
    except DataError as e:
        raise DataError(f"{config.path}: [data]: {e}") from e
    loss = spine.loss_of(config, loaded, needed=True)

    hooks.on_stage("tracing")
    if outdir:
        graph, keys = _masked_graph(path, loaded, config, example)
    else:
        batches, _ = spine.load_data(config, encode=encode, loss=config.loss)
        graph, keys = spine.capture(loaded, config, batches[0][0])
        spine.run_pipeline(config, graph, batches, hooks, loss)
        restore_masks(graph)  # a fold in the pipeline: train with the masks again

    hooks.on_stage("training")
    records = train_graph(graph, train_set, eval_set, spec, batch_size, loss=loss,
                          metric=spine.metric_of(config, loaded), track=hooks.track,
                          on_epoch=hooks.on_epoch, mask_options=_mask_options(config))

    hooks.on_stage("writing outputs")
    return spine.write(
        graph, config, out, example, keys, loaded, checkpoint=loaded.info,
        data={"source": config.data.source, "train_samples": len(train_set[1]),
              "eval_samples": len(eval_set[1]) if eval_set is not None else 0},
        train={**dataclasses.asdict(spec), "batch_size": batch_size, "history": records},
    )


def _mask_options(config: Config) -> dict[str, Any]:
    """The selection options (all but the sparsity) of the pipeline's last ``mask`` (or
    ``iterative-snip``) pass, which pruning during training keeps: the same weights, scope and
    granularity."""
    masking = [p for p in config.passes if isinstance(p, (Mask, IterativeSnip))]
    if not masking:
        return {}
    chosen = masking[-1]
    return {f.name: getattr(chosen, f.name) for f in dataclasses.fields(Mask)
            if f.name != "sparsity" and getattr(chosen, f.name) != f.default}


def _outdir_model(folder: Path, config: Config, trust: bool) -> Loaded:
    """The model of a ``chop transform`` OUTDIR: its ``hf/`` model folder, else rebuilt from
    ``[model]`` and ``weights.safetensors``, else the ``model.pt2`` program (the report's
    checkpoint entry says ``"kind": "outdir"``)."""
    masks_file = folder / "masks.safetensors"
    weights, program = folder / "weights.safetensors", folder / "model.pt2"
    if not masks_file.is_file() or not (weights.is_file() or program.is_file()):
        raise CheckpointError(
            f"{folder} is a folder but not a chop transform OUTDIR (it needs masks.safetensors "
            "and weights.safetensors or model.pt2) nor a model folder (config.json); pass an "
            "OUTDIR, a model folder or a checkpoint file"
        )
    if weights.is_file() and _sparse_export(weights):
        raise _sparse_outdir(folder)
    passes = _outdir_passes(folder)
    if "fold-bn" in passes:
        raise CheckpointError(
            f"{folder} holds a fold-bn export: its BatchNorms are folded into the convs, a model "
            "for inference (trained further it is a network without normalisation); train the "
            "OUTDIR of the same pipeline without fold-bn, then fold the trained model")
    if hf.is_folder(folder / "hf"):
        loaded = spine.load_model(config, folder / "hf", trust=trust)
    elif config.model is not None and weights.is_file() and "shrink" not in passes:
        loaded = spine.load_model(config, weights, trust=trust)  # [model]'s shapes: not shrunk
    else:
        loaded = Loaded(load_checkpoint(program, trust=trust))
    loaded.info = {**loaded.info, "path": str(folder), "kind": "outdir",
                   "sha256": loaded.checkpoint.sha256 if loaded.checkpoint else
                   loaded.info["sha256"], "pipeline": passes}
    return loaded


def _outdir_passes(folder: Path) -> list[str]:
    """The names of the passes the OUTDIR's ``report.json`` lists (none if it cannot be read:
    the other files then say what they hold)."""
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        return [str(p.get("name")) for p in report.get("pipeline", []) if isinstance(p, dict)]
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        return []


def _sparse_export(weights: Path) -> bool:
    """Whether an OUTDIR's ``weights.safetensors`` holds CSR layers (the ``sparse`` export)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, "pt") as f:
            return any(key.endswith("_crow_indices") for key in f.keys())
    except (OSError, RuntimeError, ValueError, SafetensorError):
        return False  # unreadable: loading it says why


def _sparse_outdir(folder: Path) -> CheckpointError:
    return CheckpointError(f"{folder} holds a sparse export: {_INFERENCE_ONLY}; train the "
                           "OUTDIR of the same pipeline without sparse, then apply sparse to "
                           "the trained model")


def _masked_graph(folder: Path, loaded: Loaded, config: Config, inputs: Any
                  ) -> tuple[Graph, list[str]]:
    """The graph of an OUTDIR's model with its masks inserted, and its state-dict keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    masks_file = folder / "masks.safetensors"
    graph, keys = spine.capture(loaded, config, inputs)
    if csr_weights(graph):
        raise _sparse_outdir(folder)
    if loaded.model is None:
        graph.train()
        fix = (f"add a [model] section to {config.path} to train them" if config.model is None
               else "the OUTDIR was shrunk, so [model] no longer builds its shapes: train the "
                    "OUTDIR of the pipeline without shrink to train them, then shrink")
        log.warning("%s was exported in eval mode: BatchNorm statistics and dropout stay in eval "
                    "mode while training; %s", folder / "model.pt2", fix)
    try:
        masks = load_file(masks_file)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {masks_file} ({e}); it is damaged: rerun chop "
                              "transform to write the OUTDIR again") from e
    names = {n.target for n in graph.weight_nodes()}
    for name, mask in masks.items():
        if name not in names:
            raise CheckpointError(
                f"{masks_file} masks {name!r}, which the model has no parameter for (its "
                f"parameters: {', '.join(sorted(names)[:5])}…); use the config the OUTDIR was "
                "made with"
            )
        weight = graph.parameter(name)
        if not is_mask_of(mask, weight):
            raise CheckpointError(
                f"{masks_file}: the mask of {name!r} is {mask.dtype}{list(mask.shape)}, not a "
                f"0/1 mask of the weight's shape {list(weight.shape)}; it is damaged: rerun "
                "chop transform to write the OUTDIR again")
        insert_mask(graph, graph.weight_node(name), mask.to(torch.bool))
    graph.recompile()
    if "channels-last" in loaded.info.get("pipeline", ()):
        # [model] and hf/ build the weights row-major: give them the OUTDIR's layout back
        to_channels_last(graph)
    return graph, keys
