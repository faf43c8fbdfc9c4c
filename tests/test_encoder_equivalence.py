"""The sparse encoder computes exactly what SparK's dense-masked encoder computes.

Same weights, same images, same mask: the features at visible sites agree to rounding, hidden
sites are zero, parameter gradients and batch-norm running statistics agree, and with nothing
masked both equal the plain timm model. For every family: ResNet (BasicBlock, Bottleneck),
ConvNeXt (V1 with channels-first norms and 1x1-conv MLP, V2 with GRN), and in the table of
variants RegNet, EfficientNet and MobileNetV3.
"""

import copy

import pytest

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

import torch

import timm

from spark_sparse import MaskedDenseEncoder, SparseEncoder
from spark_sparse.encoders.base import family_of
from .conftest import make_batch, randomise_norms

MODELS = ["resnet18", "resnet50", "convnext_atto", "convnextv2_atto"]
MASKS = ["none", "ratio0.6", "one"]
SIZES = [(128, 128), (192, 256)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def grad_errors(got: dict, want: dict) -> dict:
    """Relative error per gradient. A gradient that is zero up to rounding (the bias of a batch
    norm whose constant shift the next train-mode norm removes) is measured against a floor of
    1e-9 of the largest gradient instead of its own norm."""
    floor = 1e-9 * max(float(g.norm()) for g in want.values())
    return {k: float((got[k] - want[k]).norm()) / max(float(want[k].norm()), floor) for k in want}


def plain_features(model, images):
    return family_of(model).plain_features(model, images)


def encoders(timm_model, train: bool):
    sparse = SparseEncoder.from_timm(copy.deepcopy(timm_model)).train(train)
    dense = MaskedDenseEncoder.from_timm(copy.deepcopy(timm_model)).train(train)
    return sparse, dense


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", MODELS)
def test_eval_features_equal_dense_masked(timm_models, name, mask, size):
    images, active = make_batch(size, mask)
    sparse, dense = encoders(timm_models(name), train=False)
    with torch.no_grad():
        got = sparse.dense_features(images, active)
        want = dense.dense_features(images, active)
    assert [f.shape for f in got] == [f.shape for f in want]
    for stride, g, w in zip(sparse.strides, got, want):
        assert g.shape[-2:] == (size[0] // stride, size[1] // stride)
        assert rel_err(g, w) < 1e-5, f"stride {stride}"
    if mask == "none":
        for g, p in zip(got, plain_features(timm_models(name).eval(), images)):
            assert rel_err(g, p) < 1e-5


def train_step(encoder, images, active, dtype):
    """Features, timm-named parameter gradients and state after one train-mode pass."""
    encoder = encoder.to(dtype)
    feats = encoder.dense_features(images.to(dtype), active)
    g = torch.Generator().manual_seed(1)
    # a fixed random linear read-out of every scale, so every parameter gets a gradient
    loss = sum((f * torch.randn(f.shape, generator=g, dtype=dtype)).sum() for f in feats)
    loss.backward()
    grads = encoder.to_timm({n: p.grad for n, p in encoder.named_parameters()})
    return [f.detach() for f in feats], grads, encoder.timm_state_dict()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", MODELS)
def test_train_features_equal_dense_masked(timm_models, name, mask, size):
    images, active = make_batch(size, mask)
    sparse, dense = encoders(timm_models(name), train=True)
    got, _, _ = train_step(sparse, images, active, torch.float32)
    want, _, _ = train_step(dense, images, active, torch.float32)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-3
    if mask == "none":
        plain = copy.deepcopy(timm_models(name)).train()
        for g, p in zip(got, plain_features(plain, images)):
            assert rel_err(g, p) < 1e-3


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", MODELS)
def test_train_gradients_and_running_stats_equal_dense_masked(timm_models, name, mask, size):
    # float64: batch-norm backward cancels large terms, so float32 rounding would hide real errors
    images, active = make_batch(size, mask)
    sparse, dense = encoders(timm_models(name), train=True)
    fs, gs, ss = train_step(sparse, images, active, torch.float64)
    fd, gd, sd = train_step(dense, images, active, torch.float64)
    for a, b in zip(fs, fd):
        assert rel_err(a, b) < 1e-9
    converted = set(sparse.layout.top_level())  # a kept head norm is not trained
    trained = {k for k, _ in timm_models(name).named_parameters() if k.split(".")[0] in converted}
    assert gs.keys() == gd.keys() == trained
    for key, err in grad_errors(gs, gd).items():
        assert err < 1e-6, key
    for key in sd:  # running statistics moved the same way
        if sd[key].is_floating_point():
            assert rel_err(ss[key], sd[key]) < 1e-9, key


@pytest.mark.parametrize("name", MODELS)
def test_hidden_sites_are_zero_and_never_encoded(timm_models, name):
    images, active = make_batch((128, 128), "ratio0.6")
    sparse = SparseEncoder.from_timm(timm_models(name)).eval()
    with torch.no_grad():
        feats = sparse(images, active)
    visible_patches = int(active.sum())
    for stride, f in zip(sparse.strides, feats):
        assert f.tensor_stride == [stride, stride]
        # exactly the visible sites: (32/stride)^2 sites per visible patch, none elsewhere
        assert f.F.shape[0] == visible_patches * (32 // stride) ** 2
    with torch.no_grad():
        dense_maps = sparse.dense_features(images, active)
    hidden = ~active.repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert torch.all(dense_maps[-1] * (~active) == 0)
    assert torch.all(dense_maps[-3].masked_select(hidden) == 0)


@pytest.mark.parametrize("name", ["resnet26d", "resnet34"])
def test_deep_stem_avg_down_and_other_depths_equal_dense_masked(timm_models, name):
    images, active = make_batch((192, 256), "ratio0.6")
    for train in (False, True):
        sparse, dense = encoders(timm_models(name), train=train)
        with torch.no_grad():
            got, want = sparse.dense_features(images, active), dense.dense_features(images, active)
        for g, w in zip(got, want):
            assert rel_err(g, w) < (1e-3 if train else 1e-5)


VARIANTS = {
    "squeeze-excitation ResNet": ("seresnet50", {}),
    "efficient channel attention, tiered deep stem, avg-down": ("ecaresnet26t", {}),
    "grouped convolutions (ResNeXt)": ("resnext50_32x4d", {}),
    "grouped convolutions and squeeze-excitation": ("seresnext26d_32x4d", {}),
    "ResNet with another activation (SiLU)": ("resnet26", {"act_layer": "silu"}),
    "ConvNeXt with linear MLP, channels-last norms": ("convnext_tiny", {}),
    "ConvNeXt with overlapping stem": ("convnext_atto_ols", {}),
    "ConvNeXt without layer scale": ("convnext_atto", {"ls_init_value": None}),
    "ConvNeXt with head norm first": ("convnext_tiny_hnf", {}),
    "RegNetX: grouped bottlenecks, conv-norm-act leaves": ("regnetx_002", {}),
    "RegNetY: squeeze-excitation after the grouped 3x3": ("regnety_002", {}),
    "EfficientNet: inverted residuals, strided depthwise 3x3/5x5, SiLU, SE, head conv": ("efficientnet_b0", {}),
    "EfficientNet-EdgeTPU: fused edge residuals": ("efficientnet_es", {}),
    "MobileNetV3: hard-swish, hard-sigmoid SE, ReLU": ("mobilenetv3_large_100", {}),
    "MobileNetV3-Small: the first block strides": ("mobilenetv3_small_100", {}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_equal_dense_masked_and_plain_timm(variant):
    # squeeze-excitation pools each image over its visible sites: equal to timm's at mask 0
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    model = randomise_norms(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
    images, active = make_batch((128, 160), "ratio0.6", batch=2)
    sparse, dense = encoders(model, train=True)
    fs, gs, ss = train_step(sparse, images, active, torch.float64)
    fd, gd, sd = train_step(dense, images, active, torch.float64)
    for a, b in zip(fs, fd):
        assert rel_err(a, b) < 1e-9
    for key, err in grad_errors(gs, gd).items():
        assert err < 1e-6, key
    for key in sd:  # running statistics moved the same way
        if sd[key].is_floating_point():
            assert rel_err(ss[key], sd[key]) < 1e-9, key
    with torch.no_grad():  # eval mode: the running statistics, the same masked features
        for a, b in zip(sparse.eval().dense_features(images.double(), active),
                        dense.eval().dense_features(images.double(), active)):
            assert rel_err(a, b) < 1e-9
    everything, model, images = torch.ones_like(active), model.double().eval(), images.double()
    with torch.no_grad():  # float64: deep float32 nets (MobileNetV3) round to 1e-5 apart
        got = SparseEncoder.from_timm(model).double().eval().dense_features(images, everything)
        for g, p in zip(got, plain_features(model, images)):
            assert rel_err(g, p) < 1e-9
