from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import chop
from chop.cli.outputs import export_program
from chop.ir.masks import current_masks, insert_mask
from chop.kernels import csr as sparse_ops
from chop.passes.export.sparse import SPARSE, Sparse, csr_weights

pytest.importorskip("scipy")


class FlatMLP(nn.Module):
    """Images flattened into a two-layer MLP."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def masks_of(graph: chop.Graph) -> dict[str, torch.Tensor]:
    return {n.target: n.meta["chop"]["mask"].clone()
            for n in graph.weight_nodes() if "mask" in n.meta["chop"]}


def csr_dense(graph: chop.Graph, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The dense matrix the CSR buffers of parameter ``name`` hold, rebuilt by torch."""
    state = graph.module.state_dict()
    crow, col, values = (state[f"{name}_{k}"] for k in ("crow_indices", "col_indices", "values"))
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow.long().diff())
    assert crow[0] == 0 and crow.numel() == shape[0] + 1 and rows.numel() == values.numel()
    dense = torch.zeros(shape)
    dense[rows, col.long()] = values
    return dense


def test_mlp_with_flatten_stores_exactly_the_kept_weights_and_matches_the_masked_graph():
    torch.manual_seed(0)
    model = FlatMLP()
    x = torch.randn(5, 1, 8, 8)
    graph = chop.trace(model, (x[:2],))
    chop.run(graph, "magnitude, mask{sparsity=0.9, scope=local}")
    graph.eval()
    masked = graph(x)
    masks = masks_of(graph)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}

    chop.run(graph, "sparse{mode=all}")
    torch.testing.assert_close(graph(x), masked)
    torch.testing.assert_close(graph(x[:1]), masked[:1])  # batch 1 takes the matvec path
    state = graph.module.state_dict()
    assert set(state) == {f"fc{i}.{k}" for i in (1, 2) for k in
                          ("bias", "weight_values", "weight_col_indices", "weight_crow_indices")}
    info = graph.history[-1].info
    for name, shape in (("fc1.weight", (96, 64)), ("fc2.weight", (10, 96))):
        kept = int(masks[name].sum())
        assert kept == round(0.1 * masks[name].numel())
        assert state[f"{name}_values"].numel() == kept
        torch.testing.assert_close(csr_dense(graph, name, shape), weights[name] * masks[name])
        row = info["layers"][name]
        assert (row["decision"], row["params"]) == ("csr", [shape[0] * shape[1], kept])
        assert row["flops"] == [2 * shape[0] * shape[1], 2 * kept]
    assert info["total"]["params"][1] == sum(int(m.sum()) for m in masks.values())
    assert not any(n.op == "get_attr" and n.target.endswith(("weight", "_mask"))
                   for n in graph.module.graph.nodes)
    for name, value in model.named_parameters():  # the traced model is left alone
        assert torch.equal(value, weights[name])


