"""Bad input is refused with a ValueError that names the problem."""

import pytest
import torch

from spark_sparse import engine_class, random_active
from spark_sparse.encoders.families import input_sizes
from spark_sparse.encoders.refusals import ConversionError
from spark_sparse.model.spark import SparK

from .conftest import ENGINE_NAMES


@pytest.fixture(scope="module", params=ENGINE_NAMES)
def encoder(request):
    return engine_class(request.param).from_timm("resnet18").eval()


def test_size_not_divisible_by_32(encoder):
    with pytest.raises(ValueError, match="not divisible by the encoder stride 32"):
        encoder(torch.randn(1, 3, 100, 96), torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_an_empty_batch(encoder):
    with pytest.raises(ValueError, match=r"images hold no image \(a batch of 0\)"):
        encoder(torch.randn(0, 3, 64, 64), torch.ones(0, 1, 2, 2, dtype=torch.bool))


def test_active_of_wrong_shape(encoder):
    with pytest.raises(ValueError, match=r"active must have shape \(2, 1, 2, 3\)"):
        encoder(torch.randn(2, 3, 64, 96), torch.ones(2, 1, 3, 2, dtype=torch.bool))


def test_active_of_wrong_dtype(encoder):
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        encoder(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 2, 2))


def test_image_without_visible_patch(encoder):
    active = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    active[1] = False
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] of the batch have no visible patch"):
        encoder(torch.randn(2, 3, 64, 64), active)


def test_train_mode_batch_norm_with_a_single_visible_site(encoder):
    active = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    active[0, 0, 1, 0] = True
    encoder.train()
    try:
        with pytest.raises(ValueError, match="single visible patch"):
            encoder(torch.randn(1, 3, 64, 64), active)
    finally:
        encoder.eval()
    assert encoder(torch.randn(1, 3, 64, 64), active)[-1] is not None  # fine in eval mode


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_from_timm_options_are_the_engines_own(engine):
    """timm's options (pretrained=True) belong to timm.create_model; they used to fail deep in a leaf."""
    own = "conv" if engine == "sparse" else "none"
    with pytest.raises(TypeError, match=rf"Encoder.from_timm takes the engine's conversion options \({own}\), "
                                        r"not pretrained; for timm's options pass a model"):
        engine_class(engine).from_timm("resnet18", pretrained=True)
    if engine == "sparse":
        assert engine_class(engine).from_timm("resnet18", conv="minkowski") is not None


def test_a_decoder_of_no_width():
    with pytest.raises(ValueError, match=r"decoder width 0 must be a positive multiple of 32"):
        SparK.build("resnet18", engine="dense_masked", decoder_width=0)


def test_mask_ratio_outside_range():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_active(1, (7, 7), 1.0)


def test_random_active_keeps_the_papers_count():
    g = torch.Generator().manual_seed(0)
    active = random_active(4, (7, 7), 0.6, g)
    assert active.shape == (4, 1, 7, 7) and active.dtype == torch.bool
    assert active.flatten(1).sum(1).tolist() == [20] * 4  # round(49 * 0.4)


@pytest.mark.parametrize("model,multiple,largest", [
    ("resnet18", 32, None),
    ("mobilevit_xxs", 64, None),  # 2x2 blocks of sites at stride 32 too
    ("maxvit_tiny_tf_224", 224, None),  # groups and grids of 7x7 sites whole at stride 32
    ("maxvit_tiny_tf_384", 384, None),  # of 12x12
    ("coatnet_0_rw_224", 32, None),  # global attention: no partitions
    ("botnet26t_256", 32, 256),  # relative position tables of its own map
    ("lambda_resnet26rpt_256", 32, 256),  # the same for its position lambdas
    ("lambda_resnet26t", 32, None),  # position lambdas of a convolution
    ("halonet26t", 256, None),  # halo attention's 8x8 blocks of sites whole at stride 32
    ("haloregnetz_b", 224, None),  # of 7x7
    ("halo2botnet50ts_256", 128, 256),  # halo attention's blocks whole at stride 16, BotNet's tables at 32
    ("cpubone_t0", 32, None),  # attention over patches at stride 16: a whole number of them, as the mask's
    ("lowformer_b0", 32, None),  # the same, upsampled by transposed convolutions
    ("gcvit_xxtiny", 224, 224),  # groups and global tokens fractions of its own size
    ("mvitv2_tiny", 224, 224),  # relative position tables indexed from its own map's corner
    ("coat_lite_tiny", 32, None),  # its patch embeddings are timm's for its own size alone, the encoders' for any
    ("efficientformerv2_s0", 224, 224),  # attention biases of its own maps
    ("pvt_v2_b2_li", 224, 224),  # keys pooled to 7x7 cells: one per patch at its own size
    ("pvt_v2_b2", 32, None),  # the others' keys one per patch at any size
    ("hiera_tiny_224", 224, 224),  # a position embedding of its own map
    ("visformer_tiny", 224, 224),  # position embeddings of its own maps
    ("nest_tiny", 224, 224),  # the same
    ("sam2_hiera_tiny", 224, None),  # windows of 14x14 and 7x7 sites whole at strides 16 and 32
    ("sam2_hiera_large", 256, None),  # of 16x16 and 8x8
])
def test_each_family_declares_the_input_sizes_its_models_run_at(model, multiple, largest):
    sizes = input_sizes(model)
    assert (sizes.multiple, sizes.largest) == (multiple, largest)
    assert sizes.refusal(model, multiple * 2 if largest is None else largest) is None
    if largest == multiple:  # its own size alone
        assert sizes.refusal(model, largest * 2) == (
            f"model {model} {sizes.why_multiple}: input_size must be {largest}, got {largest * 2}")
        return
    assert sizes.refusal(model, multiple + 16) == (
        f"model {model} {sizes.why_multiple}: input_size must be a multiple of {multiple}, got {multiple + 16}")
    if largest is not None:
        assert sizes.refusal(model, largest + multiple) == (
            f"model {model} {sizes.why_largest}: input_size must be at most {largest}, got {largest + multiple}")


def test_the_input_sizes_of_a_model_of_no_supported_family_are_refused_in_one_line():
    with pytest.raises(ConversionError, match="^'vit_base_patch16_224' is no model of a timm module the encoders "
                                              "convert$"):
        input_sizes("vit_base_patch16_224")
