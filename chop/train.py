"""``chop train``: train a (masked) model on the configured data, keeping its masks, and save it
like ``chop transform``.

The model comes from either

- an OUTDIR of ``chop transform`` (``masks.safetensors`` with ``weights.safetensors`` or
  ``model.pt2``): rebuilt from ``[model]`` and ``weights.safetensors`` when the config has a
  ``[model]`` (BatchNorm and dropout then train as usual), else the ``model.pt2`` program (which
  was exported in eval mode: BatchNorm statistics and dropout stay in eval mode); the pipeline is
  not run again; or
- a checkpoint: the config's pipeline runs first, exactly as in ``chop transform``.

Either way the masks are ``mul(weight, mask)`` nodes of the graph while training (a ``fold`` in
the pipeline is undone for training: :func:`~chop.pruner.mask_nodes`), so pruned weights get zero
gradient and stay zero. The ``[train]`` section::

    [train]
    optimizer = "adam"        # or "sgd"
    lr = 1e-3
    epochs = 1
    batch_size = 64           # default: [data] batch_size
    weight_decay = 0.0
    momentum = 0.0            # sgd only
    seed = 0                  # the eval split, the shuffling and dropout
    eval_fraction = 0.2       # held out for the per-epoch accuracy; 0 = no evaluation

Training uses every sample of ``[data] source`` (a ``"module:callable"`` source: the first
``[data] batches`` batches it yields), split once into train and eval sets with ``seed``. Each
epoch reports the mean loss, the training accuracy and the eval accuracy (argmax of the logits).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chop import datasets, meta
from chop.checkpoint import CheckpointError, load_checkpoint
from chop.config import Config, DataSpec, _show, _Validator, load_config
from chop.data import call, cross_entropy, logits_of
from chop.errors import DataError
from chop.graph import Graph
from chop.manager import PassManager
from chop.pass_base import Pass
from chop.pruner import mask_nodes
from chop.report import build_report
from chop.save import check_outdir, default_outdir, write_outputs
from chop.sources import is_reference
from chop.transform import Result, _noop, build, program_graph, trace_inputs
from passes.transform.mask import insert_mask

log = logging.getLogger("chop")

_TRAIN_KEYS = {
    "optimizer": "\"adam\" or \"sgd\"",
    "lr": "a positive number",
    "epochs": "a positive integer",
    "batch_size": "a positive integer",
    "weight_decay": "a number of at least 0",
    "momentum": "a number in [0, 1)",
    "seed": "an integer",
    "eval_fraction": "a number in [0, 1)",
    "prune_sparsity": "a number in [0, 1)",
    "prune_criterion": "a scoring pass, e.g. \"magnitude\" or \"snip{batches=1}\"",
    "prune_schedule": "\"exp\", \"cos\", \"cube\" or \"linear\"",
    "prune_start": "an integer of at least 0 (optimizer steps)",
    "prune_end": "an integer of at least prune_start (optimizer steps)",
    "prune_frequency": "a positive integer (optimizer steps)",
}


@dataclass(frozen=True)
class TrainSpec:
    """``[train]``: the optimizer, its settings, the epochs and the eval split."""

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int | None = None  # None: [data] batch_size
    weight_decay: float = 0.0
    momentum: float = 0.0
    seed: int = 0
    eval_fraction: float = 0.2
    # pruning during training (chop.pruner.Pruner), on when prune_sparsity is set
    prune_sparsity: float | None = None
    prune_criterion: str = "magnitude"
    prune_schedule: str = "cube"
    prune_start: int = 0
    prune_end: int = 0
    prune_frequency: int = 1


def parse_train(validator: _Validator, raw: dict[str, Any]) -> TrainSpec:
    """Validate the ``[train]`` table of ``raw``; errors name the file and the key."""
    table = validator.table(raw, "train", _TRAIN_KEYS)
    values: dict[str, Any] = {}
    for name, value in table.items():
        key = f"train.{name}"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        integer = isinstance(value, int) and not isinstance(value, bool)
        ok = {
            "optimizer": value in ("adam", "sgd"),
            "lr": number and value > 0,
            "epochs": integer and value >= 1,
            "batch_size": integer and value >= 1,
            "weight_decay": number and value >= 0,
            "momentum": number and 0 <= value < 1,
            "seed": integer,
            "eval_fraction": number and 0 <= value < 1,
            "prune_sparsity": number and 0 <= value < 1,
            "prune_criterion": isinstance(value, str) and bool(value.strip()),
            "prune_schedule": value in ("exp", "cos", "cube", "linear"),
            "prune_start": integer and value >= 0,
            "prune_end": integer and value >= table.get("prune_start", 0),
            "prune_frequency": integer and value >= 1,
        }[name]
        if not ok:
            raise validator.error(key, f"expected {_TRAIN_KEYS[name]}, got {_show(value)}")
        values[name] = float(value) if name in ("lr", "weight_decay", "momentum",
                                                "eval_fraction", "prune_sparsity") else value
    if "momentum" in values and values.get("optimizer", "adam") != "sgd":
        raise validator.error(
            "train.momentum", "momentum is an option of optimizer = \"sgd\"; remove it or set "
            "optimizer = \"sgd\""
        )
    prune = [k for k in values if k.startswith("prune_") and k != "prune_sparsity"]
    if prune and "prune_sparsity" not in values:
        raise validator.error(
            f"train.{prune[0]}", "pruning during training needs train.prune_sparsity, the target "
            "it raises the sparsity to; set it, or remove the prune_* keys"
        )
    return TrainSpec(**values)


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, TrainSpec]:
    """The config at ``path`` and its ``[train]`` section (defaults when it has none); errors
    are :class:`~chop.config.ConfigError`, as for every other section."""
    config = load_config(path, overrides)
    return config, config.train or TrainSpec()


# -- data ----------------------------------------------------------------------------------------


def load_samples(spec: DataSpec, folder: Path) -> tuple[Any, torch.Tensor]:
    """Every sample of ``[data] source`` as one ``(inputs, targets)`` pair (a
    ``"module:callable"`` source: its first ``batches`` batches, concatenated)."""
    if is_reference(spec.source):
        batches = datasets.load_batches(spec, folder)
        try:
            return torch.utils._pytree.tree_map(
                lambda *xs: torch.cat(xs), *[b[0] for b in batches]
            ), torch.cat([b[1] for b in batches])
        except (RuntimeError, TypeError, ValueError) as e:
            raise DataError(
                f"data.source = {spec.source!r}: cannot join its batches into one training set "
                f"({e}); its batches must hold tensors of the same shapes but the batch size"
            ) from None
    inputs, targets, where = datasets.read_source(spec, folder)
    everything = dataclasses.replace(spec, batch_size=len(targets), batches=1, shuffle=False)
    return datasets.batched(inputs, targets, everything, where)[0]


def _take(inputs: Any, index: torch.Tensor) -> Any:
    return torch.utils._pytree.tree_map(
        lambda x: x[index] if isinstance(x, torch.Tensor) else x, inputs
    )


def split(inputs: Any, targets: torch.Tensor, fraction: float, seed: int
          ) -> tuple[tuple[Any, torch.Tensor], tuple[Any, torch.Tensor] | None]:
    """A seeded random split into (train, eval); eval is None when ``fraction`` is 0."""
    count = len(targets)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = math.floor(fraction * count + 0.5)
    if fraction > 0 and not 0 < held < count:
        raise DataError(
            f"[train] eval_fraction = {fraction} of {count} samples leaves "
            f"{'no eval' if held == 0 else 'no training'} samples; change eval_fraction"
        )
    train = (_take(inputs, order[held:]), targets[order[held:]])
    return train, ((_take(inputs, order[:held]), targets[order[:held]]) if held else None)


# -- the loop ------------------------------------------------------------------------------------


def _batches(count: int, size: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Index batches; a last batch of 1 joins the one before (a traced graph's batch size is
    dynamic from 2 on)."""
    order = torch.arange(count) if order is None else order
    cuts = list(range(0, count, size))
    if len(cuts) > 1 and count - cuts[-1] == 1:
        cuts.pop()
    return [order[a:b] for a, b in zip(cuts, cuts[1:] + [count])]


