"""``[data] source``: the ``(inputs, targets)`` batches a config names, as a list.

- a file, path relative to the config, never unpickled: ``.pt`` (``torch.load(weights_only=True)``),
  ``.npz`` (``allow_pickle=False``) or ``.safetensors``, holding ``"inputs"`` and ``"targets"``
  (in a ``.pt``, ``"inputs"`` may be a dict of keyword inputs);
- ``"digits"``: scikit-learn's bundled 8×8 digits, scaled to [0, 1], shaped ``(1, 8, 8)``;
- ``"synthetic"``: standard-normal inputs of ``[data] shape``, targets in ``range(classes)``;
- ``"module:callable"``: user code returning an iterable of batches; ``batch_size``,
  ``shuffle`` and ``seed`` are passed when it accepts them.

``batches`` batches of ``batch_size`` samples are taken in file order (or shuffled with
``seed``). ``shape`` reshapes every sample. float64 inputs become float32 and integer targets
int64, the dtypes models and the cross-entropy loss expect.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import torch

from chop.cli.checkpoint import load_failure, pickled_global, torch_load
from chop.cli.config import ConfigError, DataSpec
from chop.cli.sources import call_user, import_callable, is_reference
from chop.errors import DataError
from chop.pipeline.batches import take

Batch = tuple[Any, torch.Tensor]
_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")


def load_batches(spec: DataSpec, folder: Path) -> list[Batch]:
    """The batches of ``spec`` (``spec.batches`` of them), reading files relative to ``folder``."""
    if is_reference(spec.source):
        return _from_callable(spec, folder)
    inputs, targets, where = read_source(spec, folder)
    return batched(inputs, targets, spec, where)


def read_source(spec: DataSpec, folder: Path) -> tuple[Any, Any, str]:
    """All samples of a file, ``digits`` or ``synthetic`` source, unbatched, with a description
    of where they came from (for messages). ``module:callable`` sources yield batches instead:
    use :func:`load_batches`."""
    if spec.source == "digits":
        return (*digits(), "digits")
    if spec.source == "synthetic":
        return (*_synthetic(spec), "synthetic")
    if Path(spec.source).suffix.lower() in _SUFFIXES:
        path = folder / spec.source
        return (*_read_file(path), str(path))
    raise ConfigError(
        f"data.source = {spec.source!r} is not a data file ({', '.join(_SUFFIXES)}), "
        "\"digits\", \"synthetic\" or \"module:callable\""
    )


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "data.source = \"digits\" needs scikit-learn: pip install scikit-learn "
            "(or pip install chop[digits])"
        ) from None
    bunch = load_digits()
    inputs = torch.tensor(bunch.data, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    return inputs, torch.tensor(bunch.target, dtype=torch.int64)


def _synthetic(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.shape is None:
        raise ConfigError(
            "data.source = \"synthetic\" needs the shape of one input sample: add [data] "
            "shape = [1, 28, 28] (for example) to the config"
        )
    generator = torch.Generator().manual_seed(spec.seed)
    count = spec.batch_size * spec.batches
    inputs = torch.randn((count, *spec.shape), generator=generator)
    targets = torch.randint(0, spec.classes, (count,), generator=generator)
    return inputs, targets


def _read_file(path: Path) -> tuple[Any, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; data.source is relative to the config")
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


def batched(inputs: Any, targets: Any, spec: DataSpec, where: str) -> list[Batch]:
    tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
    if not all(isinstance(t, torch.Tensor) for t in [*tensors, targets]):
        raise DataError(f"{where}: \"inputs\" and \"targets\" must be tensors")
    count = len(targets)
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
    if not targets.is_floating_point():
        targets = targets.long()
    order = torch.arange(count)
    if spec.shuffle:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(spec.seed))
    batches = []
    for b in range(spec.batches):
        index = order[b * spec.batch_size:(b + 1) * spec.batch_size]
        x = {k: v[index] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[index]
        batches.append((x, targets[index]))
    return batches


def _from_callable(spec: DataSpec, folder: Path) -> list[Batch]:
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
    try:
        return list(take(data, spec.batches, f"data.source = {spec.source!r}"))
    except TypeError as e:
        raise DataError(
            f"data.source = {spec.source!r} returned a {type(data).__name__}, not an iterable "
            f"of (inputs, targets) batches ({e})"
        ) from e


def load_samples(spec: DataSpec, folder: Path) -> tuple[Any, torch.Tensor]:
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
    inputs, targets, where = read_source(spec, folder)
    everything = dataclasses.replace(spec, batch_size=len(targets), batches=1, shuffle=False)
    return batched(inputs, targets, everything, where)[0]
