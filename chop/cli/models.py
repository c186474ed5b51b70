"""``[model] source``: build the model a config names.

A source is ``"module:callable"`` (imported from the config's folder or PYTHONPATH, called with
``[model] kwargs``) or the name of a built-in model below.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from chop.cli.config import ConfigError, ModelSpec
from chop.cli.sources import call_user, import_callable, is_reference
from chop.errors import did_you_mean


class LeNet300100(nn.Module):
    """LeNet-300-100 (the SNIP paper's MLP): ``in_features`` -> 300 -> 100 -> ``num_classes``."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())


BUILTIN: dict[str, Callable[..., nn.Module]] = {"lenet-300-100": LeNet300100}


def build_model(spec: ModelSpec, folder: Path) -> nn.Module:
    """Build the model of ``spec``; raise :class:`ConfigError` naming what failed."""
    if is_reference(spec.source):
        factory = import_callable(spec.source, folder, "model.source")
    elif spec.source in BUILTIN:
        factory = BUILTIN[spec.source]
    else:
        raise ConfigError(
            f"model.source = {spec.source!r} is neither \"module:callable\" nor a built-in model"
            f"{did_you_mean(spec.source, BUILTIN)}; built-in models: {', '.join(BUILTIN)}"
        )
    model = call_user(factory, spec.kwargs, "model.source", spec.source)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.source = {spec.source!r} returned a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model
