"""Exact forward FLOP counts for the sparse and the dense-masked encoder, and the SparK head.

Only convolutions and linear layers are counted (2 FLOPs per multiply-add; no bias, norm,
activation or pooling arithmetic), on both sides alike:

* dense (``nn.Conv2d`` and ``nn.Linear``, the masked reference's subclasses included):
  ``2 * C_out * C_in/groups * kh * kw * H_out * W_out`` per image, zero padding and hidden
  sites included, because a dense convolution computes them (a linear layer is a 1x1 one);
* sparse (every ``MinkowskiEngine.MinkowskiConvolution``, our patch convolutions included):
  ``2 * pairs * C_in * C_out`` where ``pairs`` is the number of (input site, output site,
  kernel offset) triples actually present, read off the input and output coordinates seen by a
  forward hook. It is the work a kernel map implies; sites outside the image or hidden have no
  pair, so even at mask ratio 0 the sparse count is below the dense one (the border). A
  depthwise convolution has ``C`` multiply-adds per pair; patchify convolutions and linear
  layers have every pair present (``k * k`` per output site, one per site).

The decoder and densify stage are dense and the same for both engines; they are counted with
``torch.utils.flop_counter.FlopCounterMode`` (which also counts convolutions only, at
2 FLOPs per multiply-add).
"""

from __future__ import annotations

from collections import defaultdict

from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from spark_sparse.encoders.base import Encoder
from spark_sparse.encoders.masked_tensor import MaskedTensor
from spark_sparse.mask import upsample_active
from spark_sparse.sparse.depthwise import DepthwiseConvolution
from spark_sparse.sparse.patch_conv import PatchifyConvolution
from spark_sparse.sparse.patch_sites import centred_padding
from spark_sparse.sparse.rowwise import SparseLinear

SPARSE_LAYERS = (ME.MinkowskiConvolution, DepthwiseConvolution, PatchifyConvolution, SparseLinear)
DENSE_LAYERS = (nn.Conv2d, nn.Linear)


def kernel_pairs(in_coords: Tensor, in_stride: int, out_coords: Tensor, kernel_size: int,
                 padding: int | None = None) -> int:
    """How many (output site, kernel offset) slots hold an input site.

    Coordinates are MinkowskiEngine's (N, 3) [batch, row, col] in input pixels; the kernel spans
    ``kernel_size`` input-stride steps, centred for odd sizes and starting at the output site for
    even ones (MinkowskiEngine's convention), or from ``padding`` steps before the output site
    (TensorFlow 'same' padding's window: patch_sites.py ``tile_geometry``). A padded occupancy
    grid of the input sites makes each offset one exact lookup."""
    if len(in_coords) == 0 or len(out_coords) == 0:
        return 0
    lo = centred_padding(kernel_size) if padding is None else padding
    inp = in_coords.long().cpu()
    out = out_coords.long().cpu()
    b, r, c = inp[:, 0], inp[:, 1] // in_stride, inp[:, 2] // in_stride
    ob, orow, ocol = out[:, 0], out[:, 1] // in_stride, out[:, 2] // in_stride
    rows = int(max(r.max(), orow.max())) + kernel_size
    cols = int(max(c.max(), ocol.max())) + kernel_size
    occupied = torch.zeros(int(max(b.max(), ob.max())) + 1, rows + lo, cols + lo, dtype=torch.bool)
    occupied[b, r + lo, c + lo] = True
    pairs = 0
    for dy in range(-lo, kernel_size - lo):
        for dx in range(-lo, kernel_size - lo):
            pairs += int(occupied[ob, orow + dy + lo, ocol + dx + lo].sum())
    return pairs


def _sparse_conv_flops(conv: ME.MinkowskiConvolution, x: ME.SparseTensor, y: ME.SparseTensor) -> int:
    size = [int(k) for k in conv.kernel_generator.kernel_size]
    dilation = [int(d) for d in conv.kernel_generator.kernel_dilation]
    if size[0] != size[1] or dilation != [1, 1]:
        raise ValueError(f"only square, undilated sparse kernels are counted, got {size}, {dilation}")
    pairs = kernel_pairs(x.C, int(x.tensor_stride[0]), y.C, size[0], getattr(conv, "padding", None))
    return 2 * pairs * conv.in_channels * conv.out_channels


