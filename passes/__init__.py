"""The pass library: ``analysis`` (criteria), ``transform`` (mask), ``export`` (fold).

Passes are found by name through :mod:`chop.pipeline.registry`; import a class from its module to use it
as an object, e.g. ``from chop.passes.transform.mask import Mask``.
"""
