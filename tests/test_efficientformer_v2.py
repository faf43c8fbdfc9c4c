"""EfficientFormerV2 (encoders/families/efficientformer_v2.py) beyond the family tables, which test
``efficientformerv2_s0``: its attention biases are made for the maps of its own input size, so any
other map is refused in one line by both engines (timm's own attention would fail to reshape it)."""

import pytest
import timm
import torch

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse import MaskedDenseEncoder, SparseEncoder


@pytest.mark.parametrize("engine", [SparseEncoder, MaskedDenseEncoder])
def test_a_map_other_than_the_biases_is_refused_in_one_line(engine):
    encoder = engine.from_timm(timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=0, img_size=64))
    images, active = torch.randn(1, 3, 96, 96), torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^EfficientFormerV2's attention biases are made for maps of 2x2 sites, got "
                                         r"3x3; use the model's own input size$"):
        encoder.dense_features(images, active)
