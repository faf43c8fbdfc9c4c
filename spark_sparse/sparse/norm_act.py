"""Batch norm over (N, C) rows followed by an elementwise activation, keeping only the norm's
input for backward (as in-place activated batch norm does): the normalised rows are recomputed
from it rather than stored. The operator that consumes those rows need not keep them either
(row_saving.py): ``BatchNormAct.output_again`` makes them again, and the norm's own backward,
which runs right after that consumer's, reuses the normalised rows made there rather than
normalising a second time (on a GPU, one kernel fewer a layer). How they are made again depends
on the device (``RENORMALISE``): on the CPU one multiply-add per element from the statistics,
elsewhere torch's batch norm again, a second pass over the rows but one operation where the
multiply-add needs three (on a GPU the launches, not the passes, bound a step).
Under autocast it keeps its input's dtype, as torch's batch norm does: 16-bit rows in and out,
statistics and parameters in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import activations as timm_act
from torch import Tensor, nn

from .amp import autocast_backward, autocast_forward


def _gelu(approximate: str | None = None):
    """GELU's kernels (exact, or the tanh approximation; ``None``: the module's own setting): never
    in place, but its backward is one kernel instead of autograd recomputing the forward."""
    def mode(act: nn.Module) -> str:
        return act.approximate if approximate is None else approximate
    return (lambda act, y, inplace: F.gelu(y, approximate=mode(act)),
            lambda act, grad, y: torch.ops.aten.gelu_backward(grad, y, approximate=mode(act)))


# activations whose backward has its own kernel (and whose forward can run in place, but GELU's),
# as (forward(act, y, inplace), gradient(act, grad, y)) of the pre-activation rows y: the forward
# and gradient of any other module go through autograd
_ACT_KERNELS = {
    nn.ReLU: (lambda act, y, inplace: torch.relu_(y) if inplace else torch.relu(y),
              lambda act, grad, y: torch.ops.aten.threshold_backward(grad, y, 0)),
    nn.SiLU: (lambda act, y, inplace: F.silu(y, inplace=inplace),
              lambda act, grad, y: torch.ops.aten.silu_backward(grad, y)),
    nn.Hardswish: (lambda act, y, inplace: F.hardswish(y, inplace=inplace),
                   lambda act, grad, y: torch.ops.aten.hardswish_backward(grad, y)),
    nn.ReLU6: (lambda act, y, inplace: F.hardtanh(y, 0.0, 6.0, inplace=inplace),
               lambda act, grad, y: torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)),
    nn.LeakyReLU: (lambda act, y, inplace: F.leaky_relu(y, act.negative_slope, inplace=inplace),
                   lambda act, grad, y: torch.ops.aten.leaky_relu_backward(grad, y, act.negative_slope, False)),
    nn.GELU: _gelu(), timm_act.GELU: _gelu("none"), timm_act.GELUTanh: _gelu("tanh"),
}


def activate_(act: nn.Module, y: Tensor) -> Tensor:
    """``act(y)``, in place in ``y`` where the activation has its own in-place kernel."""
    kernels = _ACT_KERNELS.get(type(act))
    return kernels[0](act, y, True) if kernels is not None else act(y)


def activate_keeping(act: nn.Module, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """``act(y)``, and ``y`` untouched where ``activation_grad`` can read it later (an activation
    with its own kernels); None where a module's forward ran, which may have worked in place."""
    kernels = _ACT_KERNELS.get(type(act))
    if kernels is None:
        return act(y), None
    return kernels[0](act, y, False), y


def activation_grad(act: nn.Module, y: Tensor, grad: Tensor) -> Tensor:
    """The gradient at the pre-activation rows ``y`` of ``act``'s output gradient ``grad``."""
    kernels = _ACT_KERNELS.get(type(act))
    if kernels is not None:
        return kernels[1](act, grad, y)
    with torch.enable_grad():
        y = y.requires_grad_()
        return torch.autograd.grad(act(y), y, grad)[0]


