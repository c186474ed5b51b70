"""chop.trace and chop.Graph: capture, weight nodes, dynamic batch, train/eval, errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import chop
import chop.ir.graph as graph_module
import zoo
from chop.ir import meta
from chop.pipeline.batches import logits_of


def test_trace_matches_model_in_both_modes(cnn, cnn_batches):
    x = cnn_batches[0][0]
    graph = chop.trace(cnn, (x,))
    assert graph.training and cnn.training  # the model's mode is kept, and the graph starts in it
    cnn.eval()
    graph.eval()
    torch.testing.assert_close(graph(x), cnn(x), rtol=0, atol=0)


def test_weight_nodes_are_parameters_named_as_in_state_dict(cnn, cnn_graph):
    names = [n.target for n in cnn_graph.weight_nodes()]
    assert names == [name for name, _ in cnn.named_parameters()]
    assert set(names) <= set(cnn.state_dict())
    assert all(n.op == "get_attr" for n in cnn_graph.weight_nodes())
    roles = {n.target: meta.entries(n)["role"] for n in cnn_graph.weight_nodes()}
    assert roles["conv1.weight"] == "conv" and roles["fc.weight"] == "linear"
    assert roles["bn1.weight"] == "norm" and roles["conv1.bias"] == "bias"
    assert meta.entries(cnn_graph.weight_node("conv1.weight"))["op"] == "conv2d"


def test_batch_dimension_is_dynamic_and_the_graph_trains(cnn):
    graph = chop.trace(cnn, (torch.randn(2, 3, 8, 8),))
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    optimizer = torch.optim.SGD(graph.module.parameters(), lr=0.1)
    before = cnn.fc.weight.detach().clone()
    loss = nn.functional.cross_entropy(graph(x), y)
    loss.backward()
    optimizer.step()
    assert graph(x).shape == (64, 10)
    assert not torch.equal(cnn.fc.weight, before)  # shared parameters were trained


def test_batch_of_one_example_still_gives_a_dynamic_batch(mlp):
    graph = chop.trace(mlp, (torch.randn(1, 16),))
    x = torch.randn(5, 16)
    torch.testing.assert_close(graph(x), mlp(x))


def test_eval_switches_batch_norm_and_dropout_without_touching_buffers(cnn, cnn_batches):
    x = cnn_batches[0][0]
    graph = chop.trace(cnn, (x,))
    graph.eval()
    stats = {k: v.clone() for k, v in cnn.state_dict().items() if "bn" in k}
    outputs = [graph(x) for _ in range(2)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)  # dropout is off
    for key, value in stats.items():  # running stats and num_batches_tracked unchanged
        assert torch.equal(cnn.state_dict()[key], value), key
    graph.train()
    graph(x)
    assert int(cnn.bn1.num_batches_tracked) == 1
    assert not torch.equal(cnn.bn1.running_mean, stats["bn1.running_mean"])


def test_train_mode_matches_eager_train_mode(cnn, cnn_batches):
    cnn.drop.p = 0.0  # dropout's randomness aside, train mode must compute what eager computes
    x = cnn_batches[0][0]
    graph = chop.trace(cnn, (x,))
    reference = type(cnn)()
    reference.load_state_dict(cnn.state_dict())
    reference.drop.p = 0.0
    torch.testing.assert_close(graph(x), reference(x))
    torch.testing.assert_close(cnn.bn1.running_mean, reference.bn1.running_mean)


def test_module_train_and_eval_are_routed_to_the_graph(cnn_graph, cnn_batches):
    x = cnn_batches[0][0]
    assert cnn_graph.module.eval() is cnn_graph.module
    assert not cnn_graph.training and not cnn_graph.module.training
    torch.testing.assert_close(cnn_graph(x), cnn_graph(x), rtol=0, atol=0)
    cnn_graph.module.train()
    assert cnn_graph.training


def test_mode_context_restores(cnn_graph):
    with cnn_graph.mode(batch_norm=False, dropout=False):
        assert not cnn_graph.training
    assert cnn_graph.training


def test_model_traced_in_eval_mode_can_train(cnn, cnn_batches):
    cnn.eval()
    x = cnn_batches[0][0]
    graph = chop.trace(cnn, (x,))
    assert not graph.training and not cnn.training
    torch.testing.assert_close(graph(x), cnn(x), rtol=0, atol=0)
    graph.train()
    graph(x)
    assert int(cnn.bn1.num_batches_tracked) == 1


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor value: torch.export cannot capture this
            return self.fc(x)
        return x


@pytest.mark.parametrize("exportable", [True, False])
def test_trace_runs_with_the_garbage_collector_paused_and_restores_it(exportable):
    import gc

    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            seen.append(gc.isenabled())
            if not exportable and x.sum() > 0:  # data-dependent: torch.export refuses it
                return self.fc(x)
            return self.fc(x)

    assert gc.isenabled()
    if exportable:
        chop.trace(Probe(), (torch.randn(2, 3),))
    else:
        with pytest.raises(chop.TraceError):
            chop.trace(Probe(), (torch.randn(2, 3),))
    assert seen and not any(seen)  # every forward torch.export ran saw it paused
    assert gc.isenabled()


def test_untraceable_model_gets_a_trace_error_with_the_cause_chained():
    with pytest.raises(chop.TraceError) as info:
        chop.trace(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert message.startswith("torch.export could not capture DataDependent")
    assert "What to try" in message and "torch.cond" in message
    assert info.value.__cause__ is not None


def test_wrong_example_inputs_are_a_trace_error(mlp):
    with pytest.raises(chop.TraceError, match="could not capture MLP"):
        chop.trace(mlp, (torch.randn(2, 16), torch.randn(2, 16)))


def test_trace_rejects_non_modules():
    with pytest.raises(chop.TraceError, match="needs a torch.nn.Module, got function"):
        chop.trace(lambda x: x, (torch.randn(2),))


def test_tracing_a_loaded_program_says_to_wrap_it_instead(mlp, tmp_path):
    x = torch.randn(2, 16)
    torch.export.save(torch.export.export(mlp, (x,)), tmp_path / "model.pt2")
    module = torch.export.load(tmp_path / "model.pt2").module()
    with pytest.raises(chop.TraceError, match=r"cannot switch \w+ between train and eval mode.*"
                                              r"wrap it with chop.Graph\(program.module\(\), "
                                              r"training=False\)") as info:
        chop.trace(module, (x,))
    assert isinstance(info.value.__cause__, NotImplementedError)
    graph = chop.Graph(module, training=False)  # what the message says works
    torch.testing.assert_close(graph(x), mlp(x))


def test_lint_reports_inconsistent_metadata(cnn_graph):
    node = cnn_graph.weight_node("fc.weight")
    meta.entries(node)["mask"] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(chop.LintError, match=r"fc.weight.*'mask'.*shape \(3,\) differs"):
        cnn_graph.lint()


# -- training-only behaviour a train-mode export bakes in -----------------------------------------


class Patterns(nn.Module):
    """In-place dropout, BatchNorm, a torchvision-style stochastic depth on a residual branch, a
    LayerDrop-style skipped layer and a deterministic training-only branch, each optional; a
    call counter in a buffer."""

    def __init__(self, drop_path: float = 0.0, layerdrop: float = 0.0, shift: bool = False):
        super().__init__()
        self.shift = shift
        self.register_buffer("calls", torch.zeros(()))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 1)
        self.drop_path = zoo.StochasticDepth(drop_path)
        self.layerdrop = layerdrop
        self.extra = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout(0.5, inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        self.calls.add_(1)
        x = torch.relu(self.bn(self.conv(x)))
        if self.shift and self.training:  # no mode argument switches it
            x = x * 0.5 + 0.1
        x = x + self.drop_path(self.branch(x))
        if not (self.layerdrop and self.training and torch.rand([]) < self.layerdrop):  # LayerDrop
            x = x + self.extra(x)
        return self.fc(self.drop(x.mean((2, 3))))


def patterned(**options):
    torch.manual_seed(0)
    model = Patterns(**options)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize(("options", "traced_training"), [
    ({}, True),  # in-place dropout only: switched by the mode argument
    ({"drop_path": 0.3}, False),  # stochastic depth: bernoulli_ in the train-mode graph
    ({"layerdrop": 0.3}, False),  # if training and rand() < p: the train-mode export fails
    ({"shift": True}, False),  # if training: deterministic, found by running both in eval mode
])
def test_eval_outputs_are_deterministic_and_equal_the_eager_models(options, traced_training, caplog):
    model = patterned(**options)
    x = torch.randn(4, 3, 6, 6)
    state, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    with caplog.at_level("INFO", logger="chop"):
        graph = chop.trace(model, (x[:2],))
    assert graph.traced_training is traced_training
    said = [r.getMessage() for r in caplog.records if "traced in eval mode" in r.getMessage()]
    assert len(said) == (0 if traced_training else 1)
    if options.get("shift"):
        assert "an `if self.training:` branch" in said[0]
    # tracing (and the eval-mode run it compares) leaves the model's state and the RNG alone
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    graph.eval()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        for _ in range(3):
            torch.testing.assert_close(graph(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(graph.copy()(x), expected, rtol=0, atol=0)  # a copy too


class SeesEval(nn.Module):
    """Records the shape of each input its eval-mode forward runs on."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        if not self.training:
            self.seen.append(tuple(x.shape))
        return self.fc(x)


