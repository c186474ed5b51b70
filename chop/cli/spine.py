"""The steps every ``chop`` command shares, in the order they run.

1. :func:`prepare` — read and validate the config, check the pipeline against what each pass
   requires, and check the output folder: everything that can fail fast fails before anything
   slow. The command then enters the returned :class:`~chop.cli.outputs.Output` for the rest of
   the run, which locks OUTDIR and creates its temporary folder (proving it writable);
2. :func:`load_model` — load the checkpoint safely and build the model it belongs to (a Hugging
   Face model folder: :mod:`chop.cli.hf`);
3. :func:`load_data` — the configured batches and the held-out batches after them, checked
   against each other and against what the default loss needs;
4. :func:`capture` — trace the model (or wrap a ``.pt2`` program, checking the data against its
   inputs) into a :class:`Graph`; :func:`measure` then takes the metrics before pruning;
5. :func:`run_pipeline` — the config's passes, through the pass manager, with the loss of
   :func:`loss_of`; :func:`measure` again for the metrics after;
6. :func:`write` — build the report and write every output file atomically into OUTDIR (and
   ``hf/`` for a model folder).

``chop transform`` is these six steps; ``chop train`` puts training between 5 and 6
(:mod:`chop.cli.commands`). Under ``torchrun`` every rank runs steps 2–5 on the same data,
scoring its share of the batches, and rank 0 alone prepares OUTDIR and writes
(:mod:`chop.cli.ranks`). Each step raises a :class:`~chop.errors.ChopError` that names what
is wrong and how to fix it; nothing but the temporary folder is written before step 6, and
leaving the :class:`~chop.cli.outputs.Output` removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chop.cli import hf
from chop.cli.checkpoint import Checkpoint, load_checkpoint, load_into
from chop.cli.config import Config, load_config
from chop.cli.datasets import Encode, is_text, load_split
from chop.cli.models import build_model
from chop.cli.outputs import Output, check_outdir, default_outdir, write_outputs
from chop.cli.report import build_report
from chop.cli.sources import import_callable, is_reference
from chop.errors import CheckpointError, ChopError, ConfigError, DataError
from chop.ir.graph import Graph, trace_inputs
from chop.pipeline.batches import describe, expected_inputs
from chop.pipeline.manager import PassManager
from chop.pipeline.pass_base import Pass
from chop.training.loop import evaluate

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
    """A checkpoint and the model built from it (None when the checkpoint is a ``.pt2``), or a
    Hugging Face model folder (``checkpoint`` None)."""

    checkpoint: Checkpoint | None
    model: nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)
    folder: hf.Folder | None = None

    def encode(self, config: Config) -> Encode | None:
        """How text data is tokenised for this model (its folder's tokenizer), if it is."""
        if self.folder is None or not is_text(config.data.source):
            return None
        return hf.encoder(self.folder, config.data)


def prepare(config_path: str | Path, overrides: Sequence[str], outdir: str | Path | None,
            suffix: str, inputs: Sequence[Path], *, force: bool) -> tuple[Config, Output]:
    """Step 1: the validated config, its pipeline checked (a ``mask`` without a criterion fails
    here, not after loading and tracing), and OUTDIR checked (default: a new
    ``<config stem><suffix>`` folder next to the config). ``inputs``, the config, the files
    it names and the current folder are never overwritten. Enter the returned
    :class:`Output` for the rest of the run."""
    config = load_config(config_path, overrides)
    try:
        PassManager(config.passes).check()
    except ChopError as e:
        raise type(e)(f"{config.path}: [pipeline] passes: {e}") from e
    shown = Path(outdir) if outdir is not None else default_outdir(config.path, suffix)
    out = check_outdir(shown, [config.path, *inputs, *named_files(config)], force=force)
    return config, Output(out, force=force, shown=shown)


def named_files(config: Config) -> list[Path]:
    """The files in the config's folder that the config names: its data file and the modules
    of ``module:callable`` sources."""
    named = []
    for source in (config.data.source, config.model.source if config.model else "",
                   config.loss or ""):
        if is_reference(source):
            module = config.folder / source.partition(":")[0].replace(".", "/")
            named += [p for p in (module.with_suffix(".py"), module) if p.exists()]
        elif Path(source).suffix:
            named.append(config.folder / source)
    return named


def load_model(config: Config, path: Path, *, trust: bool) -> Loaded:
    """Step 2: the checkpoint at ``path`` and the model to trace — built from ``[model]`` and
    loaded, the checkpoint's own (a pickled module, trusted), or a model folder's."""
    if not path.exists():
        raise hf.not_local(path)
    if hf.is_folder(path):
        folder = hf.load_folder(path, trust=trust)
        if config.model is not None:
            log.warning("%s: [model] is not used: %s is a model folder that holds its own model",
                        config.path, path)
        return Loaded(None, folder.model, folder.info, folder)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder without config.json; pass a Hugging Face model folder "
            "(save_pretrained), or a checkpoint file"
        )
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


