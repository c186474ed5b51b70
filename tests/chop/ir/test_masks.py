"""chop.ir.masks: mask nodes (insert, update, restore after fold), new attribute names, the
parameter behind an argument, and which weights are prunable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chop
from chop.ir import masks, meta
from chop.passes.export.fold import fold_masks


def random_mask(shape, seed: int, keep: float = 0.5) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep


def mlp_reference(mlp, x: torch.Tensor, applied: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MLP's forward with some weights multiplied by their masks, written out by hand."""
    for i, layer in enumerate(mlp.layers):
        weight = layer.weight * applied.get(f"layers.{i}.weight", 1)
        x = F.linear(x, weight, layer.bias)
        if i < len(mlp.layers) - 1:
            x = torch.relu(x)
    return x


@pytest.fixture
def mlp_graph(mlp, mlp_batches) -> chop.Graph:
    return chop.trace(mlp, (mlp_batches[0][0],))


def test_insert_mask_reroutes_the_users_and_records_the_mask(mlp, mlp_graph, mlp_batches):
    x = mlp_batches[0][0]
    node = mlp_graph.weight_node("layers.1.weight")
    mask = random_mask((32, 32), 0)
    assert not masks.is_masked(mlp_graph)
    masks.insert_mask(mlp_graph, node, mask.float())  # any dtype: stored as bool
    mlp_graph.recompile()
    mlp_graph.lint()
    (mul,) = masks.mask_nodes(mlp_graph)
    assert masks.is_masked(mlp_graph)
    assert masks.mask_of(mul) == "layers.1.weight"
    assert list(node.users) == [mul]  # every other user now reads the mul
    assert meta.entries(node)["mask"].dtype == torch.bool
    assert torch.equal(meta.entries(node)["mask"], mask)
    buffer = mlp_graph.module.get_buffer("layers.1.weight_mask")
    assert buffer.dtype == torch.bool and torch.equal(buffer, mask)
    assert "layers.1.weight_mask" in mlp_graph.module.state_dict()
    torch.testing.assert_close(mlp_graph(x), mlp_reference(mlp, x, {"layers.1.weight": mask}))


def test_insert_mask_twice_updates_the_one_buffer(mlp, mlp_graph, mlp_batches):
    x = mlp_batches[1][0]
    node = mlp_graph.weight_node("layers.0.weight")
    first, second = random_mask((32, 16), 1), random_mask((32, 16), 2)
    masks.insert_mask(mlp_graph, node, first)
    masks.insert_mask(mlp_graph, node, second)
    mlp_graph.recompile()
    assert len(list(masks.mask_nodes(mlp_graph))) == 1
    buffers = [k for k in mlp_graph.module.state_dict() if "mask" in k]
    assert buffers == ["layers.0.weight_mask"]
    assert torch.equal(mlp_graph.module.get_buffer("layers.0.weight_mask"), second)
    assert torch.equal(meta.entries(node)["mask"], second)
    torch.testing.assert_close(mlp_graph(x), mlp_reference(mlp, x, {"layers.0.weight": second}))


def test_insert_masks_updates_some_and_adds_others_in_one_call(mlp, mlp_graph, mlp_batches):
    x = mlp_batches[1][0]
    names = ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    nodes = [mlp_graph.weight_node(n) for n in names]
    first = {n: random_mask(mlp_graph.parameter(n).shape, 10 + i) for i, n in enumerate(names)}
    second = {n: random_mask(mlp_graph.parameter(n).shape, 20 + i) for i, n in enumerate(names)}
    assert masks.insert_masks(mlp_graph, nodes[:2], [first[n] for n in names[:2]])
    mlp_graph.recompile()
    # two are masked already (their buffers take the new masks), the third gets its node
    assert masks.insert_masks(mlp_graph, nodes, [second[n].float() for n in names])
    mlp_graph.recompile()
    assert not masks.insert_masks(mlp_graph, nodes, [second[n] for n in names])  # all updated
    mlp_graph.lint()
    assert len(list(masks.mask_nodes(mlp_graph))) == 3
    for n, node in zip(names, nodes):
        assert torch.equal(mlp_graph.module.get_buffer(f"{n}_mask"), second[n])
        assert meta.entries(node)["mask"].dtype == torch.bool
        assert torch.equal(meta.entries(node)["mask"], second[n])
    torch.testing.assert_close(mlp_graph(x), mlp_reference(mlp, x, second))