def test_the_eval_check_runs_two_samples_of_a_large_example_batch():
    model = SeesEval()
    graph = chop.trace(model, (torch.randn(64, 4),))
    assert model.seen == [(2, 4)]  # not the 64 samples: two forwards of those cost more
    assert graph.traced_training
    with torch.no_grad():  # the graph still takes any batch
        torch.testing.assert_close(graph(torch.ones(64, 4)), model.train()(torch.ones(64, 4)))


class CropsInTraining(nn.Module):
    """A training-time crop of the token sequence to its first 20 positions (the later ones
    zeroed)."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(30, 8), nn.Linear(8, 3)

    def forward(self, ids):
        x = self.embed(ids)
        if self.training:
            x = x * (torch.arange(x.shape[1]) < 20)[:, None]
        return self.fc(x.mean(1))


def test_training_only_code_that_depends_on_the_length_is_found_on_every_position():
    """Cut to 16 positions, the crop to 20 changed nothing, and the eval-mode graph cropped."""
    torch.manual_seed(0)
    model = CropsInTraining()
    ids = torch.randint(0, 30, (4, 24))
    graph = chop.trace(model, (ids,))
    assert not graph.traced_training
    with torch.no_grad():
        torch.testing.assert_close(graph.eval()(ids), model.eval()(ids), rtol=0, atol=0)


@pytest.mark.parametrize("refused", [False, True])
def test_training_only_code_is_found_on_the_cut_example_batch_or_else_the_whole(
        refused, monkeypatch):
    import chop.ir.graph as graph_module

    if refused:  # cut inputs the graph refuses (a wrong width): the whole batch is compared
        real = graph_module.cut_inputs
        monkeypatch.setattr(graph_module, "cut_inputs", lambda module, args, kwargs, **kw: (
            (args[0][:, :2],), real(module, args, kwargs)[1]))
    x = torch.randn(16, 3, 6, 6)
    graph = chop.trace(patterned(shift=True), (x,))
    assert not graph.traced_training
    model = patterned(shift=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(graph.eval()(x), model(x), rtol=0, atol=0)


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.mul_(2))


class QuietWrites(nn.Module):
    """An EMA under no_grad, a counter under autocast, a weight clamp (WGAN's) under no_grad."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        with torch.no_grad():
            self.ema.mul_(0.9).add_(x.mean(0), alpha=0.1)
            self.fc.weight.clamp_(-0.1, 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.fc(x)
            self.calls.add_(1)
        return y.float() + self.calls


class PaddedEncoder(nn.Module):
    """torch's encoder takes its fast path in eval mode under no_grad, where padded positions
    come out differently from the layers' code the export captures."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


class TrainingOnly(nn.Module):
    """Training-only behaviour hidden from the tensor comparison: behind a -inf logit, or in
    an output that is not a tensor."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        if self.kind == "inf":
            y = torch.cat([y * (10.0 if self.training else 1.0), torch.full_like(y[:, :1],
                                                                             -torch.inf)], 1)
            return y
        return {"logits": y, "aux_weight": 0.4 if self.training else 0.0}


def _padded():
    x, pad = torch.randn(3, 6, 16), torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    return x, pad


@pytest.mark.parametrize(("build", "inputs", "traced_training"), [
    (WritesItsInput, lambda: (torch.ones(2, 4),), True),
    (QuietWrites, lambda: (torch.randn(2, 4) * 10,), True),
    (PaddedEncoder, _padded, True),
    (lambda: TrainingOnly("inf"), lambda: (torch.randn(2, 4),), False),
    (lambda: TrainingOnly("constant"), lambda: (torch.randn(2, 4),), False),
], ids=["input written", "writes under no_grad and autocast", "encoder fast path",
        "-inf output", "constant output"])
def test_the_eval_check_leaves_model_and_inputs_alone_and_sees_every_output(
        build, inputs, traced_training):
    """What the eval-mode comparison of chop.trace missed: writes to the inputs (done twice,
    then taken for training-only code), writes inside no_grad/autocast blocks and to
    parameters (left in the model), the encoder's fast path (a false difference), differences
    behind an infinity or in a non-tensor output (missed)."""
    torch.manual_seed(0)
    model = build()
    args = inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    given = [a.clone() for a in args]
    graph = chop.trace(model, args)
    assert graph.traced_training is traced_training
    assert all(torch.equal(a, b) for a, b in zip(args, given))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if not traced_training:  # the eval-mode graph computes what the model does in eval mode
        model.eval()
        with torch.no_grad():
            expected, got = model(*args), graph.eval()(*args)
        assert chop.ir.replay.output_difference(got, expected) is None


def test_writes_inside_no_grad_and_autocast_blocks_and_to_parameters_are_found():
    from chop.ir.replay import WrittenBuffers

    graph = chop.trace(QuietWrites(), (torch.randn(2, 4),))
    assert WrittenBuffers(graph.module).names == ["calls", "ema", "fc.weight"]


def test_the_eval_check_gives_no_verdict_on_the_meta_device():
    with torch.device("meta"):
        model, x = nn.Linear(4, 3), torch.empty(2, 4)
    graph = chop.trace(model, (x,))
    assert graph.traced_training


def test_a_failed_train_mode_export_prints_no_partial_graph(capsys):
    # torch prints the graph it captured before the data-dependent branch to stderr; chop
    # retries in eval mode, so that dump goes to chop's debug log, and other writes go through
    import logging
    import sys

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("chop")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        sys.stderr.write("before\n")
        graph = chop.trace(patterned(layerdrop=0.3), (torch.randn(2, 3, 6, 6),))
        sys.stderr.write("after\n")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not graph.traced_training
    assert capsys.readouterr().err.splitlines() == ["before", "after"]
    dumps = [r.getMessage() for r in records if "partial graph" in r.getMessage()]
    assert dumps and all("torch.ops.aten.rand" in d for d in dumps)


@pytest.mark.parametrize("options", [{"drop_path": 0.3}, {"layerdrop": 0.3}])
def test_a_graph_traced_in_eval_mode_still_trains_batch_norm_and_dropout(options):
    model = patterned(**options)
    x = torch.randn(4, 3, 6, 6)
    graph = chop.trace(model, (x[:2],))
    reference = patterned(**{k: 0.0 for k in options})  # drop-path/LayerDrop stay off in training
    reference.load_state_dict(model.state_dict())
    reference.drop.p = 0.0
    graph.train()
    with graph.mode(batch_norm=True, dropout=False), torch.no_grad():
        torch.testing.assert_close(graph(x), reference.train()(x))  # batch statistics
    torch.manual_seed(1)
    a = graph(x)
    torch.manual_seed(2)
    assert not torch.equal(a, graph(x))  # dropout is on again in train mode


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_instance_norm_with_running_stats_switches_like_batch_norm(traced_in):
    torch.manual_seed(0)
    tracked = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), tracked, nn.InstanceNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 6, 6)
    graph = chop.trace(model.train(traced_in == "train"), (x,))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    graph.eval()
    model.eval()
    with torch.no_grad():
        for _ in range(2):  # the running statistics, left as they were
            torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key
    graph.train()
    reference = copy.deepcopy(model).train()
    with torch.no_grad():  # batch statistics, and the running ones updated as eager code does
        torch.testing.assert_close(graph(x), reference(x))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)


