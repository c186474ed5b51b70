"""Every error chop raises, in one place. Each message says what went wrong, where, and how to
fix it.

Two families, told apart by the command line and by callers:

- :class:`ChopError` and its subclasses are *mistakes of the caller*: a bad option, config,
  checkpoint, data or output folder. ``except chop.ChopError`` catches all of them; the CLI
  prints the message and exits with status 2.
- :class:`InternalError` is *a bug in chop*: one of chop's own consistency checks failed, or an
  unexpected exception escaped a pass (the pass manager wraps it, keeping the original chained).
  The CLI prints one line and exits with status 3.

This module imports nothing from chop, so every layer can use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ChopError(Exception):
    """Base class of every user-facing error: the input, not chop, needs fixing."""


class TraceError(ChopError):
    """torch.export could not capture the model."""


class PipelineError(ChopError):
    """A pipeline string or list is malformed or names an unknown pass."""


class OptionError(ChopError):
    """A pass option is unknown, of the wrong type, or out of range."""


class GranularityError(OptionError):
    """A structured granularity (channel, head, N:M, blocks) cannot be applied to a layer."""


class MissingMetadataError(ChopError):
    """A pass needs metadata that neither the graph nor an earlier pass provides."""


class DataError(ChopError):
    """The data or loss given to a pass cannot be used."""


class PassError(ChopError):
    """A pass cannot do what was asked on this graph (the message names the pass, the passes
    before it and the node)."""


class CollapseError(ChopError):
    """The collapse analysis cannot run on this graph."""


class ConfigError(ChopError):
    """The config file (or a ``--set`` override) is missing, malformed or inconsistent."""


class CheckpointError(ChopError):
    """A checkpoint is missing, corrupt, unsafe to load, or does not match the model."""


class OutputError(ChopError):
    """The output folder cannot be used."""


class ReportError(ChopError):
    """A report cannot be read or built from the given path."""


class DistributedError(ChopError):
    """A collective of the torch.distributed process group failed or timed out (another rank
    failed, is stuck, or called a different collective), or the ranks disagree on what they
    reduce. The message names the collective and this rank; look at the other ranks' errors."""


class InternalError(Exception):
    """A bug in chop: its own check failed, or an unexpected exception escaped a pass.

    Not a :class:`ChopError`: ``except chop.ChopError`` must not swallow bugs. When the pass
    manager wraps an exception, the original is chained as ``__cause__``.
    """


class LintError(InternalError):
    """The graph or its chop metadata is inconsistent after a pass (the pass has a bug)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
