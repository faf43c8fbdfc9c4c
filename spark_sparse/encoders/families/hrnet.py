"""The HRNet family (timm ``hrnet``: HRNet-W18-Small .. W64, the SSLD ones; the backbones of
HRNet pose estimation and segmentation).

A stem of two strided 3x3 conv-norm-ReLUs (stride 4), ResNet bottlenecks, then stages of parallel
branches at strides 4, 8, 16 and 32 (a transition adds each new branch, a strided 3x3 of the
coarsest one): a stage's modules run each branch's ResNet blocks and fuse them, every branch
summing all others brought to its stride: finer ones by strided 3x3 conv-norms, coarser ones by a
1x1 conv-norm and a nearest upsampling, which stays in each visible patch (``sparse/upsample.py``).
The classification head widens each branch (a bottleneck) and joins them fine to coarse, each
joined map strided (a 3x3 conv-norm-ReLU) and added to the next branch's, the last through a 1x1
to 2048 channels.

The encoder's four features are that head's joined maps at strides 4 to 32 (the last after its
1x1): every parameter of the trunk reaches them, as timm's classifier does. timm keeps the
branches' flow in its model's forward rather than in modules; ``hrnet_features`` runs that flow
on the timm model and the converted body alike (the body keeps timm's names).
"""

from __future__ import annotations

from timm.models.hrnet import HighResolutionModule, HighResolutionNet, SequentialList
from torch import nn

from ..family import Family
from ..layouts import STRIDES, Layout
from ..mirrors import Converter, MirrorSequential
from ..refusals import ConversionError
from .resnet import RESNET

STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "layer1")
BRANCHES = ("transition1", "stage2", "transition2", "stage3", "transition3", "stage4")


def mirror_module_list(modules: nn.ModuleList, convert: Converter, path: str) -> nn.ModuleList:
    """A plain ModuleList (it slices, as timm's forward does) of the modules converted, indices kept."""
    return nn.ModuleList(convert(m, f"{path}.{i}") for i, m in enumerate(modules))


class MirrorHighResolutionModule(nn.Module):
    """HighResolutionModule: each branch's blocks, then every output branch the ReLU of the sum of
    all branches brought to its stride (its own as it is)."""

    def __init__(self, module: HighResolutionModule, convert: Converter, path: str):
        super().__init__()
        self.branches = convert(module.branches, f"{path}.branches")
        self.fuse_layers = convert(module.fuse_layers, f"{path}.fuse_layers")
        self.fuse_act = convert.leaf(module.fuse_act, f"{path}.fuse_act")

    def forward(self, x: list) -> list:
        x = [branch(b) for branch, b in zip(self.branches, x)]
        if len(x) == 1:
            return x
        fused = []
        for layers in self.fuse_layers:
            y = layers[0](x[0])
            for layer, b in zip(layers[1:], x[1:]):
                y = y + layer(b)
            fused.append(self.fuse_act(y))
        return fused


def hrnet_features(net: nn.Module, x) -> list:
    """The stem, the stages of parallel branches, then the head's joined maps at strides 4 to 32,
    on a timm HRNet or its converted body (the same names): timm's ``forward_features`` with taps."""
    for name in STEM:
        x = getattr(net, name)(x)
    branches = [x]
    for transition, stage in zip(BRANCHES[::2], BRANCHES[1::2]):
        # timm's flow: a kept branch passes as it is, any other starts from the coarsest one
        branches = getattr(net, stage)([branches[i] if isinstance(t, nn.Identity) else t(branches[-1])
                                        for i, t in enumerate(getattr(net, transition))])
    feats = [net.incre_modules[0](branches[0])]
    for incre, down, b in zip(net.incre_modules[1:], net.downsamp_modules, branches[1:]):
        feats.append(incre(b) + down(feats[-1]))
    feats[-1] = net.final_layer(feats[-1])
    return feats


def hrnet_layout(model: HighResolutionNet) -> Layout:
    """Every module the features use (the stages' lists are what each feature adds to the flow)."""
    if model.incre_modules is None or model.downsamp_modules is None:
        raise ConversionError(f"HighResolutionNet with head {model.head!r}: the encoder's features are the "
                              "classification head's joined maps; build it with head='classification'")
    incre = [f"incre_modules.{i}" for i in range(len(STRIDES))]
    down = [f"downsamp_modules.{i}" for i in range(len(STRIDES) - 1)]
    stages = ((incre[0],), (incre[1], down[0]), (incre[2], down[1]), (incre[3], down[2], "final_layer"))
    channels = [4 * c for c in model.head_channels[:-1]] + [model.num_features]
    return Layout(STEM + BRANCHES, stages, tuple(channels))


HRNET = Family(
    name="hrnet",
    timm_class=HighResolutionNet,
    mirrors={**RESNET.mirrors, HighResolutionModule: MirrorHighResolutionModule, SequentialList: MirrorSequential,
             nn.ModuleList: mirror_module_list},
    layout=hrnet_layout,
    norm_acts=RESNET.norm_acts,
    features=hrnet_features,
)
