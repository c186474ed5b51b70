"""Import user code named as ``"module:callable"`` in a config, from the config's folder.

Used for ``[model] source`` and ``[data] source``. Any failure — the module does not import, it
raises while importing, the attribute is missing or not callable — becomes a
:class:`~chop.cli.config.ConfigError` that names the config key, the module and the failing line.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chop.cli.config import ConfigError
from chop.errors import did_you_mean


def is_reference(source: str) -> bool:
    """True when ``source`` looks like ``"module:callable"`` (``"pkg.mod:Class"``)."""
    module, sep, attr = source.partition(":")
    return bool(sep and module and attr)


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def import_callable(source: str, folder: Path, key: str) -> Callable[..., Any]:
    """The callable ``source`` (``"module:attr"``) names, importing ``module`` from ``folder``
    first, then from ``sys.path``. ``key`` (e.g. ``"model.source"``) is named in errors."""
    module_name, _, attr = source.partition(":")
    folder = folder.resolve()
    cached = sys.modules.get(module_name)
    if cached is not None and (folder / (module_name.replace(".", "/") + ".py")).is_file():
        if Path(getattr(cached, "__file__", "") or "").resolve().parent != folder:
            del sys.modules[module_name]  # a same-named module from elsewhere: import ours
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name) and module_name.endswith(".py"):
            stem = module_name.removesuffix(".py")
            raise ConfigError(
                f"{key} = {source!r}: name the module without .py, as Python imports it: "
                f"\"{stem}:{attr}\" for {attr} in {stem}.py next to the config"
            ) from e
        if e.name and module_name.startswith(e.name):
            raise ConfigError(
                f"{key} = {source!r}: no module named {module_name!r} in {folder} or on "
                f"PYTHONPATH; put {module_name.replace('.', '/')}.py next to the config or fix "
                "the name"
            ) from e
        raise ConfigError(
            f"{key} = {source!r}: importing {module_name} failed: {e}{_where(e)}; install the "
            "missing package or fix the import"
        ) from e
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(
            f"{key} = {source!r}: importing {module_name} failed: {type(e).__name__}: {e}"
            f"{_where(e)}"
        ) from e
    finally:
        sys.path.remove(str(folder))
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ConfigError(
                f"{key} = {source!r}: module {module_name} ({getattr(module, '__file__', '?')}) "
                f"has no attribute {attr!r}{did_you_mean(part, names)}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key} = {source!r}: {attr} is a {type(target).__name__}, not callable")
    return target


def call_user(fn: Callable[..., Any], kwargs: dict[str, Any], key: str, source: str) -> Any:
    """Call user code ``fn(**kwargs)``, turning any exception into a :class:`ConfigError`."""
    try:
        return fn(**kwargs)
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(
            f"{key} = {source!r}: calling {getattr(fn, '__name__', source)}({shown}) failed: "
            f"{type(e).__name__}: {e}{_where(e)}"
        ) from e
