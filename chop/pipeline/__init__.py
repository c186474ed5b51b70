"""The pipeline: how passes are written, found and run.

- :mod:`~chop.pipeline.pass_base`: the pass contract (a frozen dataclass of typed options with
  one ``apply``; declared ``requires``/``provides``/``preserves``/``reshapes``/``accumulates``).
- :mod:`~chop.pipeline.manager`: pipelines as strings or lists, checked before they run, run
  pass by pass with timing, lint, invalidation and error context.
- :mod:`~chop.pipeline.registry`: pass names to classes, imported lazily.
- :mod:`~chop.pipeline.batches`: ``(inputs, targets)`` batches, the default loss, and the check
  that a rewritten graph still computes the same outputs.

Imports :mod:`chop.errors`, :mod:`chop.kernels` and :mod:`chop.ir`; the registry names passes
by import path, so it does not import :mod:`chop.passes`.
"""
