"""The timm model families the encoders convert, as timm keeps its registry apart from its models:
a new family is one module of this package (resnet.py, convnext.py, ...) defining a ``Family``,
listed here."""

from __future__ import annotations

import timm
from torch import nn

from .byobnet import BYOBNET
from .coat import COAT
from .convnext import CONVNEXT
from .cpubone import CPUBONE
from .cspnet import CSPNET
from .cspnext import CSPNEXT
from .davit import DAVIT
from .densenet import DENSENET
from .dla import DLA_FAMILY
from .dpn import DPN_FAMILY
from .edgenext import EDGENEXT
from .efficientformer import EFFICIENTFORMER
from .efficientformer_v2 import EFFICIENTFORMER_V2
from .efficientnet import EFFICIENTNET, MOBILENETV3, MOBILENETV5
from .efficientvit import EFFICIENTVIT
from .fasternet import FASTERNET
from .fastvit import FASTVIT
from ..family import Family, InputSizes
from ..refusals import ConversionError
from .focalnet import FOCALNET
from .gcvit import GCVIT
from .ghostnet import GHOSTNET
from .hgnet import HGNET
from .hiera import HIERA
from .hieradet import HIERADET
from .hrnet import HRNET
from .iformer import IFORMER
from .inception_next import INCEPTION_NEXT
from .lcnetv2 import LCNETV2
from .lowformer import LOWFORMER
from .mambaout import MAMBAOUT
from .maxxvit import MAXXVIT
from .metaformer import METAFORMER
from .mvitv2 import MVITV2
from .nest import NEST
from .nfnet import NFNET
from .pvt_v2 import PVT_V2
from .rdnet import RDNET
from .regnet import REGNET
from .resnet import RESNET
from .resnetv2 import RESNETV2
from .selecsls import SELECSLS
from .senet import SENET
from .repghost import REPGHOST
from .repvit import REPVIT
from .rexnet import REXNET
from .starnet import STARNET
from .swiftformer import SWIFTFORMER
from .swin import SWIN
from .swin_v2 import SWIN_V2
from .swin_v2_cr import SWIN_V2_CR
from .tiny_vit import TINY_VIT
from .tresnet import TRESNET
from .twins import TWINS
from .vgg import VGG_FAMILY
from .visformer import VISFORMER
from .vovnet import VOVNET
from .xception import XCEPTION

FAMILIES: tuple[Family, ...] = (RESNET, CONVNEXT, REGNET, EFFICIENTNET, MOBILENETV3,
                                RESNETV2, BYOBNET, CSPNET, NFNET, MAMBAOUT, DENSENET, REXNET, GHOSTNET, VGG_FAMILY,
                                HGNET, STARNET, FASTERNET, REPVIT, RDNET, INCEPTION_NEXT, DPN_FAMILY,
                                VOVNET, CSPNEXT, SENET, DLA_FAMILY, REPGHOST, XCEPTION, HRNET, FASTVIT, TRESNET,
                                METAFORMER, FOCALNET, LCNETV2, EFFICIENTVIT, SWIFTFORMER,
                                PVT_V2, TWINS, TINY_VIT, EFFICIENTFORMER, SWIN, SWIN_V2, EDGENEXT,
                                SELECSLS, SWIN_V2_CR, DAVIT, MOBILENETV5, IFORMER, MAXXVIT, HIERA, CPUBONE,
                                LOWFORMER, GCVIT, MVITV2, EFFICIENTFORMER_V2, HIERADET, COAT, VISFORMER,
                                NEST)


def family_of(model: nn.Module) -> Family:
    """The family of a timm model instance; a one-line ConversionError for any other model."""
    for family in FAMILIES:
        if type(model) in family.timm_classes:
            return family
    names = ", ".join(c.__name__ for f in FAMILIES for c in f.timm_classes)
    raise ConversionError(f"expected a timm model of a supported family ({names}), "
                          f"got {type(model).__name__}")


def family_named(name: str) -> Family:
    """The family of the timm model called ``name``; a one-line ConversionError for any other."""
    family = next((f for f in FAMILIES if timm.models.is_model_in_modules(name, list(f.timm_modules))), None)
    if family is None:
        raise ConversionError(f"'{name}' is no model of a timm module the encoders convert")
    return family


def input_sizes(name: str) -> InputSizes:
    """The input sizes the encoders of the timm model ``name`` (of a supported family) run at."""
    return family_named(name).input_sizes(name)


def encoder_strides(name: str) -> tuple[int, ...]:
    """The strides of the scales the encoders of the timm model ``name`` output, fine to coarse."""
    return family_named(name).strides
