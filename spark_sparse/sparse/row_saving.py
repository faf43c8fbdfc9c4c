"""Operators that keep their input rows for backward without storing them twice.

A convolution (or an SE gate) after a batch norm with its activation would keep the rows the
norm returned, while the norm keeps its own input anyway. ``save_rows`` keeps, for rows a
``BatchNormAct`` (or a ``GroupNormAct``) returned, that node instead, and ``saved_rows`` makes the
rows again in backward from the norm's input. A norm-activation-convolution sequence then keeps one row tensor for
backward where it would keep two (the memory-efficient BN-ReLU-convolution of DenseNet and
in-place ABN, without their recomputed convolution or invertible activation).
"""

from __future__ import annotations

from torch import Tensor

from .group_norm import GroupNormAct
from .norm_act import BatchNormAct

# autograd functions that keep their input and can make their output again from their node
REMAKERS = (BatchNormAct, GroupNormAct)


def save_rows(ctx, rows: Tensor, *tensors: Tensor) -> None:
    """``ctx.save_for_backward(rows, *tensors)`` for an autograd function whose backward reads its
    input ``rows`` only through ``saved_rows``; rows a ``BatchNormAct`` or ``GroupNormAct``
    returned are not kept but made again from its node. An in-place change of the rows would have
    replaced their ``grad_fn``, so rows still showing that node are unchanged since it made them."""
    node = rows.grad_fn
    # every node of a custom autograd function is an instance of its _backward_cls
    ctx.rows_remaker = next((fn for fn in REMAKERS if isinstance(node, fn._backward_cls)), None)
    ctx.rows_from = None if ctx.rows_remaker is None else node
    if ctx.rows_from is None:
        ctx.save_for_backward(rows, *tensors)
    else:
        ctx.save_for_backward(*tensors)


def saved_rows(ctx) -> tuple[Tensor, ...]:
    """(rows, *tensors) as ``save_rows`` was given them."""
    if ctx.rows_from is None:
        return ctx.saved_tensors
    return (ctx.rows_remaker.output_again(ctx.rows_from), *ctx.saved_tensors)