def test_insert_masks_writes_the_buffer_the_module_holds_now(mlp, mlp_graph, mlp_batches):
    """An update goes to the mask buffer the submodule holds at the time of the call, also
    after the buffer was replaced (``module.to()`` replaces buffers) once a call had found it."""
    x = mlp_batches[0][0]
    node = mlp_graph.weight_node("layers.1.weight")
    masks.insert_mask(mlp_graph, node, random_mask((32, 32), 5))
    mlp_graph.recompile()
    masks.insert_mask(mlp_graph, node, random_mask((32, 32), 6))  # found and remembered
    layer = mlp_graph.module.get_submodule("layers.1")
    layer._buffers["weight_mask"] = layer.weight_mask.clone()  # as .to(device) would
    mask = random_mask((32, 32), 7)
    masks.insert_mask(mlp_graph, node, mask)
    assert torch.equal(mlp_graph.module.get_buffer("layers.1.weight_mask"), mask)
    torch.testing.assert_close(mlp_graph(x), mlp_reference(mlp, x, {"layers.1.weight": mask}))


def test_restore_masks_after_fold_computes_with_the_masks_again(mlp, mlp_graph, mlp_batches):
    x = mlp_batches[2][0]
    chosen = {"layers.0.weight": random_mask((32, 16), 3), "layers.2.weight": random_mask((4, 32), 4)}
    for name, mask in chosen.items():
        masks.insert_mask(mlp_graph, mlp_graph.weight_node(name), mask)
    mlp_graph.recompile()
    assert sorted(fold_masks(mlp_graph)) == sorted(chosen)
    assert not masks.is_masked(mlp_graph)
    assert masks.current_masks(mlp_graph).keys() == chosen.keys()  # the metadata survives fold

    masks.restore_masks(mlp_graph)
    mlp_graph.lint()
    assert sorted(masks.mask_of(n) for n in masks.mask_nodes(mlp_graph)) == sorted(chosen)
    for name, mask in chosen.items():
        assert torch.equal(mlp_graph.module.get_buffer(f"{name}_mask"), mask)
    # the folded weights are zero where masked anyway; new weights show the masks really apply
    with torch.no_grad():
        for name in chosen:
            mlp_graph.parameter(name).fill_(0.5)
    expected = copy.deepcopy(mlp)
    with torch.no_grad():
        for name in chosen:
            expected.get_parameter(name).fill_(0.5)
    torch.testing.assert_close(mlp_graph(x), mlp_reference(expected, x, chosen))

    masks.restore_masks(mlp_graph)  # nothing left to restore: no second mask node
    assert len(list(masks.mask_nodes(mlp_graph))) == len(chosen)


def test_fresh_attribute_appends_underscores_until_the_name_is_new():
    owner = nn.Linear(2, 2)
    assert masks.fresh_attribute(owner, "weight_mask") == "weight_mask"
    owner.register_buffer("weight_mask", torch.ones(2, 2))
    assert masks.fresh_attribute(owner, "weight_mask") == "weight_mask_"
    owner.register_buffer("weight_mask_", torch.ones(2, 2))
    assert masks.fresh_attribute(owner, "weight_mask") == "weight_mask__"
    assert masks.fresh_attribute(owner, "weight") == "weight_"  # parameters count too


