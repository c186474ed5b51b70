"""The pass registry: kebab-case name -> the pass class, imported lazily.

Every pass of the library is listed here once. ``tests/chop/test_registry.py`` checks that each
key equals its class's ``name``.
"""

from __future__ import annotations

import importlib

from chop.errors import PipelineError, did_you_mean
from chop.pipeline.pass_base import Pass

PASSES: dict[str, str] = {
    "snip": "chop.passes.analysis.snip:Snip",
    "magnitude": "chop.passes.analysis.magnitude:Magnitude",
    "random": "chop.passes.analysis.random:Random",
    "snip2": "chop.passes.analysis.snip2:Snip2",
    "exact-salience": "chop.passes.analysis.exact_salience:ExactSalience",
    "synflow": "chop.passes.analysis.synflow:Synflow",
    "grasp": "chop.passes.analysis.grasp:Grasp",
    "gradient": "chop.passes.analysis.gradient:Gradient",
    "snip-momentum": "chop.passes.analysis.snip_momentum:SnipMomentum",
    "mask": "chop.passes.transform.mask:Mask",
    "iterative-snip": "chop.passes.transform.iterative_snip:IterativeSnip",
    "collapse": "chop.passes.analysis.collapse:Collapse",
    "fold": "chop.passes.export.fold:Fold",
    "channel-groups": "chop.passes.analysis.channel_groups:ChannelGroupsPass",
    "shrink": "chop.passes.export.shrink:Shrink",
    "sparse": "chop.passes.export.sparse:Sparse",
    "fold-bn": "chop.passes.export.fold_bn:FoldBn",
    "channels-last": "chop.passes.export.channels_last:ChannelsLast",
}


def get(name: str) -> type[Pass]:
    """The pass class registered as ``name``."""
    if name not in PASSES:
        raise PipelineError(
            f"unknown pass {name!r}{did_you_mean(name, PASSES)}; "
            f"known passes: {', '.join(PASSES)} (`chop passes` lists them with their options)"
        )
    module, _, attr = PASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass class, by name, in registry order."""
    return {name: get(name) for name in PASSES}


def providers(key: str) -> list[str]:
    """Names of the passes that provide metadata ``key``."""
    return [name for name, cls in all_passes().items() if key in cls.provides]