def test_flops_are_per_example_as_shrink_counts_them():
    """A conv's FLOPs were counted for one output pixel and a sequence's linear for one token,
    so a conv model's total looked a fraction of what shrink reported for it."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 8 * 8, 10))
    graph = chop.run(chop.trace(cnn, (torch.randn(2, 3, 8, 8),)), "random, mask{sparsity=0.5}")
    shrunk = chop.run(graph.copy(), "shrink").history[-1].info["layers"]
    kept = {k: int(m.sum()) for k, m in current_masks(graph).items()}
    rows = chop.run(graph, "sparse{mode=all, kernel=torch-mm}").history[-1].info["layers"]
    assert rows["0.weight"]["flops"] == [2 * 432 * 64] * 2 == list(shrunk["0.weight"]["flops"])
    assert rows["3.weight"]["flops"] == [2 * 10240, 2 * kept["3.weight"]]
    tokens = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    graph = chop.run(chop.trace(tokens, (torch.randn(2, 5, 8),)), "random, mask{sparsity=0.5}")
    kept = {k: int(m.sum()) for k, m in current_masks(graph).items()}
    rows = chop.run(graph, "sparse{mode=all, kernel=torch-mm}").history[-1].info["layers"]
    assert rows["0.weight"]["flops"] == [2 * 96 * 5, 2 * kept["0.weight"] * 5]  # 5 tokens


def test_cnn_keeps_convs_dense_with_folded_masks_and_converts_the_head(cnn, cnn_graph, cnn_batches):
    chop.run(cnn_graph, "magnitude, mask{sparsity=0.8, scope=local}")
    cnn_graph.eval()
    x = cnn_batches[1][0]
    masked = cnn_graph(x)
    masks = masks_of(cnn_graph)
    chop.run(cnn_graph, "sparse{mode=all}", data=cnn_batches)  # data: the pass checks outputs too
    torch.testing.assert_close(cnn_graph(x), masked)
    layers = cnn_graph.history[-1].info["layers"]
    assert {k: v["decision"] for k, v in layers.items()} == {
        "conv1.weight": "dense", "conv2.weight": "dense", "fc.weight": "csr"}
    assert "conv" in layers["conv1.weight"]["reason"]
    assert not any(k.endswith("_mask") for k in cnn_graph.module.state_dict())  # folded
    assert not cnn_graph.parameter("conv2.weight")[~masks["conv2.weight"]].any()


@pytest.mark.parametrize("sparsity, decision", [(0.7, "csr"), (0.6, "dense")])
def test_auto_takes_a_layer_masked_at_min_sparsity_whatever_the_rounding(sparsity, decision):
    # 32 weights at 0.7 keep round(9.6) = 10: a sparsity of 0.6875, under 0.7 as a float
    model = nn.Sequential(nn.Linear(16, 2)).eval()
    x = torch.randn(3, 16)
    graph = chop.run(chop.trace(model, (x,)), f"magnitude, mask{{sparsity={sparsity}}}")
    masked = graph(x)
    chop.run(graph, "sparse{min_sparsity=0.7, min_numel=0}")
    row = graph.history[-1].info["layers"]["0.weight"]
    assert row["decision"] == decision, row["reason"]
    if decision == "csr":
        assert row["reason"] == ("sparsity 0.688: 10 of 32 kept, no more than a mask at "
                                 "min_sparsity 0.7 keeps")
    else:
        assert row["reason"] == "sparsity 0.594 < min_sparsity 0.7"
    torch.testing.assert_close(graph(x), masked)


def test_auto_keeps_low_sparsity_and_small_layers_dense(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.95, scope=local, include='layers\\.0'}, "
                    "mask{sparsity=0.3, scope=local, include='layers\\.1'}")
    graph.eval()
    x = mlp_batches[1][0]
    masked = graph(x)
    chop.run(graph, "sparse{min_sparsity=0.7, min_numel=0}")
    layers = graph.history[-1].info["layers"]
    assert layers["layers.0.weight"]["decision"] == "csr"
    assert layers["layers.1.weight"]["decision"] == "dense"
    assert "sparsity 0.300 < min_sparsity 0.7" in layers["layers.1.weight"]["reason"]
    assert layers["layers.1.weight"]["params"][1] == 32 * 32
    assert "layers.2.weight" not in layers  # never masked: untouched
    torch.testing.assert_close(graph(x), masked)

    small = chop.trace(mlp, (x,))
    chop.run(small, "magnitude, mask{sparsity=0.95}, sparse")  # default min_numel=65536
    rows = small.history[-1].info["layers"]
    assert all(r["decision"] == "dense" and "min_numel" in r["reason"] for r in rows.values())
    assert small.history[-1].info["total"]["csr"] == 0


def test_timing_reports_every_layer_and_the_totals(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.95, scope=local, include='layers\\.0'}, "
                    "mask{sparsity=0.3, scope=local, include='layers\\.1'}, "
                    "sparse{min_numel=0, timing=true, timing_batch=3}")
    info = graph.history[-1].info
    layers = info["layers"]
    assert [layers[k]["decision"] for k in ("layers.0.weight", "layers.1.weight")] == ["csr", "dense"]
    dense_row = layers["layers.1.weight"]["latency_us"]
    assert dense_row[0] == dense_row[1] > 0  # kept dense: the same layer before and after
    assert all(t > 0 for t in layers["layers.0.weight"]["latency_us"])
    assert info["total"]["latency_us"] == [sum(r["latency_us"][i] for r in layers.values())
                                           for i in (0, 1)]


def test_measure_mode_keeps_the_kernel_that_is_faster_by_far():
    """Decisions whose outcome is not in doubt on any machine: a 2048×2048 layer keeping 0.2%
    of its weights is many times faster as CSR at batch 1, a 4×8 layer keeping 75% is faster
    dense (a sparse call's fixed cost alone exceeds the dense multiply). One thread: on a loaded
    machine a multi-threaded kernel's barriers can stall for milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _measure_mode_decisions()
    finally:
        torch.set_num_threads(threads)


def _measure_mode_decisions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(4, 8)
    graph = chop.trace(model, (x,))
    chop.run(graph, "magnitude, mask{include='^2\\.', sparsity=0.998}, "
             "mask{include='^6\\.', sparsity=0.25}, sparse{mode=measure, timing=true}",
             data=[(x, torch.zeros(4, dtype=torch.long))])
    info = graph.history[-1].info
    assert len(info["model_latency_us"]) == 2 and min(info["model_latency_us"]) > 0
    rows = info["layers"]
    assert rows["2.weight"]["decision"] == "csr", rows["2.weight"]
    assert rows["6.weight"]["decision"] == "dense", rows["6.weight"]
    for row in rows.values():
        assert "measured at batch 1" in row["reason"]


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_transformers_match_the_masked_graph_and_reexport(which):
    import zoo

    torch.manual_seed(0)
    model = zoo.bert() if which == "bert" else zoo.gpt2()
    args, kwargs = zoo.tokens(4, 12)
    graph = chop.trace(model, args, kwargs=kwargs)
    chop.run(graph, "magnitude, mask{sparsity=0.9}")
    graph.eval()
    other = {"input_ids": torch.randint(0, 120, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    masked = graph(**other).logits
    masks = masks_of(graph)
    chop.run(graph, "sparse{mode=all}")
    torch.testing.assert_close(graph(**other).logits, masked)  # new batch and sequence length
    layers = graph.history[-1].info["layers"]
    assert set(layers) == set(masks) and all(r["decision"] == "csr" for r in layers.values())
    if which == "gpt2":  # Conv1D weights are (in, out): stored transposed, as (out, in) CSR
        assert {r["op"] for r in layers.values()} == {"addmm"}
        name = "transformer.h.0.attn.c_attn.weight"
        assert layers[name]["shape"] == (32, 96)
        crow = graph.module.state_dict()[f"{name}_crow_indices"]
        assert crow.numel() == 96 + 1 and int(crow[-1]) == int(masks[name].sum())
    nodes = [n for n in graph.module.graph.nodes if SPARSE in n.meta.get("chop", {})]
    assert len(nodes) == len(masks)
    stored = {name: mask for name, (_, mask) in csr_weights(graph).items()}  # what files show
    assert stored.keys() == masks.keys()
    assert all(torch.equal(stored[name], masks[name]) for name in masks)  # the parameter's layout
    if which == "gpt2":
        program = export_program(graph, other)  # the custom op has a fake kernel: re-exportable
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.export.load(buffer).module()(**other).logits, masked)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_tied_weight_stored_as_csr_leaves_no_dense_copy_under_its_other_name():
    x = torch.randn(4, 16)
    graph = chop.trace(Tied(), (x,))
    chop.run(graph, "magnitude, mask{sparsity=0.9, scope=local}")
    graph.eval()
    masked = graph(x)
    chop.run(graph, "sparse{mode=all}")
    torch.testing.assert_close(graph(x), masked)
    state = graph.module.state_dict()
    assert "a.weight_values" in state and not {"a.weight", "b.weight"} & state.keys()


def test_the_dense_kernel_computes_the_masked_graph_and_stores_only_the_kept_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 8)).eval()
    graph = chop.trace(model, (torch.randn(2, 24),))
    chop.run(graph, "magnitude, mask{sparsity=0.8, scope=local}")
    x = torch.randn(350, 24)  # many rows: what the dense kernel is for
    expected = graph(x)
    rows = chop.run(graph, "sparse{mode=all, kernel=torch-dense}").history[-1].info["layers"]
    assert [n.args[6] for n in csr_nodes(graph)] == [[4], [4]]
    assert {r["kernels"]["plan"] for r in rows.values()} == {"torch-dense"}
    assert sorted(k for k, _ in graph.module.named_parameters()) == ["0.bias", "2.bias"]
    assert sum(b.numel() for k, b in graph.module.named_buffers() if k.endswith("_values")) == (
        sum(r["params"][1] for r in rows.values()))
    torch.testing.assert_close(graph(x), expected)