def test_add_tensor_names_buffers_and_parameters_beside_a_weight(mlp_graph):
    module = mlp_graph.module
    first = masks.add_tensor(mlp_graph, "layers.1.weight", "extra", torch.ones(3))
    second = masks.add_tensor(mlp_graph, "layers.1.weight", "extra", torch.zeros(3))
    assert (first, second) == ("layers.1.extra", "layers.1.extra_")
    assert torch.equal(module.get_buffer(first), torch.ones(3))
    assert torch.equal(module.get_buffer(second), torch.zeros(3))
    hidden = masks.add_tensor(mlp_graph, "layers.1.weight", "scratch", torch.ones(2),
                              persistent=False)
    state = module.state_dict()
    assert first in state and second in state and hidden not in state
    name = masks.add_tensor(mlp_graph, "layers.2.weight", "scale", torch.ones(4), parameter=True)
    assert name == "layers.2.scale"
    assert isinstance(module.get_parameter(name), nn.Parameter)
    top = masks.add_tensor(mlp_graph, "toplevel", "toplevel", torch.ones(1))
    assert top == "toplevel" and torch.equal(module.get_buffer("toplevel"), torch.ones(1))


def test_weight_name_sees_through_mask_nodes_only(cnn_graph):
    node = cnn_graph.weight_node("fc.weight")
    assert masks.weight_name(cnn_graph, node) == "fc.weight"
    masks.insert_mask(cnn_graph, node, torch.ones_like(cnn_graph.parameter(node), dtype=torch.bool))
    cnn_graph.recompile()
    (mul,) = masks.mask_nodes(cnn_graph)
    assert masks.weight_name(cnn_graph, mul) == "fc.weight"
    linear = next(iter(mul.users))
    assert masks.weight_name(cnn_graph, linear.args[1]) == "fc.weight"
    assert masks.weight_name(cnn_graph, linear.args[0]) is None  # an activation
    buffers = [n for n in cnn_graph.module.graph.nodes
               if n.op == "get_attr" and str(n.target).endswith("running_mean")]
    assert buffers and masks.weight_name(cnn_graph, buffers[0]) is None
    mask_attr = mul.args[1]
    assert masks.weight_name(cnn_graph, mask_attr) is None  # the mask buffer is no weight
    assert masks.weight_name(cnn_graph, "fc.weight") is None  # not a node
    assert masks.mask_of("fc.weight") is None and masks.mask_of(linear) is None


def test_select_weights_roles_and_regexes(cnn_graph):
    def names(**kwargs):
        return [n.target for n in masks.select_weights(cnn_graph, **kwargs)]

    assert names() == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert names(biases=True) == ["conv1.weight", "conv1.bias", "bn1.bias", "conv2.weight",
                                  "conv2.bias", "bn2.bias", "fc.weight", "fc.bias"]
    assert names(norms=True) == ["conv1.weight", "bn1.weight", "conv2.weight", "bn2.weight",
                                 "fc.weight"]
    assert names(include=r"^conv") == ["conv1.weight", "conv2.weight"]
    assert names(exclude=r"conv1") == ["conv2.weight", "fc.weight"]
    assert names(include="conv", exclude="2") == ["conv1.weight"]
    assert names(include="weight$", biases=True, exclude="^fc") == ["conv1.weight", "conv2.weight"]


def test_select_weights_embeddings_only_on_request():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.embed(ids))

    graph = chop.trace(Tagger(), (torch.randint(0, 20, (2, 5)),))
    assert [n.target for n in masks.select_weights(graph)] == ["head.weight"]
    assert [n.target for n in masks.select_weights(graph, embeddings=True)] == [
        "embed.weight", "head.weight"]


def test_current_masks_lists_every_recorded_mask(mlp_graph):
    assert masks.current_masks(mlp_graph) == {}
    chosen = {"layers.0.weight": random_mask((32, 16), 5), "layers.2.weight": random_mask((4, 32), 6)}
    for name, mask in chosen.items():
        masks.insert_mask(mlp_graph, mlp_graph.weight_node(name), mask)
    mlp_graph.recompile()
    found = masks.current_masks(mlp_graph)
    assert list(found) == list(chosen)
    assert all(torch.equal(found[k], chosen[k]) and found[k].dtype == torch.bool for k in chosen)


