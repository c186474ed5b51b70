"""Kernels: tensor algorithms that know nothing of graphs or passes.

- :mod:`~chop.kernels.select`: exact top-k selection over many score tensors (a radix select on
  the floats' bits, in bounded memory), the kept count of a sparsity.
- :mod:`~chop.kernels.csr`: the ``chop::csr_linear`` custom op (CSR weight times dense input,
  by a kernel chosen per input row count by measurement) and the CUDA 2:4 semi-structured
  conversion.
- :mod:`~chop.kernels.reduce`: reductions torch's CPU kernels make slow (whether slices hold
  a nonzero entry).
- :mod:`~chop.kernels.timing`: median wall time of a call, or of several calls interleaved.
- :mod:`~chop.kernels.allocator`: make glibc keep freed CPU memory for reuse, so that each
  step's activations do not pay page faults afresh (for programs, not libraries, to call).
- :mod:`~chop.kernels.distributed`: torch.distributed for chop: sums over the ranks with clear
  errors on failure or timeout, and where a rank's shard of a DTensor lies in the whole tensor.

Imports only :mod:`chop.errors` (and torch).
"""
