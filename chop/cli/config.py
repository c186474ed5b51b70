"""The TOML config of ``chop transform``: read, override, validate, build the passes.

::

    [model]
    source = "models:LeNet5"        # "module:callable" (importable from the config's folder or
    kwargs = { num_classes = 10 }   # PYTHONPATH) or a built-in name; not needed for a .pt2

    [data]
    source = "digits"               # a .pt/.npz/.safetensors file with "inputs" and "targets",
    batch_size = 64                 # "digits", "synthetic", "module:callable", or a text file
    batches = 1                     # (.jsonl/.json/.csv/.parquet/.txt; with a model folder)
    shuffle = false
    eval_batches = 4                # held-out batches for the metrics before and after

    [loss]                          # optional: the loss of every pass, metric and training step
    source = "losses:my_loss"       # "module:callable", loss(outputs, targets) -> scalar

    [pipeline]
    passes = ["snip", "mask", "fold"]   # or a pipeline string

    [passes.mask]                   # options of one pass of the pipeline
    sparsity = 0.9

Everything is checked before anything runs: unknown sections and keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the file, the key, the value and what is
allowed. A typo is never silently ignored. ``--set section.key=value`` overrides are applied
first (values parsed as TOML, so ``0.95``, ``true`` and ``"global"``; a bare word is a string)
and are named in messages as such.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from chop.errors import ChopError, ConfigError, OptionError, PipelineError, did_you_mean
from chop.pipeline import registry
from chop.pipeline.manager import parse_pipeline
from chop.pipeline.pass_base import SEEDS, Pass
from chop.training.loop import TrainSpec
from chop.training.pruner import criterion_pass


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: where the model comes from."""

    source: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    """``[data]``: the batches analysis passes see (and the example inputs for tracing), then
    ``eval_batches`` held-out batches for the metrics."""

    source: str = "synthetic"
    batch_size: int = 64
    batches: int = 1
    shuffle: bool = False
    seed: int = 0
    shape: tuple[int, ...] | None = None  # per-sample input shape (reshape, or synthetic shape)
    classes: int = 10  # synthetic targets are drawn from range(classes)
    eval_batches: int = 4  # held-out batches after the scoring ones (0: no metrics)
    text_field: str = "text"  # text files: the field holding the text
    label_field: str | None = None  # text files: the field holding the label (classifiers)
    max_length: int = 128  # text files: tokens per sample at most (longer texts are cut)
    given: frozenset[str] = frozenset()  # keys the user set explicitly


@dataclass(frozen=True)
class Config:
    """A validated config: the parsed sections and the pipeline's pass objects."""

    path: Path
    model: ModelSpec | None
    data: DataSpec
    passes: list[Pass]
    overrides: dict[str, Any] = field(default_factory=dict)
    train: TrainSpec = field(default_factory=TrainSpec)  # [train], read by `chop train`
    loss: str | None = None  # [loss] source, "module:callable"

    @property
    def folder(self) -> Path:
        """The config's folder: relative paths and model/data modules are resolved from it."""
        return self.path.parent


