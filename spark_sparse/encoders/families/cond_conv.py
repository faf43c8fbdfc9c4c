"""CondConv (timm's CondConv2d, in EfficientNet-CondConv's CondConvResidual blocks) on visible sites.

A CondConv layer convolves each image with its own kernel: its experts' kernels summed with the
image's routing weights, a sigmoid of a linear map of the block input's mean, here each image's
mean over its visible sites. Both engines hold timm's tensors (``weight`` (E, C_out x C_in / G x
k x k), ``bias`` (E, C_out)) through this base.
"""

from __future__ import annotations

from timm.layers import CondConv2d
from torch import Tensor, nn


class CondConvExperts(nn.Module):
    """timm's CondConv2d's experts: its parameters and geometry."""

    def __init__(self, module: CondConv2d):
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "num_experts", "weight_shape", "dynamic_padding"):
            setattr(self, name, getattr(module, name))
        self.weight = nn.Parameter(module.weight.detach().clone())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())

    def expert_weight(self, e: int) -> Tensor:
        """Expert ``e``'s (C_out, C_in / G, k, k) kernel."""
        return self.weight[e].view(self.weight_shape)
