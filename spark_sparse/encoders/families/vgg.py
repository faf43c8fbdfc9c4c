"""The VGG family (timm ``VGG``: VGG-11/13/16/19, with or without batch norm).

The body is one Sequential ``features`` of 3x3 convolutions, [batch norms], ReLUs and 2x2
max poolings (whose windows lie in one 32-pixel patch); the convolutions before the second
pooling run at strides 1 and 2, so they make the stem. timm's ``pre_logits`` (a 7x7 and a 1x1
convolution) runs on the pooled map in the classifier head: kept (frozen, never run) for strict
loading.
"""

from __future__ import annotations

from timm.models.vgg import VGG

from ..family import Family
from ..layouts import ChildStages

VGG_FAMILY = Family(
    name="vgg",
    timm_class=VGG,
    mirrors={},
    layout=ChildStages(),
    kept=("pre_logits",),
)
