"""Load checkpoints safely, and match state dicts against models.

Accepted files:

- ``.pt``/``.pth``/``.ckpt``/``.bin``: a state dict saved with ``torch.save``, loaded with
  ``torch.load(weights_only=True, map_location="cpu")``. Wrapped state dicts (Lightning's
  ``{"state_dict": …}``, ``{"model_state_dict": …}``, ``{"model": …}``) are unwrapped; a key
  prefix the model does not have (Lightning's ``model.``) is stripped when matching.
- ``.safetensors``: a state dict.
- ``.pt2``: a ``torch.export`` program; it is the model, no ``[model]`` needed.

Nothing in a file runs unless the caller passes ``trust=True`` (``--trust-checkpoint``):

- A pickled whole ``nn.Module`` needs ``weights_only=False``, which runs arbitrary code from the
  file: it is refused.
- A ``.pt2`` is read by ``torch.export.load``, which unpickles some entries (sample inputs,
  constants, legacy weights) with ``weights_only=False``, ``pickle.loads`` or the TorchScript
  unpickler, evaluates symbolic shape expressions with ``sympy.sympify`` (Python ``eval``) and
  loads AOTInductor shared libraries. :func:`untrusted_pt2` lets it read tensors and plain
  containers only, plain arithmetic in shape expressions, and no libraries; anything else is
  refused with the archive entry that holds it.

:func:`torch_load` is the one ``torch.load`` chop uses on files it did not write (checkpoints
and data files): ``weights_only=True``, torch's warnings silenced, and its advice to retry with
``weights_only=False`` never repeated.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import operator
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from chop.errors import CheckpointError
from chop.ir.graph import quiet_loggers

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


_TRUST = ("pass --trust-checkpoint (trust=True in Python) only if you trust where the file came "
          "from")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def pickled_global(e: BaseException) -> str | None:
    """The Python object a ``weights_only`` load refused (``"posix.system"``), if that is why
    it failed."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return found.group(1) if found else None


def load_failure(e: BaseException) -> str:
    """Why ``torch.load`` failed, in one line, without torch's advice to retry with
    ``weights_only=False`` (chop never gives it: that runs code from the file)."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        return f"not a torch.save file ({found.group(1).strip()})"
    return f"{type(e).__name__}: {_first_line(e) or 'cannot be read'}"


def torch_load(source: Any) -> Any:
    """``torch.load(source, weights_only=True, map_location="cpu")``: tensors and plain
    containers only, nothing else unpickled; torch's warnings about the file are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, weights_only=True, map_location="cpu")


def _corrupt(path: Path, e: BaseException | str) -> CheckpointError:
    reason = e if isinstance(e, str) else load_failure(e)
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a {path.suffix} file ({reason}); re-save it or "
        "re-download it"
    )


def _entry_holding(path: Path, data: Any) -> str:
    """The name of the archive entry whose bytes are ``data`` (for messages)."""
    data = data.getvalue() if hasattr(data, "getvalue") else bytes(data)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():  # only entries of the same size are read
                if info.file_size == len(data) and archive.read(info) == data:
                    return info.filename
    except (OSError, zipfile.BadZipFile):
        pass
    return "an entry"


def _unsafe(path: Path, entry: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {entry} holds {what}; loading it would run code from the file, so chop "
        f"refuses by default. Re-export the program from its model (torch.export.save writes "
        f"plain tensors), or {_TRUST}."
    )


_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "true", "false",
    "oo", "zoo", "nan", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "Piecewise", "ExprCondPair", "Tuple",
})


def plain_sympy(text: str, names: Iterable[str] = ()) -> bool:
    """True when ``text`` is a plain ``sympy.srepr`` expression: calls of sympy classes (and
    ``names``), numbers, arithmetic, and string literals only as the name of a ``Symbol`` or
    the digits of a ``Float``. ``sympy.sympify`` evaluates anything else as Python code."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    allowed = _SYMPY_NAMES | set(names)
    quoted = {id(call.args[0]) for call in ast.walk(tree)
              if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.args
              and call.func.id in ("Symbol", "Float")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                if id(node) not in quoted or not re.fullmatch(r"[\w.+-]+", node.value):
                    return False
            elif not isinstance(node.value, (int, float, bool)):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in allowed:
                return False
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return False  # Python's ** on numbers: 9 ** 9 ** 9 never ends
        elif isinstance(node, ast.Call) and "Pow" in getattr(node.func, "id", "") and not (
                len(node.args) == 2 and _small_exponent(node.args[1])):
            return False  # sympy evaluates a power of numbers at once (Pow, torch's PowByNatural)
        elif not isinstance(node, (ast.Expression, ast.Call, ast.keyword, ast.Load, ast.BinOp,
                                   ast.UnaryOp, ast.operator, ast.unaryop)):
            return False
    return True


def _small_exponent(node: ast.AST) -> bool:
    """An exponent a shape expression may have: a symbol, or an integer of at most 64."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Integer" and node.args:
        node = node.args[0]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int) and abs(node.value) <= 64
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Symbol"


