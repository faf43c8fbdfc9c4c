"""MViTv2 (encoders/families/mvitv2.py) beyond the family tables, which test ``mvitv2_tiny``: the large model's
layout (attention at the block's input width, the MLP's shortcut projected instead), the models and
sizes refused, and the pooling leaves against timm's own arithmetic.

Small models at 64 px (a 2x2 patch grid), built for that size: their relative position tables reach
its maps alone.
"""

import copy

import pytest
import torch
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI, randomise_norms

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse import MaskedDenseEncoder, SparseEncoder
from spark_sparse.encoders.families.mvitv2 import HeadLayerNorm, HeadSharedConv2d

from .test_encoder_equivalence import (assert_equals_plain_timm_in_eval_mode, assert_train_steps_equal, batch_on,
                                       encoders)

SIZE = (64, 64)


def small_mvitv2(**cfg) -> MultiScaleVit:
    torch.manual_seed(0)
    cfg = MultiScaleVitCfg(**{"depths": (1, 1, 2, 1), "embed_dim": 16, "num_heads": 1, **cfg})
    return randomise_norms(MultiScaleVit(cfg, img_size=SIZE, num_classes=0))


@pytest.mark.parametrize("mask", ["ratio0.6", "one"])
def test_the_large_models_layout_equals_dense_masked(mask, device):
    """``mvitv2_large``'s: no expansion in the attention (the shortcut of a stage's first block is
    its input, max-pooled), the MLP's shortcut the projection of its normed input where the width grows."""
    model = small_mvitv2(expand_attn=False, num_heads=2)
    assert any(block.shortcut_proj_mlp is not None for stage in model.stages for block in stage.blocks)
    images, active = batch_on(device, SIZE, mask, batch=4 if mask == "one" else 2)
    assert_train_steps_equal(*encoders(model, train=True, device=device), images, active)


def test_the_large_models_layout_with_nothing_hidden_equals_timm(device):
    model = small_mvitv2(expand_attn=False, num_heads=2)
    images, everything = batch_on(device, SIZE, "none", batch=2)
    assert_equals_plain_timm_in_eval_mode(model, images, everything, device)


@pytest.mark.parametrize("engine", [SparseEncoder, MaskedDenseEncoder])
def test_the_large_models_weights_load_back_into_timm(engine):
    model = small_mvitv2(expand_attn=False, num_heads=2)
    state = engine.from_timm(copy.deepcopy(model)).timm_state_dict()
    fresh = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 2, 1), embed_dim=16, num_heads=2, expand_attn=False),
                          img_size=SIZE, num_classes=0)
    fresh.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("engine", [SparseEncoder, MaskedDenseEncoder])
def test_a_map_larger_than_the_tables_reach_is_refused_in_one_line(engine):
    encoder = engine.from_timm(small_mvitv2())
    images, active = torch.randn(1, 3, 128, 128), torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^MViTv2's relative position tables reach 31 offsets, too few for queries "
                                         r"on 32 and keys on 8 sites a side; use the model's own input size$"):
        encoder.dense_features(images, active)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_the_pooling_runs_timms_kernel_on_every_head(stride):
    """timm folds the heads into the batch and runs one head's depthwise kernel on each."""
    heads, d = 3, 4
    conv = torch.nn.Conv2d(d, d, 3, stride, 1, groups=d, bias=False).double()
    norm = torch.nn.LayerNorm(d).double()
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, heads * d, 16, 16, dtype=torch.float64)
    want = norm(conv(x.view(2 * heads, d, 16, 16)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    got = HeadLayerNorm(norm, heads)(HeadSharedConv2d(conv, heads, "pool")(x))
    assert torch.allclose(got, want.reshape(2, heads * d, 16 // stride, 16 // stride), atol=1e-12)
