"""Training: pruning while a model trains.

- :mod:`~chop.training.schedule`: sparsity over steps (exp, cos, cube, linear).
- :mod:`~chop.training.pruner`: :class:`~chop.training.pruner.Pruner`, step hooks for any
  training loop, on a chop Graph or a plain ``nn.Module``.
- :mod:`~chop.training.sharded`: the Pruner's eager path for sharded models (FSDP2, tensor
  parallel): local-shard scores, exact selection over the shards.
- :mod:`~chop.training.loop`: the training loop ``chop train`` runs.
- :mod:`~chop.training.hf`: ``SNIPCallback``, a Hugging Face ``TrainerCallback`` (needs the
  ``hf`` extra; importing :mod:`chop` never imports transformers).

Imports the layers below it, passes included (criteria and ``mask`` run through the manager).
"""