def accuracy(graph: Graph, inputs: Any, targets: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``graph`` in eval mode."""
    correct = 0
    with torch.no_grad(), graph.mode(batch_norm=False, dropout=False):
        for index in _batches(len(targets), batch_size):
            logits = logits_of(call(graph.module, _take(inputs, index)))
            correct += int((logits.argmax(-1) == targets[index]).sum())
    return correct / max(len(targets), 1)


def train_graph(
    graph: Graph,
    train: tuple[Any, torch.Tensor],
    evaluation: tuple[Any, torch.Tensor] | None,
    spec: TrainSpec,
    batch_size: int,
    *,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``graph.module`` in train mode for ``spec.epochs`` epochs; returns one record per
    epoch (``epoch``, ``loss``, ``train_accuracy``, ``eval_accuracy`` or None, ``seconds``).
    The graph is left in eval mode."""
    loss = loss or cross_entropy
    params = [p for p in graph.module.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    inputs, targets = train
    generator = torch.Generator().manual_seed(spec.seed)
    pruner = _pruner(graph, spec, loss)
    records = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # dropout
        for epoch in range(1, spec.epochs + 1):
            start = time.perf_counter()
            graph.train()
            order = torch.randperm(len(targets), generator=generator)
            batches = _batches(len(targets), batch_size, order)
            total_loss, correct = 0.0, 0
            items = batches if track is None else track(
                batches, len(batches), f"epoch {epoch}/{spec.epochs}"
            )
            for index in items:
                y = targets[index]
                x = _take(inputs, index)
                if pruner is not None:
                    pruner.on_step_begin(batch=(x, y))  # prunes when the schedule says so
                outputs = call(graph.module, x)
                value = loss(outputs, y)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                if pruner is not None:
                    pruner.on_before_optimizer_step()
                optimizer.step()
                if pruner is not None:
                    pruner.on_after_optimizer_step()
                total_loss += float(value.detach()) * len(index)
                correct += int((logits_of(outputs).detach().argmax(-1) == y).sum())
            graph.eval()
            record = {
                "epoch": epoch,
                **({"sparsity": pruner.sparsity} if pruner is not None else {}),
                "loss": total_loss / len(targets),
                "train_accuracy": correct / len(targets),
                "eval_accuracy": (accuracy(graph, *evaluation, batch_size)
                                  if evaluation is not None else None),
                "seconds": time.perf_counter() - start,
            }
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
    return records


def _pruner(graph: Graph, spec: TrainSpec, loss: Callable | None) -> Any:
    """The :class:`~chop.pruner.Pruner` of ``[train] prune_*`` (None without prune_sparsity).
    Its schedule starts at the sparsity the graph's masks already have, so progressive pruning
    never gives a pruned weight back."""
    if spec.prune_sparsity is None:
        return None
    from chop.pruner import Pruner

    masks = [meta.entries(n)["mask"] for n in graph.weight_nodes() if "mask" in meta.entries(n)]
    numel = sum(m.numel() for m in masks)
    initial = 1.0 - sum(int(m.sum()) for m in masks) / numel if numel else 0.0
    pruner = Pruner(
        graph, spec.prune_sparsity, criterion=spec.prune_criterion,
        schedule=spec.prune_schedule, start_step=spec.prune_start, end_step=spec.prune_end,
        frequency=spec.prune_frequency, initial_sparsity=min(initial, spec.prune_sparsity),
        loss=loss,
    )
    pruner.on_train_begin()
    return pruner


# -- the command ---------------------------------------------------------------------------------


def _from_outdir(folder: Path, config: Config, inputs: Any, trust: bool
                 ) -> tuple[Graph, list[str], Any, dict[str, Any]]:
    """The masked graph of a ``chop transform`` OUTDIR, its state-dict keys, the model (or
    None) and the report's checkpoint entry."""
    from safetensors.torch import load_file

    masks_file = folder / "masks.safetensors"
    weights, program = folder / "weights.safetensors", folder / "model.pt2"
    if not masks_file.is_file() or not (weights.is_file() or program.is_file()):
        raise CheckpointError(
            f"{folder} is a folder but not a chop transform OUTDIR (it needs masks.safetensors "
            "and weights.safetensors or model.pt2); pass an OUTDIR or a checkpoint file"
        )
    if config.model is not None and weights.is_file():
        ckpt = load_checkpoint(weights, trust=trust)
        model = build(config, ckpt)
        graph = trace_inputs(model, inputs)
        keys = list(model.state_dict())
    else:
        ckpt = load_checkpoint(program, trust=trust)
        model = None
        graph = program_graph(ckpt, config)
        graph.train()
        keys = list(graph.module.state_dict())
        log.warning(
            "%s was exported in eval mode: BatchNorm statistics and dropout stay in eval mode "
            "while training; add a [model] section to %s to train them", program, config.path,
        )
    try:
        masks = load_file(masks_file)
    except Exception as e:
        raise CheckpointError(f"cannot read {masks_file}: {e}") from None
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
    return graph, keys, model, {"path": str(folder), "sha256": ckpt.sha256, "kind": "outdir"}


def train(
    config_path: str | Path,
    source: str | Path,
    *,
    outdir: str | Path | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    trust_checkpoint: bool = False,
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
    on_pass: Callable[[Pass, int, int], None] | None = None,
    on_stage: Callable[[str], None] = _noop,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Result:
    """Run ``chop train``; see the module doc. The hooks are those of
    :func:`chop.transform.transform`, plus ``on_epoch(record)`` after each epoch."""
    on_stage("reading the config")
    config, spec = load_train_config(config_path, overrides)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass a checkpoint file or a chop transform OUTDIR"
        )
    out = Path(outdir) if outdir is not None else default_outdir(
        config.path.with_name(f"{config.path.stem}-trained{config.path.suffix}")
    )
    out = check_outdir(out, [config.path, path], force=force)
    batch_size = spec.batch_size or config.data.batch_size

    on_stage("loading data")
    try:
        inputs, targets = load_samples(config.data, config.folder)
        train_set, eval_set = split(inputs, targets, spec.eval_fraction, spec.seed)
        example = _take(train_set[0], torch.arange(min(2, len(train_set[1]))))
    except DataError as e:
        raise DataError(f"{config.path}: [data]: {e}") from None

    on_stage("loading the model")
    if path.is_dir():
        graph, keys, model, checkpoint = _from_outdir(path, config, example, trust_checkpoint)
    else:
        ckpt = load_checkpoint(path, trust=trust_checkpoint)
        model = build(config, ckpt)
        on_stage("loading data")
        try:
            batches = datasets.load_batches(config.data, config.folder)
        except DataError as e:
            raise type(e)(f"{config.path}: [data]: {e}") from None
        on_stage("tracing")
        if ckpt.program is not None:
            graph = program_graph(ckpt, config)
            keys = list(graph.module.state_dict())
        else:
            assert model is not None
            graph = trace_inputs(model, batches[0][0])
            keys = list(model.state_dict())
        PassManager(config.passes).run(graph, batches, track=track, on_pass=on_pass)
        mask_nodes(graph)  # a fold in the pipeline: train with the masks again
        checkpoint = {"path": str(ckpt.path), "sha256": ckpt.sha256, "kind": ckpt.kind}

    on_stage("training")
    records = train_graph(graph, train_set, eval_set, spec, batch_size, track=track,
                          on_epoch=on_epoch)

    on_stage("writing outputs")
    report = build_report(
        graph,
        config={"path": str(config.path), "overrides": config.overrides},
        checkpoint=checkpoint,
        data={"source": config.data.source, "train_samples": len(train_set[1]),
              "eval_samples": len(eval_set[1]) if eval_set is not None else 0},
        train={**dataclasses.asdict(spec), "batch_size": batch_size, "history": records},
    )
    write_outputs(graph, report, out, example, keys, model)
    return Result(out, report, graph)