_SECTIONS = {"model", "data", "pipeline", "passes", "train", "loss"}
_MODEL_KEYS = {"source": "a string", "kwargs": "a table"}
_DATA_KEYS = {
    "source": "a string",
    "batch_size": "a positive integer",
    "batches": "a positive integer",
    "shuffle": "true or false",
    "seed": "an integer from -2**63 to 2**64 - 1",
    "shape": "a list of positive integers",
    "classes": "an integer of at least 2",
    "eval_batches": "an integer of at least 0",
    "text_field": "a string (a field of the text file's records)",
    "label_field": "a string (a field of the text file's records)",
    "max_length": "a positive integer",
}
_LOSS_KEYS = {"source": "a string \"module:callable\" naming loss(outputs, targets) -> scalar"}
_PIPELINE_KEYS = {"passes": "a list of pass names or a pipeline string"}
_TRAIN_KEYS = {
    "optimizer": "\"adam\" or \"sgd\"",
    "lr": "a positive (finite) number",
    "epochs": "a positive integer",
    "batch_size": "a positive integer",
    "weight_decay": "a number of at least 0",
    "momentum": "a number in [0, 1)",
    "seed": "an integer from -2**63 to 2**64 - 1",
    "eval_fraction": "a number in [0, 1)",
    "prune_sparsity": "a number in [0, 1)",
    "prune_criterion": "a scoring pass, e.g. \"magnitude\" or \"snip{batches=1}\"",
    "prune_schedule": "\"exp\", \"cos\", \"cube\" or \"linear\"",
    "prune_start": "an integer of at least 0 (optimizer steps)",
    "prune_end": "an integer of at least prune_start (optimizer steps)",
    "prune_frequency": "a positive integer (optimizer steps)",
    "fast_masks": "true or false (train with the masks kept in the weights)",
}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate the config at ``path``; raise :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise ConfigError(
            f"config file {path} does not exist{hint}; pass the path of a TOML file, e.g. "
            "--config examples/lenet5_snip.toml"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no syntax error
    except (tomllib.TOMLDecodeError, RecursionError) as e:  # nested past Python's stack
        raise ConfigError(
            f"{path} is not valid TOML: {str(e)[:200]}. Fix the syntax there (strings need quotes, "
            "tables are written [name], lists [a, b])."
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    applied = apply_overrides(raw, overrides)
    return _Validator(path, applied).config(raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"passes.mask.sparsity=0.95"`` -> ``(["passes", "mask", "sparsity"], 0.95)``."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts):
        raise ConfigError(
            f"--set {text!r} is not of the form section.key=value, e.g. "
            "--set passes.mask.sparsity=0.95"
        )
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        parsed = value.strip()  # a bare word: a string, as in pipeline strings
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to ``raw`` in place; returns them as ``{dotted key: value}``."""
    applied: dict[str, Any] = {}
    for text in overrides:
        parts, value = parse_override(text)
        table = raw
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(
                    f"--set {text!r}: {'.'.join(parts[:i + 1])} is a value, not a table"
                )
        table[parts[-1]] = value
        applied[".".join(parts)] = value
    return applied


class _Validator:
    """Checks one raw config dict; every message names the file and the key."""

    def __init__(self, path: Path, overrides: dict[str, Any]):
        self.path = path
        self.overrides = overrides

    def error(self, key: str, message: str) -> ConfigError:
        origin = f" (set by --set {key}={self.overrides[key]!r})" if key in self.overrides else ""
        return ConfigError(f"{self.path}: {key}{origin}: {message}")

    def table(self, raw: dict[str, Any], key: str, allowed: dict[str, str] | None) -> dict:
        value = raw.get(key.rpartition(".")[2], {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table [{key}], got {_show(value)}")
        if allowed is not None:
            for name in value:
                if name not in allowed:
                    raise self.error(
                        f"{key}.{name}",
                        f"unknown key {name!r} in [{key}]{did_you_mean(name, allowed)}; "
                        f"allowed keys: {', '.join(allowed)}",
                    )
        return value

    def config(self, raw: dict[str, Any]) -> Config:
        for name in raw:
            if name not in _SECTIONS:
                raise self.error(
                    name,
                    f"unknown section [{name}]{did_you_mean(name, _SECTIONS)}; allowed "
                    f"sections: {', '.join(sorted(_SECTIONS))}",
                )
        passes = self.passes(raw)
        return Config(
            self.path, self.model(raw), self.data(raw, passes), passes, dict(self.overrides),
            self.train(raw) if "train" in raw else TrainSpec(), self.loss(raw),
        )

    def loss(self, raw: dict[str, Any]) -> str | None:
        if "loss" not in raw:
            return None
        source = self.table(raw, "loss", _LOSS_KEYS).get("source")
        if not isinstance(source, str) or source.count(":") != 1 or not all(
                part.strip() for part in source.split(":")):
            raise self.error(
                "loss.source",
                f"expected {_LOSS_KEYS['source']}, got {_show(source)}; e.g. source = "
                "\"losses:my_loss\" for def my_loss(outputs, targets) in losses.py next to "
                "the config",
            )
        return source.strip()

    def model(self, raw: dict[str, Any]) -> ModelSpec | None:
        if "model" not in raw:
            return None
        table = self.table(raw, "model", _MODEL_KEYS)
        source = table.get("source")
        if not isinstance(source, str) or not source.strip():
            raise self.error(
                "model.source",
                f"expected a string \"module:callable\" or a built-in model name, got "
                f"{_show(source)}",
            )
        kwargs = table.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise self.error("model.kwargs", f"expected a table, got {_show(kwargs)}")
        return ModelSpec(source.strip(), kwargs)

    def data(self, raw: dict[str, Any], passes: list[Pass]) -> DataSpec:
        table = self.table(raw, "data", _DATA_KEYS)
        values: dict[str, Any] = {}
        for name, value in table.items():
            key = f"data.{name}"
            if name in ("source", "text_field", "label_field") and not (
                    isinstance(value, str) and value.strip()):
                raise self.error(key, f"expected {_DATA_KEYS[name]}, got {_show(value)}")
            if name == "shuffle" and not isinstance(value, bool):
                raise self.error(key, f"expected {_DATA_KEYS[name]}, got {_show(value)}")
            if name in ("batch_size", "batches", "seed", "classes", "eval_batches", "max_length"):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise self.error(key, f"expected {_DATA_KEYS[name]}, got {_show(value)}")
                low = {"batch_size": 1, "batches": 1, "classes": 2, "eval_batches": 0,
                       "max_length": 1}.get(name)
                if (low is not None and value < low) or (name == "seed" and value not in SEEDS):
                    raise self.error(
                        key, f"{value} is out of range; expected {_DATA_KEYS[name]}"
                    )
            if name == "shape":
                ok = isinstance(value, list) and value and all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
                )
                if not ok:
                    raise self.error(key, f"expected {_DATA_KEYS[name]}, got {_show(value)}")
                value = tuple(value)
            values[name] = value
        needed = max((p.data_batches() for p in passes), default=0) or 1
        if "batches" in values and values["batches"] < needed:
            users = [p.name for p in passes if p.data_batches() == needed]
            raise self.error(
                "data.batches",
                f"{values['batches']} batches is fewer than pass {users[0]!r} uses "
                f"(batches = {needed}); raise [data] batches to at least {needed}",
            )
        values.setdefault("batches", needed)
        known = {f.name for f in fields(DataSpec)}
        return DataSpec(**{k: v for k, v in values.items() if k in known}, given=frozenset(table))

    def passes(self, raw: dict[str, Any]) -> list[Pass]:
        pipeline = self.table(raw, "pipeline", _PIPELINE_KEYS)
        if "passes" not in pipeline:
            raise self.error(
                "pipeline.passes",
                "missing; list the passes to run, e.g. passes = [\"snip\", \"mask\", \"fold\"]",
            )
        spec = pipeline["passes"]
        items = [spec] if isinstance(spec, str) else spec
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise self.error(
                "pipeline.passes",
                f"expected a non-empty list of pass names or a pipeline string, got {_show(spec)}",
            )
        parsed: list[Pass] = []
        for item in items:
            try:
                parsed += parse_pipeline(item)
            except (PipelineError, OptionError) as e:
                raise self.error("pipeline.passes", str(e)) from e
        tables = self.table(raw, "passes", None)
        names = [p.name for p in parsed]
        for name, options in tables.items():
            if name not in registry.PASSES:
                raise self.error(
                    f"passes.{name}",
                    f"unknown pass {name!r}{did_you_mean(name, registry.PASSES)}; known passes: "
                    f"{', '.join(registry.PASSES)}",
                )
            if name not in names:
                raise self.error(
                    f"passes.{name}",
                    f"[passes.{name}] configures a pass that is not in the pipeline "
                    f"({', '.join(names)}); add {name!r} to [pipeline] passes or remove the table",
                )
            if not isinstance(options, dict):
                raise self.error(f"passes.{name}", f"expected a table, got {_show(options)}")
        return [self.build(p, tables.get(p.name, {})) for p in parsed]

    def build(self, inline: Pass, table: dict[str, Any]) -> Pass:
        cls = type(inline)
        defaults = {f.name: f.default for f in fields(cls)}
        given = {k: v for k, v in inline.options().items() if v != defaults[k]}
        for key, value in table.items():
            overridden = f"passes.{cls.name}.{key}" in self.overrides  # --set wins
            if key in given and given[key] != value and not overridden:
                raise self.error(
                    f"passes.{cls.name}.{key}",
                    f"{key} is set both in [pipeline] passes ({given[key]!r}) and in "
                    f"[passes.{cls.name}] ({value!r}); keep one",
                )
        try:
            return cls.from_options({**given, **table})
        except OptionError as e:
            # the key the message quotes (an unknown option), else the first it names
            key = next((k for k in table if f"'{k}'" in str(e)), None) or next(
                (k for k in table if re.search(rf"\b{re.escape(k)}\b", str(e))), None)
            return _raise(self.error(f"passes.{cls.name}" + (f".{key}" if key else ""), str(e)))

    def train(self, raw: dict[str, Any]) -> TrainSpec:
        """Validate the ``[train]`` table of ``raw``; errors name the file and the key."""
        table = self.table(raw, "train", _TRAIN_KEYS)
        values: dict[str, Any] = {}
        start = table.get("prune_start", 0)
        checks = {  # each looks at its own key's value only (another's may be of any type)
            "optimizer": lambda v: v in ("adam", "sgd"),
            "lr": lambda v: _number(v) and v > 0,
            "epochs": lambda v: _integer(v) and v >= 1,
            "batch_size": lambda v: _integer(v) and v >= 1,
            "weight_decay": lambda v: _number(v) and v >= 0,
            "momentum": lambda v: _number(v) and 0 <= v < 1,
            "seed": lambda v: _integer(v) and v in SEEDS,
            "eval_fraction": lambda v: _number(v) and 0 <= v < 1,
            "prune_sparsity": lambda v: _number(v) and 0 <= v < 1,
            "prune_criterion": lambda v: isinstance(v, str) and bool(v.strip()),
            "prune_schedule": lambda v: v in ("exp", "cos", "cube", "linear"),
            "prune_start": lambda v: _integer(v) and v >= 0,
            "prune_end": lambda v: _integer(v) and v >= (start if _integer(start) else 0),
            "prune_frequency": lambda v: _integer(v) and v >= 1,
            "fast_masks": lambda v: isinstance(v, bool),
        }
        for name, value in table.items():
            key = f"train.{name}"
            if not checks[name](value):
                raise self.error(key, f"expected {_TRAIN_KEYS[name]}, got {_show(value)}")
            if name == "prune_criterion":
                try:
                    criterion_pass(value)
                except ChopError as e:
                    raise self.error(key, str(e)) from None
            values[name] = float(value) if name in ("lr", "weight_decay", "momentum",
                                                    "eval_fraction", "prune_sparsity") else value
        if "momentum" in values and values.get("optimizer", "adam") != "sgd":
            raise self.error(
                "train.momentum", "momentum is an option of optimizer = \"sgd\"; remove it or set "
                "optimizer = \"sgd\""
            )
        prune = [k for k in values if k.startswith("prune_") and k != "prune_sparsity"]
        if prune and "prune_sparsity" not in values:
            raise self.error(
                f"train.{prune[0]}", "pruning during training needs train.prune_sparsity, the target "
                "it raises the sparsity to; set it, or remove the prune_* keys"
            )
        return TrainSpec(**values)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """An int or a finite float (TOML has inf and nan)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _raise(error: Exception) -> Any:
    raise error from None


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    return "nothing" if value is None else f"{kind} ({value!r})"
