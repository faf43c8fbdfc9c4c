"""The CoaT-Lite family (timm ``coat``: Co-Scale Conv-Attentional Image Transformers, ``coat_lite_tiny``
.. ``_medium_384``).

Four stages at strides 4, 8, 16, 32, each a patch embedding (a 4x4, then 2x2, stride-equal
convolution and a layer norm), a class token put beside the map, and serial blocks: a convolutional
position encoding (the map plus a depthwise 3x3 of it, shared by the stage's blocks, the class token
passing), then x + factorised attention(norm1(x)), then x + MLP(norm2(x)). The attention: per head,
softmax over the image's tokens of k (the class token one of them), its products with v summed over
them, then each query times that (C x C) matrix, scaled; plus, at the map's tokens, the query times
depthwise 3x3, 5x5 and 7x7 convolutions of v over groups of heads (the convolutional relative
position encoding, shared by the stage's blocks; zero at the class token). A stage's class token is
dropped at its end. Over the visible part this is timm's model of a smaller image: no hidden token is
a key, the convolutions read zeros there, and the class token meets the visible tokens alone.

The class token is a plain (B, C) tensor beside the engine's map (``class_token.py``); the attention
leaf takes both. CoaT's parallel blocks (``coat_tiny``, ``_mini``, ``_small``: the scales mixed by bilinear resizing)
are not mirrored.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.coat import CoaT, ConvPosEnc, ConvRelPosEnc, FactorAttnConvRelPosEnc, SerialBlock
from torch import Tensor, nn

from ..class_token import DropPathBoth, check_mlp_rows, layer_norm_rows, linear_rows, mlp_rows
from .convnext import MirrorMlp
from ..family import Family
from ..layouts import Layout
from ..leaves import ChannelConcat, ChannelSplit, Product
from ..mirrors import Converter
from ..refusals import ConversionError, refuse_dropout
from .hrnet import mirror_module_list


class FactorAttention(nn.Module):
    """CoaT's factorised attention of q, k and v (``qkv``'s channels, each head after head) at the
    map's tokens and the class token: per head, the softmax over the image's tokens of k times v,
    summed over them, each query times that, times ``scale``. A leaf every engine converts to its own
    twin, which gathers each image's visible tokens; ``attend`` is the computation they share."""

    def __init__(self, num_heads: int, scale: float):
        super().__init__()
        self.num_heads, self.scale = num_heads, scale

    def attend(self, tokens: Tensor, present: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        """(B, n, 3C) tokens, zeros where they hold no visible site (both engines' are: empty slots,
        cleaned maps), (B, n) bool: which hold one, (B or 1, 3C) the class token's -> (B, n, C) the
        tokens' outputs, (B, C) the class token's."""
        b, n, c3 = tokens.shape
        heads, d = self.num_heads, c3 // 3 // self.num_heads
        t = torch.cat([cls.to(tokens.dtype).expand(b, -1)[:, None], tokens], 1)
        q, k, v = t.view(b, n + 1, 3, heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, 1 + n, d)
        keys = torch.cat([present.new_ones(b, 1), present], 1)[:, None, :, None]
        k = k.masked_fill(~keys, float("-inf")).softmax(dim=2)
        out = self.scale * (q @ (k.transpose(-1, -2) @ v))  # absent keys: weight 0, value 0
        out = out.transpose(1, 2).reshape(b, n + 1, heads * d)
        return out[:, 1:], out[:, 0]

    def forward(self, x: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        out, out_cls = self.attend(x.flatten(2).transpose(1, 2), x.new_ones(b, h * w, dtype=torch.bool), cls)
        return out.transpose(1, 2).reshape(b, -1, h, w), out_cls

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, scale={self.scale}"


class MirrorConvPosEnc(nn.Module):
    """The map plus a depthwise 3x3 of it (``proj``); the class token passes."""

    def __init__(self, module: ConvPosEnc, convert: Converter, path: str):
        super().__init__()
        self.proj = convert.leaf(module.proj, f"{path}.proj")

    def forward(self, x):
        return self.proj(x) + x


class MirrorConvRelPosEnc(nn.Module):
    """q times depthwise convolutions of v, one kernel size per group of heads (``conv_list``)."""

    def __init__(self, module: ConvRelPosEnc, convert: Converter, path: str):
        super().__init__()
        self.conv_list = nn.ModuleList(convert.leaf(conv, f"{path}.conv_list.{i}")
                                       for i, conv in enumerate(module.conv_list))
        # parameter-free, names timm's lacks: v's groups split off one after the other
        self.splits = nn.ModuleList(convert.leaf(ChannelSplit(c), f"{path}.splits.{i}")
                                    for i, c in enumerate(module.channel_splits[:-1]))
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")
        self.product = convert.leaf(Product(), f"{path}.product")

    def forward(self, q, v):
        groups = []
        for split in self.splits:
            group, v = split(v)
            groups.append(group)
        groups.append(v)
        return self.product(q, self.concat(*(conv(g) for conv, g in zip(self.conv_list, groups))))


class MirrorFactorAttention(nn.Module):
    """qkv; the factorised attention of the map's tokens and the class token, plus the relative
    position encoding at the map's; proj. timm's names (``crpe``: the stage's shared module)."""

    def __init__(self, module: FactorAttnConvRelPosEnc, convert: Converter, path: str):
        super().__init__()
        refuse_dropout(module, path, "proj_drop")  # timm's attn_drop runs nowhere
        dim = module.qkv.in_features
        self.qkv = convert.leaf(module.qkv, f"{path}.qkv")
        self.proj = convert.leaf(module.proj, f"{path}.proj")
        self.crpe = convert(module.crpe, f"{path}.crpe")
        # parameter-free, names timm's lacks
        self.split_q = convert.leaf(ChannelSplit(dim), f"{path}.split_q")
        self.split_k = convert.leaf(ChannelSplit(dim), f"{path}.split_k")
        self.attention = convert.leaf(FactorAttention(module.num_heads, module.scale), f"{path}.attention")

    def forward(self, x, cls: Tensor):
        qkv = self.qkv(x)
        out, out_cls = self.attention(qkv, linear_rows(self.qkv, cls))
        q, kv = self.split_q(qkv)
        _, v = self.split_k(kv)
        return self.proj(out + self.crpe(q, v)), linear_rows(self.proj, out_cls)


class MirrorSerialBlock(nn.Module):
    """The position encoding, x + attention(norm1(x)), x + MLP(norm2(x)), for the map and its class
    token alike (each branch's drop path one draw per image for both)."""

    def __init__(self, module: SerialBlock, convert: Converter, path: str):
        super().__init__()
        check_mlp_rows(module.mlp, f"{path}.mlp")
        self.cpe = convert(module.cpe, f"{path}.cpe")
        self.norm1 = convert.leaf(module.norm1, f"{path}.norm1")
        self.factoratt_crpe = convert(module.factoratt_crpe, f"{path}.factoratt_crpe")
        self.norm2 = convert.leaf(module.norm2, f"{path}.norm2")
        self.mlp = convert(module.mlp, f"{path}.mlp")
        # timm's one drop path serves both branches (parameter-free: names timm's lacks)
        self.drop_path = DropPathBoth(module.drop_path, convert, f"{path}.drop_path")

    def forward(self, x, cls: Tensor):
        x = self.cpe(x)
        x, cls = self.drop_path(x, cls, *self.factoratt_crpe(self.norm1(x), layer_norm_rows(self.norm1, cls)))
        return self.drop_path(x, cls, self.mlp(self.norm2(x)), mlp_rows(self.mlp, layer_norm_rows(self.norm2, cls)))


class MirrorPatchEmbed(nn.Module):
    """The stride-equal convolution and the layer norm (timm flattens its map to tokens)."""

    def __init__(self, module: PatchEmbed, convert: Converter, path: str):
        super().__init__()
        self.proj = convert.leaf(module.proj, f"{path}.proj")
        self.norm = convert.leaf(module.norm, f"{path}.norm")

    def forward(self, x):
        return self.norm(self.proj(x))


def coat_features(net: nn.Module, x) -> list:
    """The four stages' maps, the last through ``norm4``: timm's ``forward_intermediates(norm=True)``
    on a timm model; on the converted body each stage's class token beside its map."""
    if isinstance(net, CoaT):
        return net.forward_intermediates(x, norm=True, intermediates_only=True)
    feats = []
    for i in range(1, 5):
        x = net[f"patch_embed{i}"](x)
        cls = getattr(net, f"cls_token{i}")[0]  # (1, C): the first block makes it each image's
        for block in net[f"serial_blocks{i}"]:
            x, cls = block(x, cls)
        feats.append(x)
    feats[-1] = net["norm4"](feats[-1])
    return feats


def coat_layout(model: CoaT) -> Layout:
    """Each stage's patch embedding, shared encodings and serial blocks; the last norm ends the last."""
    stages = tuple((f"patch_embed{i}", f"cpe{i}", f"crpe{i}", f"serial_blocks{i}") for i in range(1, 5))
    stages = stages[:3] + (stages[3] + ("norm4",),)
    return Layout((), stages, tuple(model.embed_dims))


def check(model: CoaT) -> None:
    """CoaT-Lite: serial blocks alone, the final norm present."""
    if model.parallel_blocks is not None:
        raise ConversionError("CoaT with parallel blocks (coat_tiny, coat_mini, coat_small: the scales mixed by "
                              "bilinear resizing) is not mirrored; CoaT-Lite's serial blocks are")
    if getattr(model, "norm4", None) is None or any(getattr(model, f"patch_embed{i}") is None for i in range(1, 5)):
        raise ConversionError("CoaT without its four stages and final norm (pruned, or return_interm_layers) is "
                              "not mirrored")


COAT = Family(
    name="coat",
    timm_class=CoaT,
    mirrors={PatchEmbed: MirrorPatchEmbed, ConvPosEnc: MirrorConvPosEnc, ConvRelPosEnc: MirrorConvRelPosEnc,
             FactorAttnConvRelPosEnc: MirrorFactorAttention, SerialBlock: MirrorSerialBlock,
             Mlp: MirrorMlp, nn.ModuleList: mirror_module_list},
    layout=coat_layout,
    check=check,
    features=coat_features,
    parameters=("cls_token1", "cls_token2", "cls_token3", "cls_token4"),
)
