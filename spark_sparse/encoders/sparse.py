"""Step 3: the sparse encoder — a timm ResNet rebuilt from MinkowskiEngine modules.

Stride-1 convolutions are submanifold (they keep their input sites), strided ones keep exactly
the visible sites of the coarser grid because the mask is aligned to the coarsest grid; batch
norms see visible sites only. Nothing is ever computed at a hidden site.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ..sparse.patch_conv import PatchConvolution, PatchPooling
from .resnet import ResNetEncoder, unsupported
from ..sparse.sparsify import sparsify, to_dense


def dense_to_me_kernel(weight: Tensor) -> Tensor:
    """(C_out, C_in, kh, kw) -> ME's (kernel_volume, C_in, C_out).

    ME stores some 1x1 kernels as (C_in, C_out): callers reshape to the parameter's shape."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(kh * kw, c_in, c_out)


def me_to_dense_kernel(kernel: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    kh, kw = kernel_size
    c_in, c_out = kernel.shape[-2:]
    return kernel.reshape(kw, kh, c_in, c_out).permute(3, 2, 1, 0).contiguous()


class SparseDropPath(nn.Module):
    """Stochastic depth per sample: each image's rows are kept (and rescaled) or dropped together."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        batch = int(x.C[:, 0].max()) + 1
        scale = torch.bernoulli(torch.full((batch,), keep, device=x.F.device)) / keep
        return ME.SparseTensor(x.F * scale[x.C[:, 0].long(), None],
                               coordinate_map_key=x.coordinate_map_key,
                               coordinate_manager=x.coordinate_manager)


# "patch": our patch-tile convolutions and pooling (patch_conv.py), measured faster on CPU for
# every layer of a ResNet, the 3-channel 7x7 stem included; "minkowski": ME's own modules.
CONV_IMPLS = ("patch", "minkowski")


def _sparse_conv(conv: nn.Conv2d, path: str, impl: str) -> ME.MinkowskiConvolution:
    kh, kw = conv.kernel_size
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise unsupported(conv, path, "grouped or dilated convolution")
    if kh != kw or kh % 2 == 0 or conv.padding != (kh // 2, kw // 2) or conv.stride[0] != conv.stride[1]:
        raise unsupported(conv, path, f"kernel {conv.kernel_size}, stride {conv.stride}, "
                                      f"padding {conv.padding} is not a centred odd square kernel")
    cls = ME.MinkowskiConvolution if impl == "minkowski" else PatchConvolution
    sparse = cls(conv.in_channels, conv.out_channels, kernel_size=kh,
                 stride=conv.stride[0], bias=conv.bias is not None, dimension=2)
    with torch.no_grad():
        sparse.kernel.copy_(dense_to_me_kernel(conv.weight).view_as(sparse.kernel))
        if conv.bias is not None:
            sparse.bias.copy_(conv.bias.view(1, -1))
    sparse.train(conv.training)
    return sparse


def _sparse_bn(bn: nn.BatchNorm2d, path: str) -> ME.MinkowskiBatchNorm:
    sparse = ME.MinkowskiBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                   affine=bn.affine, track_running_stats=bn.track_running_stats)
    sparse.bn.load_state_dict(bn.state_dict())
    sparse.train(bn.training)
    return sparse


def _sparse_pool(pool: nn.Module, path: str, impl: str) -> nn.Module:
    def size(v):
        return v if isinstance(v, int) else v[0]

    k, s, p = size(pool.kernel_size), size(pool.stride), size(pool.padding)
    stock = impl == "minkowski"
    if isinstance(pool, nn.MaxPool2d) and (k, s, p) == (3, 2, 1):
        # after a ReLU, the zeros a dense max-pool would see at hidden sites never win
        return ME.MinkowskiMaxPooling(3, stride=2, dimension=2) if stock else PatchPooling("max", 3, 2)
    if isinstance(pool, nn.AvgPool2d) and (k, s, p) == (2, 2, 0):
        # avg-down shortcut: mask-aligned 2x2 windows are fully visible or fully hidden
        return ME.MinkowskiAvgPooling(2, stride=2, dimension=2) if stock else PatchPooling("avg", 2, 2)
    raise unsupported(pool, path, f"kernel {k}, stride {s}, padding {p}")


def convert_leaf(module: nn.Module, path: str, conv: str = "patch") -> nn.Module:
    """One timm leaf -> its MinkowskiEngine twin; ``conv`` picks the convolution implementation."""
    if conv not in CONV_IMPLS:
        raise ValueError(f"conv must be one of {CONV_IMPLS}, got '{conv}'")
    if type(module) is nn.Conv2d:
        return _sparse_conv(module, path, conv)
    if type(module) is nn.BatchNorm2d:
        return _sparse_bn(module, path)
    if type(module) is nn.ReLU:
        return ME.MinkowskiReLU()
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _sparse_pool(module, path, conv)
    if isinstance(module, DropPath):
        return SparseDropPath(module.drop_prob)
    if isinstance(module, nn.Identity):
        return nn.Identity()
    raise unsupported(module, path)


class SparseEncoder(ResNetEncoder):
    """A timm ResNet as genuine sparse convolutions over the visible pixels.

    >>> enc = SparseEncoder.from_timm(timm.create_model("resnet50", num_classes=0))
    >>> feats = enc(images, active)            # 4 ME.SparseTensor, strides 4..32
    >>> maps = enc.dense_features(images, active)  # 4 dense (B, C, h, w), zeros where hidden
    """

    convert_leaf = staticmethod(convert_leaf)

    def __init__(self, body: nn.ModuleDict, channels: list[int], name: str):
        super().__init__(body, channels, name)
        if isinstance(body["maxpool"], PatchPooling) and isinstance(body["act1"], ME.MinkowskiReLU):
            # ReLU and max pooling commute; pooling first means the stem's stride-2 ReLU output
            # (the largest map after the input) is never made, and the ReLU that remains runs
            # on a quarter of the rows and keeps what the next convolution keeps anyway
            body["maxpool"].relu = True
            body["act1"] = nn.Identity()

    def encode_input(self, images: Tensor, active: Tensor) -> ME.SparseTensor:
        return sparsify(images, active)

    def to_dense(self, feature: ME.SparseTensor, batch: int, size: tuple[int, int]) -> Tensor:
        return to_dense(feature, batch, size)

    def timm_key(self, key: str) -> str:
        key = super().timm_key(key).replace(".bn.", ".")
        return key[: -len("kernel")] + "weight" if key.endswith(".kernel") else key

    def tensor_to_timm(self, key: str, value: Tensor) -> Tensor:
        if key.endswith(".kernel"):
            return me_to_dense_kernel(value, self._kernel_size(key))
        if key.endswith(".bias") and value.dim() == 2:  # ME conv bias is (1, C_out)
            return value.view(-1)
        return value

    def tensor_from_timm(self, key: str, value: Tensor) -> Tensor:
        if key.endswith(".kernel"):
            return dense_to_me_kernel(value).view_as(self.get_parameter(key))
        if key.endswith(".bias") and isinstance(self.get_submodule(key.rsplit(".", 1)[0]),
                                                ME.MinkowskiConvolution):
            return value.view(1, -1)
        return value

    def _kernel_size(self, key: str) -> tuple[int, int]:
        conv = self.get_submodule(key[: -len(".kernel")])
        k = conv.kernel_generator.kernel_size
        return int(k[0]), int(k[1])
