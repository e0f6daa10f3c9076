import types

import pytest
import torch

from ptyl.data.segmentation import DigitCanvasSegmentation, make_segmentation_splits
from ptyl.errors import DataError, InvalidValueError


def _digits(n=40, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, d, d, generator=g)
    targets = torch.randint(0, 10, (n,), generator=g)
    return images, targets


def _replay(ds, digits, targets, i):
    """Rebuild canvas i and its mask from the recorded placements with plain loops."""
    s, d = ds.canvas_size, digits.shape[-1]
    canvas = torch.zeros(s, s)
    label = torch.zeros(s, s, dtype=torch.int64)  # class + 1 of the digit holding the pixel's maximum
    for active, idx, cls, top, left in ds.placements[i].tolist():
        if not active:
            continue
        assert cls == targets[idx]
        patch = digits[idx, 0]
        for r in range(d):
            for c in range(d):
                v = patch[r, c].item()
                if v > canvas[top + r, left + c]:  # strict: the earlier digit keeps ties
                    canvas[top + r, left + c] = v
                    label[top + r, left + c] = cls + 1
    return canvas, torch.where(canvas > ds.threshold, label, 0)


@pytest.mark.parametrize("placement", ["grid", "free"])
def test_masks_match_digit_pixels(placement):
    digits, targets = _digits()
    ds = DigitCanvasSegmentation(digits, targets, 12, canvas_size=32, digits_per_canvas=(1, 4), threshold=0.5,
                                 seed=3, placement=placement)
    assert ds.num_classes == 11 and len(ds) == 12
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (32, 32) and mask.dtype == torch.int64
        canvas, expected = _replay(ds, digits, targets, i)
        assert torch.equal(image[0], canvas)
        assert torch.equal(mask, expected)


def test_grid_placement_is_non_overlapping_and_mask_is_threshold_of_each_digit():
    digits, targets = _digits(d=10)
    ds = DigitCanvasSegmentation(digits, targets, 20, canvas_size=30, digits_per_canvas=(2, 4), seed=1)
    for i in range(len(ds)):
        image, mask = ds[i]
        covered = torch.zeros(30, 30, dtype=torch.int64)
        for active, idx, cls, top, left in ds.placements[i].tolist():
            if not active:
                continue
            covered[top:top + 10, left:left + 10] += 1
            patch = digits[idx, 0]
            # foreground exactly where this digit > threshold, labelled class + 1
            assert torch.equal(image[0, top:top + 10, left:left + 10], patch)
            expected = torch.where(patch > 0.5, cls + 1, 0)
            assert torch.equal(mask[top:top + 10, left:left + 10], expected)
        assert covered.max() <= 1
        assert torch.all(mask[covered == 0] == 0) and torch.all(image[0][covered == 0] == 0)
        n_active = int(ds.placements[i, :, 0].sum())
        assert 2 <= n_active <= 4


def test_deterministic_and_seed_dependent():
    digits, targets = _digits()
    a = DigitCanvasSegmentation(digits, targets, 10, canvas_size=32, seed=0)
    b = DigitCanvasSegmentation(digits, targets, 10, canvas_size=32, seed=0)
    c = DigitCanvasSegmentation(digits, targets, 10, canvas_size=32, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_real_sklearn_digits_resized_and_splits():
    from sklearn.datasets import load_digits

    d = load_digits()
    pool = types.SimpleNamespace(
        images=torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None],
        targets=torch.tensor(d.target),
        num_classes=10,
    )
    train, test = make_segmentation_splits(pool, 1000, 300, seed=0, canvas_size=48, digit_size=20)
    assert len(train) == 1000 and len(test) == 300 and train.num_classes == 11
    assert set(train.masks.unique().tolist()) == set(range(11))
    # disjoint digit pools: the test canvases are built from images the train canvases never use
    n_test_pool = round(0.2 * len(d.target))
    assert int(train.placements[..., 1].max()) < len(d.target) - n_test_pool
    assert int(test.placements[..., 1].max()) < n_test_pool
    assert train.images.min() >= 0 and train.images.max() <= 1
    assert not torch.equal(train.images[:300], test.images)


def test_generation_is_fast():
    import time

    digits, targets = _digits(n=500, d=28)
    start = time.perf_counter()
    DigitCanvasSegmentation(digits, targets, 2000, canvas_size=64)
    assert time.perf_counter() - start < 5.0  # ~0.3 s on an idle core; generous for shared CI


def test_bad_inputs():
    digits, targets = _digits(d=10)
    with pytest.raises(InvalidValueError, match="grid"):
        DigitCanvasSegmentation(digits, targets, 5, canvas_size=20, digits_per_canvas=(1, 5))
    with pytest.raises(DataError):
        DigitCanvasSegmentation(digits, targets[:-1], 5)
    with pytest.raises(InvalidValueError):
        DigitCanvasSegmentation(digits, targets, 5, canvas_size=8)
    with pytest.raises(DataError):
        DigitCanvasSegmentation(digits * 2, targets, 5)
    with pytest.raises(DataError):
        make_segmentation_splits(42, 5, 5)