def test_replacing_a_tied_parameter_replaces_it_under_every_name():
    """fold replaced GPT-2's tied embedding under one name: weights.safetensors held a pruned
    wte and an unpruned lm_head, and hf/ reloaded the unpruned head."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(12, 6), nn.Linear(6, 12, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    graph = chop.trace(Tied(), (torch.randint(0, 12, (2, 5)),))
    # one node for the tied parameter, by its first name, and code generated from that graph
    assert [n.target for n in graph.module.graph.find_nodes(op="get_attr")] == ["embed.weight"]
    assert "embed" in graph.module.code and "head" not in graph.module.code
    chop.run(graph, "magnitude, mask{sparsity=0.5, embeddings=true}, fold")
    state = graph.module.state_dict()
    embed, head = state["embed.weight"], state["head.weight"]
    assert embed.data_ptr() == head.data_ptr() and int((embed == 0).sum()) == 36


def test_recurrent_layers_switch_their_dropout_between_layers():
    torch.manual_seed(0)
    model = zoo.Recurrent()
    ids = torch.randint(0, 120, (4, 7))
    graph = chop.trace(model, (ids,))
    torch.manual_seed(1)
    a = graph(ids)
    torch.manual_seed(2)
    assert not torch.equal(a, graph(ids))  # inter-layer dropout is on in train mode
    graph.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(graph(ids), model(ids), rtol=0, atol=0)
    roles = {n.target: n.meta["chop"]["role"] for n in graph.weight_nodes()}
    assert roles["lstm.weight_ih_l1_reverse"] == roles["gru.weight_hh_l0"] == "linear"
    assert roles["lstm.bias_hh_l0"] == "bias" and roles["embed.weight"] == "embedding"
    assert meta.entries(graph.weight_node("lstm.weight_hh_l0"))["op"] == "lstm"


def test_a_model_that_exports_in_neither_mode_reports_the_train_mode_error():
    with pytest.raises(chop.TraceError) as info:
        chop.trace(DataDependent(), (torch.randn(2, 4),))
    assert "torch.cond" in str(info.value) and info.value.__cause__ is not None


@pytest.mark.parametrize(("pipeline", "model"), [
    ("snip, channel-groups, mask{granularity=channel, sparsity=0.5}, collapse", "cnn"),
    ("magnitude, mask{granularity=channel, sparsity=0.5}, shrink", "cnn"),
    ("fold-bn, channels-last, grasp", "cnn"),
    ("synflow, mask{sparsity=0.8}, fold", "mlp"),
    ("random, mask{sparsity=0.5}, sparse", "mlp"),
    ("snip2, gradient, exact-salience", "mlp"),
    ("snip-momentum, iterative-snip{steps=2}", "mlp"),
])
def test_a_copy_after_any_pass_computes_the_same_and_owns_its_parameters(pipeline, model, request):
    check_copy(pipeline, model, request, lambda graph: graph.copy())


def test_deepcopy_is_graph_copy(request):
    check_copy("magnitude, mask{granularity=channel, sparsity=0.5}, shrink", "cnn", request,
               copy.deepcopy)


def test_a_deepcopy_with_what_shares_the_parameters_keeps_sharing(mlp, mlp_batches):
    """One copy.deepcopy of the graph, an optimizer over it and the traced model: the copied
    optimizer steps the copied graph, whose parameters the copied model holds."""
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    optimizer = torch.optim.SGD(graph.module.parameters(), lr=0.1)
    twin, twin_optimizer, twin_model = copy.deepcopy((graph, optimizer, mlp))
    ours = [p for group in twin_optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in ours} == {id(p) for p in twin.module.parameters()}
    assert {id(p) for p in twin_model.parameters()} <= {id(p) for p in twin.module.parameters()}
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    x, y = mlp_batches[0]
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    twin_optimizer.step()
    name = next(iter(before))
    assert not torch.equal(twin_model.state_dict()[name], before[name])
    assert all(torch.equal(v, before[k]) for k, v in graph.module.state_dict().items())
    held = copy.deepcopy({"graph": graph, "module": graph.module})
    assert held["module"] is held["graph"].module


def test_a_deepcopy_of_the_module_is_a_graph_of_its_own():
    """copy.deepcopy(graph.module): its own chop metadata, and its eval() switches its dropout
    off (the Graph's mode arguments), not the original's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(6, 8)
    graph = chop.trace(model, (x,))
    chop.run(graph, "magnitude, mask{sparsity=0.5}")
    module = copy.deepcopy(graph.module)
    twin = graph_module.graph_of(module)
    assert twin is not None and twin is not graph and twin.module is module

    def kept(g: chop.Graph) -> list[int]:
        return [int(meta.entries(n)["mask"].sum()) for n in g.weight_nodes()
                if "mask" in meta.entries(n)]

    before = kept(graph)
    chop.run(twin, "random{seed=3}, mask{sparsity=0.9}")
    assert kept(graph) == before and sum(before) == 96 and sum(kept(twin)) == 19
    assert graph.training and module.training
    module.eval()
    assert graph.training and not twin.training
    model.eval()
    with torch.no_grad():  # no dropout: the masked model, deterministic
        twin_masks = {n.target: meta.entries(n)["mask"] for n in twin.weight_nodes()
                      if "mask" in meta.entries(n)}
        expected = torch.func.functional_call(model, {k: p * twin_masks[k] if k in twin_masks else p
                                                      for k, p in model.named_parameters()}, (x,))
        torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(module(x), module(x), rtol=0, atol=0)


def check_copy(pipeline: str, model: str, request, copier) -> None:
    module = request.getfixturevalue(model)
    batches = request.getfixturevalue(f"{model}_batches")
    graph = chop.trace(module, (batches[0][0][:2],))
    chop.run(graph, pipeline, data=batches)
    twin = copier(graph)
    assert type(twin) is chop.Graph
    graph.eval()
    twin.eval()
    x = batches[1][0]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), graph(x), rtol=0, atol=0)
    assert [r.name for r in twin.history] == [r.name for r in graph.history]
    ours = {id(p) for p in graph.module.parameters()}
    assert not any(id(p) in ours for p in twin.module.parameters())


