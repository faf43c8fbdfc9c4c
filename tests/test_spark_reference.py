"""Both engines compute SparK's masked forward of the ordinary timm model, written here from the
paper's description and independent of our block code.

The engines share their block wiring (spark_sparse/encoders/families/resnet.py, convnext.py, ...), so
comparing them with each other checks only the leaf operators. This reference runs timm's own
modules, in timm's own forward, and only changes what SparK changes (Tian et al., ICLR 2023,
sec. 3; the official code simulates it the same way):

* the input and the output of every convolution are multiplied by the mask, upsampled by
  repetition to the output's resolution, so hidden sites stay zero;
* a batch norm takes its statistics over the visible sites only: they are gathered into a batch
  of single sites and normalised by the module's own forward (its weights, running statistics
  and momentum), and the hidden sites stay zero;
* a layer norm normalises each position over its channels, so normalising every position and
  then zeroing the hidden ones is normalising the visible positions only;
* max pooling takes the maximum over the visible sites of each window (a hidden zero cannot win
  it; after a ReLU this is also what pooling the zero-filled map gives);
* a ConvNeXt block is masked where it adds its input, and every stage output is masked.
"""

import copy

import pytest
import torch
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from spark_sparse import engine_class

from .conftest import ENGINE_NAMES, make_batch

SIZE = (96, 128)  # non-square: a 3x4 patch grid, 5 of 12 patches visible per image at mask 0.6


def upsampled(active: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (B, 1, h, w) visible set at the resolution of ``x``: each patch repeated."""
    r = x.shape[-2] // active.shape[-2]
    return active.repeat_interleave(r, -2).repeat_interleave(r, -1)


def spark_masked_features(model: nn.Module, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
    """SparK's masked dense forward of the timm ``model``, modified in place: the stage outputs
    at strides 4, 8, 16 and 32, which timm's ``feature_info`` names."""

    def masked(module, inputs, output):  # a forward hook: its return value replaces the output
        return output * upsampled(active, output)

    def batch_norm_over_visible_sites(bn):
        def forward(x):
            visible = upsampled(active, x)[:, 0]
            sites = x.permute(0, 2, 3, 1)[visible]  # (visible sites, channels)
            out = torch.zeros_like(x.permute(0, 2, 3, 1))
            out[visible] = type(bn).forward(bn, sites[:, :, None, None])[:, :, 0, 0]
            return out.permute(0, 3, 1, 2)
        return forward

    def max_pool_over_visible_sites(pool):
        def forward(x):
            visible = upsampled(active, x)
            out = type(pool).forward(pool, x.masked_fill(~visible, float("-inf")))
            return torch.where(upsampled(active, out), out, 0)  # windows of hidden sites only: -inf
        return forward

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.forward = batch_norm_over_visible_sites(module)
        elif isinstance(module, nn.MaxPool2d):
            module.forward = max_pool_over_visible_sites(module)
        elif isinstance(module, (nn.Conv2d, LayerNorm2d, ConvNeXtBlock)):
            module.register_forward_hook(masked)
    stages = [model.get_submodule(info["module"]) for info in model.feature_info if info["reduction"] >= 4]
    feats = []
    for stage in stages:
        stage.register_forward_hook(lambda module, inputs, output: feats.append(masked(module, inputs, output)))
    model.forward_features(images * upsampled(active, images))
    return feats


def read_out(feats: list[torch.Tensor]) -> torch.Tensor:
    """A fixed random linear function of every scale, so every parameter gets a gradient."""
    g = torch.Generator().manual_seed(1)
    return sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in feats)


@torch.no_grad()
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())  # no reference here is zero: none is clamped


MODELS = {
    "resnet18": ("resnet18", {}),
    "convnext_atto": ("convnext_atto", {}),  # channels-first norms, 1x1-convolution MLP
    "convnext_atto linear MLP": ("convnext_atto", {"conv_mlp": False}),  # channels-last, as ConvNeXt-T and up
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("model", MODELS)
def test_both_engines_compute_sparks_masked_forward_of_the_timm_model(timm_models, model, engine, train):
    # float64, so that 1e-9 separates a different computation from a different summation order
    images, active = make_batch(SIZE, "ratio0.6")
    images = images.double()
    name, kwargs = MODELS[model]
    model = timm_models(name, **kwargs)  # random norms and biases: a bias leaking into hidden sites shows
    reference = copy.deepcopy(model).double().train(train)
    encoder = engine_class(engine).from_timm(copy.deepcopy(model)).double().train(train)
    with torch.set_grad_enabled(train):
        want = spark_masked_features(reference, images, active)
        got = encoder.dense_features(images, active)
    assert [f.shape[1:] for f in got] == [f.shape[1:] for f in want] == [
        (c, SIZE[0] // s, SIZE[1] // s) for c, s in zip(encoder.channels, (4, 8, 16, 32))]
    for stride, g, w in zip(encoder.strides, got, want):
        assert torch.all(g.masked_select(~upsampled(active, g)) == 0), f"stride {stride}: a hidden site"
        assert rel_err(g, w) < 1e-9, f"stride {stride}"
    if not train:
        return
    # train mode: the same batch statistics moved the same running statistics (and nothing else
    # of the state), and the same loss gives the same parameter gradients, in timm's names
    state = reference.state_dict()
    for key, value in encoder.timm_state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert rel_err(value, state[key]) < 1e-9, key
        else:  # weights, and num_batches_tracked counted one step in both
            assert torch.equal(value, state[key]), key
    read_out(want).backward()
    read_out(got).backward()
    got_grads = encoder.to_timm({n: p.grad for n, p in encoder.named_parameters()})
    want_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert got_grads.keys() == want_grads.keys()  # the classifier head's norm has none
    for key, grad in got_grads.items():
        assert rel_err(grad, want_grads[key]) < 1e-9, key