# Plain arithmetic on sizes that an exported graph may call besides operators (what torch.export
# serialises for symbolic shapes)
_ARITHMETIC = frozenset({
    *(getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "lshift", "rshift")),
    math.ceil, math.floor, math.trunc, round,
    *(getattr(torch, name) for name in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max",
                                        "sym_min", "sym_sqrt") if hasattr(torch, name)),
})


def _is_operator(target: Any) -> bool:
    return (isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
            or (not isinstance(target, (str, torch.Tensor)) and target in _ARITHMETIC))


def _check_calls(program: torch.export.ExportedProgram, path: Path) -> None:
    """Refuse an untrusted program that calls, or passes as an argument, anything but an
    operator (ATen's, a registered custom op's, a higher-order op) or size arithmetic: the
    deserialiser resolves any ``torch.*`` path a file names (``torch.builtins.exec``, a helper
    that imports a module the file names), which would run when the program runs."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            called = node.target if node.op == "call_function" else None
            if node.op in ("call_module", "call_method") or (
                    called is not None and not _is_operator(called)):
                raise _unsafe(path, "its program", f"a call of {_named(node.target)}, which is "
                              "not an operator")
            for value in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
                if (callable(value) and not isinstance(value, (torch.fx.Node, nn.Module))
                        and not _is_operator(value)):
                    raise _unsafe(path, "its program", f"{_named(value)} as an argument of "
                                  f"{node.name}, which is not an operator")


def _named(target: Any) -> str:
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and name else repr(target)[:80]


@contextmanager
def untrusted_pt2(path: Path) -> Iterator[None]:
    """While ``torch.export.load`` reads the ``.pt2`` at ``path``, let nothing in it run (see the
    module doc): every ``torch.load`` is ``weights_only=True``, ``pickle.loads`` and the
    TorchScript unpickler are refused, shape expressions must be plain arithmetic. Raises
    :class:`CheckpointError` naming the entry. Everything is restored on exit.

    The patches are process-wide while the file loads (``torch.load`` called by another thread
    meanwhile is ``weights_only=True`` too)."""
    import sympy
    from torch.export.pt2_archive import _package

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise _corrupt(path, e) from e
    libraries = [n for n in names if "/aotinductor/" in f"/{n}"]
    program = next((n for n in names if "/models/" in f"/{n}"), "its program")
    if libraries:
        raise _unsafe(path, libraries[0], "an AOTInductor-compiled library (native code)")
    real_load, real_sympify = torch.load, sympy.sympify
    real_pickle, real_torchbind = _package.pickle, torch._C._pickle_load_obj

    def load(f: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return real_load(f, *args, weights_only=True, **kwargs)
        except Exception as e:
            if weights_only is not False:
                raise
            found = pickled_global(e)  # torch would unpickle it in full, running its code
            raise _unsafe(path, _entry_holding(path, f), f"a pickled Python object ({found})"
                          if found else f"a pickle only a full unpickler reads "
                          f"({load_failure(e)})") from e

    def refuse(data: Any, *args: Any, **kwargs: Any) -> Any:
        raise _unsafe(path, _entry_holding(path, data), "a pickled Python object")

    def sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, str) and not plain_sympy(a, kwargs.get("locals") or {}):
            raise _unsafe(path, program,
                          f"a shape expression that is not plain arithmetic ({a[:60]!r})")
        return real_sympify(a, *args, **kwargs)

    torch.load, sympy.sympify = load, sympify
    _package.pickle = SimpleNamespace(**{**vars(pickle), "loads": refuse})
    torch._C._pickle_load_obj = refuse
    try:
        yield
    finally:
        torch.load, sympy.sympify = real_load, real_sympify
        _package.pickle, torch._C._pickle_load_obj = real_pickle, real_torchbind


def _holds(archive: zipfile.ZipFile, name: str, text: bytes, chunk: int = 1 << 20) -> bool:
    """Whether entry ``name`` holds ``text``, read in chunks: a small archive may inflate an
    entry to gigabytes, which must not all be in memory at once."""
    tail = b""
    with archive.open(name) as f:
        for block in iter(lambda: f.read(chunk), b""):
            if text in tail + block:
                return True
            tail = block[-len(text):]
    return False


def _register_output_types(path: Path) -> None:
    """A Hugging Face model's program returns its ``ModelOutput`` (``SequenceClassifierOutput``
    …), whose pytree registration happens when ``transformers.modeling_outputs`` is imported:
    import that one module when the program names it and transformers is installed."""
    try:
        with zipfile.ZipFile(path) as archive:
            named = any(_holds(archive, name, b"transformers.modeling_outputs.")
                        for name in archive.namelist()
                        if name.endswith(".json") and "/models/" in name)
    except (OSError, zipfile.BadZipFile, KeyError):
        return  # torch.export.load says what is wrong
    if named:
        try:
            import transformers.modeling_outputs  # noqa: F401
        except ImportError:
            pass  # torch.export.load then says which type it cannot read


def load_program(path: Path, *, trust: bool = False) -> torch.export.ExportedProgram:
    """The ``torch.export`` program in the ``.pt2`` at ``path``; unless ``trust``, nothing in
    the file runs (:func:`untrusted_pt2`)."""
    if not zipfile.is_zipfile(path):
        raise _corrupt(path, "not a zip archive")
    import chop.kernels.csr  # noqa: F401  (registers chop::csr_linear: a sparse export's op)

    _register_output_types(path)

    said: list[logging.LogRecord] = []
    try:  # torch.export.load logs the reason, then raises "see the warnings above"
        with quiet_loggers("torch.export", "torch._export.serde.serialize", kept=said), (
                nullcontext() if trust else untrusted_pt2(path)):
            program = torch.export.load(path)
        if not trust:
            _check_calls(program, path)
        return program
    except CheckpointError:
        raise
    except Exception as e:
        if "not compiled with CUDA" in str(e):
            raise CheckpointError(
                f"{path} holds tensors saved on a CUDA device, and this torch has no CUDA: load "
                "it where CUDA is, or export the model again on the CPU") from e
        reason = next(filter(None, map(_reason, reversed(said))), None)
        raise _corrupt(path, f"{type(e).__name__}: {reason}" if reason else e) from e


def _reason(record: logging.LogRecord) -> str | None:
    """The last line of a logged exception (or the message): what torch saw go wrong."""
    if record.exc_info and record.exc_info[1] is not None:
        text = str(record.exc_info[1]).strip()
        return text.splitlines()[-1] if text else type(record.exc_info[1]).__name__
    text = record.getMessage().strip()
    return text.splitlines()[-1] if text else None


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
        return Checkpoint(path, digest, program=load_program(path, trust=trust))
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
        content = torch_load(path)
    except Exception as e:
        found = pickled_global(e)
        if found is None:
            raise _corrupt(path, e) from e
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects ({found}), e.g. a "
                "whole nn.Module saved with torch.save(model). Loading it runs code from the "
                "file, so chop refuses by default. Save model.state_dict() instead, or rerun "
                "with --trust-checkpoint if you trust where the file came from."
            ) from e
        try:
            content = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as e2:
            raise CheckpointError(
                f"checkpoint {path} could not be unpickled even with --trust-checkpoint: "
                f"{type(e2).__name__}: {_first_line(e2)}; the classes it was saved with must be "
                "importable"
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
    kinds = [  # what load_state_dict cannot copy into a dense real tensor
        f"{k} is " + (f"a {state[k].layout} tensor" if state[k].layout != torch.strided
                      else str(state[k].dtype))
        for k in own if k in state and (state[k].layout != torch.strided or (
            state[k].is_complex() and not own[k].is_complex()))
    ]
    problems = [
        f"{len(items)} {what}: {_listed(items)}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes), ("tensors of another kind", kinds))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(problems)
            + (". Check that [model] source and kwargs build the architecture the checkpoint "
               "was saved from." if missing or unexpected or shapes else
               ". Save dense tensors of the model's dtypes (tensor.to_dense(), .real).")
        )
    model.load_state_dict(state, strict=True)
