"""The dense-masked engine's tensor: a dense map that carries its mask (masked_engine.py), and the
one way its twins run a function on the visible sites' rows.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ..mask import upsample_active


class MaskedTensor(NamedTuple):
    """A dense (B, C, h, w) map, the coarse visible-patch grid, and whether hidden sites may hold
    values (``dirty``) rather than zeros."""

    x: Tensor
    active: Tensor
    dirty: bool = False

    def visible(self) -> Tensor:
        """(B, 1, h, w) bool mask at this map's resolution."""
        return upsample_active(self.active, self.x.shape[-2:])

    def clean(self) -> "MaskedTensor":
        return MaskedTensor(self.x * self.visible(), self.active) if self.dirty else self

    def __add__(self, other: "MaskedTensor") -> "MaskedTensor":
        return MaskedTensor(self.clean().x + other.clean().x, self.active)

    def __sub__(self, other: "MaskedTensor") -> "MaskedTensor":
        return MaskedTensor(self.clean().x - other.clean().x, self.active)


def on_visible_rows(inp: MaskedTensor, fn) -> MaskedTensor:
    """``fn`` on the (N_visible, C) channel rows of the visible sites; hidden sites become zeros
    (whatever a dirty input held there)."""
    x = inp.x.permute(0, 2, 3, 1)
    where = inp.visible()[:, 0].nonzero(as_tuple=True)
    rows = fn(x[where])  # not always x's dtype: a layer norm returns float32 under CUDA autocast
    out = rows.new_zeros(x.shape[:-1] + (rows.shape[-1],)).index_put(where, rows)
    return MaskedTensor(out.permute(0, 3, 1, 2), inp.active)
