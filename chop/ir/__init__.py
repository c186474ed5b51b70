"""The IR: what every pass works on.

- :mod:`~chop.ir.graph`: :func:`~chop.ir.graph.trace` captures a model with torch.export into a
  :class:`~chop.ir.graph.Graph` (a dynamic batch, train/eval modes, weight nodes named as in
  ``state_dict``).
- :mod:`~chop.ir.meta`: the typed ``node.meta["chop"]`` entries (role, op, saliency, mask,
  channel groups, effective) and their checks.
- :mod:`~chop.ir.masks`: the rewrite helpers passes share: mask nodes (``mul(weight, mask)``),
  which weights are prunable, new buffers and parameters beside a weight.

Imports only :mod:`chop.errors` and :mod:`chop.kernels`.
"""