# -- what the graph caches about itself ------------------------------------------------------------


def test_mode_switches_reuse_the_generated_code_and_compute_the_same(cnn_graph, cnn_batches, monkeypatch):
    x = cnn_batches[0][0]
    buffers = {k: v.clone() for k, v in cnn_graph.module.named_buffers()}
    results = {}
    for bn, dropout, lean in [(False, False, False), (False, False, True), (True, True, False)]:
        cnn_graph.module.load_state_dict(buffers, strict=False)  # train mode updated them
        torch.manual_seed(0)
        with cnn_graph.mode(batch_norm=bn, dropout=dropout, lean=lean), torch.no_grad():
            results[bn, dropout, lean] = cnn_graph(x)
    calls = []
    monkeypatch.setattr(type(cnn_graph.module), "recompile", lambda self: calls.append(1))
    for (bn, dropout, lean), expected in results.items():  # every mode seen once: no codegen
        cnn_graph.module.load_state_dict(buffers, strict=False)
        torch.manual_seed(0)
        with cnn_graph.mode(batch_norm=bn, dropout=dropout, lean=lean), torch.no_grad():
            torch.testing.assert_close(cnn_graph(x), expected, rtol=0, atol=0)
    assert calls == []
    torch.testing.assert_close(results[False, False, True], results[False, False, False],
                               rtol=0, atol=0)