def load_data(config: Config, *, targets: bool = True, encode: Encode | None = None,
              loss: Any = None) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    """Step 3: the ``[data]`` batches and the held-out batches after them (for the metrics);
    errors are prefixed with the config and section.

    Every batch must have the structure, dtypes and per-sample shapes of the first, and, when
    ``targets`` are used (a pass reads data, or training), integer class targets unless the
    config names a ``loss`` (``[loss] source``): the command line's default loss is
    cross-entropy. ``encode`` tokenises text data (:meth:`Loaded.encode`)."""
    try:
        batches, held = load_split(config.data, config.folder, encode)
        first = _per_sample(batches[0][0])
        for i, (inputs, _) in enumerate([*batches[1:], *held], 1):
            if _per_sample(inputs) != first:
                raise DataError(
                    f"batch {i} has inputs {describe(inputs)} but batch 0 has "
                    f"{describe(batches[0][0])}; every batch must have the same structure, "
                    "dtypes and per-sample shapes (only the batch size may differ)"
                )
        if targets and loss is None:
            for _, target in batches:
                class_targets(target)
    except ChopError as e:
        raise type(e)(f"{config.path}: [data]: {e}") from e
    return batches, held


def loss_of(config: Config, loaded: Loaded, *, needed: bool) -> Any:
    """The loss of every pass, metric and training step: ``[loss] source``, else None (chop's
    cross-entropy, which the targets of a model folder's task are made for). A model folder
    without a task head has no default: when a loss is ``needed``, that is a
    :class:`ConfigError` asking for ``[loss] source``."""
    if config.loss is not None:
        return import_callable(config.loss, config.folder, "loss.source")
    folder = loaded.folder
    if needed and folder is not None and not folder.task:
        raise ConfigError(
            f"{config.path}: {type(folder.model).__name__} has no task head chop knows a loss "
            "for (causal or masked LM, sequence or token classification); name one with "
            "[loss] source = \"module:callable\", a loss(outputs, targets) -> scalar tensor "
            "(outputs: the model's, targets: the [data] label_field values)"
        )
    return None


def metric_of(config: Config, loaded: Loaded) -> str:
    """``loss`` with a user's loss, a model folder's task metric, else ``accuracy``."""
    if config.loss is not None:
        return "loss"
    return loaded.folder.metric if loaded.folder is not None else "accuracy"


def measure(config: Config, graph: Graph, held: list[tuple[Any, Any]], metric: str, loss: Any
            ) -> dict[str, float] | None:
    """The metric (and mean loss) of ``graph`` in eval mode on the held-out batches; None
    without held-out batches with targets (nothing to measure)."""
    if not held or any(t is None for _, t in held):
        return None
    try:
        return evaluate(graph, held, metric, loss)
    except ChopError as e:
        raise type(e)(f"{config.path}: [data] eval_batches: {e}") from e


def metrics_entry(before: dict[str, float] | None, after: dict[str, float] | None,
                  held: list[tuple[Any, Any]], metric: str) -> dict[str, Any]:
    """The report's ``metrics``: the metric before and after, on how many held-out samples."""
    if before is None or after is None:
        return {}
    samples = sum(len(t) for _, t in held)
    return {"metrics": {"metric": metric, "batches": len(held), "samples": samples,
                        "before": before, "after": after}}


def class_targets(targets: Any) -> None:
    """Raise :class:`DataError` for float targets: the command line's loss is cross-entropy
    over integer class labels (chop would otherwise fail after loading and tracing)."""
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        raise DataError(
            f"the targets are {describe(targets)}, but chop's command line scores and trains "
            "with cross-entropy over integer class labels; save the targets as integer class "
            "indices, or, for regression or soft labels, name a loss: [loss] source = "
            "\"module:callable\" (loss(outputs, targets) -> scalar)"
        )


