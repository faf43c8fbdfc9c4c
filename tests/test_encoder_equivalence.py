"""The sparse encoder computes exactly what SparK's dense-masked encoder computes.

Same weights, same images, same mask: the features at visible sites agree to rounding, hidden
sites are zero, parameter gradients and batch-norm running statistics agree, and with nothing
masked both equal the plain timm model, in eval and in train mode. For every family: ResNet
(BasicBlock, Bottleneck), ConvNeXt (V1 with channels-first norms and 1x1-conv MLP, V2 with GRN),
and in the table of variants every other family and block type (each family with every mask
through one member).
(tests/test_spark_reference.py compares both engines with SparK's masked timm forward itself.)

Small models and images: what is tested is the wiring of each block type and the operators at
each stride, which a 96x128 image (non-square: a 3x4 patch grid) and one or two blocks per stage
exercise as a 224 image and ResNet-50 would. Tolerances: float64 agrees to rounding (about 1e-14),
so 1e-9 separates any real difference from rounding; parameter gradients get 1e-6, as batch-norm
backward cancels large terms; float32 (the engines' working precision) is checked at 1e-5 in eval
and 1e-3 in train mode, where batch-norm statistics of few sites amplify rounding.

``pytest --device cuda`` runs the models and images on the GPU (masks stay on the CPU, as in
training): the same tolerances hold there, with TF32 off (conftest's ``device``).
"""

import copy

import pytest
import timm
import torch
from timm.layers import StdConv2dSame
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.byobnet import MobileOneBlock, RepVggBlock
from timm.models.lcnetv2 import RepDepthwiseSeparable
from timm.models.mambaout import GatedConvBlock
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.visformer import Visformer

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI, make_batch, randomise_norms

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse import MaskedDenseEncoder, SparseEncoder
from spark_sparse.encoders.families import family_of
from spark_sparse.encoders.refusals import ConversionError

# resnet26: Bottleneck blocks as in ResNet-50 (strided 3x3, 1x1 downsample, identity blocks), two a stage
MODELS = ["resnet18", "resnet26", "convnext_atto", "convnextv2_atto"]
MASKS = ["none", "ratio0.6", "one"]
SIZE = (96, 128)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def grad_errors(got: dict, want: dict) -> dict:
    """Relative error per gradient. A gradient that is zero up to rounding (the bias of a batch
    norm or convolution whose constant shift the next train-mode norm removes) is measured against
    a floor of 1e-8 of the largest gradient instead of its own norm: StarNet's convolution bias
    before a norm sums large rows to rounding noise of 2.5e-15 of the largest gradient."""
    floor = 1e-8 * max(float(g.norm()) for g in want.values())
    return {k: float((got[k] - want[k]).norm()) / max(float(want[k].norm()), floor) for k in want}


def plain_features(model, images):
    return family_of(model).plain_features(model, images)


def encoders(timm_model, train: bool, device: torch.device):
    sparse = SparseEncoder.from_timm(copy.deepcopy(timm_model)).train(train).to(device)
    dense = MaskedDenseEncoder.from_timm(copy.deepcopy(timm_model)).train(train).to(device)
    return sparse, dense


def batch_on(device: torch.device, size: tuple[int, int], mask: str, batch: int = 4, patch: int = 32):
    """``make_batch``'s images on ``device``; the mask stays on the CPU, as in training."""
    images, active = make_batch(size, mask, batch, patch=patch)
    return images.to(device), active


def assert_equals_plain_timm_in_eval_mode(model, images, everything, device) -> None:
    """``model``'s sparse encoder (float64, eval mode) with nothing hidden equals timm's model."""
    encoder = SparseEncoder.from_timm(copy.deepcopy(model)).double().eval().to(device)
    with torch.no_grad():
        got = encoder.dense_features(images.double(), everything)
        for g, p in zip(got, plain_features(copy.deepcopy(model).double().eval().to(device), images.double())):
            assert rel_err(g, p) < 1e-9