def test_state_dict_round_trip_into_a_fresh_sparse_graph(mlp_batches):
    x = mlp_batches[0][0]

    def sparse_graph(seed: int) -> chop.Graph:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 4))
        graph = chop.trace(model, (x,))
        # one kernel for both: plans measured under load could differ, and so would the sums
        chop.run(graph, "magnitude, mask{sparsity=0.8, scope=local}, "
                 "sparse{mode=all, kernel=torch-mm}")
        return graph.eval()

    a, b = sparse_graph(0), sparse_graph(1)
    assert not torch.allclose(a(x), b(x))
    buffer = io.BytesIO()
    torch.save(a.module.state_dict(), buffer)
    buffer.seek(0)
    b.module.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_bad_inputs_are_clear_errors(cnn_graph, monkeypatch):
    with pytest.raises(chop.MissingMetadataError, match="pass 'sparse' needs 'mask'.*Run one of mask"):
        chop.run(cnn_graph, "sparse")
    with pytest.raises(chop.OptionError, match="min_sparsity=1.5 is out of range"):
        Sparse(min_sparsity=1.5)
    with pytest.raises(chop.OptionError, match="mode='fast' is not valid"):
        chop.run(cnn_graph, "magnitude, mask, sparse{mode=fast}")
    with pytest.raises(chop.OptionError, match="timing_batch=0"):
        Sparse(timing_batch=0)
    with pytest.raises(chop.OptionError, match="kernel='mkl' is not valid; expected one of 'measure'"):
        Sparse(kernel="mkl")
    with pytest.raises(chop.PassError, match="no mask nodes: an earlier pass .* run sparse before"):
        chop.run(cnn_graph, "magnitude, mask, fold-bn, sparse")  # fold-bn folded the masks
    with pytest.raises(chop.PassError, match=r"holds 1 layer\(s\) an earlier sparse stored as "
                                             r"CSR and no masks left to store: run sparse once"):
        chop.run(cnn_graph.copy(), "magnitude, mask, sparse{mode=all}, sparse")
    monkeypatch.setattr(sparse_ops, "have_scipy", lambda: False)
    with pytest.raises(chop.PassError, match=r"pass 'sparse'.*kernel=scipy.*needs scipy.*chop\[sparse\]"):
        chop.run(cnn_graph, "magnitude, mask, sparse{kernel=scipy}")


