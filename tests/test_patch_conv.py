"""Our fast convolutions (plain and depthwise) and pooling compute exactly what MinkowskiEngine's
own modules compute; with TensorFlow's asymmetric 'same' padding, what timm's Conv2dSame computes
over the masked map."""

import copy

import pytest

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)
import torch
from timm.layers import Conv2dSame
from timm.layers.padding import get_same_padding
from torch import nn

from spark_sparse import SparseEncoder, random_active
from spark_sparse.encoders.refusals import ConversionError
from spark_sparse.encoders.sparse_engine import convert_leaf, dense_to_me_kernel, me_to_dense_kernel
from spark_sparse.mask import upsample_active
from spark_sparse.sparse.depthwise import BandDepthwiseConvolution, DepthwiseConvolution, HeadSharedDepthwise
from spark_sparse.sparse.dilated import DilatedConvolution
from spark_sparse.sparse.grouped_conv import GroupedConvolution
from spark_sparse.sparse.patch_conv import PatchConvolution, PatchPooling, standardised
from spark_sparse.sparse.patch_sites import tile_geometry
from spark_sparse.sparse.pointwise import GroupedPointwise, PointwiseNorm
from spark_sparse.sparse.sparsify import sparsify, to_dense
from spark_sparse.sparse.transposed_conv import TransposedConvolution
from spark_sparse.sparse.upsample import PatchUpsample


