"""The dense-masked reference encoder: SparK's official way of *simulating* sparsity.

Every layer runs densely over the whole image and its output is multiplied by the mask;
batch norms gather the visible sites first. It is the baseline of the equivalence tests and of
every benchmark. The mask travels with the tensor (``MaskedTensor``), never in global state.
"""

from __future__ import annotations

from typing import NamedTuple

from timm.layers import DropPath
from torch import Tensor, nn

from ..mask import upsample_active
from .resnet import ResNetEncoder, unsupported


class MaskedTensor(NamedTuple):
    """A dense (B, C, h, w) map with zeros at hidden sites, and the coarse visible-patch grid."""

    x: Tensor
    active: Tensor

    def visible(self) -> Tensor:
        """(B, 1, h, w) bool mask at this map's resolution."""
        return upsample_active(self.active, self.x.shape[-2:])

    def __add__(self, other: "MaskedTensor") -> "MaskedTensor":
        return MaskedTensor(self.x + other.x, self.active)


class MaskedConv2d(nn.Conv2d):
    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        y = super().forward(inp.x)
        return MaskedTensor(y * upsample_active(inp.active, y.shape[-2:]), inp.active)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """Batch statistics over visible sites only, as SparK's SparseBatchNorm2d."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.x.permute(0, 2, 3, 1)
        vis = inp.visible()[:, 0]
        rows = x[vis]  # (N_visible, C)
        n, c = rows.shape
        # BatchNorm2d over a (1, C, N, 1) view is BatchNorm1d over the N visible rows
        normed = super().forward(rows.t().reshape(1, c, n, 1)).reshape(c, n).t()
        out = _scatter(x, vis, normed)
        return MaskedTensor(out.permute(0, 3, 1, 2), inp.active)


def _scatter(like: Tensor, where: Tensor, rows: Tensor) -> Tensor:
    out = like.new_zeros(like.shape[:-1] + (rows.shape[-1],))
    return out.index_put(where.nonzero(as_tuple=True), rows)


class MaskedApply(nn.Module):
    """Run a dense module, then zero the hidden sites again (pooling can spread into them)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        y = self.module(inp.x)
        return MaskedTensor(y * upsample_active(inp.active, y.shape[-2:]), inp.active)


class MaskedPointwise(nn.Module):
    """An elementwise module (ReLU, drop-path) that keeps zeros at zero: no re-masking needed."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return MaskedTensor(self.module(inp.x), inp.active)


def convert_leaf(module: nn.Module, path: str) -> nn.Module:
    if type(module) is nn.Conv2d:
        conv = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size,
                            module.stride, module.padding, module.dilation, module.groups,
                            module.bias is not None)
        conv.load_state_dict(module.state_dict())
        return conv
    if type(module) is nn.BatchNorm2d:
        bn = MaskedBatchNorm2d(module.num_features, module.eps, module.momentum,
                               module.affine, module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        return bn
    if type(module) is nn.ReLU:
        return MaskedPointwise(nn.ReLU())
    if isinstance(module, DropPath):
        return MaskedPointwise(DropPath(module.drop_prob))
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return MaskedApply(module)
    if isinstance(module, nn.Identity):
        return nn.Identity()
    raise unsupported(module, path)


class MaskedDenseEncoder(ResNetEncoder):
    """Dense convolutions multiplied by the mask; same interface as ``SparseEncoder``."""

    convert_leaf = staticmethod(convert_leaf)

    def encode_input(self, images: Tensor, active: Tensor) -> MaskedTensor:
        return MaskedTensor(images * upsample_active(active, images.shape[-2:]), active)

    def to_dense(self, feature: MaskedTensor, batch: int, size: tuple[int, int]) -> Tensor:
        return feature.x

    def timm_key(self, key: str) -> str:
        # wrappers add ".module." to pooling/activation paths, which hold no tensors anyway
        return super().timm_key(key).replace(".module.", ".")