def test_without_scipy_the_measured_plan_uses_torch_kernels_only(mlp, mlp_batches, monkeypatch):
    monkeypatch.setattr(sparse_ops, "have_scipy", lambda: False)
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.9}, sparse{mode=all}")
    for row in graph.history[-1].info["layers"].values():
        assert "scipy" not in row["kernels"]["plan"]
        assert all(set(times) <= {"torch-linear", "torch-mm", "torch-mv", "torch-dense"}
                   for times in row["kernels"]["us"].values())


def csr_nodes(graph: chop.Graph) -> list:
    return [n for n in graph.module.graph.nodes if n.target is torch.ops.chop.csr_linear.default]


def test_each_layer_stores_its_measured_plan_in_the_op_and_the_info(mlp, mlp_batches, monkeypatch):
    """The plan plan_kernels returns for a layer is what its csr_linear node carries, and the
    graph equals the masked graph at row counts on both sides of every switch."""
    plans = iter([([0, 1], [3]), ([2, 1, 0], [2, 5])])
    seen = []

    def plan_kernels(values, col, crow, shape):
        seen.append(shape)
        return (*next(plans), {1: {"torch-mm": 1e-6}})

    monkeypatch.setattr("chop.passes.export.sparse.plan_kernels", plan_kernels)
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.8, include='layers\\.[01]'}")
    graph.eval()
    x = torch.randn(9, 16)
    masked = [graph(x[:n]) for n in range(1, 10)]
    chop.run(graph, "sparse{mode=all}")
    assert seen == [(32, 16), (32, 32)]
    nodes = csr_nodes(graph)
    assert [n.args[6:8] for n in nodes] == [([0, 1], [3]), ([2, 1, 0], [2, 5])]
    assert [n.meta["chop"][SPARSE]["plan"] for n in nodes] == [
        "torch-linear below 3 rows, torch-mm from 3", "scipy below 2 rows, torch-mm from 2, torch-linear from 5"]
    layers = graph.history[-1].info["layers"]
    assert layers["layers.0.weight"]["kernels"] == {
        "plan": "torch-linear below 3 rows, torch-mm from 3", "us": {1: {"torch-mm": 1.0}}}
    for n in range(1, 10):
        torch.testing.assert_close(graph(x[:n]), masked[n - 1])