def test_select_weights_follows_an_edit_of_the_graph(cnn_graph):
    # remembered while the graph's structure holds, looked up again after an edit
    assert [n.target for n in masks.select_weights(cnn_graph, norms=True)] == [
        "conv1.weight", "bn1.weight", "conv2.weight", "bn2.weight", "fc.weight"]
    cnn_graph.eval()
    chop.run(cnn_graph, "fold-bn")  # removes the BatchNorm weights from the graph
    assert [n.target for n in masks.select_weights(cnn_graph, norms=True)] == [
        "conv1.weight", "conv2.weight", "fc.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_factor_multiplies_exactly_as_the_bool_mask(dtype):
    x = torch.tensor([1.5, -2.0, float("nan"), float("inf"), -0.0, 3.0], dtype=dtype)
    mask = torch.tensor([True, False, False, True, True, False])
    by_factor, by_mask = x * masks.factor(mask), x * mask
    assert by_factor.dtype == by_mask.dtype == dtype
    assert torch.equal(by_factor.isnan(), by_mask.isnan())
    assert torch.equal(by_factor.nan_to_num().view(-1), by_mask.nan_to_num().view(-1))
    assert torch.equal(torch.signbit(by_factor), torch.signbit(by_mask))  # -0.0 where -2·0
    inplace = x.clone().mul_(masks.factor(mask))
    assert torch.equal(inplace.nan_to_num(), by_mask.nan_to_num())
    assert masks.factor(mask).data_ptr() == mask.data_ptr()  # a view, no copy


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns: equal bits, equal values (NaN and -0.0 included)."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_multiply_masks_gives_the_bits_of_mul_by_the_bool_mask(dtype):
    """Sizes around the chunk (one over, several chunks plus a tail), a small tensor, a
    transposed one and a mask given as its uint8 factor: each as ``mul_`` by the bool mask."""
    gen = torch.Generator().manual_seed(0)
    chunk = masks._CHUNK
    shapes = [(chunk + 1,), (3, chunk // 2 + 7), (5, 7), (4, 1000)]
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    tensors.append(torch.randn(600, 700, generator=gen).to(dtype).t())  # not contiguous
    tensors[0][:5] = torch.tensor([float("nan"), -2.0, float("inf"), -0.0, 1.0])
    kept = [torch.rand(t.shape, generator=gen) > 0.5 for t in tensors]
    kept[0][:5] = torch.tensor([False, False, True, True, False])
    expected = [t.clone().mul_(m) for t, m in zip(tensors, kept)]
    given = [m if i % 2 else masks.factor(m) for i, m in enumerate(kept)]

    into = [torch.full_like(t, 7.0) for t in tensors]
    masks.multiply_masks_(tensors, given, into)
    for got, want in zip(into, expected):
        assert torch.equal(_bits(got), _bits(want))
    copies = [t.clone() for t in tensors]
    masks.multiply_masks_(copies, given)
    for got, want in zip(copies, expected):
        assert torch.equal(_bits(got), _bits(want))
    for t, m, want in zip(tensors, kept, expected):
        got = masks.masked(t, m)
        assert torch.equal(_bits(got), _bits(want)) and got.stride() == want.stride()
    masks.multiply_masks_([], [])  # nothing to do
    with pytest.raises(ValueError):
        masks.multiply_masks_(tensors, kept[:1])


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got.dtype == want.dtype and got.stride() == want.stride()
            and torch.equal(_bits(got), _bits(want)))


# sizes for mask_product's ways: tiny, over a multi-tensor chunk, over _PIECES_FROM (in pieces),
# a conv kernel channels-last, a transposed large weight (not contiguous: by the factor)
_PRODUCT_CASES = [
    ((5, 7), torch.contiguous_format, False),
    ((600, 700), torch.contiguous_format, False),
    ((2048, 1025), torch.contiguous_format, True),
    ((64, 32, 3, 3), torch.channels_last, False),
    ((1025, 2048), "transposed", False),
]


@pytest.mark.parametrize("shape, layout, pieces", _PRODUCT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_product_gives_the_bits_layout_and_gradients_of_aten_mul(shape, layout, pieces,
                                                                      dtype):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=gen).to(dtype)
    weight.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -2.0, 1.0])
    weight = (weight.t().contiguous().t() if layout == "transposed"
              else weight.contiguous(memory_format=layout))
    mask = torch.rand(shape, generator=gen) > 0.5
    mask.view(-1)[:4] = torch.tensor([False, False, False, True])
    weight.requires_grad_(True)
    want, got = torch.ops.aten.mul.Tensor(weight, mask), masks.mask_product(weight, mask)
    assert _same(got, want)
    assert (type(got.grad_fn).__name__ == "_MaskProductBackward") == pieces
    upstream = torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)
    (want_grad,) = torch.autograd.grad(want, weight, upstream, create_graph=True)
    (got_grad,) = torch.autograd.grad(got, weight, upstream, create_graph=True)
    assert _same(got_grad, want_grad)
    # create_graph: the gradient is itself differentiable (by the upstream: the mask again)
    (want_second,) = torch.autograd.grad(want_grad.float().sum(), upstream)
    (got_second,) = torch.autograd.grad(got_grad.float().sum(), upstream)
    assert _same(got_second, want_second)
    with torch.no_grad():
        assert _same(masks.mask_product(weight, mask), torch.ops.aten.mul.Tensor(weight, mask))
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD: the tangent times the mask
        dual = torch.autograd.forward_ad.make_dual(weight.detach(), upstream.detach())
        got, want = (torch.autograd.forward_ad.unpack_dual(product(dual, mask)).tangent
                     for product in (masks.mask_product, torch.ops.aten.mul.Tensor))
        assert _same(got, want)


