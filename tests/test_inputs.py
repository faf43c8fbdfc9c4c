"""Bad input is refused with a ValueError that names the problem."""

import pytest
import torch

from spark_sparse import engine_class, random_active

from .conftest import ENGINE_NAMES


@pytest.fixture(scope="module", params=ENGINE_NAMES)
def encoder(request):
    return engine_class(request.param).from_timm("resnet18").eval()


def test_size_not_divisible_by_32(encoder):
    with pytest.raises(ValueError, match="not divisible by the encoder stride 32"):
        encoder(torch.randn(1, 3, 100, 96), torch.ones(1, 1, 3, 3, dtype=torch.bool))


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


def test_mask_ratio_outside_range():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_active(1, (7, 7), 1.0)


def test_random_active_keeps_the_papers_count():
    g = torch.Generator().manual_seed(0)
    active = random_active(4, (7, 7), 0.6, g)
    assert active.shape == (4, 1, 7, 7) and active.dtype == torch.bool
    assert active.flatten(1).sum(1).tolist() == [20] * 4  # round(49 * 0.4)
