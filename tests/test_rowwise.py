"""The row operators that trade a stored tensor for a recomputation compute exactly what the
plain torch expressions compute, and keep no more than they promise for backward."""

import copy

import pytest

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)
import torch
from timm.layers import activations as timm_act
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from spark_sparse import SparseEncoder, random_active
from spark_sparse.precision import autocast, compute_dtype
from spark_sparse.sparse.depthwise import DepthwiseConvolution
from spark_sparse.sparse.group_norm import SparseGroupNormAct
from spark_sparse.sparse.grouped_conv import GroupedConvolution
from spark_sparse.sparse import norm_act
from spark_sparse.sparse.norm_act import batch_norm_act
from spark_sparse.sparse.patch_conv import PatchConvolution
from spark_sparse.sparse.rowwise import ImageScale, image_of_rows, with_features
from spark_sparse.sparse.sparsify import sparsify, to_dense

# GELU in its three spellings (torch's, tanh-approximated, timm's): their own kernels; Mish, Identity: via autograd
ACTS = [nn.SiLU(), nn.Hardswish(), nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.GELU(), nn.GELU(approximate="tanh"),
        timm_act.GELUTanh(), timm_act.GELU(), nn.Mish(), nn.Identity()]
# float64, the same arithmetic reordered at most: measured differences are at most 1e-14 on values
# of order 1-50, so 1e-12 (relative and absolute) leaves room for rounding and no more
EXACT64 = dict(rtol=1e-12, atol=1e-12)


def saved_row_dtypes(fn, rows: int) -> list[torch.dtype]:
    """The dtype of each tensor with ``rows`` rows that the graph of ``fn()`` keeps for backward."""
    kept = []

    def pack(t):
        if t.dim() == 2 and t.shape[0] == rows:
            kept.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return kept


def saved_row_tensors(fn, rows: int) -> int:
    """How many tensors with ``rows`` rows the graph of ``fn()`` keeps for backward."""
    return len(saved_row_dtypes(fn, rows))


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.fixture(params=["affine", "batch_norm"])
def renormalise(request, monkeypatch) -> str:
    """Either way a norm's rows are normalised again in backward (the CPU's and a GPU's), both run here."""
    monkeypatch.setitem(norm_act.RENORMALISE, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_batch_norm_act_equals_batch_norm_then_activation(act, momentum, renormalise):
    torch.manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64) * 3 + 1
    ours, ref = (nn.BatchNorm1d(8, momentum=momentum).double() for _ in range(2))
    with torch.no_grad():
        for bn in (ours, ref):
            bn.weight.copy_(torch.linspace(0.5, 2, 8))
            bn.bias.copy_(torch.linspace(-1, 1, 8))
    for train in (True, True, False):  # two steps move the running statistics, then eval
        ours.train(train), ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = batch_norm_act(xa, ours, act), act(ref(xb))
        torch.testing.assert_close(got, want, **EXACT64)
        for a, b in zip(grads(got, [xa, ours.weight, ours.bias]), grads(want, [xb, ref.weight, ref.bias])):
            torch.testing.assert_close(a, b, **EXACT64)
        for name, buf in ref.named_buffers():
            assert torch.equal(ours.get_buffer(name), buf), name


def test_batch_norm_act_keeps_only_its_input_for_backward():
    x = torch.randn(300, 8, requires_grad=True)
    bn = nn.BatchNorm1d(8)
    assert saved_row_tensors(lambda: nn.SiLU()(bn(x)), 300) == 2  # the norm's input and output
    assert saved_row_tensors(lambda: batch_norm_act(x, bn, nn.SiLU()), 300) == 1


def test_image_scale_equals_gathered_gates_and_keeps_no_gathered_copy():
    torch.manual_seed(0)
    image = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    got, want = ImageScale.apply(x, scale, image), x * scale[image]
    torch.testing.assert_close(got, want, **EXACT64)
    for a, b in zip(grads(got, [x, scale]), grads(want, [x, scale])):
        torch.testing.assert_close(a, b, **EXACT64)
    assert saved_row_tensors(lambda: x * scale[image], 9) == 2
    assert saved_row_tensors(lambda: ImageScale.apply(x, scale, image), 9) == 1


def _conv(cls, *args, tile_min_sites=None, small_block_path=None, **kwargs):
    torch.manual_seed(0)
    conv = cls(*args, **kwargs).double()
    for p in conv.parameters():
        nn.init.normal_(p, std=0.3)
    if tile_min_sites is not None:
        conv.tile_min_sites = tile_min_sites
    if small_block_path is not None:
        conv.small_block_path = small_block_path
    return conv


