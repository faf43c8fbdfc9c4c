"""Our fast convolutions (plain and depthwise) and pooling compute exactly what MinkowskiEngine's
own modules compute."""

import pytest

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)
import torch

from spark_sparse import SparseEncoder, random_active
from spark_sparse.encoders.sparse_engine import dense_to_me_kernel
from spark_sparse.sparse.depthwise import DepthwiseConvolution
from spark_sparse.sparse.patch_conv import PatchConvolution, PatchPooling
from spark_sparse.sparse.sparsify import sparsify


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


@pytest.mark.parametrize("path", ["tiles", "gemm"])
@pytest.mark.parametrize("kernel_size,stride", [(7, 2), (3, 1), (3, 2), (1, 2), (1, 1)])
def test_convolution_matches_minkowski_forward_and_backward(kernel_size, stride, path):
    (xa, xb), (fa, fb) = twin_inputs(4)
    ref = ME.MinkowskiConvolution(4, 8, kernel_size=kernel_size, stride=stride, bias=True, dimension=2).double()
    ours = PatchConvolution(4, 8, kernel_size=kernel_size, stride=stride, bias=True, dimension=2).double()
    ours.tile_min_sites = 1 if path == "tiles" else 10**6  # force one of the two code paths
    ours.load_state_dict(ref.state_dict())
    same_forward_and_input_gradient(ref(xa), ours(xb), fa, fb)
    torch.testing.assert_close(ref.kernel.grad, ours.kernel.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref.bias.grad, ours.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["tiles", "canvas"])
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (7, 1), (3, 2), (5, 2)])
def test_depthwise_convolution_matches_minkowski_forward_and_backward(kernel_size, stride, path):
    (xa, xb), (fa, fb) = twin_inputs(4, seed=2)
    ref = ME.MinkowskiChannelwiseConvolution(4, kernel_size, stride=stride, bias=True, dimension=2).double()
    ours = DepthwiseConvolution(4, kernel_size, bias=True, stride=stride).double()
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


def test_both_convolution_implementations_give_the_same_encoder():
    images = torch.randn(2, 3, 128, 128)
    active = random_active(2, (4, 4), 0.6, torch.Generator().manual_seed(0))
    fast = SparseEncoder.from_timm("resnet26d").eval()
    stock = SparseEncoder.from_timm("resnet26d", conv="minkowski").eval()
    stock.load_timm_state_dict(fast.timm_state_dict())
    with torch.no_grad():
        for a, b in zip(fast.dense_features(images, active), stock.dense_features(images, active)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="conv must be one of"):
        SparseEncoder.from_timm("resnet18", conv="fft")
