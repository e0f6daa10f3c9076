import pytest
import torch

from ptyl.data.augment import (
    SimCLRAugment,
    gaussian_noise,
    random_affine,
    random_brightness_contrast,
    random_erasing,
    random_horizontal_flip,
    random_resized_crop,
)
from ptyl.errors import InvalidValueError, PtylError


def _images(b=8, h=16, w=16):
    return torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(1))


OPS = [
    lambda x, g: random_resized_crop(x, generator=g),
    lambda x, g: random_horizontal_flip(x, 0.5, generator=g),
    lambda x, g: random_affine(x, 20.0, (0.2, 0.2), (0.8, 1.2), generator=g),
    lambda x, g: random_brightness_contrast(x, 0.3, 0.3, generator=g),
    lambda x, g: gaussian_noise(x, 0.1, generator=g),
    lambda x, g: random_erasing(x, 1.0, generator=g),
    lambda x, g: SimCLRAugment(16)(x, g),
]


@pytest.mark.parametrize("op", OPS)
def test_ops_keep_shape_dtype_and_are_seed_deterministic(op):
    x = _images()
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        a = op(xd, torch.Generator().manual_seed(3))
        b = op(xd, 3)  # int seed == generator seeded with it
        c = op(xd, torch.Generator().manual_seed(4))
        assert a.shape == xd.shape and a.dtype == dtype
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_simclr_augment_range_and_views_differ():
    aug = SimCLRAugment(16, erasing_p=0.5, flip_p=0.5)
    x = _images(32)
    g = torch.Generator().manual_seed(0)
    v1, v2 = aug(x, g), aug(x, g)
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == x.dtype
        assert v.min() >= 0 and v.max() <= 1
    assert not torch.equal(v1, v2)
    assert (v1 - x).abs().mean() > 0.01  # really changes the images


def test_identity_settings_reproduce_input():
    x = _images()
    assert torch.allclose(random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), generator=0), x, atol=1e-6)
    assert torch.allclose(random_affine(x, 0.0, (0.0, 0.0), (1.0, 1.0), generator=0), x, atol=1e-6)
    assert torch.equal(random_horizontal_flip(x, 0.0, generator=0), x)
    assert torch.equal(random_horizontal_flip(x, 1.0, generator=0), x.flip(-1))
    assert torch.equal(gaussian_noise(x, 0.0, generator=0), x)


def _force_max_draws(monkeypatch):
    """Make every U(lo, hi) draw return hi, so random_affine applies exactly +degrees and +translate."""
    import ptyl.data.augment as aug

    monkeypatch.setattr(aug, "_uniform",
                        lambda n, lo, hi, g, like: torch.full((n,), hi, dtype=like.dtype, device=like.device))


def test_affine_rotation_by_90_degrees_is_exact_rot90(monkeypatch):
    _force_max_draws(monkeypatch)
    x = _images(4, 8, 8)
    out = random_affine(x, 90.0, (0.0, 0.0), (1.0, 1.0), generator=0)
    assert torch.allclose(out, torch.rot90(x, k=-1, dims=(-2, -1)), atol=1e-5)  # clockwise on screen


def test_affine_translation_moves_pixels_right_and_down(monkeypatch):
    _force_max_draws(monkeypatch)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 2] = 1.0
    out = random_affine(x, 0.0, (0.25, 0.5), (1.0, 1.0), generator=0)  # +2 px right, +4 px down
    expected = torch.zeros_like(x)
    expected[0, 0, 5, 4] = 1.0
    assert torch.allclose(out, expected, atol=1e-5)


def test_resized_crop_of_half_box_upsamples_that_quarter(monkeypatch):
    _force_max_draws(monkeypatch)  # area 0.25, ratio 1 -> box of half side; centre at +(1 - w) = bottom-right
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = random_resized_crop(x, (0.25, 0.25), (1.0, 1.0), generator=0, size=2)
    assert torch.allclose(out, x[..., 2:, 2:], atol=1e-5)


def test_random_erasing_zeroes_a_box():
    x = torch.ones(6, 1, 20, 20)
    out = random_erasing(x, p=1.0, scale=(0.1, 0.1), ratio=(1.0, 1.0), generator=0)
    erased = (out == 0).sum(dim=(1, 2, 3)).float()
    assert torch.all(erased > 20) and torch.all(erased < 60)  # ~10% of 400 pixels, grid-rounded


def test_bad_inputs_raise():
    with pytest.raises(InvalidValueError):
        random_resized_crop(torch.rand(3, 16, 16), generator=0)
    with pytest.raises(PtylError):
        random_horizontal_flip(_images(), p=1.5, generator=0)
    with pytest.raises(InvalidValueError):
        SimCLRAugment(16)(torch.rand(2, 1, 8, 8), 0)
    with pytest.raises(InvalidValueError):
        gaussian_noise(_images(), 0.1, generator="seed")