def test_mask_product_under_vmap_and_fake_tensors_is_aten_mul():
    """Under torch.func's transforms a large weight takes the factor (an autograd.Function
    without a vmap rule would fail there); under fake tensors (torch.export) aten's ``mul``."""
    gen = torch.Generator().manual_seed(4)
    weights = torch.randn(2, 2048, 1025, generator=gen)
    mask = torch.rand(2048, 1025, generator=gen) > 0.5
    got = torch.func.vmap(masks.mask_product, in_dims=(0, None))(weights, mask)
    assert torch.equal(got, weights * mask)
    grad = torch.func.grad(lambda w: masks.mask_product(w, mask).square().sum())(weights[0])
    assert torch.equal(grad, 2 * weights[0] * mask * mask)
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    fake_weight, fake_mask = mode.from_tensor(weights[0]), mode.from_tensor(mask)
    with mode:
        fake = masks.mask_product(fake_weight, fake_mask)
    assert fake.shape == (2048, 1025) and fake.dtype == torch.float32


def test_a_masked_graph_runs_mask_product_and_keeps_its_mul_nodes():
    """The generated code (plain, lean, a copy's) calls mask_product; the fx graph keeps its
    aten ``mul`` nodes, so a re-export holds aten ops only; a training step computes the bits
    the same graph computes with aten's ``mul`` in its code."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1025, 2048), nn.ReLU(), nn.Linear(2048, 10))
    x, y = torch.randn(4, 1025), torch.tensor([1, 2, 3, 4])
    graph = chop.run(chop.trace(model, (x,)), "random{seed=1}, mask{sparsity=0.5}")
    nodes = list(masks.mask_nodes(graph))
    assert len(nodes) == 2 and all(n.target is torch.ops.aten.mul.Tensor for n in nodes)
    assert graph.module.code.count("mask_product(") == 2
    assert graph.copy().module.code.count("mask_product(") == 2
    with graph.mode(batch_norm=False, dropout=False, lean=True):
        assert graph.module.code.count("mask_product(") == 2
    reference = graph.copy()
    plain = torch.fx.graph._PyTreeCodeGen.__new__(torch.fx.graph._PyTreeCodeGen)
    plain.__dict__.update(reference.module.graph._codegen.__dict__)
    reference.module.graph.set_codegen(plain)
    reference.recompile()
    assert "mask_product" not in reference.module.code

    def step(g: chop.Graph) -> list[torch.Tensor]:
        F.cross_entropy(g.module(x), y).backward()
        return [p.grad for p in g.module.parameters()]

    for got, want in zip(step(graph), step(reference), strict=True):
        assert torch.equal(_bits(got), _bits(want))
    program = torch.export.export(graph.module, (x,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.mul.Tensor in targets and masks.mask_product not in targets
