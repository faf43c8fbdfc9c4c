"""A class token beside an engine's map (CoaT-Lite's, MViTv2's ``_cls`` models'): each image's one
token that attends and is attended to with the map's visible tokens, but lies at no site.

It is a plain (B, C) tensor, not a row of the map (B is 1 before the first attention, whose output
is each image's). Each engine's twins of ``nn.Linear`` and ``nn.LayerNorm`` are those classes, so the
mirrors run the map's own leaves on the token's rows, with the very parameters the map's rows use;
a branch's drop path is drawn once per image, as timm's, and scales the map's rows and the token alike.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from .leaves import ImageFactor
from .mirrors import Converter
from .refusals import unsupported


def linear_rows(linear: nn.Linear, rows: Tensor) -> Tensor:
    """A linear leaf on plain (B, C) rows."""
    return F.linear(rows, linear.weight, linear.bias)


def layer_norm_rows(norm: nn.LayerNorm, rows: Tensor) -> Tensor:
    """A layer-norm leaf on plain (B, C) rows."""
    return F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def check_mlp_rows(mlp: nn.Module, path: str) -> None:
    """Refuse an MLP ``mlp_rows`` does not run: timm's Mlp with exact GELU and no middle norm."""
    if not isinstance(getattr(mlp, "norm", None), nn.Identity) or type(mlp.act) is not nn.GELU \
            or mlp.act.approximate != "none":
        raise unsupported(mlp, path, "an MLP beside a class token other than fc1, exact GELU, fc2")


def mlp_rows(mlp: nn.Module, rows: Tensor) -> Tensor:
    """A mirrored MLP (``convnext.MirrorMlp``: fc1, GELU, fc2) on plain (B, C) rows."""
    return linear_rows(mlp.fc2, F.gelu(linear_rows(mlp.fc1, rows)))


class DropPathBoth(nn.Module):
    """x + out and cls + out_cls, with timm's drop path (one draw per image, the kept ones scaled by
    1 / keep) of ``drop_path``'s rate on out and out_cls alike."""

    def __init__(self, drop_path: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.drop_prob = drop_path.drop_prob if isinstance(drop_path, DropPath) else 0.0
        self.scale = convert.leaf(ImageFactor(), f"{path}.scale")  # parameter-free: no state dict entry

    def forward(self, x, cls: Tensor, out, out_cls: Tensor):
        if not self.training or self.drop_prob == 0.0:
            return x + out, cls + out_cls
        keep = 1.0 - self.drop_prob
        factors = out_cls.new_empty(out_cls.shape[0]).bernoulli_(keep).div_(keep)  # timm's draw, per image
        return x + self.scale(out, factors), cls + out_cls * factors[:, None]

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
