"""The ``chop`` command line: the application on top of the library.

- :mod:`~chop.cli.main`: arguments, dispatch and exit codes (0 ok, 2 a mistake in the input,
  3 a bug, 130 interrupted); imports nothing heavy until a command runs.
- :mod:`~chop.cli.spine`: the steps every command shares (config, output folder, checkpoint,
  data, capture, pipeline, outputs); :mod:`~chop.cli.commands`: ``transform`` and ``train``.
- :mod:`~chop.cli.config` (TOML), :mod:`~chop.cli.checkpoint` (safe loading),
  :mod:`~chop.cli.datasets` and :mod:`~chop.cli.sources` (data and user code),
  :mod:`~chop.cli.models` (built-in models).
- :mod:`~chop.cli.outputs` (atomic, checked output files), :mod:`~chop.cli.report` (the JSON
  report), :mod:`~chop.cli.viz` (the sparsity picture), :mod:`~chop.cli.display` (terminal).

The top layer: it may import everything below it.
"""