def running_statistics(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", MODELS)
def test_eval_features_equal_dense_masked(timm_models, name, mask, device):
    images, active = batch_on(device, SIZE, mask)
    sparse, dense = encoders(timm_models(name), train=False, device=device)
    with torch.no_grad():
        got = sparse.dense_features(images, active)
        want = dense.dense_features(images, active)
    assert [f.shape for f in got] == [f.shape for f in want]
    for stride, g, w in zip(sparse.strides, got, want):
        assert g.shape[-2:] == (SIZE[0] // stride, SIZE[1] // stride)
        assert rel_err(g, w) < 1e-5, f"stride {stride}"
    if mask == "none":
        with torch.no_grad():
            plain = plain_features(copy.deepcopy(timm_models(name)).eval().to(device), images)
        for g, p in zip(got, plain):
            assert rel_err(g, p) < 1e-5


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", MODELS)
def test_train_features_equal_dense_masked(timm_models, name, mask, device):
    images, active = batch_on(device, SIZE, mask)
    sparse, dense = encoders(timm_models(name), train=True, device=device)
    got, want = sparse.dense_features(images, active), dense.dense_features(images, active)  # as trained: with autograd
    for g, w in zip(got, want):
        assert rel_err(g.detach(), w.detach()) < 1e-3
    if mask == "none":
        with torch.no_grad():
            plain = plain_features(copy.deepcopy(timm_models(name)).train().to(device), images)
        for g, p in zip(got, plain):
            assert rel_err(g.detach(), p) < 1e-3


# what is random in train mode (stochastic depth, Swin V2-CR's dropout in its bias MLP) draws the same in
# both engines and in timm from the same random state: every train-mode pass compared starts from this one
SEED = 0


def train_step(encoder, images, active, dtype, seed: int = SEED):
    """Features, timm-named parameter gradients and state after one train-mode pass."""
    encoder = encoder.to(dtype)
    torch.manual_seed(seed)
    feats = encoder.dense_features(images.to(dtype), active)
    g = torch.Generator().manual_seed(1)
    # a fixed random linear read-out of every scale, so every parameter gets a gradient
    loss = sum((f * torch.randn(f.shape, generator=g, dtype=dtype).to(f.device)).sum() for f in feats)
    loss.backward()
    grads = encoder.to_timm({n: p.grad for n, p in encoder.named_parameters()})
    return [f.detach() for f in feats], grads, encoder.timm_state_dict()


def assert_train_steps_equal(sparse, dense, images, active) -> tuple[list, dict]:
    """One float64 train step of each: the same features, gradients and running statistics."""
    fs, gs, ss = train_step(sparse, images, active, torch.float64)
    fd, gd, sd = train_step(dense, images, active, torch.float64)
    for a, b in zip(fs, fd):
        assert rel_err(a, b) < 1e-9
    assert gs.keys() == gd.keys()
    for key, err in grad_errors(gs, gd).items():
        assert err < 1e-6, key
    for key in sd:  # running statistics moved the same way
        if sd[key].is_floating_point():
            assert rel_err(ss[key], sd[key]) < 1e-9, key
    return fs, ss


def assert_equals_plain_timm_in_train_mode(timm_model, feats: list, state: dict, images, tol: float = 1e-9) -> None:
    """With nothing hidden, a train-mode pass is timm's: batch statistics over all sites, the
    same features and the same running statistics afterwards (float64)."""
    plain = copy.deepcopy(timm_model).double().train().to(images.device)
    torch.manual_seed(SEED)
    with torch.no_grad():
        for f, p in zip(feats, plain_features(plain, images.double())):
            assert rel_err(f, p) < tol
    for key, value in running_statistics(plain.state_dict()).items():
        assert rel_err(state[key], value) < 1e-9, key


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", MODELS)
def test_train_gradients_and_running_stats_equal_dense_masked(timm_models, name, mask, device):
    # float64: batch-norm backward cancels large terms, so float32 rounding would hide real errors
    images, active = batch_on(device, SIZE, mask)
    sparse, dense = encoders(timm_models(name), train=True, device=device)
    feats, state = assert_train_steps_equal(sparse, dense, images, active)
    converted = set(sparse.layout.top_level())  # a kept head norm is not trained
    trained = {k for k, _ in timm_models(name).named_parameters() if k.split(".")[0] in converted}
    assert sparse.to_timm(dict(sparse.named_parameters())).keys() == trained
    if mask == "none":
        assert_equals_plain_timm_in_train_mode(timm_models(name), feats, state, images)


@pytest.mark.parametrize("name", MODELS)
def test_hidden_sites_are_zero_and_never_encoded(timm_models, name, device):
    images, active = batch_on(device, (128, 128), "ratio0.6")
    sparse = SparseEncoder.from_timm(copy.deepcopy(timm_models(name))).eval().to(device)
    with torch.no_grad():
        feats = sparse(images, active)
    visible_patches = int(active.sum())
    for stride, f in zip(sparse.strides, feats):
        assert f.tensor_stride == [stride, stride]
        # exactly the visible sites: (32/stride)^2 sites per visible patch, none elsewhere
        assert f.F.shape[0] == visible_patches * (32 // stride) ** 2
    with torch.no_grad():
        dense_maps = [m.cpu() for m in sparse.dense_features(images, active)]
    hidden = ~active.repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert torch.all(dense_maps[-1] * (~active) == 0)
    assert torch.all(dense_maps[-3].masked_select(hidden) == 0)


def test_stochastic_depth_drops_and_rescales_the_images_timm_would_from_the_same_random_state(timm_models, device):
    # a float64 step of each engine from one seed: the same images' blocks dropped, the rest
    # rescaled by 1 / keep in float64 (both draw as timm's drop_path does)
    images, active = batch_on(device, SIZE, "ratio0.6", batch=8)
    sparse, dense = encoders(timm_models("convnext_atto", drop_path_rate=0.5), train=True, device=device)
    steps = [train_step(encoder, images, active, torch.float64, seed=3) for encoder in (sparse, dense)]
    for a, b in zip(steps[0][0], steps[1][0]):
        assert rel_err(a, b) < 1e-9
    for key, err in grad_errors(steps[0][1], steps[1][1]).items():
        assert err < 1e-6, key


@pytest.mark.parametrize("name", ["resnet26d", "resnet34"])
def test_deep_stem_avg_down_and_other_depths_equal_dense_masked(timm_models, name, device):
    images, active = batch_on(device, SIZE, "ratio0.6")
    for train in (False, True):
        sparse, dense = encoders(timm_models(name), train=train, device=device)
        with torch.no_grad():
            got, want = sparse.dense_features(images, active), dense.dense_features(images, active)
        for g, w in zip(got, want):
            assert rel_err(g, w) < (1e-3 if train else 1e-5)


VARIANTS = {
    "squeeze-excitation ResNet (BasicBlock)": ("seresnet18", {}),
    "efficient channel attention, tiered deep stem, avg-down": ("ecaresnet26t", {}),
    "grouped convolutions (ResNeXt)": ("resnet26", {"cardinality": 32, "base_width": 4}),
    "grouped convolutions and squeeze-excitation (Bottleneck)": ("seresnext26d_32x4d", {}),
    "ResNet with another activation (SiLU)": ("resnet26", {"act_layer": "silu"}),
    "anti-aliased ResNet: 2x2 average pooling after the stride-1 3x3 and in the stem, avg-down": (
        "resnetaa50d", {"layers": (1, 1, 1, 1)}),
    "anti-aliased BasicBlock ResNet": ("resnetaa34d", {"layers": (1, 1, 1, 1)}),
    "ResNet with GroupNorm in place of batch norm (stem, blocks, shortcut)": ("resnet50_gn", {"layers": (1, 1, 1, 1)}),
    "ConvNeXt with linear MLP, channels-last norms": ("convnext_atto", {"conv_mlp": False}),
    "ConvNeXt with overlapping stem": ("convnext_atto_ols", {}),
    "ConvNeXt without layer scale": ("convnext_atto", {"ls_init_value": None}),
    "ConvNeXt with head norm first": ("convnext_atto", {"head_norm_first": True}),
    "RegNetX: grouped bottlenecks, conv-norm-act leaves": ("regnetx_002", {}),
    "RegNetY: squeeze-excitation after the grouped 3x3": ("regnety_002", {}),
    "RegNetY with GroupNorm (timm's GroupNormAct in each conv-norm-act)": ("regnety_040_sgn", {}),
    "RegNetV: pre-activation bottlenecks, a plain stem convolution, a final activation": ("regnetv_040", {}),
    "EfficientNet: inverted residuals, strided depthwise 3x3/5x5, SiLU, SE, head conv": ("efficientnet_b0", {}),
    "EfficientNet-EdgeTPU: fused edge residuals": ("efficientnet_es", {}),
    "MobileNetV2: inverted residuals with ReLU6": ("mobilenetv2_050", {}),
    "MobileNetV3: hard-swish, hard-sigmoid SE, ReLU": ("mobilenetv3_large_100", {}),
    "MobileNetV3-Small: the first block strides": ("mobilenetv3_small_100", {}),
    "MobileNetV4: universal inverted residuals (extra depthwise, inverted, ConvNeXt-like)": (
        "mobilenetv4_conv_small", {}),
    "MobileNetV4 anti-aliased: stride-1 convolutions then 2x2 average pooling": ("mobilenetv4_conv_aa_medium", {}),
}
VARIANT_SIZE = (64, 96)  # a 2x3 patch grid: at mask 0.6 two patches visible per image
# MobileViT's maps need whole 2x2 blocks of sites at every stride: a 2x4 patch grid
VARIANT_SIZES = {"mobilevit_xxs": (64, 128), "mobilevitv2_050": (64, 128), "ghostnetv2_100": (64, 128)}
# MaxViT's groups and grids of 2x2 sites (built for 64 px) need maps of whole ones at every stride: a 2x4 patch
# grid; CoAtNet's attention runs over the whole map of the size timm builds it for: a 2x2 patch grid
VARIANT_SIZES.update({name: (64, 128) for name in ["test_maxvit", "maxvit_tiny_tf_224", "maxxvit_rmlp_nano_rw_256",
                                                   "maxxvitv2_nano_rw_256", "maxvit_tiny_pm_256"]})
VARIANT_SIZES.update({"test_coatnet": (64, 64), "coatnet_rmlp_1_rw_224": (64, 64)})

# TensorFlow ports: 'same' padding at stride 2 (stem, strided depthwise and fused convolutions)
# puts each window one site later; at mask none, equal to timm is what proves the padding right
VARIANTS.update({
    "TensorFlow EfficientNet: 'same'-padded stem and strided depthwise 3x3/5x5": ("tf_efficientnet_b0", {}),
    "TensorFlow EfficientNetV2: 'same'-padded strided fused (full 3x3) convolutions": ("tf_efficientnetv2_b0", {}),
    "TensorFlow MobileNetV3-Small: 'same' padding, the first block strides": ("tf_mobilenetv3_small_100", {}),
})

# timm's resnetv2 module: pre-activation blocks (norm and activation before each convolution), the
# final norm ending the last stage; GroupNorm with each image's statistics over its visible sites
VARIANTS.update({
    "ResNetV2: pre-activation basic blocks, deep stem, avg-down, batch norm": ("resnetv2_18d", {}),
    "ResNetV2: pre-activation bottlenecks, max pooling of the 7x7 stem's output (no activation)": (
        "resnetv2_50", {"layers": (2, 1, 1, 1)}),
    "BiT: GroupNorm, weight-standardised convolutions, zero-padded stem pooling": ("resnetv2_50x1_bit", {}),
    "ResNetV2 with GroupNorm (one channel a group in the deep stem)": ("resnetv2_50d_gn", {"layers": (1, 1, 1, 1)}),
    "ResNetV2 without pre-activation: Bottleneck, normed projection shortcut": (
        "resnetv2_50", {"preact": False, "layers": (2, 1, 1, 1)}),
    "weight-standardised convolutions with TensorFlow 'same' padding (timm's StdConv2dSame)": (
        "resnetv2_50d_gn", {"layers": (1, 1, 1, 1), "conv_layer": StdConv2dSame}),
})

# timm's byobnet and cspnet modules
VARIANTS.update({
    "RepVGG: 3x3, 1x1 and identity-norm branches summed (a strided 1x1 keeps the coarser sites)": ("repvgg_a0", {}),
    "MobileOne: four 3x3 branches, a 1x1 scale branch, an identity norm; depthwise, pointwise": ("mobileone_s0", {}),
    "GENet: a stride-2 stem conv, basic and bottleneck blocks, a final 1x1 conv": ("gernet_s", {}),
    "byobnet ResNeXt: tiered stem, max pooling after SiLU, ECA": ("eca_resnext26ts", {}),
    "byobnet RegNetZ: grouped bottlenecks with SE, no shortcut where the width changes": ("regnetz_b16", {}),
    "CLIP ResNet: 2x2 average-pool anti-aliasing and stem pooling, avg-down": ("resnet50_clip_gap", {}),
    "CSPResNet: cross-stage bottleneck stages, max pooling after LeakyReLU": ("cspresnet50", {}),
    "CSPDarkNet: a stride-1 stem and stride-2 first stage as the encoder's stem": ("cspdarknet53", {}),
    "DarkNet: stages without the split": ("darknet17", {}),
    "CS3DarkNet: cross stages with one transition, SiLU": ("cs3darknet_s", {}),
})

# timm's nfnet module: no norms; scaled weight-standardised convolutions (grouped 3x3s), residual
# branches scaled by constants (test_nfnet: a small NFNet-L, deep stem, SE after the last 1x1)
VARIANTS.update({
    "NF-ResNet: no norms, 7x7 stem and its max pooling (no activation before), avg-pool shortcut": (
        "nf_resnet26", {}),
    "NFNet-L: deep stem, grouped scaled standardised 3x3, SE after the last 1x1, final 1x1 conv": ("test_nfnet", {}),
    "NFNet-F: GELU, a second grouped 3x3 a block": ("test_nfnet", {"extra_conv": True, "act_layer": "gelu"}),
    "NFNet with the activations' gains in GammaAct": ("test_nfnet", {"gamma_in_act": True}),
    "NF-RegNet: 3x3 stem, SE between the 3x3 and the last 1x1": ("nf_regnet_b0", {}),
    "DeepMind's NFNet ports: TensorFlow 'same' padding (grouped strided 3x3s too), skip-init gain": (
        "test_nfnet", {"same_padding": True, "skipinit": True, "gamma_in_act": True}),
})

# timm's mambaout module: gated CNN blocks (fc1 split three ways, a depthwise 7x7 on one part,
# the gate's activation times the rest, fc2), layer norms, 3x3 stride-2 stem and downsampling
VARIANTS.update({
    "MambaOut: gated CNN blocks, 3x3 stride-2 stem with a middle norm, downsampling then norm": (
        "mambaout_femto", {"depths": (1, 1, 1, 1)}),
    "MambaOut _rw: norm-first downsampling, SiLU, layer scale, more channels convolved": (
        "test_mambaout", {"conv_ratio": 1.5}),
})

# timm's densenet module: each layer reads the running concatenation; transitions pool 2x2
SMALL_DENSENET = {"block_config": (2, 2, 2, 2), "growth_rate": 8}
VARIANTS.update({
    "DenseNet: dense blocks (pre-activation, concatenated), transitions, 7x7 stem and max pooling": (
        "densenet121", SMALL_DENSENET),
    "DenseNet with a deep 3x3 stem": ("densenet264d", {"block_config": (1, 2, 1, 1), "growth_rate": 8}),
})

# timm's rexnet module: linear bottlenecks whose input joins their first channels, SE with a batch
# norm on the pooled vectors, a final 1x1 conv-norm-act ending the last stage
VARIANTS.update({
    "ReXNet: partial residuals, SE with a batch norm inside, SiLU and ReLU6": ("rexnet_100", {}),
    "ReXNet with rounded channels": ("rexnetr_100", {}),
})

# timm's ghostnet module (version 1): ghost modules (a 1x1 and a depthwise 3x3 of it side by side),
# strided depthwise convolutions, hard-sigmoid SE, depthwise + 1x1 shortcuts; version 2's DFC attention
# gate (2x2 cells with norms of their own, upsampled back: at 64 x 128 the stride-32 map's two cells of
# 2 x 2 patches, some half hidden); version 3's re-parameterisable branches and the gate (at 64 x 96 the
# 2 x 3 sites' one cell, timm's pooling leaving out a column, its upsampling stretching the cell)
VARIANTS["GhostNet: ghost modules, strided depthwise 3x3/5x5, SE, depthwise shortcuts"] = ("ghostnet_050", {})
VARIANTS["GhostNetV2: V1's ghost modules times the DFC attention gate of their input"] = ("ghostnetv2_100", {})
VARIANTS["GhostNetV3: summed conv-norm branches, a strided 1x1 branch, the DFC gate"] = ("ghostnetv3_050", {})

# timm's vgg module: plain 3x3 convolutions at every stride from 1, 2x2 max poolings (a small head MLP:
# timm's 7x7 pre-logits convolution is kept, not run)
SMALL_VGG_HEAD = {"mlp_ratio": 1 / 64}
VARIANTS.update({
    "VGG with batch norm: stride-1 and stride-2 convolutions in the stem, 2x2 max poolings": ("vgg11_bn", SMALL_VGG_HEAD),
    "VGG without norms": ("vgg11", SMALL_VGG_HEAD),
})

# timm's hgnet module: blocks joining their input and every layer's output (a chain of conv-norm-acts,
# or light 1x1 + depthwise 5x5 pairs), residual after a stage's first block, strided depthwise 3x3;
# V2's stem: 2x2 convolutions and a 2x2 max pooling padded below and right, joined; learned scalar
# affines after its activations (they move zero); V1's stem and effective SE (ESE) aggregation
VARIANTS.update({
    "PP-HGNetV2: 2x2 stem convolutions and pooling padded below/right, scalar affines, light blocks": (
        "hgnetv2_b0", {}),
    "PP-HGNet: 3x3 stem and max pooling, ESE aggregation": ("hgnet_tiny", {}),
})

# timm's starnet module: the "star" (act(f1) times f2, a product of two 1x1 branches' rows) between
# depthwise 7x7s, strided 3x3 conv-norms between stages, the features' final batch norm
VARIANTS["StarNet: star products, depthwise 7x7 with and without a norm, final batch norm"] = ("starnet_s050", {})
# timm's fasternet module: partial convolutions (a 3x3 over a quarter of the channels, split and
# concatenated), 1x1 MLPs, 4x4 and 2x2 patchify convolutions, layer scale where enabled
VARIANTS.update({
    "FasterNet: partial convolutions, patch embedding and merging": ("fasternet_t0", {}),
    "FasterNet with layer scale and GELU": ("fasternet_t0", {"layer_scale_init_value": 0.1, "act_layer": torch.nn.GELU}),
})

# timm's repvit module: depthwise kxk conv-norm + depthwise 1x1 (with a bias, or legacy: a conv-norm)
# + identity under one norm, SE every other block, 1x1 conv-norm MLPs with GELU, downsampling blocks
VARIANTS.update({
    "RepViT: re-parameterisable depthwise branches, SE, GELU MLPs, downsampling blocks": ("repvit_m0_9", {}),
    "RepViT, legacy branches (the 1x1 with its own norm, none after the sum)": ("repvit_m1", {"legacy": True}),
})

# timm's res2net and resnest modules (ResNet models of their own bottlenecks): groups of channels in a
# chain of 3x3s, a 3x3 average pooling at a stage's first block (hidden sites counted as zeros, as the
# padding), grouped; split attention (radix 2, or 1: a sigmoid), the pooling before or after the 3x3
FOUR_BLOCKS = {"layers": (1, 1, 1, 1)}
VARIANTS.update({
    "Res2Net: hierarchical groups of 3x3s, 3x3 average pooling at stride 1 and 2": ("res2net50_26w_4s", FOUR_BLOCKS),
    "Res2NeXt: grouped 3x3s in the groups": ("res2next50", FOUR_BLOCKS),
    "ResNeSt: split attention (radix 2), 3x3 average pooling after it, avg-down": ("resnest14d", {}),
    "ResNeSt radix 1 (a sigmoid), grouped, pooling before the split attention": ("resnest50d_1s4x24d", FOUR_BLOCKS),
})

# timm's rdnet module: dense stages whose blocks (depthwise 7x7, layer norm, 1x1 MLP with GELU,
# [effective SE with a hard sigmoid], layer scale) read the running concatenation; layer-norm
# transitions with 1x1 and 2x2 stride-2 convolutions; a patchify stem, or a deep one
VARIANTS.update({
    "RDNet: dense stages of ConvNeXt-like blocks, effective SE, transitions": ("rdnet_tiny", {}),
    "RDNet with an overlapping 3x3 stem and its head norm first": (
        "rdnet_tiny", {"stem_type": "overlap_tiered", "head_norm_first": True}),
})

# timm's inception_next module: inception depthwise convolutions (channels split four ways: kept, a
# 3x3, a 1 x 11 and an 11 x 1 band), batch norms, 1x1 MLPs with GELU, layer scale
VARIANTS["InceptionNeXt: inception depthwise with 1 x 11 and 11 x 1 bands"] = ("inception_next_atto", {})

# timm's dpn module: dual path blocks (pre-activation 1x1, grouped 3x3, 1x1 or the b variants' two
# 1x1s; a residual and a dense path in one tensor, split, summed and concatenated), strided projections,
# a final norm + ReLU after the last tap
VARIANTS.update({
    "DPN-48b: dual paths, the b variant's two 1x1s, a 3x3 stem": ("dpn48b", {}),
    "DPN-68: dual paths, one 1x1 split in two": ("dpn68", {}),
})

# timm's vovnet module: one-shot aggregation blocks (a chain of 3x3 conv-norm-acts, or of depthwise-
# separable ones after a 1x1 reduction, joined once with the block's input), effective SE or ECA,
# residual from a stage's second block; unpadded 3x3 stride-2 max poolings with ceil_mode
VARIANTS.update({
    "VoVNet V1: OSA blocks, unpadded ceil-mode max poolings": ("vovnet39a", {"layer_per_block": 2}),
    "ESE-VoVNet: residual blocks, effective SE": ("ese_vovnet19b_slim", {"block_per_stage": (1, 2, 1, 2)}),
    "ESE-VoVNet, depthwise-separable layers after a 1x1 reduction": ("ese_vovnet19b_slim_dw", {}),
    "ECA-VoVNet: efficient channel attention": ("eca_vovnet39b", {"layer_per_block": 2, "block_per_stage": (1, 1, 1, 2)}),
})

# timm's cspnext module (RTMDet's backbones): cross-stage partial layers of 3x3 + depthwise 5x5 blocks
# with SiLU, effective SE over the joined branches; the last stage's spatial pyramid: 5x5, 9x9, 13x13
# stride-1 max poolings over the visible sites (on the canvas), no residuals there
VARIANTS["CSPNeXt: CSP layers of depthwise 5x5 blocks, effective SE, spatial pyramid max poolings"] = ("cspnext_tiny", {})

# timm's senet module (the legacy Caffe ports): basic blocks and bottlenecks striding in their first
# 1x1 or in their (grouped) 3x3, SE before the shortcut; a 7x7 stem or SENet-154's three 3x3s and 3x3
# strided shortcuts; the stem's unpadded ceil-mode 3x3 stride-2 max pooling
VARIANTS.update({
    "Legacy SE-ResNet: basic blocks, unpadded ceil-mode stem pooling, SE": ("legacy_seresnet18", FOUR_BLOCKS),
    "Legacy SE-ResNet bottlenecks, striding in their first 1x1": ("legacy_seresnet50", FOUR_BLOCKS),
    "Legacy SE-ResNeXt: grouped 3x3 striding": ("legacy_seresnext26_32x4d", FOUR_BLOCKS),
    "Legacy SENet-154: three 3x3s in the stem, 3x3 strided shortcuts, 64 groups": ("legacy_senet154", FOUR_BLOCKS),
})

# timm's dla module: a 7x7 and 3x3s at stride 1 (the pixels), aggregation trees (two residual blocks
# joined with the stage's 2x2-max-pooled input by a root 1x1; deeper trees nest, handing children on)
# of basic blocks, (grouped) bottlenecks or Res2Net's groups with a 3x3 average pooling; root shortcuts
SHALLOW_DLA = {"levels": (1, 1, 1, 1, 1, 1)}
VARIANTS.update({
    "DLA-34: basic blocks, trees of two levels, roots joining the pooled input": ("dla34", {}),
    "DLA-46-C: bottlenecks, a root shortcut": ("dla46_c", {"shortcut_root": True}),
    "DLA-X-46-C: grouped bottlenecks": ("dla46x_c", {}),
    "DLA-60-Res2Net: hierarchical groups of channels, 3x3 average pooling": ("dla60_res2net", SHALLOW_DLA),
})

# timm's repghost module: GhostNet's bottlenecks with re-parameterisable ghost modules (a depthwise 3x3
# conv-norm of the primary 1x1 plus a batch norm of it, summed), hard-sigmoid SE
VARIANTS["RepGhostNet: ghost modules summing a depthwise 3x3 and a norm of the primary, SE"] = ("repghostnet_050", {})

# timm's sknet module (ResNets of selective kernel blocks): a 3x3 and a 3x3 with dilation 2 side by side
# (on halves of the input, or grouped on all of it), mixed by a softmax across them of an attention
# (1x1, batch norm over the pooled vectors, ReLU, 1x1) on each image's visible mean; at stride 32 the
# dilated 3x3 reaches two patches away
VARIANTS.update({
    "SKResNet: selective kernels on split inputs, a dilated 3x3, basic blocks": ("skresnet18", FOUR_BLOCKS),
    "SKResNeXt: grouped selective kernels on the whole input, bottlenecks": ("skresnext50_32x4d", FOUR_BLOCKS),
    "SKResNet-D: deep stem, avg-down, selective kernel bottlenecks": ("skresnet50d", {"layers": (1, 1, 1, 2)}),
})

# MixNet (timm's efficientnet module): mixed convolutions, the channels split into groups each with its own
# depthwise kernel (3x3 .. 9x9, strided too) or its own 1x1, joined; TensorFlow's 'same' padding in tf_mixnet
VARIANTS.update({
    "MixNet: mixed depthwise kernels 3x3 to 9x9 and grouped 1x1s": ("mixnet_m", {}),
    "TensorFlow MixNet: mixed 'same'-padded depthwise kernels striding": ("tf_mixnet_s", {}),
})

# global context attention (GCNet: timm's byobnet gcresnet*, efficientnet's gc_efficientnetv2_rw_t): the context
# a softmax over each image's visible sites of a 1x1's logits, weighting the rows; a per-image channel shift
# (gcresnet*) or gated scale (gc_efficientnetv2_rw_t)
VARIANTS.update({
    "GCResNet: global context attention pooled by a softmax over visible sites": ("gcresnet33ts", {}),
    "GCResNeXt: global context after grouped 3x3s": ("gcresnext26ts", {}),
    "GC-EfficientNetV2: global context in place of SE": ("gc_efficientnetv2_rw_t", {}),
})

# EvoNorm-S0/S0a (x sigmoid(v x) over each image's group deviation) and the filter response norm (over each
# image's channel RMS, a learned threshold), their statistics over visible sites: timm's *_evos, *_frn models
VARIANTS.update({
    "ResNetV2 with EvoNorm-S0": ("resnetv2_50d_evos", FOUR_BLOCKS),
    "ResNetV2 with filter response norms and thresholds": ("resnetv2_50d_frn", FOUR_BLOCKS),
    "RegNetZ with EvoNorm-S0a": ("regnetz_b16_evos", {}),
    "EfficientNet with EvoNorm-S0 (no activation after its projections)": ("test_efficientnet_evos", {}),
    "EfficientNet with layer norms and their activations (LayerNormAct2d)": ("test_efficientnet_ln", {}),
})
# timm takes these norms' statistics in float32 (``x.float()``) even of a float64 map; ours in the map's
# float64: with nothing hidden, equal to plain timm to float32's rounding only
# timm pads Twins-SVT's, TinyViT's and Swin's maps to whole groups of sites and lets the padding's projections be
# keys; here the padding is no key, so timm's features are the encoder's on maps of whole groups: 224 px
# EfficientFormer's attention biases are timm's for a 7x7 map only (224 px)
PLAIN_TIMM_SIZE = {"twins_svt_small": (224, 224), "tiny_vit_5m_224": (224, 224), "efficientformer_l1": (224, 224),
                   "swin_tiny_patch4_window7_224": (224, 224), "swinv2_tiny_window8_256": (256, 256),
                   "swinv2_cr_tiny_ns_224": (224, 224), "davit_tiny": (224, 224), "davit_base_fl": (384, 384)}
FLOAT32_STATISTICS_IN_TIMM = {"resnetv2_50d_evos", "resnetv2_50d_frn", "regnetz_b16_evos", "test_efficientnet_evos"}

# CondConv (EfficientNet-CondConv): each image's kernels its experts' summed with routing weights from its
# visible mean; depthwise 5x5 experts striding, TensorFlow's 'same' padding in the ports
VARIANTS.update({
    "EfficientNet-CondConv: per-image expert kernels routed by the visible mean": ("efficientnet_cc_b0_4e", {}),
    "TensorFlow EfficientNet-CondConv, 8 experts, 'same' padding": ("tf_efficientnet_cc_b0_8e", {}),
})

# timm's xception_aligned module (DeepLabV3+'s backbones): blocks of three depthwise-separable convolutions,
# each after a ReLU (or, in the last block, normed and activated, no shortcut), the third striding with a 1x1
# conv-norm shortcut; the pre-activation nets: a norm-ReLU before each, the block's first feeding its shortcut
VARIANTS.update({
    "Aligned Xception: separable convolutions after ReLUs, strided shortcuts, a no-skip last block": ("xception41", {}),
    "Pre-activation aligned Xception: norm-ReLUs before separable convolutions, a final ReLU": ("xception41p", {}),
})

# timm's hrnet module: parallel branches at strides 4 to 32, each fusing all others (finer ones through strided
# 3x3 conv-norms, coarser ones through a 1x1 conv-norm and a nearest upsampling), ResNet blocks in the branches;
# the features the classification head's joined maps (bottlenecks, strided 3x3s, the final 1x1)
VARIANTS.update({
    "HRNet: parallel branches fused by strided 3x3s and nearest upsampling, the head's joins": ("hrnet_w18_small", {}),
    "HRNet with two modules a stage, bottlenecks in the stem": ("hrnet_w18_small_v2", {}),
})

# timm's fastvit module, its convolutional models: MobileOne blocks (summed conv-norm branches and an identity
# norm), RepMixer (x + layer scale (a depthwise 3x3's MobileOne block - a norm of x)), MLPs after a depthwise 7x7;
# patch embeddings of a 7x7 + 3x3 at stride 2 with two outputs a channel (over 2x2 blocks on the canvas); SE at the end
VARIANTS.update({
    "FastViT: RepMixer blocks, MobileOne stem, large-kernel grouped patch embeddings": ("fastvit_t8", {}),
    "FastViT re-parameterised: one convolution each": ("fastvit_t8", {"inference_mode": True}),
})

# blur pools (timm's BlurPool2d, anti-aliased downsampling): a fixed binomial 3x3 at stride 2 after the
# activation, reflection-padded (ResNet's stem after a stride-1 max pooling and its strided blocks, DenseNet's
# stem and transitions) or zero-padded ('blurpc': MobileNetV4)
VARIANTS.update({
    "ResNet with blur pools: stem max pooling at stride 1, blur after strided 3x3s": (
        "resnetblur18", {"layers": (1, 1, 1, 1)}),
    "DenseNet with blur pools in its deep stem and transitions": (
        "densenetblur121d", {"block_config": (1, 1, 1, 1), "growth_rate": 8}),
    "MobileNetV4 with zero-padded blur pools": ("mobilenetv4_conv_blur_medium", {}),
    "ByobNet with blur pools in its strided 3x3s and shortcuts": ("resnet33ts", {"aa_layer": "blur"}),
})

# timm's tresnet module: space to depth (4x4 pixel blocks into channels), LeakyReLU conv-norm-acts, blur
# pools after stride-1 3x3s, SE, avg-down shortcuts; basic blocks (M) and bottlenecks (V2)
VARIANTS.update({
    "TResNet: space-to-depth stem, blur-pooled basic blocks and bottlenecks": ("tresnet_m", {"layers": (1, 1, 1, 1)}),
    "TResNet V2: bottlenecks in every stage": ("tresnet_v2_l", {"layers": (1, 1, 1, 1)}),
})
# EfficientNet-X: a first block of a space-to-depth 2x2 stride-2 convolution, then a depthwise 2x2 at stride 1
# with TensorFlow's 'same' padding (one site more below and right)
VARIANTS["EfficientNet-X: space-to-depth convolution, depthwise 2x2"] = ("efficientnet_x_b3", {})
# YOLOv5's "focus" stem as timm builds it: a 6x6 stride-2 convolution with padding 2 on the pixels
VARIANTS["CS3DarkNet with the focus stem"] = ("cs3darknet_focus_s", {})

# timm's metaformer module, its ConvFormers: inverted separable convolutions (1x1, StarReLU, which moves zero:
# hidden sites read its bias until masked, depthwise 7x7, 1x1), bias-free layer norms, 1x1 MLPs with StarReLU,
# learned residual scales in the last two stages; a 7x7 stride-4 stem padded 2, norm-first strided 3x3s
VARIANTS.update({
    "ConvFormer: separable convolutions with StarReLU, residual scales, a 7x7 stride-4 stem padded 2": (
        "convformer_s18", {}),
    "ConvFormer with layer scale, residual scales in every stage": (
        "convformer_s18", {"layer_scale_init_values": 1e-5, "res_scale_init_values": 1.0}),
})
# and its PoolFormers: a 3x3 average pooling over each window's visible sites minus the input (timm leaves the
# padding uncounted: the mean of the sites inside the image), group norms of one group per image; V1: norms with
# biases, GELU MLPs with biases, layer scale, no norm in the stem and downsampling; V2: StarReLU, residual scales
VARIANTS.update({
    "PoolFormer: visible-site average pooling minus the input, one-group norms, GELU MLPs, layer scale": (
        "poolformer_s12", {}),
    "PoolFormer V2: bias-free one-group norms, StarReLU, residual scales": ("poolformerv2_s12", {}),
    "ResNeXt-26ts with an average-pooled stem leaving its padding uncounted": ("resnext26ts", {"stem_pool": "avg"}),
})
# timm's focalnet module: focal modulation (a 1x1 split into a query, a context and gates, the context through
# depthwise convolutions with GELU level by level, each level gated, the last one's mean over each image's
# visible sites the gated global level, then a 1x1 times the query), layer norms, 4x4 and 2x2 patchify
# convolutions. FocalNet-H's layout on the tiny one: four levels (depthwise 5x5 .. 11x11, on tiles at stride 4
# and the canvas beyond), post norms, a norm inside the modulation, layer scale, the modulator normalised, 7x7
# stride-4 and 3x3 stride-2 overlapping convolutions. Stochastic depth off: timm's default is 0.1
VARIANTS.update({
    "FocalNet: gated depthwise 3x3 and 5x5 levels, a global level over visible sites, patchify convs": (
        "focalnet_tiny_srf", {"drop_path_rate": 0.0}),
    "FocalNet-H's layout: four levels up to 11x11, post norms, layer scale, overlapping convolutions": (
        "focalnet_tiny_srf", {"drop_path_rate": 0.0, "focal_levels": (4,) * 4, "focal_windows": (5,) * 4,
                              "use_post_norm": True, "use_post_norm_in_modulation": True, "normalize_modulator": True,
                              "use_overlap_down": True, "layerscale_value": 1e-4}),
})
# timm's lcnetv2 module (PP-LCNetV2): depthwise separable blocks whose depthwise convolution trains as 5x5, 3x3
# and 1x1 (at stride 1) depthwise conv-norms summed over the same sites, SE, two 1x1 conv-norm-ReLUs in a row
VARIANTS["PP-LCNetV2: depthwise 5x5, 3x3 and 1x1 conv-norm branches, SE, residual blocks"] = ("lcnetv2_small", {})
# timm's efficientvit_mit module: ReLU linear attention per head over each image's tokens (hidden ones add nothing),
# q, k, v aggregated by a depthwise 5x5 and a grouped 1x1 beside them, MBConvs, depthwise separable stem blocks, the
# head's 1x1 conv-norm-act before pooling; EfficientViT-L: fused MBConvs, two-3x3 stem blocks, GELU (tanh)
VARIANTS.update({
    "EfficientViT: linear attention over visible tokens, multi-scale q, k, v, MBConvs, the head's 1x1": (
        "efficientvit_b0", {}),
    "EfficientViT-L: fused MBConvs, a stem of two 3x3s, GELU (tanh), attention in the last stage": (
        "efficientvit_l1", {}),
})
# timm's swiftformer module: efficient additive attention (normalised queries and keys per token, a global query
# pooled by weights normalised over each image's visible tokens), ConvEncoders, layer scale, the final batch norm
VARIANTS["SwiftFormer: additive attention pooled over visible tokens, ConvEncoders, layer scale"] = ("swiftformer_xs", {})
# MetaFormer's CAFormers: multi-head self-attention in the last two stages, each visible token attending to its
# image's visible tokens only (one token an image at stride 32 with a single visible patch), linear MLPs
VARIANTS["CAFormer: self-attention among each image's visible tokens, linear StarReLU MLPs"] = ("caformer_s18", {})
# FastViT's SA models: a conditional positional encoding (the input plus a depthwise 7x7) and self-attention blocks
# after a batch norm in the last stage; MobileCLIP's image tower the same with its own widths
VARIANTS.update({"FastViT-SA: conditional positional encoding, self-attention after a batch norm": ("fastvit_sa12", {}),
                 "FastViT-SA re-parameterised: the positional encoding one convolution": (
                     "fastvit_sa12", {"inference_mode": True}),
                 "FastViT-MCi (MobileCLIP): RepMixer stages, self-attention in the last": ("fastvit_mci0", {})})
# MobileNetV4's hybrid models: multi-query attention blocks (query heads sharing one key and value head, which come
# from a strided depthwise conv-norm at stride 16: queries at 16 attend to keys at 32), layer scale
VARIANTS["MobileNetV4 hybrid: multi-query attention, keys and values from a strided depthwise conv"] = (
    "mobilenetv4_hybrid_medium", {})
# timm's pvt_v2 module: spatial-reduction attention (every token a query, keys and values from a convolution whose
# kernel is its stride, reaching the 32-pixel patches, then a layer norm; the tokens themselves at stride 32), a head
# of keys and values per query head, MLPs with a depthwise 3x3, overlapping patch embeddings, layer norms
VARIANTS["PVT v2: queries attend to keys made one per visible patch, depthwise MLPs"] = ("pvt_v2_b0", {})
# timm's twins module: PCPVT's blocks are PVT v2's with a position encoding generator (the input plus a depthwise
# 3x3) after each stage's first, 4x4 and 2x2 patchify embeddings; SVT's alternate PVT's attention with attention
# within groups of 7x7 sites from the map's corner (at stride 4 they straddle the patches), each visible token
# attending to its group's visible tokens, timm's padding of the map to whole groups no key
VARIANTS.update({"Twins-PCPVT: PVT v2's attention, a position encoding generator, patchify embeddings": (
                     "twins_pcpvt_small", {}),
                 "Twins-SVT: attention within groups of 7x7 sites, alternating with PVT v2's": (
                     "twins_svt_small", {})})
# timm's tiny_vit module: attention within groups of 7x7 sites (at stride 8 here; the whole map at 16 and 32 at 224
# px) after a layer norm, each head's q, k, v side by side, a learned bias per relative offset; MBConvs, patch
# merging (a strided depthwise 3x3 between 1x1 conv-norms), depthwise 3x3 conv-norms between attention and MLP
VARIANTS["TinyViT: attention within groups of sites with relative-offset biases, MBConvs, patch merging"] = (
    "tiny_vit_5m_224", {})
# timm's efficientformer module: PoolFormer's blocks with batch-norm 1x1 MLPs and layer scale, the last block a
# transformer's whose attention over the image's visible tokens carries a learned bias per offset on the 7x7 grid
VARIANTS["EfficientFormer: attention with offset biases at stride 32, pooling blocks, layer scale"] = (
    "efficientformer_l1", {})
# timm's swin_transformer module: attention within groups of 7x7 sites with a learned bias per relative offset, every
# other block's groups shifted by 3 sites (timm's cyclic roll and its mask), patch merging (2x2 sites into channels,
# a layer norm, a linear reduction); two blocks a stage keep both kinds in each
VARIANTS["Swin: attention within shifted groups of sites with relative-offset biases, patch merging"] = (
    "swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2), "drop_path_rate": 0.0})
# timm's swin_transformer_v2 module: the same groups with cosine attention (a learned scale per head), a bias from an
# MLP of log-spaced offsets, q and v biases, norms after attention and MLP, patch merging that reduces then normalises
VARIANTS["Swin V2: cosine attention within shifted groups of sites, post-norms"] = (
    "swinv2_tiny_window8_256", {"depths": (2, 2, 2, 2), "drop_path_rate": 0.0})
# timm's swin_transformer_v2_cr module: Swin V2's attention in its own modules, the bias of each pair of sites from an
# MLP with a dropout of its own (drawn in train mode as timm's, from the same random state), q, k, v biases, norms
# ending each stage (the _ns models)
VARIANTS["Swin V2-CR: cosine attention, a bias MLP per pair with its dropout, stage norms"] = (
    "swinv2_cr_tiny_ns_224", {"depths": (2, 2, 2, 2)})
# timm's davit module: pairs of blocks, one attending within groups of 7x7 sites from the map's corner, one between
# channels (sums over each image's visible tokens), each after a convolutional position encoding (the input plus a
# depthwise 3x3); Florence-2's: groups of 12x12, the channel attention v2 scaled by each image's visible tokens, 3x3
# stride-2 downsampling
SMALL_FLORENCE_DAVIT = {"depths": (1, 1, 1, 1), "embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8)}
VARIANTS.update({
    "DaViT: attention within groups of sites and between channels, convolutional position encodings": (
        "davit_tiny", {"depths": (1, 1, 1, 1)}),
    "DaViT of Florence-2: groups of 12x12, channel attention scaled per image, 3x3 downsampling": (
        "davit_base_fl", SMALL_FLORENCE_DAVIT),
})
# timm's mobilevit module (ByobNet models): MobileViT blocks, a kxk and a 1x1, then transformer blocks whose attention
# groups the sites by their offset in 2x2 blocks (v1: softmax attention over each group's visible sites, layer norms,
# the input fused back by a 3x3; v2: separable attention, group norms, 1x1 MLPs), inverted residuals; on maps of
# whole 2x2 blocks at every stride (a 2x4 patch grid)
VARIANTS.update({"MobileViT: attention within groups of sites two apart, a fusion of input and output": (
                     "mobilevit_xxs", {}),
                 "MobileViT v2: separable attention within groups of sites two apart, group norms": (
                     "mobilevitv2_050", {})})
# timm's mobilenetv5 module (Gemma 3n's vision tower): MobileNetV4's edge and universal inverted residuals and
# multi-query attention with RMS norms of each site's channels (with and without GELU), no batch norm; a quarter of
# its widths
VARIANTS["MobileNetV5: MobileNetV4's blocks and multi-query attention with RMS norms"] = (
    "mobilenetv5_base", {"channel_multiplier": 0.25})
# timm's iformer module: conv-norms in residuals with layer scale (ConvNeXt-like blocks, FFNs, conditional position
# encodings) and single-head modulation attention: one head over each image's visible tokens, its values and gate
# through a sigmoid (which moves zero: hidden sites hold values until masked), a 5x5 stride-2 stem
VARIANTS["iFormer: single-head attention over visible tokens gated by a sigmoid, conv-norm residuals"] = (
    "iformer_t", {})
# timm's edgenext module: ConvNeXt-like blocks with depthwise 3x3 to 9x9, and ending each later stage a block of
# Res2Net-like depthwise 3x3s over groups of channels, a Fourier position encoding (second stage), attention between
# channels over each image's visible tokens, layer scales; small_rw: a 9x9 stride-4 stem, blocks whose depthwise
# convolution strides and widens, no convolution biases
VARIANTS.update({
    "EdgeNeXt: split depthwise groups, channel attention over visible tokens, Fourier positions": (
        "edgenext_xx_small", {}),
    "EdgeNeXt small_rw: a 9x9 stride-4 stem, strided widening depthwise blocks, no biases": ("edgenext_small_rw", {}),
})
# timm's selecsls module (XNect's backbones): conv-norm-ReLU chains of 3x3s and 1x1s whose 3x3 outputs are concatenated
# with the stage's first block's output (timm's [x, skip] lists), strided 3x3s; the head's stride-32 layers
VARIANTS["SelecSLS: concatenated 3x3 chains, each stage's first output beside every later block"] = ("selecsls60", {})
# timm's maxxvit module, built for 64 px (groups of 2x2 sites): MaxViT's blocks, a pre-norm MBConv (strided depthwise
# 3x3, SE, the input average-pooled), attention within groups of sites from the map's corner, then within grids of
# sites spread over the map, each with a bias per pair of places (a table; TensorFlow's ports: a table of row and
# column offsets, q, k, v head after head, 'same' padding, a head norm and MLP kept; MaxxViT: ConvNeXt blocks, a bias
# MLP with its own dropout, v2 without the group attention; the parallel variant: both halves concatenated);
# CoAtNet's transformer blocks attend over the whole map of the model's size (norm, then pooling, where they stride;
# max-pooled shortcuts in coatnet_rmlp_1_rw, SE before the norm, a pre-norm activation)
SMALL_MAXXVIT = {"embed_dim": (32, 64, 128, 256), "depths": (1, 2, 1, 1), "stem_width": (16, 32), "img_size": 64}
# timm's byoanet module (ByobNets), built for the test's 64x96 images: BotNet's bottlenecks whose 3x3 is attention over
# each image's visible sites with logits from each query and learned embeddings of the key's row and column offsets
# (a 2x2 average pooling after it where the block strides); ECA and grouped convolutions in eca_botnext; lambda
# layers: each image's content lambda (a softmax of k over its visible sites times v), each site's position lambda
# (a 9x9 convolution of v, hidden sites reading zero, or embeddings of the other visible sites' offsets times their v)
BOTNET = {"img_size": (64, 96)}
# PVT v2's linear variant pools its keys to 7x7 cells: one per patch of a 224-px image, the size it runs at
VARIANT_SIZES["pvt_v2_b2_li"] = (224, 224)
PVT_V2_LINEAR = "PVT v2 linear: keys the mean of each visible patch (7x7 cells at 224 px), a ReLU in the MLP"
VARIANTS[PVT_V2_LINEAR] = (
    "pvt_v2_b2_li", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 48, 64), "num_heads": (1, 2, 3, 4)})
VARIANTS.update({"BotNet: attention over visible sites with relative-offset logits, pooled where it strides": (
                     "botnet26t_256", BOTNET),
                 "BotNeXt: the same in ResNeXt bottlenecks with ECA": ("eca_botnext26ts_256", BOTNET),
                 "Lambda-ResNet: lambdas of each image's visible sites, position lambdas of a 9x9 convolution": (
                     "lambda_resnet26t", {}),
                 "Lambda-ResNet rpt: position lambdas from embeddings of each visible site's offset": (
                     "lambda_resnet26rpt_256", BOTNET)})
# halo attention: the map cut into blocks of queries, each attending to the visible keys of its block widened by a
# halo and to the zero padding's keys beyond the map's border (their position logits alone), the queries on every
# other site where the block strides. Blocks smaller than timm's 8x8 (7x7), for small images: HaloNet's 4x4 sites
# (2x2 patches at stride 16, the whole map at 32), HaloRegNetZ's 3x3 (straddling patches; it strides by pooling)
HALONET = {"self_attn_kwargs": {"block_size": 4, "halo_size": 2}}
HALOREGNETZ = {"self_attn_kwargs": {"block_size": 3, "halo_size": 2, "qk_ratio": 0.33}}
VARIANT_SIZES.update({"halonet26t": (128, 128), "haloregnetz_b": (96, 96), "sehalonet33ts": (64, 128)})
VARIANTS.update({"HaloNet: attention in blocks and their halos, the padding's keys, strided queries": (
                     "halonet26t", HALONET),
                 # blocks of half a patch at stride 8, one patch at 16 and 2x2 at 32 (the sparse engine's windows
                 # gathered per visible patch at 16 and 32)
                 "SE-HaloNet: halo attention in blocks of one patch and of 2x2, squeeze-excitation": (
                     "sehalonet33ts", {"self_attn_kwargs": {"block_size": 2, "halo_size": 1}}),
                 "HaloRegNetZ: halo attention in blocks straddling patches, then average pooling": (
                     "haloregnetz_b", HALOREGNETZ)})
# timm's hiera module, built for the test's 64x96 images (its position embedding is made for the model's own map):
# attention within mask units (the mask's 32-pixel patches), the stage's first block's queries and shortcut
# max-pooled over 2x2 sites, then attention over each image's visible tokens (abswin: the position table a resized
# global one plus the mask unit's, tiled)
HIERA = {"img_size": (64, 96)}
VARIANTS.update({"Hiera: attention within mask units, then over the image, queries max-pooled where a stage starts": (
                     "hiera_tiny_224", HIERA),
                 "Hiera abswin: a resized global position table plus the mask unit's, tiled": (
                     "hiera_small_abswin_256", HIERA),
                 "Hiera with layer scale (hiera_base_abswin_256's)": (
                     "hiera_tiny_224", {**HIERA, "init_values": 1e-5})})
# SAM 2's Hiera (timm's hieradet_sam2), with windows for small images: 8x8 sites at stride 4 and 4x4 at 8 (the mask's
# patch), 4x4 at 16 (2x2 patches; the next stage's first block pools its queries within them) and 2x2 at 32; its
# global blocks over each image's visible tokens; the position embedding resized to the canvas's map
SAM2 = {"window_spec": (8, 4, 4, 2)}
VARIANT_SIZES["sam2_hiera_tiny"] = (64, 128)
VARIANTS["SAM 2 Hiera: windows of one patch and of 2x2, pooled queries, global blocks"] = ("sam2_hiera_tiny", SAM2)
# its own windows, at 224 px: 14x14 sites at stride 16 (7x7 patches, the queries of the last stage's first block pooled
# within them) and 7x7 at 32 (the whole image), a block a stage but two, one global
VARIANT_SIZES["sam2_hiera_small"] = (224, 224)
VARIANTS["SAM 2 Hiera at 224 px: its own windows of 7x7 patches"] = (
    "sam2_hiera_small", {"stages": (1, 1, 2, 1), "global_att_blocks": (3,)})
VARIANTS.update({
    "MaxViT: MBConvs, attention within groups of sites and within grids spread over the map": (
        "test_maxvit", {"img_size": 64}),
    "MaxViT of TensorFlow: biases from row and column offsets, q, k, v head after head, 'same' padding": (
        "maxvit_tiny_tf_224", SMALL_MAXXVIT),
    "MaxxViT: ConvNeXt blocks, a bias MLP of log-spaced offsets with its own dropout": (
        "maxxvit_rmlp_nano_rw_256", SMALL_MAXXVIT),
    "MaxxViT v2: grid attention alone": ("maxxvitv2_nano_rw_256", SMALL_MAXXVIT),
    "MaxViT parallel: group and grid attention side by side, concatenated": ("maxvit_tiny_pm_256", SMALL_MAXXVIT),
    "CoAtNet: MBConvs, then attention over the whole map with a bias per pair of sites": (
        "test_coatnet", {"img_size": 64}),
    "CoAtNet rmlp_1_rw: max-pooled shortcuts, pooled MBConvs, SE before the norm, a bias MLP": (
        "coatnet_rmlp_1_rw_224", SMALL_MAXXVIT),
})

# timm's cpubone module: fused MBConvs (grouped 3x3, 1x1) and MBConvs, CPUBone blocks (a one-group norm
# and attention from a depthwise 2x2 and a 1x1 to packed heads, per 32-pixel patch at stride 16 then
# repeated over its sites, per site at 32; a 1x1 MLP; a local block of 2x2 kernels padded above and
# left). The MLP's dropout (0.1 by default) draws its own mask in each engine: off here
CPUBONE = {"proj_drop_rate": 0.0}
VARIANTS.update({
    "CPUBone: fused MBConvs, packed-head attention per patch and per site, 2x2 kernels padded above-left": (
        "cpubone_t0", CPUBONE),
    "CPUBone with a stem block and MBConvs (depthwise 2x2) where a stage is 256 wide": (
        "cpubone_nano", {**CPUBONE, "width_list": (12, 24, 48, 96, 256), "depth_list": (1, 1, 1, 1, 1)}),
    "CPUBone unfused: MBConvs everywhere, the attention's own output projection, norms in every conv": (
        "cpubone_nano", {**CPUBONE, "fused_conv": False, "fused_downsample": False, "local_mbconv_norm": "all"}),
    "CPUBone with ungrouped expansions: plain 3x3s and 2x2s (padded above-left)": (
        "cpubone_nano", {**CPUBONE, "expand_groups": 1}),
    "CPUBone upsampling its attention by learned transposed convolutions (4x4 at stride 2, 3x3)": (
        "cpubone_nano", {**CPUBONE, "attn_upsample": "transpose"}),
})

# timm's lowformer module: CPUBone's ancestor, the same blocks; attention from a depthwise 5x5 at stride 2
# (one token per 32-pixel patch at stride 16) or a 3x3 (stride 32), upsampled by a transposed convolution
# (4x4 at stride 2, reaching into the neighbouring patches; 3x3 at stride 1) with the projection folded in
SMALL_LOWFORMER = {"width_list": (8, 16, 24, 32, 64), "depth_list": (1, 1, 1, 1, 2)}
VARIANTS.update({
    "LowFormer: fused MBConvs, attention upsampled by transposed convolutions holding its projection": (
        "lowformer_b0", {}),
    "LowFormer unfused: MBConvs, the attention's own projection, depthwise transposed convolutions": (
        "lowformer_b0", {**SMALL_LOWFORMER, "fused_conv": False}),
    "LowFormer-E3: a stem block, attention without MLPs": ("lowformer_e3", SMALL_LOWFORMER),
    "LowFormer-E1: local blocks alone after the strided ones": ("lowformer_e1", SMALL_LOWFORMER),
})

# timm's gcvit module, built for square test images (its windows are fractions of its input size): at 96 px groups
# of 3x3 sites straddle the patches at strides 4 and 8, and every other block's queries are the global tokens (one
# per 32-pixel patch, from MBConvs and max poolings) tiled over the groups; at 64 px groups of 2x2 tile each patch
VARIANT_SIZES.update({"gcvit_xxtiny": (96, 96), "gcvit_xtiny": (64, 64)})
VARIANTS.update({
    "GCViT: groups straddling the patches, global queries one per patch tiled over the groups": (
        "gcvit_xxtiny", {"img_size": 96}),
    "GCViT with layer scale (gcvit_base's), groups within the patches": (
        "gcvit_xtiny", {"img_size": 64, "layer_scale": 1e-5}),
})

# timm's mvitv2 module at 64 px (its relative position tables are made for its own input size): q, k and v pooled
# per head by a shared depthwise 3x3 (k and v at stride 4 on the stride-4 map: keys at stride 16, reading one site of
# the neighbouring patch), queries at stride 2 where a stage starts beside a max-pooled shortcut, residual pooling
VARIANT_SIZES.update({"mvitv2_tiny": (64, 64), "mvitv2_small_cls": (64, 64)})
VARIANTS.update({
    "MViTv2: pooling attention with relative positions, depthwise 3x3s at strides 1, 2 and 4": (
        "mvitv2_tiny", {"img_size": 64}),
    # the class token: one more query, key and value (normed, not pooled), no relative position; drop path for both
    "MViTv2 with a class token (the _cls models)": ("mvitv2_small_cls", {"img_size": 64, "drop_path_rate": 0.1}),
})

# timm's efficientformer_v2 module at 96 px (its attention biases are made for its own input size): attention at
# stride 32 with talking heads, at stride 16 on the map reduced by a strided depthwise 3x3 and upsampled bilinearly
# (each site reading a neighbouring patch's token), the last downsampling's queries at stride 32 over keys at 16
VARIANT_SIZES.update({"efficientformerv2_s0": (96, 96)})
VARIANTS.update({
    "EfficientFormerV2: talking heads, bilinear upsampling at stride 16, attention downsampling": (
        "efficientformerv2_s0", {"img_size": 96}),
})

# timm's coat module at 64 px (its patch embeddings are made for their own input size): each stage's class token
# beside its map in the factorised attention (a key and value of every token), depthwise 3x3, 5x5 and 7x7 encodings of
# v and a 3x3 position encoding shared by a stage's blocks; drop path drawn once per image for the map and its token
VARIANT_SIZES.update({"coat_lite_tiny": (64, 64)})
VARIANTS.update({
    "CoaT-Lite: class tokens beside the maps, factorised attention, shared convolutional encodings": (
        "coat_lite_tiny", {"img_size": 64, "drop_path_rate": 0.1}),
})

# timm's visformer module at 64x96 px (its position embeddings are made for its own input size): three scales (strides
# 8, 16 and 32) after a stride-2 stem, patch embeddings with batch norms and position tables, grouped 3x3s in the
# first stage's MLPs, attention over each image's visible tokens from a 1x1 convolution in the later stages
VISFORMER = {"img_size": VARIANT_SIZE, "drop_path_rate": 0.1}
VARIANTS.update({
    "Visformer: three scales, position tables, attention from 1x1 convolutions over each image": (
        "visformer_tiny", VISFORMER),
})

# timm's nest module at 64 px (its position embeddings are made for its own input size): levels at strides 4, 8, 16, so
# 16-pixel patches (a 4x4 grid); attention within blocks of 4x4 sites (at stride 4: one patch; the whole map at 16),
# block aggregations (3x3 convolution, layer norm, 3x3 stride-2 max pooling over the visible sites)
VARIANT_SIZES["nest_tiny"] = (64, 64)
VARIANT_SIZES["nest_small_jx"] = (64, 64)
VARIANT_PATCHES = {"nest_tiny": 16, "nest_small_jx": 16}
VARIANTS.update({
    "NesT: 16-pixel patches, attention within blocks, block aggregation by max pooling": (
        "nest_tiny", {"img_size": 64, "drop_path_rate": 0.1}),
    # the JAX ports: TensorFlow's 'same' max pooling (its windows start at the output's own site)
    "NesT _jx: 'same' max pooling in the block aggregation": ("nest_small_jx", {"img_size": 64, "drop_path_rate": 0.1}),
})

# the families whose coverage is this table get every mask (none hidden, one visible patch an image)
# through one member carrying its operators; the rest of the table, mask 0.6 (and with nothing
# hidden, plain timm below): RegNetY's grouped 3x3 and SE, EfficientNet's strided depthwise 3x3/5x5
# and SE, MobileNetV3-Small's strided first block, 'same' padding at every stride, a GroupNorm per
# image, RepVGG's summed branches, cross stages
EVERY_MASK = {"regnety_002", "efficientnet_b0", "mobilenetv3_small_100", "tf_mobilenetv3_small_100",
              "mobilenetv4_conv_small", "resnetaa50d", "resnetv2_50d_gn", "repvgg_a0", "cs3darknet_s", "test_nfnet",
              "test_mambaout", "densenet121", "rexnet_100", "ghostnet_050", "ghostnetv2_100", "ghostnetv3_050",
              "vgg11_bn",
              "hgnetv2_b0", "starnet_s050", "fasternet_t0", "repvit_m0_9", "res2net50_26w_4s", "resnest14d",
              "rdnet_tiny", "inception_next_atto", "dpn48b", "ese_vovnet19b_slim",
              "cspnext_tiny", "legacy_seresnext26_32x4d", "dla46_c",
              "repghostnet_050", "skresnet18", "mixnet_m",
              "gcresnet33ts", "resnetv2_50d_evos", "efficientnet_cc_b0_4e", "xception41",
              "hrnet_w18_small", "fastvit_t8", "resnetblur18", "tresnet_m", "convformer_s18",
              "poolformerv2_s12", "focalnet_tiny_srf", "lcnetv2_small", "efficientvit_b0",
              "swiftformer_xs", "caformer_s18", "pvt_v2_b0", "twins_svt_small", "tiny_vit_5m_224",
              "efficientformer_l1", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "edgenext_xx_small",
              "selecsls60", "swinv2_cr_tiny_ns_224", "davit_tiny",
              "mobilevit_xxs", "mobilevitv2_050", "mobilenetv5_base", "iformer_t", "test_maxvit", "test_coatnet",
              "botnet26t_256", "lambda_resnet26t", "hiera_tiny_224", "cpubone_t0", "lowformer_b0",
              "gcvit_xxtiny", "mvitv2_tiny", "efficientformerv2_s0", "halonet26t",
              "sehalonet33ts", "sam2_hiera_tiny", "coat_lite_tiny", "visformer_tiny", "nest_tiny"}


def universal_inverted_residuals() -> torch.nn.Module:
    """A small MobileNetV4 with every kind of universal inverted residual, each striding where it
    can (timm's names: extra depthwise, ConvNeXt-like, inverted, FFN, a strided last depthwise),
    SE, and layer scale (timm's conv models have none; its hybrids have attention)."""
    arch = [["er_r1_k3_s2_e4_c24"],
            ["uir_r1_a3_k5_s2_e4_c32", "uir_r1_a3_k0_s1_e4_c32"],
            ["uir_r1_a5_k0_s2_e3_c48", "uir_r1_a0_k0_s1_e2_c48", "uir_r1_a0_k3_s1_e2_c48"],
            ["uir_r1_a0_k0_p3_s2_e2_c64", "uir_r1_a3_k3_p3_s1_e2_c64_se0.25"]]
    torch.manual_seed(0)
    model = MobileNetV3(decode_arch_def(arch), num_classes=0, stem_size=16, layer_scale_init_value=1e-5)
    return randomise_norms(model)


@pytest.mark.parametrize("mask", MASKS)
def test_every_kind_of_universal_inverted_residual_equals_dense_masked_and_plain_timm(mask, device):
    model = universal_inverted_residuals()
    images, active = batch_on(device, VARIANT_SIZE, mask, batch=4 if mask == "one" else 2)
    assert_train_steps_equal(*encoders(model, train=True, device=device), images, active)
    if mask == "none":
        assert_equals_plain_timm_in_eval_mode(model, images, active, device)


def test_a_visformer_without_its_convolution_stem_equals_dense_masked_and_plain_timm(device):
    """timm's Visformer with init_channels=None (no registered model: timm's builder drops a None
    argument) embeds the pixels in 8x8 patches, no stem before; a ViT stem (one scale) is refused."""
    torch.manual_seed(0)
    model = randomise_norms(Visformer(img_size=VARIANT_SIZE, num_classes=0, init_channels=None, embed_dim=48,
                                      depth=(1, 1, 1), num_heads=2, attn_stage="011", spatial_conv="100",
                                      norm_layer=torch.nn.BatchNorm2d, embed_norm=torch.nn.BatchNorm2d))
    for mask in ("ratio0.6", "none"):
        images, active = batch_on(device, VARIANT_SIZE, mask, batch=2)
        assert_train_steps_equal(*encoders(model, train=True, device=device), images, active)
    assert_equals_plain_timm_in_eval_mode(model, images, active, device)
    with pytest.raises(ConversionError, match=r"^Visformer with a ViT stem \(vit_stem=True\) is not mirrored"):
        SparseEncoder.from_timm(Visformer(img_size=VARIANT_SIZE, num_classes=0, vit_stem=True, depth=(1, 1, 1)))


@pytest.mark.parametrize("use_attn, fuse_add, fuse_scale", [(False, False, True), (True, True, True)],
                         ids=["the visible mean, a scale", "attention pooling, a scale and a shift"])
def test_every_kind_of_global_context_equals_dense_masked_and_plain_timm(timm_models, use_attn, fuse_add, fuse_scale,
                                                                         device):
    """timm's GlobalContext without attention pooling (each image's visible mean), and with a gated
    scale beside the added context (gcresnet33ts's: a per-image shift, which puts values at hidden
    sites in dense masking, masked later)."""
    model = copy.deepcopy(timm_models("gcresnet33ts"))
    for block in model.modules():
        if isinstance(getattr(block, "attn", None), timm.layers.GlobalContext):
            channels = block.attn.conv_attn.in_channels
            block.attn = timm.layers.GlobalContext(channels, use_attn=use_attn, fuse_add=fuse_add, fuse_scale=fuse_scale)
    randomise_norms(model)
    for mask in ("ratio0.6", "none"):
        images, active = batch_on(device, VARIANT_SIZE, mask, batch=2)
        assert_train_steps_equal(*encoders(model, train=True, device=device), images, active)
    assert_equals_plain_timm_in_eval_mode(model, images, active, device)


# nets whose attention the sparse engine runs on each image's rows side by side (MobileViT's and MaxViT's: each grid
# group's rows)
UNEQUAL_IMAGES = {"caformer_s18": {}, "pvt_v2_b0": {}, "tiny_vit_5m_224": {}, "efficientformer_l1": {},
                  "edgenext_xx_small": {}, "davit_base_fl": SMALL_FLORENCE_DAVIT, "iformer_t": {},
                  "mobilevit_xxs": {}, "mobilevitv2_050": {}, "test_maxvit": {"img_size": 64}, "botnet26t_256": BOTNET,
                  "lambda_resnet26t": {}, "lambda_resnet26rpt_256": BOTNET, "hiera_tiny_224": HIERA,
                  "cpubone_t0": CPUBONE, "lowformer_b0": {},
                  "gcvit_xxtiny": {"img_size": 96}, "mvitv2_tiny": {"img_size": 64},
                  "mvitv2_small_cls": {"img_size": 64}, "efficientformerv2_s0": {"img_size": 96}, "halonet26t": HALONET,
                  "sam2_hiera_tiny": SAM2, "coat_lite_tiny": {"img_size": 64}, "visformer_tiny": VISFORMER}


@pytest.mark.parametrize("name", UNEQUAL_IMAGES)
def test_self_attention_over_images_with_different_numbers_of_visible_patches(timm_models, name, device):
    """The sparse engine lays each image's rows side by side as its tokens, up to the most any image
    has: with 5, 2 and 1 visible patches, the shorter images' empty slots must be no keys (PVT v2:
    queries at stride 4 to 32, keys at 32; TinyViT: its bias gathered at each token's position) and
    count for nothing (Florence-2's DaViT scales its channel attention by each image's visible tokens;
    MobileViT's and MaxViT's grid groups hold as many rows as the image has visible patches)."""
    size = VARIANT_SIZES.get(name, VARIANT_SIZE)
    images, _ = batch_on(device, size, "none", batch=3)
    active = torch.zeros(3, 1, size[0] // 32, size[1] // 32, dtype=torch.bool)
    active[0].view(-1)[:5] = True
    active[1, 0, 1, 0] = active[1, 0, 0, -1] = True
    active[2, 0, 1, 1] = True
    assert_train_steps_equal(*encoders(timm_models(name, **UNEQUAL_IMAGES[name]), train=True, device=device), images,
                             active)


@pytest.mark.parametrize("name, kwargs, attention", [("botnet26t_256", BOTNET, BottleneckAttn),
                                                     ("halonet26t", HALONET, HaloAttn)])
def test_attention_with_its_position_logits_scaled_too_equals_dense_masked_and_plain_timm(timm_models, name, kwargs,
                                                                                          attention, device):
    """timm's BottleneckAttn and HaloAttn scale the relative logits with the dot products where
    ``scale_pos_embed`` (no registered model sets it)."""
    model = copy.deepcopy(timm_models(name, **kwargs))
    for module in model.modules():
        if isinstance(module, attention):
            module.scale_pos_embed = True
    size = VARIANT_SIZES.get(name, VARIANT_SIZE)
    images, active = batch_on(device, size, "ratio0.6", batch=2)
    assert_train_steps_equal(*encoders(model, train=True, device=device), images, active)
    images, everything = batch_on(device, size, "none", batch=2)
    assert_equals_plain_timm_in_eval_mode(model, images, everything, device)


@pytest.mark.parametrize("engine", [SparseEncoder, MaskedDenseEncoder])
def test_pvt_v2_linear_off_its_own_input_size_is_refused_in_one_line(timm_models, engine):
    """Its keys' 7x7 cells are patches on a 7x7 grid of them alone; elsewhere a cell would straddle
    patches (timm pools any map; pretraining refuses another size before any work)."""
    name, kwargs = VARIANTS[PVT_V2_LINEAR]
    encoder = engine.from_timm(copy.deepcopy(timm_models(name, **kwargs)))
    images, active = make_batch((192, 224), "ratio0.6", 2)
    with pytest.raises(ValueError, match=r"^adaptive average pooling to 7x7 pools one patch per cell on a 7x7 grid "
                                         r"of patches only, got 6x7: run the model at its own input size$"):
        encoder(images, active)


@pytest.mark.parametrize("name, kwargs, message", [
    ("halonet26t", HALONET, r"halo attention cuts its map into blocks of 4x4 sites, got 6x8; use an input size that "
                            r"makes whole blocks"),
    ("sam2_hiera_tiny", SAM2, r"attention within units of 4x4 sites needs maps of whole units, got 6x8; use an "
                              r"input size that makes them"),
])
@pytest.mark.parametrize("engine", [SparseEncoder, MaskedDenseEncoder])
def test_attention_in_groups_on_a_map_of_part_groups_is_refused_in_one_line(timm_models, engine, name, kwargs,
                                                                             message):
    """timm cuts HaloNet's map into whole blocks (and asserts so) and pads SAM 2's to whole windows
    with zeros its attention reads as keys; pretraining refuses another input size before any work
    (test_pretrain.py), the encoder in one line where such a map reaches it."""
    encoder = engine.from_timm(copy.deepcopy(timm_models(name, **kwargs)))
    images, active = make_batch((96, 128), "ratio0.6", 2)
    with pytest.raises(ValueError, match=f"^{message}$"):
        encoder(images, active)


def test_a_gated_product_of_two_maps_with_values_at_hidden_sites_is_masked_later(timm_models, device):
    """MambaOut without fc2's bias: only the gated product says its hidden sites hold values (both
    factors do, from fc1's bias), and the block's sum must clean them."""
    model = copy.deepcopy(timm_models("test_mambaout"))
    for block in model.modules():
        if isinstance(block, GatedConvBlock):
            block.fc2.register_parameter("bias", None)
    images, active = batch_on(device, VARIANT_SIZE, "ratio0.6", batch=2)
    assert_train_steps_equal(*encoders(model, train=True, device=device), images, active)


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repghostnet_050", "lcnetv2_small", "ghostnetv3_050"])
def test_reparameterised_branches_equal_dense_masked_and_plain_timm(timm_models, name, device):
    # for inference timm folds each block's branches into one convolution with a bias
    model = timm.models.reparameterize_model(copy.deepcopy(timm_models(name)))
    assert not any(isinstance(m, (RepVggBlock, MobileOneBlock)) and m.reparam_conv is None for m in model.modules())
    assert not any(isinstance(m, RepDepthwiseSeparable) and m.dw_conv_list is not None for m in model.modules())
    images, active = batch_on(device, VARIANT_SIZE, "ratio0.6", batch=2)
    assert_train_steps_equal(*encoders(model, train=True, device=device), images, active)
    images, everything = batch_on(device, VARIANT_SIZE, "none", batch=2)
    assert_equals_plain_timm_in_eval_mode(model, images, everything, device)


@pytest.mark.parametrize("variant, mask", [(v, m) for v, (name, _) in VARIANTS.items()
                                           for m in (MASKS if name in EVERY_MASK else ["ratio0.6"])])
def test_variants_equal_dense_masked(timm_models, variant, mask, device):
    # squeeze-excitation pools each image over its visible sites
    name, kwargs = VARIANTS[variant]
    # one visible patch per image: four images, since a train-mode batch norm over only two sites
    # at stride 32 is so ill-conditioned that float64 rounding grows to 1e-8 (measured)
    images, active = batch_on(device, VARIANT_SIZES.get(name, VARIANT_SIZE), mask, batch=4 if mask == "one" else 2,
                              patch=VARIANT_PATCHES.get(name, 32))
    sparse, dense = encoders(timm_models(name, **kwargs), train=True, device=device)
    assert_train_steps_equal(sparse, dense, images, active)
    with torch.no_grad():  # eval mode: the running statistics, the same masked features
        for a, b in zip(sparse.eval().dense_features(images.double(), active),
                        dense.eval().dense_features(images.double(), active)):
            assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("engine", [SparseEncoder, MaskedDenseEncoder])
def test_a_dropout_drops_visible_features_in_train_mode_only(timm_models, engine, device):
    """CPUBone's MLPs (strides 16 and 32) drop 0.1 by default. Each engine draws its own mask (over
    the visible rows, over the whole map), so what both must do is checked against the same net
    without dropout: equal in eval mode and before the first dropout, changed after it in train
    mode, hidden sites zero."""
    images, active = batch_on(device, VARIANT_SIZE, "ratio0.6")
    dropping, plain = (engine.from_timm(copy.deepcopy(timm_models("cpubone_t0", proj_drop_rate=p))).to(device)
                       for p in (0.5, 0.0))
    with torch.no_grad():
        for a, b in zip(dropping.eval().dense_features(images, active), plain.eval().dense_features(images, active)):
            assert torch.equal(a, b)
        torch.manual_seed(SEED)
        dropped = dropping.train().dense_features(images, active)
        kept = plain.train().dense_features(images, active)
    for stride, a, b in zip(dropping.strides, dropped, kept):
        assert torch.equal(a, b) == (stride < 16), f"stride {stride}"
        hidden = ~active.to(device).repeat_interleave(32 // stride, 2).repeat_interleave(32 // stride, 3)
        assert not a.masked_select(hidden).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_with_nothing_hidden_equal_plain_timm_in_eval_and_train_mode(timm_models, variant, device):
    # squeeze-excitation over all sites is timm's global mean; float64: deep float32 nets
    # (MobileNetV3) round to 1e-5 apart
    name, kwargs = VARIANTS[variant]
    model = timm_models(name, **kwargs)
    images, everything = batch_on(device, PLAIN_TIMM_SIZE.get(name, VARIANT_SIZES.get(name, VARIANT_SIZE)), "none",
                                  batch=2, patch=VARIANT_PATCHES.get(name, 32))
    images = images.double()
    encoder = SparseEncoder.from_timm(copy.deepcopy(model)).double().to(device)
    tol = 1e-6 if name in FLOAT32_STATISTICS_IN_TIMM else 1e-9
    with torch.no_grad():
        got = encoder.eval().dense_features(images, everything)
        for g, p in zip(got, plain_features(copy.deepcopy(model).double().eval().to(device), images)):
            assert rel_err(g, p) < tol
        torch.manual_seed(SEED)
        feats = encoder.train().dense_features(images, everything)
    assert_equals_plain_timm_in_train_mode(model, feats, encoder.timm_state_dict(), images, tol)
