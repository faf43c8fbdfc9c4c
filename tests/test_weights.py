"""Weights move both ways between an ordinary timm ResNet and the encoders, losslessly."""

import pytest
import timm
import torch

from spark_sparse import MaskedDenseEncoder, SparseEncoder, create_encoder
from spark_sparse.encoders.resnet import ConversionError
from spark_sparse.encoders.sparse import dense_to_me_kernel, me_to_dense_kernel

from .conftest import randomise_norms

ALL_DEPTHS = ["resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152",
              "resnet200", "resnet50d", "resnet26d", "resnet18d"]


@pytest.mark.parametrize("name", ALL_DEPTHS)
@pytest.mark.parametrize("engine", [SparseEncoder, MaskedDenseEncoder], ids=["sparse", "dense_masked"])
def test_timm_state_dict_round_trip_is_exact(name, engine):
    model = randomise_norms(timm.create_model(name, pretrained=False, num_classes=0))
    want = model.state_dict()
    encoder = engine.from_timm(model)
    got = encoder.timm_state_dict()
    fresh = timm.create_model(name, pretrained=False, num_classes=0)
    fresh.load_state_dict(got, strict=True)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # and back: loading timm weights into a fresh encoder reproduces them
    other = engine.from_timm(timm.create_model(name, pretrained=False, num_classes=0))
    other.load_timm_state_dict(want)
    for key, value in other.timm_state_dict().items():
        assert torch.equal(value, want[key]), key


def test_me_kernel_layout_is_volume_by_in_by_out():
    weight = torch.randn(8, 5, 3, 3)
    kernel = dense_to_me_kernel(weight)
    assert kernel.shape == (9, 5, 8)
    assert torch.equal(me_to_dense_kernel(kernel, (3, 3)), weight)
    assert dense_to_me_kernel(torch.randn(8, 5, 1, 1)).shape == (1, 5, 8)


def test_encoder_reports_stage_channels():
    assert create_encoder("resnet18").channels == [64, 128, 256, 512]
    assert create_encoder("resnet50", "dense_masked").channels == [256, 512, 1024, 2048]


def test_unconvertible_module_is_named_with_its_path():
    model = timm.create_model("seresnet18", pretrained=False, num_classes=0)
    with pytest.raises(ConversionError, match=r"layer1\.0\.se"):
        SparseEncoder.from_timm(model)
    with pytest.raises(ConversionError, match="expected a timm ResNet"):
        SparseEncoder.from_timm(torch.nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        create_encoder("resnet_nope")
    with pytest.raises(ValueError, match="unknown engine"):
        create_encoder("resnet18", "quantum")


def test_drop_path_is_mirrored():
    enc = create_encoder("resnet50", "sparse", drop_path_rate=0.1)
    probs = [m.drop_prob for m in enc.modules() if type(m).__name__ == "SparseDropPath"]
    # timm spreads the rate linearly over the 16 blocks; the first gets 0 and no drop-path
    assert len(probs) == 15 and max(probs) == pytest.approx(0.1)