def _gate(x: ME.SparseTensor) -> ME.SparseTensor:
    scale = torch.linspace(0.5, 1.5, x.F.shape[1], dtype=x.F.dtype).repeat(2, 1)
    scale[1] *= 2
    return with_features(x, ImageScale.apply(x.F, scale, image_of_rows(x)))


ONE_TILE, NO_TILES = 1, 10**6  # blocks of this many sites per side and more run on tiles
AFTER_NORM = {  # operators that may follow a batch norm with its activation
    "1x1 convolution": lambda: _conv(PatchConvolution, 6, 10, kernel_size=1, dimension=2),
    "3x3 on tiles": lambda: _conv(PatchConvolution, 6, 10, kernel_size=3, dimension=2, tile_min_sites=ONE_TILE),
    "3x3 as offset GEMMs": lambda: _conv(PatchConvolution, 6, 10, kernel_size=3, dimension=2,
                                          tile_min_sites=NO_TILES),
    "3x3 as window GEMMs": lambda: _conv(PatchConvolution, 6, 10, kernel_size=3, dimension=2,
                                          tile_min_sites=NO_TILES, small_block_path="windows"),
    "strided 3x3": lambda: _conv(PatchConvolution, 6, 10, kernel_size=3, stride=2, dimension=2),
    "grouped 3x3 on tiles": lambda: _conv(GroupedConvolution, 6, 6, 3, 1, 3, tile_min_sites=ONE_TILE),
    "grouped 3x3 as offset GEMMs": lambda: _conv(GroupedConvolution, 6, 6, 3, 1, 3, tile_min_sites=NO_TILES),
    "grouped 3x3 as window GEMMs": lambda: _conv(GroupedConvolution, 6, 6, 3, 1, 3, tile_min_sites=NO_TILES,
                                                 small_block_path="windows"),
    "depthwise on tiles": lambda: _conv(DepthwiseConvolution, 6, 3, tile_min_sites=ONE_TILE),
    "depthwise on the canvas": lambda: _conv(DepthwiseConvolution, 6, 5, tile_min_sites=NO_TILES),
    "strided depthwise": lambda: _conv(DepthwiseConvolution, 6, 3, stride=2),
    "squeeze-excitation gate": lambda: _gate,
}


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Mish])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", AFTER_NORM.values(), ids=AFTER_NORM.keys())
def test_an_operator_after_a_norm_with_its_activation_keeps_none_of_its_rows(op, train, act, renormalise):
    """It makes them again from the norm's input in backward: the same gradients as keeping them,
    one row tensor kept instead of two (the norm's backward reuses the rows normalised again there,
    but after an activation without a kernel of its own, such as Mish, whose module may work in place)."""
    g = torch.Generator().manual_seed(0)
    x = sparsify(torch.randn(2, 6, 64, 96, generator=g, dtype=torch.float64), random_active(2, (2, 3), 0.5, g))
    op, rows = op(), x.F.shape[0]
    bn = nn.BatchNorm1d(6).double().train(train)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0, generator=g)

    def run(keep_rows: bool):
        feats = x.F.clone().requires_grad_()
        y = batch_norm_act(feats, bn, act())
        out = op(with_features(x, y.clone() if keep_rows else y))  # a clone is kept as any tensor
        return out.F, [feats, bn.weight, bn.bias, *op_params]

    op_params = list(op.parameters()) if isinstance(op, nn.Module) else []
    kept, (want, inputs_b) = saved_row_tensors(lambda: run(False), rows), run(True)
    got, inputs_a = run(False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(got, inputs_a), grads(want, inputs_b)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (kept, saved_row_tensors(lambda: run(True), rows)) == (1, 2)


class Normalisations(TorchDispatchMode):
    """Counts, while active (in backward), the operations that normalise a norm's rows again: a
    fused multiply-add or torch's batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.addcmul.default, torch.ops.aten.native_batch_norm.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("act, normalisations", [(nn.ReLU, 1), (nn.SiLU, 1), (nn.GELU, 1), (nn.Mish, 2)])
def test_a_norm_and_the_convolution_after_it_normalise_again_once_in_backward(act, normalisations, renormalise):
    """The convolution's weight gradient needs the norm's activated rows, made again from its
    input; the norm's backward, next, takes its activation's gradient at the normalised rows made
    there. An activation run by its own module (Mish) may work in place: normalised again."""
    g = torch.Generator().manual_seed(0)
    x = sparsify(torch.randn(2, 6, 64, 96, generator=g), random_active(2, (2, 3), 0.5, g))
    conv = AFTER_NORM["3x3 as window GEMMs"]().float()
    feats = x.F.clone().requires_grad_()
    out = conv(with_features(x, batch_norm_act(feats, nn.BatchNorm1d(6).train(), act()))).F
    with Normalisations() as counted:
        out.sum().backward()
    assert counted.count == normalisations


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("op", AFTER_NORM.values(), ids=AFTER_NORM.keys())
def test_an_operator_after_a_norm_with_its_activation_under_bf16_autocast(op, renormalise):
    """It computes in bf16, as torch's convolutions do under autocast, keeps one row tensor for
    backward, in bf16, and returns gradients in their inputs' dtypes (float32 parameters: float32
    gradients). Its output is float64's to bf16's rounding (each of the few roundings on the way
    2^-9 relative: measured at most 4e-3, allowed 2^-6) and so are the gradients (measured at most
    1.8e-2, allowed 2^-5: the norm's weight and bias gradients are sums over all rows that cancel
    to much less than their terms)."""
    g = torch.Generator().manual_seed(0)
    x = sparsify(torch.randn(2, 6, 64, 96, generator=g, dtype=torch.float64), random_active(2, (2, 3), 0.5, g))
    op64, n = op(), x.F.shape[0]
    op32 = copy.deepcopy(op64).float() if isinstance(op64, nn.Module) else op64
    bn64 = nn.BatchNorm1d(6).double()
    bn32 = copy.deepcopy(bn64).float()

    def run(op, bn, dtype, precision):
        feats = x.F.to(dtype).requires_grad_()
        with autocast(precision, "cpu"):
            # the norm's input in the compute dtype, as a convolution before it would return it
            rows = feats if precision == "fp32" else feats.to(compute_dtype(precision))
            y = batch_norm_act(rows, bn, nn.ReLU())
            out = op(with_features(x, y)).F
        return out, [feats, bn.weight, bn.bias, *(op.parameters() if isinstance(op, nn.Module) else ())]

    want, inputs64 = run(op64, bn64, torch.float64, "fp32")
    assert saved_row_dtypes(lambda: run(op32, bn32, torch.float32, "bf16"), n) == [torch.bfloat16]
    got, inputs = run(op32, bn32, torch.float32, "bf16")
    assert got.dtype == torch.bfloat16
    assert rel_err(got.detach(), want.detach()) < 2**-6
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, b, inp in zip(torch.autograd.grad(got, inputs, upstream.to(got.dtype)),
                         torch.autograd.grad(want, inputs64, upstream), inputs):
        assert a.dtype == inp.dtype == torch.float32
        assert rel_err(a, b) < 2**-5


def test_a_sparse_resnet_bottleneck_keeps_its_norms_inputs_and_its_output():
    """Besides its input: each batch norm's input and the block's output, no activation's."""
    encoder = SparseEncoder.from_timm("resnet50")
    block, kept, inside = encoder.body.layer1[1], {}, [False]
    weights = {p.untyped_storage().data_ptr() for p in encoder.parameters()}
    block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    block.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t):
        where = t.untyped_storage().data_ptr()
        if inside[0] and t.dim() == 2 and where not in weights:
            kept[where] = t.shape
        return t

    images = torch.randn(2, 3, 64, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(images, random_active(2, (2, 2), 0.5, torch.Generator().manual_seed(0)))
    widths = sorted(shape[1] for shape in kept.values())
    assert widths == [64, 64, 256, 256, 256]  # bn1, bn2 inputs; input, bn3 input, output


def _group_norm_input(visible: float, channels: int = 64, seed: int = 0):
    """A sparse float64 batch of 3 images (2x3 patches of 4x4 sites), ``visible`` of each image's patches kept."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, channels, 8, 12, generator=g, dtype=torch.float64) * 2 + 0.5
    active = random_active(3, (2, 3), 1.0 - visible, g)
    return images, active, sparsify(images, active)


def _group_norms(groups: int, channels: int, affine: bool):
    torch.manual_seed(0)
    ref = nn.GroupNorm(groups, channels, eps=1e-5, affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    return SparseGroupNormAct(ref, nn.Identity()), ref


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("groups", [32, 64, 1], ids=["32 groups", "a channel a group", "one group"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_group_norm_over_a_fully_visible_map_equals_torch_group_norm(act, groups, affine):
    images, active, x = _group_norm_input(visible=1.0)
    ours, ref = _group_norms(groups, 64, affine)
    ours.act = act
    feats = x.F.clone().requires_grad_()
    got = to_dense(ours(with_features(x, feats)), 3, (8, 12))
    dense = images.clone().requires_grad_()
    want = act(ref(dense))
    torch.testing.assert_close(got, want, **EXACT64)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [p for p in ours.parameters()]
    got_grads = torch.autograd.grad((got * g).sum(), [feats, *params])
    want_grads = torch.autograd.grad((want * g).sum(), [dense, *ref.parameters()])
    grad_rows = to_dense(with_features(x, got_grads[0]), 3, (8, 12))
    for a, b in zip([grad_rows, *got_grads[1:]], want_grads):
        torch.testing.assert_close(a, b, **EXACT64)


def test_group_norm_takes_each_images_statistics_over_its_visible_sites_only():
    """The reference: torch's group norm of each image's visible rows alone, as a (1, C, n) map."""
    _, active, x = _group_norm_input(visible=0.5)
    ours, ref = _group_norms(32, 64, affine=True)
    ours.act = nn.SiLU()
    feats = x.F.clone().requires_grad_()
    got = ours(with_features(x, feats)).F
    image = image_of_rows(x)
    rows = feats.detach().clone().requires_grad_()
    want = torch.cat([nn.SiLU()(ref(rows[image == i].t()[None]))[0].t() for i in range(3)])
    assert torch.equal(image, image.sort().values)  # rows of an image are contiguous, in image order
    torch.testing.assert_close(got, want, **EXACT64)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * g).sum(), [feats, ours.weight, ours.bias]),
                    torch.autograd.grad((want * g).sum(), [rows, ref.weight, ref.bias])):
        torch.testing.assert_close(a, b, **EXACT64)


def test_group_norm_keeps_only_its_input_and_the_operator_after_it_none_of_its_rows():
    _, _, x = _group_norm_input(visible=0.5, channels=6)
    norm, _ = _group_norms(3, 6, affine=True)
    norm.act = nn.ReLU()
    conv = _conv(PatchConvolution, 6, 10, kernel_size=3, dimension=2, tile_min_sites=NO_TILES)
    rows = x.F.shape[0]

    def run(keep_rows: bool):
        feats = x.F.clone().requires_grad_()
        y = norm(with_features(x, feats))
        out = conv(with_features(y, y.F.clone()) if keep_rows else y)
        return out.F, [feats, norm.weight, norm.bias, conv.kernel]

    assert saved_row_tensors(lambda: norm(with_features(x, x.F.clone().requires_grad_())), rows) == 1
    (got, inputs_a), (want, inputs_b) = run(False), run(True)
    torch.testing.assert_close(got, want, **EXACT64)
    for a, b in zip(grads(got, inputs_a), grads(want, inputs_b)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (saved_row_tensors(lambda: run(False), rows), saved_row_tensors(lambda: run(True), rows)) == (1, 2)


class PassesOver(TorchDispatchMode):
    """Lists, while active, the operations that read ``x`` (or a view of it) and make a tensor of
    its size: each one pass over its rows."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.storage, self.size, self.names = x.untyped_storage().data_ptr(), x.numel(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        reads = any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == self.storage
                    for t in tree_leaves(args))
        if reads and not func.is_view and any(isinstance(t, torch.Tensor) and t.numel() == self.size
                                              for t in tree_leaves(out)):
            self.names.append(func.__name__)
        return out


def test_a_group_norm_and_the_convolution_after_it_normalise_again_once_in_backward():
    """The convolution's backward makes the norm's rows again from its input (centred, scaled);
    the norm's backward, next, takes its activation's gradient at the rows made there, and reads
    its input twice more for its own gradient."""
    _, _, x = _group_norm_input(visible=0.5, channels=6)
    norm, _ = _group_norms(3, 6, affine=True)
    norm.act = nn.ReLU()
    conv = _conv(PatchConvolution, 6, 10, kernel_size=3, dimension=2, tile_min_sites=NO_TILES)
    feats = x.F.clone().requires_grad_()
    out = conv(norm(with_features(x, feats))).F
    with PassesOver(feats) as passes:
        out.sum().backward()
    assert passes.names == ["sub.Tensor", "mul.Tensor", "addcmul_.default"]