class _NoModeArgs(nn.Module):
    """Dropout of p=0 (most LLM configs) and BatchNorm without running statistics: nothing it
    computes depends on train or eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6, track_running_stats=False)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.fc(x))).relu()


@pytest.mark.parametrize("p, codegens", [(0.0, 0), (0.5, 1)])
def test_a_mode_switch_of_a_graph_without_mode_arguments_generates_no_code(p, codegens,
                                                                           monkeypatch):
    graph = chop.trace(_NoModeArgs(p), (torch.randn(4, 6),))
    x = torch.randn(5, 6)
    graph.module.graph.create_node("call_function", torch.ops.aten.relu.default,
                                   (x.new_ones(()),))  # an edit (an unused node) ...
    graph.module.graph.eliminate_dead_code()
    graph.recompile()  # ... and its recompile: the cached code of every mode is stale now
    calls = []
    recompile = type(graph.module).recompile
    monkeypatch.setattr(type(graph.module), "recompile",
                        lambda self: calls.append(1) or recompile(self))
    with torch.no_grad(), graph.mode(batch_norm=False, dropout=False):
        assert not graph.module.training
        evaluated = graph(x)
    assert graph.module.training
    assert len(calls) == codegens  # into eval (back: its cached code); none without mode args
    if p == 0.0:
        with torch.no_grad():
            torch.testing.assert_close(evaluated, graph(x), rtol=0, atol=0)
            model = _NoModeArgs(p)
            model.load_state_dict(graph.module.state_dict(), strict=False)
            torch.testing.assert_close(evaluated, model.eval()(x), rtol=0, atol=0)


def test_a_lean_block_runs_its_cached_code_without_editing_the_nodes(cnn_graph, cnn_batches):
    x = cnn_batches[0][0]
    def training_args() -> list:  # the batch_norm nodes' training argument
        return [n.args[5] for n in cnn_graph.module.graph.nodes
                if n.target is torch.ops.aten.batch_norm.default]
    cnn_graph.train()
    with cnn_graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        expected = cnn_graph(x)
    assert set(training_args()) == {True}
    with cnn_graph.mode(batch_norm=False, dropout=False, lean=True):  # first time: generated
        pass
    with cnn_graph.mode(batch_norm=False, dropout=False, lean=True), torch.no_grad():
        assert set(training_args()) == {True}  # nodes untouched, the eval code runs
        assert not cnn_graph.module.training
        torch.testing.assert_close(cnn_graph(x), expected, rtol=0, atol=0)
    assert set(training_args()) == {True} and cnn_graph.module.training
    with cnn_graph.mode(batch_norm=False, dropout=False):  # a plain block edits them
        assert set(training_args()) == {False}
        fx_code = cnn_graph.module.graph.python_code("self").src
        assert fx_code == cnn_graph.module.code  # the graph is what runs
    assert set(training_args()) == {True}


class _Dispatched(TorchDispatchMode):
    """Records every ATen overload dispatched inside (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_lean_code_calls_bindings_that_dispatch_the_same_ops(name, monkeypatch):
    _, traced = zoo.trace(name)
    args, kwargs = zoo.ZOO[name].inputs(2)

    def run(bindings: dict) -> tuple:
        monkeypatch.setattr(graph_module, "_BINDINGS", bindings)
        graph = traced.copy()
        params = [p for p in graph.module.parameters() if p.requires_grad]
        with graph.mode(batch_norm=False, dropout=False, lean=True), _Dispatched() as seen:
            out = logits_of(graph(*args, **kwargs))
            grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
            code = graph.module.code
        return seen.ops, out, grads, code

    ops, out, grads, code = run(graph_module._BINDINGS)
    plain_ops, plain_out, plain_grads, plain_code = run({})
    assert code != plain_code and "torch.ops.aten.conv2d" not in code  # bindings are called
    assert ops == plain_ops  # the same overloads, in the same order, forward and backward
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for g, plain in zip(grads, plain_grads, strict=True):
        assert (g is None) == (plain is None)
        if g is not None:
            torch.testing.assert_close(g, plain, rtol=0, atol=0)


def test_lean_code_leaves_out_checks_but_not_random_or_in_place_ops():
    graph = zoo.trace("mobilenetv3")[1]  # in-place activations, dropout, BatchNorm
    with graph.mode(batch_norm=False, dropout=True):
        full = graph.module.code
    with graph.mode(batch_norm=False, dropout=True, lean=True):
        lean = graph.module.code
    assert "_guards_fn" in full and "_guards_fn" not in lean  # torch.export's input checks
    assert "num_batches_tracked" in full and "num_batches_tracked" not in lean  # read by nothing
    assert lean.count("dropout") == full.count("dropout") > 0
    assert lean.count("hardswish_") == full.count("hardswish_") > 0


def test_lean_code_keeps_the_guards_of_an_input_that_export_fixed_at_its_traced_value():
    x = torch.randn(3, 4)
    graph = chop.trace(zoo.Scaled(), (x, 2.0))
    with graph.mode(batch_norm=False, dropout=False, lean=True):
        assert "_guards_fn" in graph.module.code
        with pytest.raises(AssertionError, match="scale == 2.0"):
            graph.module(x, 3.0)  # not computed with 2.0 instead


def test_weight_nodes_and_parameters_follow_edits_of_the_graph(mlp):
    graph = chop.trace(mlp, (torch.randn(2, 16),))
    before = graph.weight_nodes()
    first = before[0]
    graph.module.register_parameter("extra", nn.Parameter(torch.ones(3)))
    with graph.module.graph.inserting_after(first):
        graph.module.graph.get_attr("extra")
    graph.recompile()
    assert [n.target for n in graph.weight_nodes()] == [n.target for n in before][:1] + ["extra"] + [
        n.target for n in before][1:]
    replacement = nn.Parameter(torch.zeros_like(graph.parameter(first)))
    graph.module.get_submodule(first.target.rpartition(".")[0]).register_parameter(
        first.target.rpartition(".")[2], replacement)
    assert graph.parameter(first) is replacement  # looked up afresh, not cached


def _counted_structure_checks(patch: pytest.MonkeyPatch) -> list[int]:
    """Count torch.export's input-structure checks (one entry per check) while ``patch`` holds."""
    checks: list[int] = []
    real_check = torch.export._unlift._check_inputs_match

    def counting(*args, **kwargs):
        checks.append(1)
        return real_check(*args, **kwargs)

    patch.setattr(torch.export._unlift, "_check_inputs_match", counting)
    return checks


def test_calling_a_graph_skips_only_the_export_structure_check_and_keeps_every_other(mlp):
    """Positional tensors go straight to forward (torch.export's pre-hook does not run); the
    shape guards still fail, other input structures get torch's own check, and a hook the
    user adds makes every call go through the module's full call again."""
    graph = chop.trace(mlp, (torch.randn(2, 16),))
    x = torch.randn(3, 16)
    with pytest.MonkeyPatch.context() as patch:
        structure_checks = _counted_structure_checks(patch)
        torch.testing.assert_close(graph(x), mlp(x), rtol=0, atol=0)
        assert structure_checks == []
        with pytest.raises(Exception, match="size|shape|Guard"):  # the shape guards still run
            graph(torch.randn(3, 15))
        with pytest.raises(ValueError, match="tree spec"):  # two inputs for one: torch's check
            graph(x, x)
        assert structure_checks == [1]
        with pytest.raises(ValueError, match="tree spec"):
            graph([x])
        seen = []
        handle = graph.module.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        graph(x)
        assert seen == [(3, 4)] and len(structure_checks) == 3
        handle.remove()
        graph(x)
        assert seen == [(3, 4)] and len(structure_checks) == 3


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * scale


def test_calling_a_graph_with_keyword_tensors_skips_the_structure_check_too():
    model = _Keywords()
    graph = chop.trace(model, (), {"x": torch.randn(2, 4), "scale": torch.randn(2, 3)})
    x, scale = torch.randn(5, 4), torch.randn(5, 3)
    with pytest.MonkeyPatch.context() as patch:
        structure_checks = _counted_structure_checks(patch)
        torch.testing.assert_close(graph(scale=scale, x=x), model(x, scale), rtol=0, atol=0)
        assert structure_checks == []
        with pytest.raises(Exception, match="size|shape|Guard"):  # the shape guards still run
            graph(x=torch.randn(5, 5), scale=scale)
        with pytest.raises(ValueError, match="keyword"):  # a missing keyword: torch's check
            graph(x=x)
        with pytest.raises(ValueError):  # the keyword given by position: torch's check
            graph(x, scale=scale)
        assert len(structure_checks) == 2


class _Slices(nn.Module):
    """Whole slices (``x[:, :]``, ``x[:, 0:]``) around a linear layer, and a partial one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x[:, :] * 2)[:, 0:]
        return y[:, 1:] * y[:, 0:][:, :5]


def test_lean_code_drops_whole_slices_with_the_same_values_and_gradients():
    graph = chop.trace(_Slices(), (torch.randn(3, 6),))
    slices = [n for n in graph.module.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
    assert len(slices) == 7  # what torch.export made of them: 5 whole, 2 partial
    x = torch.randn(4, 6)
    results = []
    for lean in (False, True):
        with graph.mode(batch_norm=False, dropout=False, lean=lean):
            out = graph(x)
            params = list(graph.module.parameters())
            results.append((out, torch.autograd.grad(out.square().sum(), params)))
            code = graph.module.code
    assert code.count("aten.slice.Tensor(") == 2  # the partial ones stay
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for lean_grad, grad in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(lean_grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("key", ['q"uote', "new\nline"])
def test_a_name_torch_cannot_write_as_code_is_a_trace_error(key):
    """torch writes module names into the code it generates: a quote or a line break in an
    nn.ModuleDict key gave a raw SyntaxError."""

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({key: nn.Linear(3, 3)})

        def forward(self, x):
            return self.layers[key](x)

    with pytest.raises(chop.TraceError, match="rename it"):
        chop.trace(Named(), torch.randn(2, 3))


def test_a_failed_trace_says_it_in_one_error_not_torchs_log_of_tracebacks(caplog):
    """A shape mismatch made torch's fake-tensor logger print a traceback for every meta
    kernel it tried (287 lines on LeNet-5), even with chop's --quiet."""
    with caplog.at_level("DEBUG"), pytest.raises(chop.TraceError):
        chop.trace(nn.Linear(4, 3), torch.randn(2, 5))
    assert not [r for r in caplog.records if r.name.startswith("torch._subclasses")]


def test_trace_warns_when_the_model_fixes_the_batch_or_the_sequence(caplog):
    class Positions(nn.Module):  # a position table of 7 rows fixes the sequence length
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(10, 4), nn.Parameter(torch.randn(7, 4))

        def forward(self, ids):
            return self.emb(ids) + self.pos

    ids = torch.randint(0, 10, (2, 7))
    with caplog.at_level(logging.WARNING, logger="chop"):
        graph = chop.trace(Positions(), (ids,))
    assert "input 'ids' keeps a fixed sequence length of 7 (the model's code fixes it)" in caplog.text
    assert "fixed batch size" not in caplog.text
    graph(torch.randint(0, 10, (5, 7)))  # the batch stays dynamic


def test_a_one_dimensional_input_is_called_unbatched_not_a_fixed_batch(caplog):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with caplog.at_level(logging.WARNING, logger="chop"):
        graph = chop.trace(model, (torch.randn(16),))
    assert "input 'input_1' is 1-D, one unbatched sample (its 16 features are not a batch)" in (
        caplog.text)
    assert "fixed batch size" not in caplog.text
    assert graph(torch.randn(16)).shape == (3,)


@pytest.mark.parametrize("training", [True, False])
def test_a_cumulative_batch_norm_that_forces_an_eval_export_is_named(training, caplog):
    """BatchNorm(momentum=None) does not export in train mode (its factor is 1 / a counter);
    the eval-mode graph cannot update its statistics when it trains: said, as a warning when
    the model came in train mode (to be trained), else as information."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None),
                          nn.BatchNorm1d(4)).train(training)
    with caplog.at_level("INFO", logger="chop"):
        graph = chop.trace(model, (torch.randn(5, 3),))
    assert not graph.traced_training
    said = [r for r in caplog.records if "momentum=None" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == ("WARNING" if training else "INFO")
    assert said[0].getMessage().startswith("Sequential: BatchNorm 1 has momentum=None")


class VarKeywords(nn.Module):
    """Keyword inputs that land in **kwargs, as transformers' output_hidden_states=True does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, **kwargs):
        y = self.fc(x) * (2.0 if kwargs.get("double") else 1.0)
        return y + kwargs["bias"] if "bias" in kwargs else y


def test_inputs_through_var_keywords_trace_with_the_examples_shapes(caplog):
    """torch.export fails on any dynamic shapes when an input goes through **kwargs, which
    made chop.trace fail ("Must provide a tree_name")."""
    x, bias = torch.randn(2, 4), torch.randn(2, 3)
    model = VarKeywords()
    with caplog.at_level("WARNING", logger="chop"):
        graph = chop.trace(model, (x,), kwargs={"double": True, "bias": bias})
    assert graph.traced_training
    assert ("input 'x' keeps a fixed batch size of 2 (the inputs double, bias go through its "
            "forward's **kwargs, for which torch.export takes no dynamic shapes)") in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(graph.eval()(x, double=True, bias=bias),
                                   model.eval()(x, double=True, bias=bias))
