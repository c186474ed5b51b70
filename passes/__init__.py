"""The pass library, installed as ``chop.passes`` (the repository's ``passes/`` folder).

- ``analysis``: criteria that write ``saliency`` (snip and its family), channel coupling
  (``channel-groups``) and ``collapse``; they read the graph and change nothing.
- ``transform``: ``mask`` and ``iterative-snip``, which insert and update mask nodes.
- ``export``: ``fold``, ``shrink`` and ``sparse``, which turn a masked graph into what ships.

One pass per file, named after the pass. Passes are found by name through
:mod:`chop.pipeline.registry`; import a class from its module to use it as an object, e.g.
``from chop.passes.transform.mask import Mask``. Passes import :mod:`chop.ir` and
:mod:`chop.pipeline`, never :mod:`chop.training` or :mod:`chop.cli`.
"""