def _sparse_layer_flops(layer: nn.Module, x: ME.SparseTensor, y: ME.SparseTensor) -> int:
    if isinstance(layer, ME.MinkowskiConvolution):
        return _sparse_conv_flops(layer, x, y)
    if isinstance(layer, DepthwiseConvolution):
        pairs = kernel_pairs(x.C, int(x.tensor_stride[0]), y.C, layer.kernel_size, layer.padding)
        return 2 * pairs * layer.weight.shape[0]
    if isinstance(layer, PatchifyConvolution):
        c_out, c_in, k, _ = layer.weight.shape
        return 2 * y.F.shape[0] * k * k * c_in * c_out
    return 2 * y.F.shape[0] * layer.in_features * layer.out_features  # SparseLinear


def _dense_layer_flops(layer: nn.Module, y: Tensor) -> int:
    if isinstance(layer, nn.Linear) and y.dim() != 4:
        # features last: pooled (B, C) vectors (CondConv's routing), rows, (B, n, C) tokens (SwiftFormer's attention)
        return 2 * y.numel() * layer.in_features
    b, c_out, h, w = y.shape  # a masked linear layer's output is a (B, C, h, w) map too
    if isinstance(layer, nn.Linear):
        return 2 * b * c_out * layer.in_features * h * w
    kh, kw = layer.kernel_size
    return 2 * b * c_out * (layer.in_channels // layer.groups) * kh * kw * h * w


class ConvFlopCounter:
    """Forward hooks on every convolution and linear layer of ``module``; FLOPs per layer name.

    >>> with ConvFlopCounter(encoder) as counter:
    ...     encoder(images, active)
    >>> counter.total
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.layers: dict[str, int] = defaultdict(int)
        self._handles: list = []

    def __enter__(self) -> "ConvFlopCounter":
        for name, sub in self.module.named_modules():
            if isinstance(sub, SPARSE_LAYERS + DENSE_LAYERS):
                self._handles.append(sub.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(conv: nn.Module, inputs: tuple, output) -> None:
            if isinstance(conv, SPARSE_LAYERS):
                self.layers[name] += _sparse_layer_flops(conv, inputs[0], output)
            else:
                y = output.x if isinstance(output, MaskedTensor) else output
                self.layers[name] += _dense_layer_flops(conv, y)
        return hook

    @property
    def total(self) -> int:
        return sum(self.layers.values())


class _Frozen:
    """Eval mode and no autograd for a counting forward; batch-norm statistics stay untouched."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.module.modules()}
        self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        for m, mode in self.modes.items():
            m.training = mode


def encoder_flops(encoder: Encoder, images: Tensor, active: Tensor) -> dict[str, int]:
    """Forward FLOPs of each convolution of ``encoder`` on this batch (whole batch, not per image)."""
    with _Frozen(encoder), ConvFlopCounter(encoder) as counter:
        encoder(images, active)
    return dict(counter.layers)


def head_flops(spark: nn.Module, images: Tensor, active: Tensor) -> int:
    """Forward FLOPs of SparK's densify stage and decoder on this batch (whole batch).

    They only depend on shapes, so zero feature maps of the encoder's shapes stand in for the
    encoder's output."""
    encoder = spark.encoder
    active = active.to(images.device)  # masks come on the CPU, as in training
    b, _, h, w = images.shape
    feats = [images.new_zeros(b, c, h // s, w // s) for c, s in zip(encoder.channels, encoder.strides)]
    feats = feats[::-1][: spark.hierarchy]
    with _Frozen(spark), FlopCounterMode(display=False) as mode:
        to_decoder = [d(f, upsample_active(active, f.shape[-2:])) for d, f in zip(spark.densify, feats)]
        spark.decoder(to_decoder)
    return int(mode.get_total_flops())
