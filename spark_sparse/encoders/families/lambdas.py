"""The lambda layer's two parameter-free halves as leaves every engine converts (timm's
``LambdaLayer``, ``layers/lambda_layer.py``; LambdaNetworks, Bello 2021).

After its qkv 1x1 (every head's q, then k, then v) and the norms of q and v, a lambda layer
summarises each image's tokens in a content lambda: the softmax of k over the tokens times v,
summed, a (key_dim, value_dim) matrix. Each token adds its own position lambda, from v at the
sites around it: the local variant convolves v with ``key_dim`` r x r kernels (an ``nn.Conv3d``
of kernel (r, r, 1) in timm, ``PositionLambdas`` here), the global one sums learned embeddings of
each token's offset times its v. Each head's output is its q times the two lambdas.

Here the softmax and the sums run over each image's visible tokens, and the convolution reads the
hidden sites as zero (both engines keep hidden v at zero): an image keeps its features in a larger
hidden canvas and beside other images. The global variant's offset tables reach the map of the
model's own input size (timm runs that one alone): input sizes up to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import map_tokens


class PositionLambdas(nn.Module):
    """The local variant's position lambdas: each of ``key_dim`` r x r kernels over each channel of
    v, (B, value_dim, h, w) -> (B, key_dim * value_dim, h, w), kernel after kernel; ``weight``
    (key_dim, 1, r, r, 1) and ``bias`` (key_dim,) are timm's ``conv_lambda``'s."""

    def __init__(self, conv: nn.Conv3d, value_dim: int):
        super().__init__()
        self.value_dim = value_dim
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[2]

    def forward(self, v: Tensor) -> Tensor:
        r = self.kernel_size
        out = F.conv3d(v.permute(0, 2, 3, 1).unsqueeze(1), self.weight, self.bias, padding=(r // 2, r // 2, 0))
        return out.permute(0, 1, 4, 2, 3).flatten(1, 2)  # (B, key_dim, h, w, V) -> (B, key_dim * V, h, w)

    def extra_repr(self) -> str:
        return f"key_dim={self.weight.shape[0]}, value_dim={self.value_dim}, kernel_size={self.kernel_size}"


class LambdaMixing(nn.Module):
    """Each token's heads times the content lambda plus its position lambda: the local variant's
    from ``PositionLambdas`` (its channels after q, k and v), the global variant's from ``pos_emb``
    (timm's (2H - 1, 2W - 1, key_dim) embeddings of offsets on maps of up to ``feat`` = (H, W))."""

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, feat: tuple[int, int] | None = None):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.feat = None if feat is None else tuple(feat)

    def like(self, cls: type) -> "LambdaMixing":
        return cls(self.num_heads, self.key_dim, self.value_dim, self.feat)

    def check(self, h: int, w: int) -> None:
        """Refuse, in one line, a map larger than the global variant's offset tables reach."""
        if self.feat is not None and (h > self.feat[0] or w > self.feat[1]):
            raise ValueError(f"the lambda layer's position embeddings reach maps of up to {self.feat[0]}x{self.feat[1]}"
                             f" sites, got {h}x{w}; use an input size up to the model's own (timm runs that alone)")

    def mix(self, tokens: Tensor, present: Tensor, ys: Tensor | None = None, xs: Tensor | None = None,
            pos_emb: Tensor | None = None) -> Tensor:
        """(B, n, C) each token's q, k, v (and position lambdas), (B, n) bool: which are the image's
        tokens, (B, n) each token's row and column (global variant) -> (B, n, heads * value_dim)."""
        heads, kd, vd = self.num_heads, self.key_dim, self.value_dim
        q, k, v, *position = tokens.split([heads * kd, kd, vd] + ([kd * vd] if self.feat is None else []), dim=-1)
        keys = present | ~present.any(1, keepdim=True)  # an image without a token: outputs never read
        k = k.masked_fill(~keys[..., None], float("-inf")).softmax(1)
        lambdas = (k.transpose(1, 2) @ v)[:, None]  # (B, 1, key_dim, value_dim): the content lambda
        if self.feat is None:
            lambdas = lambdas + position[0].unflatten(-1, (kd, vd))
        else:
            (h, w) = self.feat
            emb = pos_emb.to(v.dtype)[ys[:, None, :] - ys[:, :, None] + h - 1, xs[:, None, :] - xs[:, :, None] + w - 1]
            lambdas = lambdas + emb.transpose(-1, -2) @ v[:, None]  # (B, n, key_dim, value_dim)
        return (q.unflatten(-1, (heads, kd)) @ lambdas).flatten(2)

    def mix_map(self, x: Tensor, present: Tensor, pos_emb: Tensor | None = None) -> Tensor:
        """(B, C, h, w) the map's q, k, v (and position lambdas), (B, h * w) bool: which sites are
        the image's tokens -> (B, C', h, w)."""
        b, _, h, w = x.shape
        self.check(h, w)
        tokens, ys, xs = map_tokens(x)
        return self.mix(tokens, present, ys, xs, pos_emb).transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, x: Tensor, pos_emb: Tensor | None = None) -> Tensor:
        present = x.new_ones(x.shape[0], x.shape[2] * x.shape[3], dtype=torch.bool)
        return self.mix_map(x, present, pos_emb)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, feat={self.feat}"
