import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from ptyl.errors import DataError, InvalidValueError
from ptyl.metrics.segmentation import evaluate_segmentation, mean_iou, per_class_iou, pixel_accuracy


def _example():
    # 2 classes, one 4x4 mask. Class 1 = left half of the target; prediction marks the left 3 columns.
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, :, :2] = 1
    pred = torch.zeros(1, 4, 4, dtype=torch.int64)
    pred[0, :, :3] = 1
    return pred, target


def test_mean_iou_hand_checked():
    pred, target = _example()
    # class 1: TP = 8, FP = 4, FN = 0 -> 8/12; class 0: TP = 4, FP = 0, FN = 4 -> 4/8
    expected = (8 / 12 + 4 / 8) / 2
    assert mean_iou(pred, target, num_classes=2) == pytest.approx(expected)
    assert pixel_accuracy(pred, target, num_classes=2) == pytest.approx(12 / 16)
    assert torch.allclose(per_class_iou(pred, target, 2), torch.tensor([0.5, 8 / 12]))


def test_probabilities_are_argmaxed_and_absent_classes_skipped():
    pred, target = _example()
    probs = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 0.8 + 0.2 / 3
    # class 2 never occurs in predictions or targets: excluded from the mean, NaN per class
    assert mean_iou(probs, target, num_classes=3) == pytest.approx((8 / 12 + 4 / 8) / 2)
    assert math.isnan(per_class_iou(probs, target, 3)[2].item())
    assert pixel_accuracy(probs, target) == pytest.approx(12 / 16)


def test_ignore_index_leaves_pixels_out():
    pred, target = _example()
    target[0, :, 2] = 255  # the column where prediction and target disagree
    assert mean_iou(pred, target, 2, ignore_index=255) == pytest.approx(1.0)
    assert pixel_accuracy(pred, target, 2, ignore_index=255) == pytest.approx(1.0)


def test_evaluate_segmentation_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 5, generator=g)
    probs = logits.softmax(dim=1)
    masks = torch.randint(0, 4, (3, 6, 5), generator=g)
    out = evaluate_segmentation(probs, masks)
    flat_p = probs.permute(0, 2, 3, 1).reshape(-1, 4)
    flat_t = masks.reshape(-1)
    assert out["nll"] == pytest.approx(torch.nn.functional.nll_loss(flat_p.log(), flat_t).item(), rel=1e-5)
    assert out["pixel_accuracy"] == pytest.approx((flat_p.argmax(1) == flat_t).float().mean().item())
    assert out["ece"] == pytest.approx(multiclass_calibration_error(flat_p, flat_t, 4, n_bins=15).item(), rel=1e-5)
    assert out["miou"] == pytest.approx(mean_iou(probs, masks, 4))
    # subsampled ECE is deterministic and close to the full one
    sub = evaluate_segmentation(probs, masks, max_calibration_pixels=60)
    assert sub == evaluate_segmentation(probs, masks, max_calibration_pixels=60)
    assert sub["nll"] == out["nll"]


def test_bad_inputs():
    pred, target = _example()
    with pytest.raises(DataError):
        mean_iou(pred, target[:, :3], 2)
    with pytest.raises(DataError):
        mean_iou(pred, target + 5, 2)
    with pytest.raises(InvalidValueError, match="sum to 1"):
        evaluate_segmentation(torch.rand(1, 2, 4, 4) + 0.6, target)
    with pytest.raises(InvalidValueError, match="non-negative"):
        evaluate_segmentation(torch.tensor([1.5, -0.5]).view(1, 2, 1, 1).expand(1, 2, 4, 4), target)
    with pytest.raises(DataError):
        mean_iou(pred.float(), target, 2)
