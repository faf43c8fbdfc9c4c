"""Autocast for the engine's own autograd functions, on whichever device their rows live.

``torch.amp.custom_fwd``/``custom_bwd`` fix the device type, and the dtype to cast to, when the
class is defined; our rows may be on CPU or CUDA, under bf16 or fp16, so both are read at call
time from the first tensor argument and autocast's state there. Otherwise the rule is theirs:

* ``autocast_forward``: under autocast, float32 tensor arguments are cast to autocast's dtype
  (float64 is left alone, as autocast does) and the forward runs with autocast off, so what it
  saves for backward is in that dtype. With ``cast_inputs=False`` (norms with float32 parameters
  and statistics, pooling, gates: operators autocast does not cast) only the second part holds.
* ``autocast_backward``: backward runs with autocast off, whatever the caller's state. Autograd
  gives it gradients in the forward outputs' dtype and casts what it returns to the inputs'
  dtypes: a float32 parameter gets a float32 gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def _device_type(args: tuple) -> str:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
    raise TypeError("an autocast_forward function needs a tensor argument")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype on ``device_type`` if autocast is on there; None if off or unknown (meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(value, dtype: torch.dtype):
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype is not torch.float64:
        return value.to(dtype)
    return value


def autocast_forward(forward: Callable | None = None, *, cast_inputs: bool = True) -> Callable:
    """Decorates an autograd function's ``forward(ctx, *args)``: see the module's docstring."""
    if forward is None:
        return functools.partial(autocast_forward, cast_inputs=cast_inputs)

    @functools.wraps(forward)
    def run(ctx, *args):
        device = ctx.autocast_device = _device_type(args)
        dtype = autocast_dtype(device)
        if dtype is None:
            ctx.autocast_device = None  # autocast off, or a device it does not know (meta)
            return forward(ctx, *args)
        if cast_inputs:
            args = tuple(_cast(a, dtype) for a in args)
        with torch.autocast(device, enabled=False):
            return forward(ctx, *args)

    return run


def autocast_backward(backward: Callable) -> Callable:
    """Decorates the ``backward(ctx, *grads)`` of an ``autocast_forward`` function."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if ctx.autocast_device is None:
            return backward(ctx, *grads)
        with torch.autocast(ctx.autocast_device, enabled=False):
            return backward(ctx, *grads)

    return run
