"""``[data] source``: the ``(inputs, targets)`` batches a config names, as a list.

- a file, path relative to the config, never unpickled: ``.pt`` (``torch.load(weights_only=True)``),
  ``.npz`` (``allow_pickle=False``) or ``.safetensors``, holding ``"inputs"`` and ``"targets"``
  (in a ``.pt``, ``"inputs"`` may be a dict of keyword inputs);
- ``"digits"``: scikit-learn's bundled 8×8 digits, scaled to [0, 1], shaped ``(1, 8, 8)``;
- ``"synthetic"``: standard-normal inputs of ``[data] shape``, targets in ``range(classes)``;
- ``"module:callable"``: user code returning an iterable of batches; ``batch_size``,
  ``shuffle`` and ``seed`` are passed when it accepts them;
- a text file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.txt``): records with a
  ``text_field`` (and a ``label_field`` for classifiers), read here (:func:`read_records`;
  parquet needs pyarrow) and tokenised by the ``encode`` function a model folder provides
  (:mod:`chop.cli.hf`). A ``.txt`` file is one text per non-empty line; a ``.json`` file is a
  list of records or a table of columns.

``batches`` batches of ``batch_size`` samples are taken in file order (or shuffled with
``seed``), then up to ``eval_batches`` held-out batches from the samples after them
(:func:`load_split`): the metrics before and after pruning are measured on those. ``shape``
reshapes every sample. float64 inputs become float32 and integer targets int64, the dtypes
models and the cross-entropy loss expect.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import inspect
import itertools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chop.cli.checkpoint import load_failure, pickled_global, torch_load
from chop.cli.config import ConfigError, DataSpec
from chop.cli.sources import call_user, import_callable, is_reference
from chop.errors import DataError
from chop.pipeline.batches import take

log = logging.getLogger("chop")

Batch = tuple[Any, Any]
Records = list[dict[str, Any]]
# tokenises text records into (keyword inputs, targets or None); `where` names them in messages
Encode = Callable[[Records, str], tuple[dict[str, torch.Tensor], torch.Tensor | None]]
_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def load_batches(spec: DataSpec, folder: Path, encode: Encode | None = None) -> list[Batch]:
    """The batches of ``spec`` (``spec.batches`` of them), reading files relative to ``folder``."""
    return load_split(spec, folder, encode)[0]


def load_split(spec: DataSpec, folder: Path, encode: Encode | None = None
               ) -> tuple[list[Batch], list[Batch]]:
    """The ``spec.batches`` batches of ``spec`` and the held-out batches after them (up to
    ``spec.eval_batches``; fewer, or a smaller last one, when the source has fewer samples)."""
    if is_reference(spec.source):
        return _from_callable(spec, folder)
    inputs, targets, where = read_source(spec, folder, encode)
    return batched(inputs, targets, spec, where, held_out=True)


def is_text(source: str) -> bool:
    """Whether ``[data] source`` names a text file (tokenised with a model folder's tokenizer)."""
    return not is_reference(source) and Path(source).suffix.lower() in TEXT_SUFFIXES


def read_source(spec: DataSpec, folder: Path, encode: Encode | None = None
                ) -> tuple[Any, Any, str]:
    """All samples of a file, ``digits`` or ``synthetic`` source, unbatched, with a description
    of where they came from (for messages). ``module:callable`` sources yield batches instead:
    use :func:`load_batches`. Text files are tokenised by ``encode``."""
    unused = set()
    if not is_text(spec.source):
        unused |= spec.given & {"text_field", "label_field", "max_length"}
    if spec.source != "synthetic":
        unused |= spec.given & {"classes"}
    for key in sorted(unused):  # left from another source, or a misunderstanding: say so
        log.warning("data.%s does nothing for data.source = %r (%s); remove it from [data]",
                    key, spec.source, "classes is for the synthetic source" if key == "classes"
                    else "text_field, label_field and max_length are for text files")
    if spec.source == "digits":
        return (*digits(), "digits")
    if spec.source == "synthetic":
        return (*_synthetic(spec), "synthetic")
    if is_text(spec.source):
        path = folder / spec.source
        if encode is None:
            raise ConfigError(
                f"data.source = {spec.source!r} is a text file, which needs a tokenizer: pass "
                "a Hugging Face model folder (save_pretrained, with its tokenizer files) as the "
                "checkpoint, or give the data as tensors (.pt/.npz/.safetensors)"
            )
        return (*encode(read_records(path, spec.text_field), str(path)), str(path))
    if Path(spec.source).suffix.lower() in _SUFFIXES:
        path = folder / spec.source
        return (*_read_file(path), str(path))
    raise ConfigError(
        f"data.source = {spec.source!r} is not a data file ({', '.join(_SUFFIXES)}), a text "
        f"file ({', '.join(TEXT_SUFFIXES)}), \"digits\", \"synthetic\" or "
        "\"module:callable\""
    )


def read_records(path: Path, text_field: str = "text") -> Records:
    """The records of a text file: JSON lines, a JSON list of records (or a table of equal
    columns), CSV with a header row, parquet (pyarrow), or plain text with one record
    ``{text_field: line}`` per non-empty line. Raises :class:`DataError` naming the line."""
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"reading {path} needs pyarrow: pip install pyarrow (or pip install chop[text])"
            ) from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's own error types: a damaged or foreign file
            raise DataError(f"cannot read {path} as parquet: {type(e).__name__}: {e}") from e
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path} as UTF-8 text: {e}") from e
    if suffix == ".txt":
        return [{text_field: line} for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_record(_json(line, path, f"line {number}"), path,
                                       f"line {number}"))
        return records
    content = _json(text, path, "")
    if isinstance(content, dict) and content and all(isinstance(v, list)
                                                     for v in content.values()):
        lengths = {len(v) for v in content.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: its columns have different lengths ({sorted(lengths)})")
        return [dict(zip(content, row)) for row in zip(*content.values())]
    if not isinstance(content, list):
        raise DataError(
            f"{path} holds a JSON {type(content).__name__}; it must hold a list of records "
            "([{\"text\": ..., \"label\": ...}, ...]) or a table of columns ({\"text\": [...]})"
        )
    return [_record(item, path, f"item {i}") for i, item in enumerate(content)]


def _json(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # nested past Python's stack
        raise DataError(f"{path}{f' {where}' if where else ''} is not valid JSON: "
                        f"{str(e)[:200]}") from e


def _record(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f"{path} {where} is a JSON {type(value).__name__}, not a record; each must be an "
            "object such as {\"text\": \"...\", \"label\": 1}"
        )
    return value


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits (pixels 0–16, scaled to 0–1) and their labels: what
    ``sklearn.datasets.load_digits`` returns, read from the CSV scikit-learn ships with numpy,
    without importing scikit-learn (3.4 s, most of the time of the README's first example);
    through ``load_digits`` where that file is not where scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError(
            "data.source = \"digits\" needs scikit-learn: pip install scikit-learn "
            "(or pip install chop[digits])"
        )
    files = [Path(p, "datasets", "data", "digits.csv.gz")
             for p in spec.submodule_search_locations or ()]
    found = next((f for f in files if f.is_file()), None)
    if found is not None:
        import numpy as np

        table = np.loadtxt(found, delimiter=",")  # 64 pixels, then the label, per row
        pixels, labels = table[:, :-1], table[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits

        pixels, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(pixels, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    return inputs, torch.tensor(labels, dtype=torch.int64)


def _synthetic(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.shape is None:
        raise ConfigError(
            "data.source = \"synthetic\" needs the shape of one input sample: add [data] "
            "shape = [1, 28, 28] (for example) to the config"
        )
    parts = []
    for seed, batches in ((spec.seed, spec.batches), (spec.seed + 1, spec.eval_batches)):
        generator = torch.Generator().manual_seed(seed)  # the scoring batches, then held out
        count = spec.batch_size * batches
        parts.append((torch.randn((count, *spec.shape), generator=generator),
                      torch.randint(0, spec.classes, (count,), generator=generator)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _check_file(path: Path) -> None:
    """A :class:`DataError` unless ``path`` is a regular file (a FIFO or a device would block
    or never end)."""
    if path.is_file():
        return
    if path.exists():
        raise DataError(f"data file {path} is not a regular file (a folder, a FIFO or a device); "
                        "point data.source at a file")
    raise DataError(f"data file {path} does not exist; data.source is relative to the config")


def _read_file(path: Path) -> tuple[Any, torch.Tensor]:
    _check_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            content = torch_load(path)
        elif suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as npz:
                content = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
        else:
            from safetensors.torch import load_file

            content = load_file(path)
    except Exception as e:
        found = pickled_global(e) or ("a pickled object array" if "allow_pickle" in str(e)
                                      else None)
        reason = (f"it holds pickled Python objects ({found}), which chop never unpickles from "
                  "a data file" if found else load_failure(e))
        raise DataError(
            f"cannot read data file {path}: {reason}; it must be a dict of tensors (or arrays) "
            "saved with torch.save, numpy.savez or safetensors"
        ) from e
    if not isinstance(content, dict):
        raise DataError(
            f"data file {path} holds a {type(content).__name__}; it must hold a dict with "
            "\"inputs\" and \"targets\""
        )
    if "inputs" not in content:  # keyword inputs stored flat: "inputs.input_ids", ...
        nested = {k[7:]: v for k, v in content.items() if k.startswith("inputs.")}
        content = {**content, "inputs": nested} if nested else content
    missing = [k for k in ("inputs", "targets") if k not in content]
    if missing:
        raise DataError(
            f"data file {path} has no {' and no '.join(repr(m) for m in missing)} (it holds: "
            f"{', '.join(map(repr, content)) or 'nothing'}); save a dict with \"inputs\" (a "
            "tensor or a dict of tensors) and \"targets\" (one target per sample)"
        )
    return content["inputs"], content["targets"]


def batched(inputs: Any, targets: Any, spec: DataSpec, where: str, *, held_out: bool = False
            ) -> Any:
    """``spec.batches`` batches of the samples; with ``held_out``, also the held-out batches
    after them, as ``(batches, held-out batches)``. ``targets`` may be None (text without
    labels): the batches' targets are then None."""
    tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    given = [targets] if targets is not None else []
    if not tensors or not all(isinstance(t, torch.Tensor) for t in [*tensors, *given]):
        raise DataError(f"{where}: \"inputs\" and \"targets\" must be tensors")
    if any(t.dim() == 0 for t in [*tensors, *given]):
        raise DataError(f"{where}: \"inputs\" and \"targets\" need one entry per sample along "
                        "their first dimension; one of them is a single number (a 0-d tensor)")
    count = len(targets) if targets is not None else len(tensors[0])
    if any(len(t) != count for t in tensors):
        raise DataError(
            f"{where}: inputs and targets have different numbers of samples "
            f"({[len(t) for t in tensors]} vs {count})"
        )
    if count // spec.batch_size < spec.batches:  # full batches only
        raise DataError(
            f"{where} has {count} samples, fewer than {spec.batches} full batches of "
            f"{spec.batch_size}; lower [data] batch_size or batches"
        )

    def fix(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float64:
            t = t.float()
        if spec.shape is not None:
            per_sample = math.prod(t.shape[1:])
            if per_sample != math.prod(spec.shape):
                raise ConfigError(
                    f"data.shape = {list(spec.shape)} does not fit {where}: samples have shape "
                    f"{list(t.shape[1:])} ({per_sample} values)"
                )
            t = t.reshape(len(t), *spec.shape)
        return t

    inputs = {k: fix(v) for k, v in inputs.items()} if isinstance(inputs, dict) else fix(inputs)
    if targets is not None and not targets.is_floating_point():
        targets = targets.long()
    order = torch.arange(count)
    if spec.shuffle:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(spec.seed))

    def batch(index: torch.Tensor) -> Batch:
        x = {k: v[index] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[index]
        return x, (targets[index] if targets is not None else None)

    size = spec.batch_size
    batches = [batch(order[b * size:(b + 1) * size]) for b in range(spec.batches)]
    if not held_out:
        return batches
    rest = order[spec.batches * size:(spec.batches + spec.eval_batches) * size]
    cuts = list(range(0, len(rest), size))
    if len(cuts) > 1 and len(rest) - cuts[-1] == 1:
        cuts.pop()  # a last batch of 1 joins the one before (traced batch sizes start at 2)
    held = [batch(rest[a:b]) for a, b in zip(cuts, cuts[1:] + [len(rest)], strict=False)]
    return batches, [b for b in held if len(b[0] if not isinstance(b[0], dict)
                                         else next(iter(b[0].values()))) > 1]


def _from_callable(spec: DataSpec, folder: Path) -> tuple[list[Batch], list[Batch]]:
    fn = import_callable(spec.source, folder, "data.source")
    try:
        accepted = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        accepted = set()
    kwargs = {k: getattr(spec, k) for k in ("batch_size", "shuffle", "seed") if k in accepted}
    settable = {"batch_size", "shuffle", "seed", "shape", "classes"}
    ignored = sorted((spec.given & settable) - set(kwargs))
    if ignored:
        raise ConfigError(
            f"data.source = {spec.source!r} does not take {', '.join(ignored)} (its parameters: "
            f"{', '.join(accepted) or 'none'}); remove {', '.join(ignored)} from [data] or add "
            "them as parameters of the callable"
        )
    data = call_user(fn, kwargs, "data.source", spec.source)
    who = f"data.source = {spec.source!r}"
    try:
        batches = iter(data)
        first = list(take(batches, spec.batches, who))
        held = list(itertools.islice(batches, spec.eval_batches))  # as many as there are
        return first, list(take(held, len(held), who))
    except TypeError as e:
        raise DataError(
            f"data.source = {spec.source!r} returned a {type(data).__name__}, not an iterable "
            f"of (inputs, targets) batches ({e})"
        ) from e


def load_samples(spec: DataSpec, folder: Path, encode: Encode | None = None
                 ) -> tuple[Any, torch.Tensor]:
    """Every sample of ``[data] source`` as one ``(inputs, targets)`` pair (a
    ``"module:callable"`` source: its first ``batches`` batches, concatenated)."""
    if is_reference(spec.source):
        batches = load_batches(spec, folder)
        try:
            return torch.utils._pytree.tree_map(
                lambda *xs: torch.cat(xs), *[b[0] for b in batches]
            ), torch.cat([b[1] for b in batches])
        except (RuntimeError, TypeError, ValueError) as e:
            raise DataError(
                f"data.source = {spec.source!r}: cannot join its batches into one training set "
                f"({e}); its batches must hold tensors of the same shapes but the batch size"
            ) from e
    inputs, targets, where = read_source(spec, folder, encode)
    if targets is None:
        raise DataError(f"{where} has no labels to train on; set [data] label_field")
    everything = dataclasses.replace(spec, batch_size=len(targets), batches=1, shuffle=False)
    return batched(inputs, targets, everything, where)[0]