def layers_of_three_kinds() -> tuple[chop.Graph, torch.Tensor, torch.Tensor]:
    """A masked graph whose layers 0, 2 and 4 (32x32, 211, 207 and 196 entries kept: within 10%
    of 0's) are of one kind, 6 (32x32, 50 kept) and 8 (16x32) of their own; an input and the
    masked graph's output on it."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), nn.ReLU())],
                          nn.Linear(32, 16))
    graph = chop.trace(model.eval(), (torch.randn(2, 32),))
    x = torch.randn(5, 32)
    chop.run(graph, "magnitude, mask{sparsity=0.8, include='^[024][.]'}, "
                    "mask{sparsity=0.95, include='^[68][.]'}")
    return graph, x, graph.eval()(x)


def test_layers_of_one_shape_and_about_one_density_share_a_measured_plan(monkeypatch):
    """A transformer's blocks hold layers of a few kinds: each kind is measured once."""
    measured = []

    def plan_kernels(values, col, crow, shape):
        measured.append(values.numel())
        return [len(measured) % 2], [], {1: {"torch-mm": 1e-6}}

    monkeypatch.setattr("chop.passes.export.sparse.plan_kernels", plan_kernels)
    graph, x, expected = layers_of_three_kinds()
    chop.run(graph, "sparse{mode=all}")
    layers = graph.history[-1].info["layers"]
    kept = {k: round((1 - r["sparsity"]) * r["params"][0]) for k, r in layers.items()}
    # 0, 2 and 4 (211, 207 and 196 of 1,024 entries: within 10% of 0's) share the plan
    # measured on 0; 6 (50 entries) and 8 (of another shape) have their own
    assert [kept[k] for k in ("0.weight", "2.weight", "4.weight", "6.weight")] == [
        211, 207, 196, 50]
    assert measured == [kept["0.weight"], kept["6.weight"], kept["8.weight"]]
    assert [layers[k]["kernels"].get("shared_with") for k in kept] == [
        None, "0.weight", "0.weight", None, None]
    assert [layers[k]["kernels"]["plan"] for k in kept] == [
        "torch-mm", "torch-mm", "torch-mm", "torch-linear", "torch-mm"]
    assert [n.args[6] for n in csr_nodes(graph)] == [[1], [1], [1], [0], [1]]  # what they run
    torch.testing.assert_close(graph(x), expected)


@pytest.mark.parametrize("timing", [False, True])
def test_mode_measure_decides_a_kind_of_layer_once_unless_every_layer_is_timed(timing,
                                                                               monkeypatch):
    """Layers alike get the verdict measured on the first of them, not each its own noise."""
    timed = []

    def time_layer(weight, csr, plan, batch):  # the first layer timed is faster dense
        timed.append(csr[0].numel())
        return (1e-6, 2e-6) if len(timed) == 1 else (2e-6, 1e-6)

    monkeypatch.setattr("chop.passes.export.sparse.plan_kernels",
                        lambda *a: ([1], [], {1: {"torch-mm": 1e-6}}))
    monkeypatch.setattr("chop.passes.export.sparse._time_layer", time_layer)
    graph, x, expected = layers_of_three_kinds()
    chop.run(graph, f"sparse{{mode=measure, timing={str(timing).lower()}}}")
    layers = graph.history[-1].info["layers"]
    names = ["0.weight", "2.weight", "4.weight", "6.weight", "8.weight"]
    if timing:  # each layer timed, and decided, on its own
        assert len(timed) == 5 and "measured_on" not in str(layers)
        assert [layers[k]["decision"] for k in names] == ["dense"] + ["csr"] * 4
    else:  # 2 and 4 are of 0's kind; 6 and 8 kinds of their own
        assert timed == [211, 50, layers["8.weight"]["params"][1]]
        assert [layers[k].get("measured_on") for k in names] == [
            None, "0.weight", "0.weight", None, None]
        assert [layers[k]["decision"] for k in names] == ["dense"] * 3 + ["csr"] * 2
        assert "measured at batch 1 on 0.weight: csr 2.0 µs vs dense 1.0 µs" in (
            layers["2.weight"]["reason"])
        assert layers["2.weight"]["latency_us"] == layers["0.weight"]["latency_us"]
    assert len(csr_nodes(graph)) == (4 if timing else 2)
    torch.testing.assert_close(graph(x), expected)


