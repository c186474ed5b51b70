"""Integrations with training frameworks. Each submodule imports its framework itself (they are
optional extras); importing :mod:`chop` or this package never imports them."""