def _per_sample(inputs: Any) -> Any:
    leaves, spec = torch.utils._pytree.tree_flatten(inputs)
    return spec, [(x.dtype, tuple(x.shape[1:])) if isinstance(x, torch.Tensor) else type(x)
                  for x in leaves]


def capture(loaded: Loaded, config: Config, inputs: Any) -> tuple[Graph, list[str]]:
    """Step 4: the graph to run the pipeline on, and the state-dict keys of the model it came
    from (``weights.safetensors`` keeps exactly these)."""
    if loaded.checkpoint is not None and loaded.checkpoint.program is not None:
        graph = program_graph(loaded.checkpoint, config, inputs)
        return graph, list(graph.module.state_dict())
    if loaded.model is None:
        raise CheckpointError(f"checkpoint {loaded.info.get('path')} holds no model to trace")
    return trace_inputs(loaded.model, inputs), list(loaded.model.state_dict())


def run_pipeline(config: Config, graph: Graph, batches: list, hooks: Hooks, loss: Any = None,
                 *, shared_data: bool = False) -> None:
    """Step 5: the config's passes on ``graph``, reporting progress through ``hooks``
    (``shared_data``: every rank of a process group has the same batches)."""
    PassManager(config.passes).run(graph, batches, loss, track=hooks.track,
                                   on_pass=hooks.on_pass, shared_data=shared_data)


def write(graph: Graph, config: Config, out: Output, example: Any, keys: Sequence[str],
          loaded: Loaded, **context: Any) -> Result:
    """Step 6: the report (with ``context``: checkpoint, data, metrics, train…) and every
    output file, committed as OUTDIR; a model folder's pruned model goes to ``hf/``."""
    report = build_report(
        graph, config={"path": str(config.path), "overrides": config.overrides}, **context
    )
    extra = None
    folder = loaded.folder
    if folder is not None:
        def extra(tmp: Path, state: dict, reshaped: bool, sample: Any, expected: Any
                  ) -> dict[str, Any]:
            why = hf.write_folder(folder, state, reshaped, tmp / "hf", sample, expected)
            if why is not None:
                log.info("hf/ was not written: %s", why)  # the summary says it
                return {"hf": {"written": False, "reason": why}}
            return {"hf": {"written": True, "path": "hf", "architecture":
                           type(folder.model).__name__,
                           "tokenizer": folder.tokenizer is not None}}
    write_outputs(graph, report, out, example, keys, loaded.model, extra)
    return Result(out.path, report, graph)


def program_graph(ckpt: Checkpoint, config: Config, inputs: Any = None) -> Graph:
    """A graph over a ``.pt2`` program's module; its batch size must fit the data's, and
    ``inputs`` (one batch's) its input shapes and dtypes."""
    if ckpt.program is None:
        raise CheckpointError(f"{ckpt.path} is not a torch.export program")
    module = ckpt.program.module()
    placeholders = list(module.graph.find_nodes(op="placeholder"))
    for node in placeholders:
        value = node.meta.get("val")
        if (isinstance(value, torch.Tensor) and value.dim() > 0
                and isinstance(value.shape[0], int) and value.shape[0] != config.data.batch_size):
            raise CheckpointError(
                f"{ckpt.path} was exported with a fixed batch size of {value.shape[0]} (input "
                f"{node.name}); set [data] batch_size = {value.shape[0]} in {config.path}, or "
                "re-export it with a dynamic batch dimension"
            )
    if inputs is not None:
        given = ([inputs.get(n.name) for n in placeholders] if isinstance(inputs, dict) else
                 list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
        for node, value in zip(placeholders, given, strict=False):
            want = node.meta.get("val")
            if not (isinstance(want, torch.Tensor) and isinstance(value, torch.Tensor)):
                continue
            sizes = zip(want.shape[1:], value.shape[1:], strict=False)
            if want.dtype != value.dtype or want.dim() != value.dim() or any(
                    isinstance(w, int) and w != v for w, v in sizes):
                raise DataError(
                    f"{config.path}: [data]: the batches' input {node.name} is "
                    f"{describe(value)}, but {ckpt.path} takes {expected_inputs(module)}; "
                    "give [data] samples of the shape and dtype the program was exported for "
                    "(only the batch size may differ)"
                )
    return Graph(module, training=False, name=ckpt.path.stem)
