"""SNIPCallback inside a real transformers.Trainer run (tiny BERT from a config, CPU); chop
imports without transformers."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from chop.errors import DataError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def dataset(count: int = 24):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 120, (12,), generator=g),
             "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": int(torch.randint(0, 3, (), generator=g))} for _ in range(count)]


def trainer(model, data, callback, tmp_path, steps: int):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1000,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_snip_callback_prunes_at_the_first_step_and_keeps_exact_sparsity(tmp_path):
    from chop.training.hf import SNIPCallback

    model, data = tiny_bert(), dataset()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = SNIPCallback(representative_batch=transformers.default_data_collator(data[:8]),
                            sparsity=0.8, mask_options={"scope": "local"})
    trainer(model, data, callback, tmp_path, steps=3).train()

    masks = callback.masks
    assert masks and all(".weight" in k and "embeddings" not in k for k in masks)
    for name, mask in masks.items():
        weight = model.get_parameter(name)
        assert int(mask.sum()) == math.floor(0.2 * mask.numel() + 0.5), name
        assert torch.count_nonzero(weight[~mask]) == 0, name  # still pruned after 3 Adam steps
        assert torch.count_nonzero(weight[mask]) == int(mask.sum())
        assert not torch.equal(weight, before[name])  # and it trained
    assert set(model.state_dict()) == set(before)  # no renamed or extra parameters/buffers
    history = callback.pruner.history
    assert [h["step"] for h in history] == [0]


def test_snip_callback_checks_its_batch():
    from chop.training.hf import SNIPCallback

    with pytest.raises(DataError, match="labels"):
        SNIPCallback(representative_batch={"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(DataError, match="dict"):
        SNIPCallback(representative_batch=[1, 2])


def test_chop_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import chop, chop.training.pruner, chop.cli.commands, chop.cli.main, chop.cli.hf\n"
        "try:\n"
        "    import chop.training.hf\n"
        "except chop.ChopError as e:\n"
        "    assert 'pip install chop[hf]' in str(e); print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_snip_callback_masks_gradients_before_the_trainer_clips_them(tmp_path):
    """The Trainer clips the gradients before on_pre_optimizer_step: they must be the pruned
    model's then (pruned entries 0, the kept ones scaled to max_grad_norm), and the hooks that
    mask them are gone after training."""
    from chop.training.hf import SNIPCallback

    seen = []

    class Recorder(transformers.TrainerCallback):  # runs before SNIPCallback's own hook
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            masks = snip.masks
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            seen.append((sum(int(torch.count_nonzero(grads[n][~m])) for n, m in masks.items()),
                         float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in
                                                                    grads.values()])))))

    model, data = tiny_bert(), dataset()
    snip = SNIPCallback(representative_batch=transformers.default_data_collator(data[:8]),
                        sparsity=0.8, end_step=2, frequency=1)
    run = trainer(model, data, Recorder(), tmp_path, steps=3)
    run.args.max_grad_norm = 1e-3  # far below the gradients' norm: every step clips
    run.add_callback(snip)
    run.train()
    assert len(seen) == 3
    for pruned, norm in seen:
        assert pruned == 0
        assert norm == pytest.approx(1e-3, rel=1e-4)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_snip_callback_scores_a_t5_with_its_cache_and_a_batch_with_extra_columns(tmp_path, caplog):
    """A default T5 returns a key/value cache (which does not export) and the Trainer trains it;
    with remove_unused_columns=False the batch carries columns the forward takes only as
    **kwargs (which torch.export cannot take by name). Both failed to trace."""
    from chop.training.hf import SNIPCallback

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 120, (10,), generator=g),
             "labels": torch.randint(0, 120, (6,), generator=g), "row": i} for i in range(16)]
    batch = transformers.default_data_collator(data[:8])
    callback = SNIPCallback(representative_batch=batch, sparsity=0.5)
    run = trainer(model, data, callback, tmp_path, steps=2)
    run.args.remove_unused_columns = False
    run.train()
    assert "row of the representative batch is no input of T5ForConditionalGeneration's " \
           "forward; scored without" in caplog.text
    masks = callback.masks
    total = sum(m.numel() for m in masks.values())
    assert masks and sum(int(m.sum()) for m in masks.values()) == total - total // 2
    assert "weights the masks pruned" not in caplog.text
    name, mask = next(iter(masks.items()))
    with torch.no_grad():  # as a checkpoint from before pruning, loaded as the best model
        model.get_parameter(name)[~mask] = 1.0
    callback.on_train_end(run.args, run.state, None, model=model)
    assert f"has weights the masks pruned (in 1 layer(s), e.g. {name})" in caplog.text