# how a norm's rows are normalised again in backward, per device type: "affine" (a multiply-add
# with a per-channel scale and shift made in forward) or "batch_norm" (torch's batch norm again,
# the same operation as forward's, statistics included)
RENORMALISE = {"cpu": "affine"}


def renormalise_path(device: torch.device) -> str:
    return RENORMALISE.get(device.type, "batch_norm")


def _affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift): the norm as one multiply-add per element, per channel in float32."""
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
    return scale, shift


def _normalised_again(node) -> Tensor:
    """The normalised rows of ``node``'s forward (a ``BatchNormAct`` node or context), in its
    input's dtype: 16-bit rows are normalised in float32, then rounded, as torch's batch norm does.
    Torch's batch norm again returns them exactly; the multiply-add, up to rounding."""
    x, weight, bias, running_mean, running_var, _, _, scale, shift = node.saved_tensors
    if scale is not None:
        return torch.addcmul(shift, x, scale).to(x.dtype)
    if node.training:  # the batch's statistics again, nothing updated
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, node.eps)[0]
    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, node.eps)[0]


class BatchNormAct(torch.autograd.Function):
    """Batch norm over the rows, then an elementwise activation, keeping only the norm's input
    for backward: the normalised rows the activation's gradient needs are recomputed rather than
    stored, one row-sized tensor less per layer (as in-place activated batch norm does). Running
    statistics are updated once, in forward."""

    @staticmethod
    @autocast_forward(cast_inputs=False)  # the statistics and parameters stay float32
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, training: bool, momentum: float, eps: float, act: nn.Module) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, training,
                                                  momentum, eps)
        if any(ctx.needs_input_grad):
            scale = shift = None
            if renormalise_path(x.device) == "affine":
                # the statistics the rows were normalised with
                stats = (mean, invstd) if training else (running_mean, (running_var + eps).rsqrt())
                scale, shift = _affine(weight, bias, *stats)
            ctx.save_for_backward(x, weight, bias, running_mean, running_var, mean, invstd, scale, shift)
        ctx.training, ctx.eps, ctx.act, ctx.remade = training, eps, act, None
        return activate_(act, y)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad: Tensor):
        x, weight, _, running_mean, running_var, mean, invstd, _, _ = ctx.saved_tensors
        y = _normalised_again(ctx) if ctx.remade is None else ctx.remade
        ctx.remade = None  # every consumer's backward has run: needed no more
        grad_y = activation_grad(ctx.act, y, grad)
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, running_mean, running_var,
            mean if ctx.training else None, invstd if ctx.training else None,
            ctx.training, ctx.eps, [need[0], need[1], need[2]])  # False for a None parameter
        return grad_x, grad_w, grad_b, None, None, None, None, None, None

    @staticmethod
    def output_again(node) -> Tensor:
        """What the forward of ``node``, one of this function's backward nodes, returned (up to
        rounding where the rows are normalised again with a multiply-add: ``_normalised_again``)."""
        # the pre-activation rows, for the node's own backward, which runs next
        out, node.remade = activate_keeping(node.act, _normalised_again(node))
        return out


def batch_norm_arguments(bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    """(weight, bias, running_mean, running_var, training, momentum, eps) for
    ``torch.native_batch_norm`` as torch's batch norm module would pass them (running statistics,
    momentum or a cumulative average); counts the batch, as the module does."""
    factor = 0.0
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or bn.running_mean is None
    keep = not bn.training or bn.track_running_stats
    return (bn.weight, bn.bias, bn.running_mean if keep else None, bn.running_var if keep else None,
            training, factor, bn.eps)


def batch_norm_act(x: Tensor, bn: nn.modules.batchnorm._BatchNorm, act: nn.Module) -> Tensor:
    """``act(bn(x))`` for (N, C) rows, as torch's batch norm module would run it, through
    ``BatchNormAct``; ``act`` must not work in place."""
    return BatchNormAct.apply(x, *batch_norm_arguments(bn), act)