class Branches(nn.Module):
    """Sparse results read by activations then a sparse layer (a, b), a view (c), a residual
    add (d), and the graph's output (e)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(32, 32) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(torch.tanh(self.a(x))))
        h = self.c(torch.nn.functional.gelu(h, approximate="tanh"))
        h = h.view(*x.shape[:-1], 4, 8).flatten(-2)
        return self.e(self.d(h) + h)


class Strides(torch.fx.Interpreter):
    """Runs a graph and checks every tensor's real strides against its node's fake value."""

    def run_node(self, n):
        result = super().run_node(n)
        val = n.meta.get("val")
        if isinstance(result, torch.Tensor) and isinstance(val, torch.Tensor) and result.numel():
            sizes = [int(s) for s in result.shape]
            strides = [s.node.hint if isinstance(s, torch.SymInt) else s for s in val.stride()]
            assert list(result.stride()) == strides or 1 in sizes, n.name
        return result


def test_results_read_only_by_sparse_layers_are_returned_transposed_with_matching_strides():
    torch.manual_seed(0)
    model = Branches().eval()
    graph = chop.trace(model, (torch.randn(4, 32),))
    chop.run(graph, "magnitude, mask{sparsity=0.9, scope=local}")
    graph.eval()
    inputs = [torch.randn(n, 32) for n in (1, 4, 9)]
    masked = [graph(x) for x in inputs]
    chop.run(graph, "sparse{mode=all, kernel=torch-mm}")
    nodes = csr_nodes(graph)
    assert [n.meta["chop"][SPARSE]["weight"] for n in nodes] == [f"{k}.weight" for k in "abcde"]
    assert [n.args[8] for n in nodes] == [True, True, False, False, False]
    for x, expected in zip(inputs, masked):
        y = graph(x)
        torch.testing.assert_close(y, expected)
        assert y.is_contiguous()
    with torch.no_grad():  # at the traced batch size: the hints of the symbolic strides
        Strides(graph.module).run(torch.randn(4, 32))


class Gated(nn.Module):
    """A gated MLP (Llama's: silu(gate) * up, then down, here also with numbers and a power),
    and a layer scaled by a broadcast vector (its result must stay row-major: the vector is
    not)."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.other = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(32, 64)
        self.down, self.out = nn.Linear(64, 32), nn.Linear(64, 32)
        self.scale = nn.Parameter(torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.gate(x)) * self.up(x) * 0.5
        h = h + 0.1 * torch.pow(h, 3)  # the shape of GPT-2's tanh GELU
        return self.down(h) + self.out(self.other(x) * self.scale)


def test_gated_products_of_sparse_results_stay_transposed_and_broadcasts_do_not():
    torch.manual_seed(0)
    graph = chop.trace(Gated().eval(), (torch.randn(4, 32),))
    chop.run(graph, "magnitude, mask{sparsity=0.9, scope=local}")
    graph.eval()
    inputs = [torch.randn(n, 32) for n in (1, 4, 7)]
    masked = [graph(x) for x in inputs]
    chop.run(graph, "sparse{mode=all, kernel=torch-mm}")
    flags = {n.meta["chop"][SPARSE]["weight"]: n.args[8] for n in csr_nodes(graph)}
    assert flags == {"gate.weight": True, "up.weight": True, "other.weight": False,
                     "down.weight": False, "out.weight": False}
    for x, expected in zip(inputs, masked):
        torch.testing.assert_close(graph(x), expected)
    with torch.no_grad():
        Strides(graph.module).run(torch.randn(4, 32))


def test_a_named_kernel_is_used_for_every_batch_without_timing(mlp, mlp_batches, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a named kernel must not be measured")

    monkeypatch.setattr("chop.passes.export.sparse.plan_kernels", never)
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.9}, sparse{mode=all, kernel=torch-linear}")
    assert [n.args[6:8] for n in csr_nodes(graph)] == [([0], [])] * 3
    assert {r["kernels"]["plan"] for r in graph.history[-1].info["layers"].values()} == {"torch-linear"}


def test_the_pt2_keeps_the_plans_and_loads_in_a_fresh_process(mlp, mlp_batches, tmp_path):
    import subprocess
    import sys

    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.9}, sparse{mode=all}")
    graph.eval()
    x = mlp_batches[1][0]
    plans = [n.args[6:] for n in csr_nodes(graph)]  # plans and layouts
    torch.export.save(export_program(graph, x), tmp_path / "model.pt2")
    torch.save({"x": x, "y": graph(x).detach(), "x1": x[:1], "y1": graph(x[:1]).detach()},
               tmp_path / "io.pt")
    code = f"""
import torch, chop
program = torch.export.load({str(tmp_path / "model.pt2")!r})
io = torch.load({str(tmp_path / "io.pt")!r})
module = program.module()
for x, y in ((io["x"], io["y"]), (io["x1"], io["y1"])):
    torch.testing.assert_close(module(x), y, rtol=0, atol=0)
nodes = [n for n in program.graph.nodes if n.target is torch.ops.chop.csr_linear.default]
print([[*map(list, n.args[6:8]), n.args[8] if len(n.args) > 8 else False] for n in nodes])
again = torch.export.export(module, (io["x"],), dynamic_shapes=({{0: torch.export.Dim.AUTO}},))
torch.testing.assert_close(again.module()(io["x"]), io["y"], rtol=0, atol=0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([[*map(list, p[:2]), p[2]] for p in plans])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured needs a CUDA GPU")
def test_two_four_masks_use_semi_structured_weights_on_cuda():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 semi-structured sparsity needs compute capability >= 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda()
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    graph = chop.trace(model, (x,))
    for node in graph.weight_nodes():
        weight = graph.parameter(node)
        if weight.dim() == 2:  # keep the 2 largest of every 4 along the input dim
            top = weight.detach().abs().reshape(weight.shape[0], -1, 4).topk(2, -1).indices
            mask = torch.zeros(weight.shape[0], weight.shape[1] // 4, 4, dtype=torch.bool,
                               device="cuda").scatter_(-1, top, True)
            insert_mask(graph, node, mask.reshape(weight.shape))
    graph.recompile()
    graph.eval()
    with torch.no_grad():
        masked = graph(x)
        chop.run(graph, "sparse{mode=all}")
        layers = graph.history[-1].info["layers"]
        assert {r["decision"] for r in layers.values()} == {"semi-structured"}, layers
        torch.testing.assert_close(graph(x), masked, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenet", "inception", "mlp", "opaque"])
def test_zoo_sparse_matches_the_masked_graph(name):
    import zoo

    _, graph = zoo.trace(name)
    chop.run(graph, "magnitude, mask{sparsity=0.9}")
    args, kwargs = zoo.ZOO[name].inputs(5)
    masked = zoo.output(graph(*args, **kwargs))
    chop.run(graph, "sparse{mode=all}")
    torch.testing.assert_close(zoo.output(graph(*args, **kwargs)), masked)
    layers = graph.history[-1].info["layers"]
    assert all((r["decision"] == "csr") == (r["op"] in ("linear", "addmm")) for r in layers.values())
    assert not any(k.endswith("_mask") for k in graph.module.state_dict())


def test_masked_biases_stay_dense_and_say_why():
    """Their reason read "used by csr_linear.default, which has no sparse kernel"."""
    graph = chop.trace(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                       (torch.randn(3, 8),))
    chop.run(graph, "magnitude, mask{sparsity=0.5, biases=true}, sparse{mode=all}")
    layers = graph.history[-1].info["layers"]
    assert {name: row["decision"] for name, row in layers.items()} == {
        "0.weight": "csr", "0.bias": "dense", "2.weight": "csr", "2.bias": "dense"}
    assert layers["0.bias"]["reason"] == "a bias of linear: one dim, kept dense with its mask folded"
