"""Load checkpoints safely, and match state dicts against models.

Accepted files:

- ``.pt``/``.pth``/``.ckpt``/``.bin``: a state dict saved with ``torch.save``, loaded with
  ``torch.load(weights_only=True, map_location="cpu")``. Wrapped state dicts (Lightning's
  ``{"state_dict": …}``, ``{"model_state_dict": …}``, ``{"model": …}``) are unwrapped; a key
  prefix the model does not have (Lightning's ``model.``) is stripped when matching.
- ``.safetensors``: a state dict.
- ``.pt2``: a ``torch.export`` program; it is the model, no ``[model]`` needed.

A pickled whole ``nn.Module`` needs ``weights_only=False``, which runs arbitrary code from the
file: it is refused unless the caller passes ``trust=True`` (``--trust-checkpoint``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chop.errors import CheckpointError

_STATE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_WRAPPERS = ("state_dict", "model_state_dict", "model")



@dataclass
class Checkpoint:
    """A loaded checkpoint: exactly one of ``state_dict``, ``program`` or ``module`` is set."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor] | None = None
    program: torch.export.ExportedProgram | None = None
    module: nn.Module | None = None

    @property
    def kind(self) -> str:
        """``"state_dict"``, ``"program"`` or ``"module"``."""
        if self.program is not None:
            return "program"
        return "module" if self.module is not None else "state_dict"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _quiet_torch_export():
    """torch.export.load logs a full traceback before re-raising; our message says it all."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _corrupt(path: Path, e: BaseException | str) -> CheckpointError:
    if not isinstance(e, str):
        e = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a {path.suffix} file ({e}); re-save it or "
        "re-download it"
    )


def load_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Load ``path`` (see the module doc); raise :class:`CheckpointError` with the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist{' (it is a folder)' if path.is_dir() else ''}; "
            "pass the path of a .pt/.pth/.ckpt, .safetensors or .pt2 file"
        )
    suffix = path.suffix.lower()
    digest = sha256(path)
    if suffix == ".pt2":
        if not zipfile.is_zipfile(path):
            raise _corrupt(path, "not a zip archive")
        try:
            with _quiet_torch_export():
                program = torch.export.load(path)
        except Exception as e:
            raise _corrupt(path, e) from e
        return Checkpoint(path, digest, program=program)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return Checkpoint(path, digest, state_dict=load_file(path))
        except Exception as e:
            raise _corrupt(path, e) from e
    if suffix not in _STATE_SUFFIXES:
        raise CheckpointError(
            f"checkpoint {path}: unknown file type {suffix!r}; chop reads state dicts "
            f"({', '.join(_STATE_SUFFIXES)}), .safetensors and torch.export .pt2 files"
        )
    try:
        content = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise _corrupt(path, e) from e
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects ({found.group(1)}), e.g. a "
                "whole nn.Module saved with torch.save(model). Loading it runs code from the "
                "file, so chop refuses by default. Save model.state_dict() instead, or rerun "
                "with --trust-checkpoint if you trust where the file came from."
            ) from e
        try:
            content = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as e2:
            raise CheckpointError(
                f"checkpoint {path} could not be unpickled even with --trust-checkpoint: "
                f"{type(e2).__name__}: {e2}; the classes it was saved with must be importable"
            ) from e2
    if isinstance(content, nn.Module):
        return Checkpoint(path, digest, module=content)
    return Checkpoint(path, digest, state_dict=_unwrap(path, content))


def _unwrap(path: Path, content: Any) -> dict[str, torch.Tensor]:
    if isinstance(content, dict):
        for key in _WRAPPERS:
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not content:
        raise CheckpointError(
            f"checkpoint {path} holds a {type(content).__name__}, not a state dict; save "
            "model.state_dict() with torch.save"
        )
    bad = [k for k, v in content.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is not a state dict: {_listed(bad)} are not tensors; save "
            "model.state_dict() (or {\"state_dict\": model.state_dict()})"
        )
    return dict(content)


def _listed(items: list[str], first: int = 5) -> str:
    shown = ", ".join(items[:first])
    return shown + (f" and {len(items) - first} more" if len(items) > first else "")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a common key prefix (Lightning's ``model.``) when that makes the keys match."""
    if set(state) & expected:
        return state
    first = next(iter(state))
    for cut in [m.end() for m in re.finditer(r"\.", first)]:
        prefix = first[:cut]
        if all(k.startswith(prefix) for k in state):
            stripped = {k[cut:]: v for k, v in state.items()}
            if set(stripped) & expected:
                return stripped
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state, strict=True)``, after checking keys and shapes so that a
    mismatch lists the missing keys, unexpected keys and shape mismatches (first few of each)."""
    own = model.state_dict()
    state = _strip_prefix(state, set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the checkpoint vs {tuple(own[k].shape)} in the model"
        for k in own if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        f"{len(items)} {what}: {_listed(items)}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)) if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(problems)
            + ". Check that [model] source and kwargs build the architecture the checkpoint "
            "was saved from."
        )
    model.load_state_dict(state, strict=True)