def twin_inputs(channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, channels, 64, 96, generator=g, dtype=torch.float64)
    x = sparsify(images, random_active(2, (2, 3), 0.5, g), insert=True)  # ME's modules read its maps
    leaves = [x.F.clone().requires_grad_() for _ in range(2)]
    return [ME.SparseTensor(f, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
            for f in leaves], leaves


def same_sites(a: ME.SparseTensor, b: ME.SparseTensor) -> None:
    """Same coordinates, same features per coordinate (row orders may differ)."""
    assert a.tensor_stride == b.tensor_stride
    order_a = torch.argsort(a.C[:, 0] * 10**8 + a.C[:, 1] * 10**4 + a.C[:, 2])
    order_b = torch.argsort(b.C[:, 0] * 10**8 + b.C[:, 1] * 10**4 + b.C[:, 2])
    assert torch.equal(a.C[order_a], b.C[order_b])
    torch.testing.assert_close(a.F[order_a], b.F[order_b], rtol=1e-10, atol=1e-10)
    return order_a, order_b


def same_forward_and_input_gradient(ya: ME.SparseTensor, yb: ME.SparseTensor, fa, fb) -> None:
    """Same outputs; the same gradient reaches the inputs' features (fa, fb) from one upstream
    gradient (parameter gradients are left for the caller to compare)."""
    order_a, order_b = same_sites(ya, yb)
    grad = torch.randn(ya.F.shape, dtype=torch.float64)
    (ya.F[order_a] * grad).sum().backward()
    (yb.F[order_b] * grad).sum().backward()
    torch.testing.assert_close(fa.grad, fb.grad, rtol=1e-10, atol=1e-10)


def force_path(conv: PatchConvolution | GroupedConvolution, path: str) -> PatchConvolution | GroupedConvolution:
    """``conv`` running k x k kernels on ``path`` ('tiles', 'offsets' or 'windows') for any block."""
    conv.tile_min_sites = 1 if path == "tiles" else 10**6
    conv.small_block_path = None if path == "tiles" else path
    return conv


@pytest.mark.parametrize("path", ["tiles", "offsets", "windows"])
@pytest.mark.parametrize("kernel_size,stride", [(7, 2), (3, 1), (3, 2), (1, 2), (1, 1)])
def test_convolution_matches_minkowski_forward_and_backward(kernel_size, stride, path):
    (xa, xb), (fa, fb) = twin_inputs(4)
    ref = ME.MinkowskiConvolution(4, 8, kernel_size=kernel_size, stride=stride, bias=True, dimension=2).double()
    ours = force_path(PatchConvolution(4, 8, kernel_size=kernel_size, stride=stride, bias=True, dimension=2).double(),
                      path)
    ours.load_state_dict(ref.state_dict())
    same_forward_and_input_gradient(ref(xa), ours(xb), fa, fb)
    torch.testing.assert_close(ref.kernel.grad, ours.kernel.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref.bias.grad, ours.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backward", ["adjoint", "native"])
@pytest.mark.parametrize("path", ["tiles", "canvas"])
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (7, 1), (3, 2), (5, 2)])
def test_depthwise_convolution_matches_minkowski_forward_and_backward(kernel_size, stride, path, backward):
    (xa, xb), (fa, fb) = twin_inputs(4, seed=2)
    ref = ME.MinkowskiChannelwiseConvolution(4, kernel_size, stride=stride, bias=True, dimension=2).double()
    ours = DepthwiseConvolution(4, kernel_size, bias=True, stride=stride).double()
    ours.backward_path = backward  # the CPU's backward (forward convolutions) and a GPU's (torch's own), both run here
    ours.tile_min_sites = 1 if path == "tiles" else 10**6  # stride 1: force one of the two layouts
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        ref.kernel.copy_(dense_to_me_kernel(ours.weight).view_as(ref.kernel))
        ref.bias.copy_(ours.bias.view_as(ref.bias))
    same_forward_and_input_gradient(ref(xa), ours(xb), fa, fb)
    torch.testing.assert_close(dense_to_me_kernel(ours.weight.grad).view_as(ref.kernel), ref.kernel.grad,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad.view_as(ref.bias), ref.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_1x1_convolutions_match_minkowski_forward_and_backward(groups, stride):
    # the reference: one MinkowskiEngine 1x1 convolution with the groups' weights on the block diagonal
    (xa, xb), (fa, fb) = twin_inputs(8, seed=3)
    ours = GroupedPointwise(8, 8, groups, stride, bias=True).double()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    full = torch.block_diag(*ours.weight.detach().view(groups, 8 // groups, 8 // groups))[:, :, None, None]
    ref = ME.MinkowskiConvolution(8, 8, kernel_size=1, stride=stride, bias=True, dimension=2).double()
    with torch.no_grad():
        ref.kernel.copy_(dense_to_me_kernel(full).view_as(ref.kernel))
        ref.bias.copy_(ours.bias.view_as(ref.bias))
    same_forward_and_input_gradient(ref(xa), ours(xb), fa, fb)
    ref_grad = ref.kernel.grad.view(8, 8).t()  # (C_out, C_in): the groups' blocks on its diagonal
    blocks = torch.stack([ref_grad[i * 8 // groups:(i + 1) * 8 // groups, i * 8 // groups:(i + 1) * 8 // groups]
                          for i in range(groups)])
    torch.testing.assert_close(ours.weight.grad.view_as(blocks), blocks, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad.view_as(ref.bias), ref.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_1x1_convolutions_under_bf16_autocast_round_once_as_a_convolution(groups):
    """Rows, kernel and bias in bf16, products and bias summed in float32 and rounded once: bf16 rows
    out, as timm's convolution under autocast (a float32 kernel or bias multiplied or added to
    bf16 rows would hand float32 rows to the rest of the block)."""
    from spark_sparse.sparse.rowwise import with_features

    (x, _), _ = twin_inputs(8, seed=5)
    ours = GroupedPointwise(8, 8, groups, bias=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ours.weight.normal_(generator=g)
        ours.bias.normal_(generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        out = ours(with_features(x, x.F.detach().float())).F
    exact = copy.deepcopy(ours).double()  # the bf16 operands' products and sums, unrounded
    with torch.no_grad():
        exact.weight.copy_(ours.weight.bfloat16().double())
        exact.bias.copy_(ours.bias.bfloat16().double())
        want = exact(with_features(x, x.F.detach().bfloat16().double())).F
    assert out.dtype == torch.bfloat16
    # at most one bf16 step apart (2**-7 of a value, at most), where float32's sums round the
    # other way: about one draw of weights in 50 did so before they were seeded
    torch.testing.assert_close(out.double(), want.bfloat16().double(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_1x1_convolution_and_its_norm_keep_no_product_and_compute_the_same(stride, train):
    # RepVGG's 1x1 branch: the product is made again in backward instead of kept
    (xa, xb), (fa, fb) = twin_inputs(4, seed=4)
    conv = PatchConvolution(4, 6, kernel_size=1, stride=stride, dimension=2).double()
    bn = ME.MinkowskiBatchNorm(6).double()
    with torch.no_grad():
        conv.kernel.normal_()
        bn.bn.weight.uniform_(0.5, 1.5), bn.bn.bias.normal_(), bn.bn.running_mean.normal_()
    ref_conv, ref_bn = copy.deepcopy(conv).train(train), copy.deepcopy(bn).train(train)
    fused = PointwiseNorm(conv, bn).train(train)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = fused(xb)
    assert not [shape for shape in saved if shape == out.F.shape]  # inputs, weights, statistics only
    same_forward_and_input_gradient(ref_bn(ref_conv(xa)), out, fa, fb)
    for ref, ours in ((ref_conv, conv), (ref_bn, bn)):
        for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10, msg=name)
        for (name, a), b in zip(ref.named_buffers(), ours.buffers()):  # running statistics, batches counted
            torch.testing.assert_close(b, a, rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("mode,kernel_size", [("max", 3), ("avg", 2)])
def test_pooling_matches_minkowski_forward_and_backward(mode, kernel_size):
    (xa, xb), (fa, fb) = twin_inputs(4, seed=1)
    ref_cls = ME.MinkowskiMaxPooling if mode == "max" else ME.MinkowskiAvgPooling
    same_forward_and_input_gradient(ref_cls(kernel_size, stride=2, dimension=2)(xa),
                                    PatchPooling(mode, kernel_size, 2)(xb), fa, fb)


def test_tensors_not_made_by_sparsify_are_refused():
    x = ME.SparseTensor(torch.randn(3, 4), coordinates=torch.tensor([[0, 0, 0], [0, 0, 1], [0, 5, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match="made by spark_sparse.sparse.sparsify"):
        PatchConvolution(4, 4, kernel_size=3, dimension=2)(x)


@pytest.mark.parametrize("name", ["resnet26d", "seresnet18", "ecaresnet26t"])
def test_both_convolution_implementations_give_the_same_encoder(name):
    """MinkowskiEngine's own modules (conv='minkowski') and ours: the same features, attention
    gates included (per-image squeeze-excitation and ECA over rows in MinkowskiEngine's order)."""
    images = torch.randn(3, 3, 128, 160, dtype=torch.float64)
    active = random_active(3, (4, 5), 0.6, torch.Generator().manual_seed(0))
    fast = SparseEncoder.from_timm(name).double().eval()
    stock = SparseEncoder.from_timm(name, conv="minkowski").double().eval()
    stock.load_timm_state_dict(fast.timm_state_dict())
    with torch.no_grad():
        for a, b in zip(fast.dense_features(images, active), stock.dense_features(images, active)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_an_unknown_convolution_implementation_is_refused():
    with pytest.raises(ValueError, match="conv must be one of"):
        SparseEncoder.from_timm("resnet18", conv="fft")


@pytest.mark.parametrize("block,kernel_size,stride", [(1, 3, 1), (2, 3, 1), (2, 3, 2), (4, 3, 2), (4, 5, 2)])
def test_a_grouped_convolution_computes_the_same_on_every_path(block, kernel_size, stride):
    """Tiles, offset GEMMs and window GEMMs: the same features and gradients (float64)."""
    g = torch.Generator().manual_seed(block)
    images = torch.randn(3, 6, 3 * block, 4 * block, generator=g, dtype=torch.float64)
    x = sparsify(images, random_active(3, (3, 4), 0.5, g))
    runs = {}
    for path in ("tiles", "offsets", "windows"):
        conv = GroupedConvolution(6, 12, kernel_size, stride, groups=3, bias=True).double()
        torch.manual_seed(1)
        nn.init.normal_(conv.weight)
        nn.init.normal_(conv.bias)
        force_path(conv, path)
        feats = x.F.clone().requires_grad_()
        out = conv(ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager))
        (out.F * torch.linspace(-1, 1, out.F.numel(), dtype=out.F.dtype).view_as(out.F)).sum().backward()
        runs[path] = (out.F, feats.grad, conv.weight.grad, conv.bias.grad)
    for path in ("offsets", "windows"):
        for a, b in zip(runs["tiles"], runs[path]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["resnet26d", "seresnext26d_32x4d"])
def test_an_encoder_on_window_gemms_equals_it_on_offset_gemms(name):
    """What a GPU runs over small blocks (window GEMMs) is what the CPU runs (offset GEMMs): a
    ResNet's and a ResNeXt's features and every gradient, in train mode, float64."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 128, 160, generator=g, dtype=torch.float64)
    active = random_active(3, (4, 5), 0.6, g)
    encoder = SparseEncoder.from_timm(name).double().train()
    runs = []
    for path in ("offsets", "windows"):
        convs = [m for m in encoder.modules() if isinstance(m, (PatchConvolution, GroupedConvolution))]
        for conv in convs:
            conv.small_block_path = path
        encoder.zero_grad(set_to_none=True)
        feats = encoder.dense_features(images, active)
        sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in feats).backward()
        runs.append((feats, [p.grad for p in encoder.parameters()]))
    (feats_a, grads_a), (feats_b, grads_b) = runs
    for a, b in zip(feats_a + grads_a, feats_b + grads_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_weight_standardisation_off_the_cpu_is_a_batch_norm_and_the_same_on_the_cpu():
    """A GPU standardises kernels with one batch norm (one kernel each way), the CPU with plain
    reductions (faster there): the same kernels and gradients, each column (output channel)
    at zero mean and unit variance, as timm's batch norm over the weight."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3 * 3 * 6, 8, generator=g, dtype=torch.float64) * 3 + 1
    grad = torch.randn(w.shape, generator=g, dtype=torch.float64)
    outs, grads = [], []
    for fused in (True, False):
        x = w.clone().requires_grad_()
        out = standardised(x, 1e-5, fused=fused)
        (out * grad).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    timm_way = torch.nn.functional.batch_norm(w.t().reshape(1, 8, -1), None, None, training=True, eps=1e-5)
    torch.testing.assert_close(outs[1], timm_way.reshape(8, -1).t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[1].mean(0), torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_same_padding_tile_starts_one_site_later_at_stride_two():
    # centred 3x3 at stride 2 over an 8x8 block reads input sites -1..7; TensorFlow's 'same'
    # pads 0 above (1 below) on an even side, so it reads 0..8; a 5x5 pads 1 above, not 2
    assert tile_geometry(8, 3, 2) == (-1, 9)
    assert tile_geometry(8, 3, 2, padding=0) == (0, 9)
    assert tile_geometry(8, 5, 2) == (-2, 11)
    assert tile_geometry(8, 5, 2, padding=1) == (-1, 11)
    # a 2x2 block (stride 16 to 32): the 5x5 window of its second output reaches two sites
    # into the next block, as far as the neighbour table goes
    assert tile_geometry(2, 5, 2, padding=1) == (-1, 5)
    for k in (3, 5, 7):  # timm's total 'same' padding on even sides, the smaller half above
        for n in (2, 4, 112):
            assert get_same_padding(n, k, 2, 1) // 2 == k // 2 - 1


def _same_padded(kind: str, k: int, c: int, stride: int = 2) -> tuple[nn.Module, Conv2dSame]:
    """A sparse convolution with TensorFlow's 'same' padding and timm's dense one, with the same
    random weights (float64)."""
    torch.manual_seed(0)
    groups = c if kind == "depthwise" else 2 if kind.startswith("grouped") else 1
    dense = Conv2dSame(c, c if kind == "depthwise" else 6, k, stride=stride, groups=groups, bias=True).double()
    padding = (k - stride) // 2  # what timm pads above and left of an even side
    path = {"tiles": "tiles", "offset GEMMs": "offsets", "window GEMMs": "windows"}.get(kind.removeprefix("grouped "))
    if kind == "depthwise":
        sparse = DepthwiseConvolution(c, k, bias=True, stride=2, padding=padding).double()
        sparse.load_state_dict(dense.state_dict())
        return sparse, dense
    if groups > 1:  # NFNet's DeepMind ports
        sparse = force_path(GroupedConvolution(c, 6, k, 2, groups, bias=True, padding=padding).double(), path)
        sparse.load_state_dict(dense.state_dict())
        return sparse, dense
    sparse = PatchConvolution(c, 6, kernel_size=k, stride=stride, bias=True, dimension=2, padding=padding).double()
    force_path(sparse, path)
    with torch.no_grad():
        sparse.kernel.copy_(dense_to_me_kernel(dense.weight).view_as(sparse.kernel))
        sparse.bias.copy_(dense.bias.view_as(sparse.bias))
    return sparse, dense


def assert_equal_on_masked_map(sparse: nn.Module, dense: nn.Module, images: torch.Tensor, active: torch.Tensor,
                               stride: int, g: torch.Generator) -> None:
    """``sparse`` on the visible pixels and ``dense`` on the masked images: the same output at every
    visible output site and the same gradient reaching every visible input (float64, to 1e-12);
    the modules' parameter gradients are left for the caller to compare."""
    b, _, h, w = images.shape
    x = sparsify(images, active)
    feats = x.F.clone().requires_grad_()
    out = sparse(ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager))
    size = (h // stride, w // stride)
    visible = upsample_active(active, (h, w))
    masked = (images * visible).requires_grad_()
    want = dense(masked) * upsample_active(active, size)
    got = to_dense(out, b, size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (got * grad).sum().backward()
    (want * grad).sum().backward()
    grad_rows = ME.SparseTensor(feats.grad, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    torch.testing.assert_close(to_dense(grad_rows, b, (h, w)), masked.grad * visible, rtol=1e-12, atol=1e-12)


DENSE_PATHS = ["tiles", "offset GEMMs", "window GEMMs"]
# odd kernels at stride 2 (TensorFlow ports) on every path; even ones at stride 1 (HGNetV2's 2x2
# stem convolutions) on the dense paths: no family has an even depthwise or grouped one
SAME_PADDED = ([(kind, k, 2) for kind in DENSE_PATHS + ["depthwise"] + [f"grouped {p}" for p in DENSE_PATHS]
                for k in (3, 5)] + [(kind, k, 1) for kind in DENSE_PATHS for k in (2, 4)]
               + [("depthwise", k, 2) for k in (7, 9)])  # tf_mixnet's: past 2x2 blocks' neighbours, on the canvas


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks", "8x8 blocks"])
@pytest.mark.parametrize("kind,kernel_size,stride", SAME_PADDED)
def test_same_padded_convolution_equals_timm_conv2d_same_on_the_masked_map(kind, kernel_size, stride, block):
    """At every visible output site (block edges included, where the off-centre window reads the
    next block or the padding below/right), the same value and the same gradients as timm's
    dynamically padded Conv2dSame over the masked map: features, input and weight gradients
    (an even kernel at stride 1 reads one site more below and right than above and left)."""
    g = torch.Generator().manual_seed(3)
    b, c, grid = 3, 4, (2, 3)
    images = torch.randn(b, c, grid[0] * block, grid[1] * block, generator=g, dtype=torch.float64)
    active = random_active(b, grid, 0.5, g)
    sparse, dense = _same_padded(kind, kernel_size, c, stride)
    assert_equal_on_masked_map(sparse, dense, images, active, stride, g)
    weight_grad = sparse.weight.grad if kind == "depthwise" or kind.startswith("grouped") else me_to_dense_kernel(
        sparse.kernel.grad, (kernel_size, kernel_size))
    torch.testing.assert_close(weight_grad, dense.weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks (canvas)", "8x8 blocks (tiles)"])
@pytest.mark.parametrize("backward", ["adjoint", "native"])
@pytest.mark.parametrize("kernel_size", [(1, 11), (11, 1), (1, 3)])
def test_a_band_depthwise_convolution_equals_torchs_on_the_masked_map(block, kernel_size, backward):
    """InceptionNeXt's 1 x k and k x 1 depthwise convolutions, run as k x k ones with a kernel zero
    off its middle row or column: torch's band convolution of the masked map at every visible site
    (windows reaching across blocks, into hidden ones and the padding), and its gradients (input,
    the band weight itself, bias)."""
    g = torch.Generator().manual_seed(6)
    b, c, grid = 3, 4, (2, 3)
    images = torch.randn(b, c, grid[0] * block, grid[1] * block, generator=g, dtype=torch.float64)
    active = random_active(b, grid, 0.5, g)
    torch.manual_seed(0)
    padding = (kernel_size[0] // 2, kernel_size[1] // 2)
    dense = nn.Conv2d(c, c, kernel_size, padding=padding, groups=c).double()
    sparse = BandDepthwiseConvolution(c, kernel_size).double()
    sparse.load_state_dict(dense.state_dict())
    sparse.backward_path = backward
    assert_equal_on_masked_map(sparse, dense, images, active, 1, g)
    assert sparse.weight.grad.shape == dense.weight.grad.shape == (c, 1, *kernel_size)
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks", "8x8 blocks"])
@pytest.mark.parametrize("stride", [1, 2])
def test_3x3_average_pooling_counts_absent_sites_as_zeros_like_the_padding(block, stride):
    """Res2Net's and ResNeSt's 3x3 average pooling (padding 1, padding counted): at every visible
    output site the value and the gradient of torch's pooling of the masked map, a fixed
    depthwise convolution (hidden sites read zero and count, as the padding does)."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(3, 4, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    assert_equal_on_masked_map(PatchPooling("avg", 3, stride), nn.AvgPool2d(3, stride, padding=1), images, active,
                               stride, g)


class MeanOfVisible(nn.Module):
    """Each 3x3 window's mean over its visible sites (zero where it has none), from torch's pooling
    of the masked map and of the mask, the padding counted in both (so it cancels)."""

    def __init__(self, stride: int, visible: torch.Tensor):
        super().__init__()
        self.stride, self.visible = stride, visible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = nn.functional.avg_pool2d(self.visible.to(x.dtype), 3, self.stride, 1)
        return nn.functional.avg_pool2d(x, 3, self.stride, 1) / share.clamp_min(1 / 9)


@pytest.mark.parametrize("block,stride", [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2)],
                         ids=["one site a patch", "2x2 blocks", "2x2 blocks, stride 2", "8x8 blocks",
                              "8x8 blocks, stride 2"])
def test_an_average_pooling_leaving_its_padding_uncounted_is_the_mean_of_the_visible_sites(block, stride):
    """PoolFormer's 3x3 average pooling with ``count_include_pad=False``, converted from torch's
    module: at every visible output site the mean of its window's visible sites and its gradient;
    where nothing is hidden, torch's own pooling (which divides by the sites inside the image)."""
    g = torch.Generator().manual_seed(13)
    images = torch.randn(3, 4, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    torch_pool = nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
    sparse = convert_leaf(torch_pool, "token_mixer.pool")
    assert isinstance(sparse, PatchPooling) and sparse.present_only
    visible = upsample_active(active, images.shape[-2:])
    assert_equal_on_masked_map(sparse, MeanOfVisible(stride, visible), images, active, stride, g)
    everything = torch.ones_like(active)
    assert_equal_on_masked_map(sparse, torch_pool, images, everything, stride, g)


def test_an_average_pooling_of_the_present_sites_is_refused_with_minkowskis_own_modules():
    with pytest.raises(ConversionError, match=r"AvgPool2d at 'pool': an average pooling of present sites with "
                                              r"conv='minkowski'; use conv='patch'"):
        convert_leaf(nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), "pool", conv="minkowski")


# stride 2 reads blocks of 2x2 sites at least (the stride-32 map, one site a patch, is the last)
@pytest.mark.parametrize("block,stride", [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2)],
                         ids=["one site a patch (canvas)", "2x2 blocks", "2x2 blocks, stride 2", "8x8 blocks (tiles)",
                              "8x8 blocks, stride 2"])
@pytest.mark.parametrize("groups", [1, 4])
def test_dilated_convolution_equals_torchs_on_the_masked_map(block, stride, groups):
    """SKNet's 3x3 with dilation 2, on every path (tiles, the small-block path, the canvas where it
    reaches two patches away), grouped or not: torch's dilated convolution of the masked map at
    every visible output site, its input gradient and its weight and bias gradients."""
    g = torch.Generator().manual_seed(8)
    images = torch.randn(3, 8, 3 * block, 4 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (3, 4), 0.5, g)
    dense = nn.Conv2d(8, 12, 3, stride, padding=2, dilation=2, groups=groups).double()
    sparse = DilatedConvolution(8, 12, 3, stride, groups, bias=True, dilation=2).double()
    sparse.load_state_dict(dense.state_dict())
    assert_equal_on_masked_map(sparse, dense, images, active, stride, g)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(getattr(sparse, name).grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks (canvas)", "8x8 blocks (tiles)"])
@pytest.mark.parametrize("groups,same", [(4, False), (8, False), (8, True)],
                         ids=["4 groups", "2 outputs a channel (FastViT)", "2 outputs a channel, 'same'"])
def test_a_wide_strided_grouped_convolution_equals_torchs_on_the_masked_map(block, groups, same):
    """FastViT's 7x7 grouped convolution at stride 2 (and TensorFlow's 'same' padding): over 2x2
    blocks its window reaches past the neighbours the tables cover, and runs on the canvas;
    features, input, weight and bias gradients equal torch's on the masked map."""
    g = torch.Generator().manual_seed(10)
    images = torch.randn(3, 8, 3 * block, 4 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (3, 4), 0.5, g)
    dense = (Conv2dSame(8, 16, 7, 2, groups=groups) if same else nn.Conv2d(8, 16, 7, 2, 3, groups=groups)).double()
    sparse = GroupedConvolution(8, 16, 7, 2, groups, bias=True, padding=2 if same else None).double()
    sparse.load_state_dict(dense.state_dict())
    assert_equal_on_masked_map(sparse, dense, images, active, 2, g)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(getattr(sparse, name).grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks (canvas)", "8x8 blocks (tiles)"])
@pytest.mark.parametrize("kernel_size", [7, 9])
def test_a_wide_strided_depthwise_convolution_equals_torchs_on_the_masked_map(block, kernel_size):
    """MixNet's 7x7 and 9x9 depthwise kernels at stride 2: over 2x2 blocks the window reaches past
    the neighbours, and the convolution runs on the canvas; forward, input and weight gradients."""
    g = torch.Generator().manual_seed(9)
    images = torch.randn(3, 4, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    dense = nn.Conv2d(4, 4, kernel_size, 2, padding=kernel_size // 2, groups=4).double()
    sparse = DepthwiseConvolution(4, kernel_size, stride=2).double()
    sparse.load_state_dict(dense.state_dict())
    assert_equal_on_masked_map(sparse, dense, images, active, 2, g)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(getattr(sparse, name).grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("block", [4, 8], ids=["4x4 blocks", "8x8 blocks"])
@pytest.mark.parametrize("heads", [1, 3])
def test_a_depthwise_3x3_at_stride_4_equals_torchs_on_the_masked_map(block, heads):
    """MViTv2's key pooling: a centred 3x3 at stride 4 skips sites between its windows (the tile still
    holds the whole patch, so that backward reaches every row) and reads one site of the patch above
    and left; one head's kernel repeated over the heads (``HeadSharedDepthwise``), its gradient
    the sum over them. Forward, input and weight gradients."""
    g = torch.Generator().manual_seed(11)
    images = torch.randn(3, 2 * heads, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    dense = nn.Conv2d(2 * heads, 2 * heads, 3, 4, padding=1, groups=2 * heads, bias=False).double()
    sparse = HeadSharedDepthwise(heads, 2, 3, stride=4).double()
    with torch.no_grad():
        dense.weight.copy_(sparse.weight.normal_(generator=g).repeat(heads, 1, 1, 1))
    assert_equal_on_masked_map(sparse, dense, images, active, 4, g)
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad.view(heads, 2, 1, 3, 3).sum(0), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("path", ["tiles", "offsets", "windows"])
@pytest.mark.parametrize("block", [4, 8], ids=["4x4 blocks", "8x8 blocks"])
def test_metaformers_stride_4_stem_equals_torchs_on_the_masked_map(path, block):
    """MetaFormer's 7x7 stride-4 stem pads 2, not 3: output i reads input sites 4i - 2 .. 4i + 4,
    one site into the next block below and right. Converted from timm's module, on every path:
    features, input, weight and bias gradients equal torch's on the masked map."""
    g = torch.Generator().manual_seed(12)
    images = torch.randn(3, 3, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    dense = nn.Conv2d(3, 5, 7, 4, 2).double()
    sparse = force_path(convert_leaf(dense, "stem.conv").double(), path)
    assert isinstance(sparse, PatchConvolution) and sparse.padding == 2
    assert_equal_on_masked_map(sparse, dense, images, active, 4, g)
    torch.testing.assert_close(me_to_dense_kernel(sparse.kernel.grad, (7, 7)), dense.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.bias.grad.view(-1), dense.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", [1, 4])
def test_a_strided_convolution_whose_padding_changes_the_maps_size_is_refused(padding):
    """7x7 at stride 4 padding 1 gives 55 outputs on a 224-pixel side, padding 4 gives 57: no
    window a stride apart per block of sites, so no sparse twin; one line names the layer."""
    with pytest.raises(ConversionError, match=r"'stem\.conv'.*one window per stride"):
        convert_leaf(nn.Conv2d(3, 5, 7, 4, padding), "stem.conv")


class PoolVisibleOnly(nn.Module):
    """A dense max pooling of the map with its hidden sites at -inf (0 where nothing visible won)."""

    def __init__(self, pool: nn.MaxPool2d, visible: torch.Tensor):
        super().__init__()
        self.pool, self.visible = pool, visible

    def forward(self, x):
        y = self.pool(x.masked_fill(~self.visible, float("-inf")))
        return y.masked_fill(y == float("-inf"), 0.0)


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks", "8x8 blocks"])
def test_unpadded_ceil_mode_max_pooling_takes_the_maximum_over_visible_sites(block):
    """VoVNet's 3x3 stride-2 max pooling without padding, ``ceil_mode``: output i reads input sites
    2i..2i+2 (one into the next patch; the last window hangs over the map's edge), values of
    either sign; the maximum over the visible ones, forward and gradient."""
    g = torch.Generator().manual_seed(6)
    images = torch.randn(3, 4, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    visible = upsample_active(active, images.shape[-2:])
    dense = PoolVisibleOnly(nn.MaxPool2d(3, 2, ceil_mode=True), visible)
    assert_equal_on_masked_map(PatchPooling("max", 3, 2, padding=0), dense, images, active, 2, g)


@pytest.mark.parametrize("block", [1, 4], ids=["one site a patch", "4x4 blocks"])
@pytest.mark.parametrize("kernel_size", [5, 9, 13])
def test_wide_stride_1_max_pooling_takes_the_maximum_over_visible_sites(block, kernel_size):
    """CSPNeXt's spatial pyramid: centred k x k stride-1 max poolings reaching several patches
    away (one site a patch at stride 32), on a 7x9 patch grid where the image's edges cut the
    windows; values of either sign, forward and gradient."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(3, 4, 7 * block, 9 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (7, 9), 0.6, g)
    visible = upsample_active(active, images.shape[-2:])
    dense = PoolVisibleOnly(nn.MaxPool2d(kernel_size, 1, kernel_size // 2), visible)
    assert_equal_on_masked_map(PatchPooling("max", kernel_size, 1), dense, images, active, 1, g)


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks", "8x8 blocks"])
@pytest.mark.parametrize("pad,kernel_size,stride", [((1, 1, 1, 1), 3, 2), ((0, 1, 0, 1), 2, 1)], ids=["BiT", "HGNetV2"])
def test_max_pooling_where_absent_sites_read_zero_equals_zero_padded_pooling_of_the_masked_map(
        block, pad, kernel_size, stride):
    """BiT's stem (a zero pad then an unpadded 3x3 stride-2 max pooling) and HGNetV2's (padded
    below and right, 2x2 stride 1), with no activation before them (values of either sign): hidden
    sites read zero there as the padding does. Forward and gradient (which goes nowhere where a
    zero won)."""
    g = torch.Generator().manual_seed(4)
    images = torch.randn(3, 4, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    x = sparsify(images, active)
    feats = x.F.clone().requires_grad_()
    out = PatchPooling("max", kernel_size, stride, fill=0.0)(
        ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager))
    visible = upsample_active(active, images.shape[-2:])
    masked = (images * visible).requires_grad_()
    size = (2 * block // stride, 3 * block // stride)
    want = nn.Sequential(nn.ConstantPad2d(pad, 0.0), nn.MaxPool2d(kernel_size, stride))(masked)
    want = want * upsample_active(active, size)
    got = to_dense(out, 3, size)
    assert torch.equal(got, want)
    assert bool((want == 0).logical_and(upsample_active(active, size)).any())  # a zero won somewhere
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (got * grad).sum().backward()
    (want * grad).sum().backward()
    grad_rows = ME.SparseTensor(feats.grad, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    torch.testing.assert_close(to_dense(grad_rows, 3, images.shape[-2:]), masked.grad * visible, rtol=0, atol=1e-15)


@pytest.mark.parametrize("block,scale", [(2, 2), (8, 2), (8, 4), (8, 8)],
                         ids=["2x2 blocks, x2", "8x8 blocks, x2", "8x8 blocks, x4", "8x8 blocks, x8"])
def test_nearest_upsampling_copies_each_coarse_site_within_its_patch(block, scale):
    """HRNet's fusion of a coarser branch (a coarse map made here by 2x2 average poolings): torch's
    nearest upsampling of the masked map at every visible site, and each coarse site's gradient
    the sum of its copies'."""
    g = torch.Generator().manual_seed(9)
    images = torch.randn(3, 4, 3 * block, 4 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (3, 4), 0.5, g)
    pools = scale.bit_length() - 1
    sparse = nn.Sequential(*[PatchPooling("avg", 2, 2) for _ in range(pools)], PatchUpsample(scale))
    dense = nn.Sequential(*[nn.AvgPool2d(2) for _ in range(pools)], nn.Upsample(scale_factor=scale, mode="nearest"))
    assert_equal_on_masked_map(sparse, dense, images, active, 1, g)


@pytest.mark.parametrize("block,scale", [(2, 2), (8, 2), (8, 4)],
                         ids=["2x2 blocks, x2", "8x8 blocks, x2", "8x8 blocks, x4"])
def test_bilinear_upsampling_reads_the_neighbouring_patches_visible_sites_only(block, scale):
    """EfficientFormerV2's attention at stride 32 brought back to 16 (a coarse map made here by 2x2
    average poolings): torch's bilinear upsampling of the masked map at every visible site, a
    site at a patch's edge reading the neighbouring patch's edge (zero where it is hidden, clamped
    at the image's border); the gradient reaching every visible coarse site."""
    g = torch.Generator().manual_seed(12)
    images = torch.randn(3, 4, 3 * block, 4 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (3, 4), 0.5, g)
    pools = scale.bit_length() - 1
    sparse = nn.Sequential(*[PatchPooling("avg", 2, 2) for _ in range(pools)], PatchUpsample(scale, "bilinear"))
    dense = nn.Sequential(*[nn.AvgPool2d(2) for _ in range(pools)], nn.Upsample(scale_factor=scale, mode="bilinear"))
    assert_equal_on_masked_map(sparse, dense, images, active, 1, g)


@pytest.mark.parametrize("block", [2, 8], ids=["2x2 blocks", "8x8 blocks"])
def test_a_1x1_average_pooling_at_stride_2_takes_each_2x2_blocks_first_site(block):
    """EfficientFormerV2's query subsampling (timm's ``AvgPool2d(1, 2, 0)``): torch's at every visible
    output site; only the sites it takes get a gradient."""
    g = torch.Generator().manual_seed(13)
    images = torch.randn(3, 4, 2 * block, 3 * block, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    assert_equal_on_masked_map(PatchPooling("avg", 1, 2), nn.AvgPool2d(1, 2, 0), images, active, 2, g)


@pytest.mark.parametrize("block", [1, 2, 8], ids=["1x1 blocks", "2x2 blocks", "8x8 blocks"])
@pytest.mark.parametrize("kernel,stride,padding", [(4, 2, 1), (3, 1, 1), (8, 4, 2), (2, 2, 0)])
@pytest.mark.parametrize("groups", [1, 4], ids=["one group", "depthwise"])
def test_transposed_convolution_equals_torchs_on_the_masked_map(block, kernel, stride, padding, groups):
    """LowFormer's learned upsampling (4x4 at stride 2, padding 1; 3x3 at stride 1) and others that make
    stride x stride fine sites of each coarse one (a coarse map made here by 2x2 average poolings): each
    coarse row's windows reach into the neighbouring patches, where only visible sites take their share;
    the same weight and bias gradients as torch's."""
    g = torch.Generator().manual_seed(10)
    side = block * stride
    images = torch.randn(3, 4, 3 * side, 4 * side, generator=g, dtype=torch.float64)
    active = random_active(3, (3, 4), 0.5, g)
    dense_up = nn.ConvTranspose2d(4, 4, kernel, stride, padding, groups=groups).double()
    sparse_up = TransposedConvolution(4, 4, kernel, stride, padding, groups).double()
    sparse_up.load_state_dict(dense_up.state_dict())
    pools = stride.bit_length() - 1
    sparse = nn.Sequential(*[PatchPooling("avg", 2, 2) for _ in range(pools)], sparse_up)
    dense = nn.Sequential(*[nn.AvgPool2d(2) for _ in range(pools)], dense_up)
    assert_equal_on_masked_map(sparse, dense, images, active, 1, g)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(sparse_up, name).grad, getattr(dense_up, name).grad, rtol=1e-12, atol=1e-12)


def test_a_transposed_convolution_that_leaves_the_grid_or_mixes_groups_is_refused():
    with pytest.raises(ValueError, match="a transposed 3x3 convolution at stride 2 with padding 1 does not make "
                                         "stride x stride sites of each one"):
        TransposedConvolution(4, 4, 3, 2, 1)
    with pytest.raises(ValueError, match=r"a transposed convolution of 2 groups \(4 -> 4 channels\): only one "
                                         "group or depthwise"):
        TransposedConvolution(4, 4, 4, 2, 1, groups=2)


def test_upsampling_past_the_pixels_is_refused():
    images = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="cannot upsample a stride-1 map by 2: past the pixels' own grid"):
        PatchUpsample(2)(sparsify(images, torch.ones(1, 1, 1, 1, dtype=torch.bool)))
