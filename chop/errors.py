"""Typed errors. Every message says what went wrong, where, and how to fix it.

All chop errors derive from :class:`ChopError`, so ``except chop.ChopError`` catches every user
error while programming errors (bugs) still surface as ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ChopError(Exception):
    """Base class of every error chop raises on purpose."""


class TraceError(ChopError):
    """torch.export could not capture the model."""


class PipelineError(ChopError):
    """A pipeline string or list is malformed or names an unknown pass."""


class OptionError(ChopError):
    """A pass option is unknown, of the wrong type, or out of range."""


class MissingMetadataError(ChopError):
    """A pass needs metadata that neither the graph nor an earlier pass provides."""


class LintError(ChopError):
    """The graph or its chop metadata is inconsistent after a pass."""


class DataError(ChopError):
    """The data or loss given to a pass cannot be used."""


class PassError(ChopError):
    """A pass failed; the message names the pass, the passes before it and the node."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
