"""Metrics against hand computations and outside references (torchmetrics modules, torch.nn.functional)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from ptyl.errors import DataError, InvalidValueError
from ptyl.metrics import accuracy, brier_score, calibration_bins, evaluate_probs, expected_calibration_error, nll

# Hand example: 4 examples, 3 classes.
PROBS = torch.tensor(
    [
        [0.7, 0.2, 0.1],  # predicts 0, target 0: correct, confidence 0.7
        [0.1, 0.6, 0.3],  # predicts 1, target 2: wrong,   confidence 0.6
        [0.25, 0.25, 0.5],  # predicts 2, target 2: correct, confidence 0.5
        [0.05, 0.9, 0.05],  # predicts 1, target 1: correct, confidence 0.9
    ]
)
TARGETS = torch.tensor([0, 2, 2, 1])


def random_problem(n=500, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen) * 2
    targets = torch.randint(0, classes, (n,), generator=gen)
    return logits, torch.softmax(logits, 1), targets


def test_hand_computed_values():
    assert accuracy(PROBS, TARGETS) == pytest.approx(0.75)
    assert nll(PROBS, TARGETS) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.9)) / 4)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.6**2 + 0.7**2) + (0.25**2 + 0.25**2 + 0.5**2)
             + (0.05**2 + 0.1**2 + 0.05**2)) / 4
    assert brier_score(PROBS, TARGETS) == pytest.approx(brier)
    # 5 bins of width 0.2: [0.4,0.6) holds conf 0.5 (correct); [0.6,0.8) holds 0.7 (correct) and 0.6 (wrong);
    # [0.8,1.0] holds 0.9 (correct).
    ece = 0.25 * abs(1 - 0.5) + 0.5 * abs(0.5 - 0.65) + 0.25 * abs(1 - 0.9)
    assert expected_calibration_error(PROBS, TARGETS, n_bins=5) == pytest.approx(ece)


def test_against_torchmetrics_modules():
    _, probs, targets = random_problem()
    acc_module = MulticlassAccuracy(num_classes=5, average="micro")
    ece_module = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")
    # modules accumulate across batches
    for chunk_p, chunk_t in zip(probs.split(128), targets.split(128), strict=True):
        acc_module.update(chunk_p, chunk_t)
        ece_module.update(chunk_p, chunk_t)
    assert accuracy(probs, targets) == pytest.approx(acc_module.compute().item())
    assert expected_calibration_error(probs, targets) == pytest.approx(ece_module.compute().item(), abs=1e-6)
    assert accuracy(probs, targets) == pytest.approx((probs.argmax(1) == targets).float().mean().item())


def test_nll_against_torch_losses():
    logits, probs, targets = random_problem()
    assert nll(probs, targets) == pytest.approx(F.nll_loss(torch.log(probs), targets).item(), rel=1e-5)
    assert nll(probs, targets) == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


def test_nll_of_zero_probability_is_finite():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = nll(probs, torch.tensor([1, 0]))
    assert math.isfinite(value) and value > 40


def test_brier_against_vectorised_reference():
    _, probs, targets = random_problem(classes=4)
    reference = ((probs - F.one_hot(targets, 4).float()) ** 2).sum(1).mean().item()
    assert brier_score(probs, targets) == pytest.approx(reference, rel=1e-6)


def test_calibration_bins_reproduce_ece():
    _, probs, targets = random_problem(seed=3)
    bins = calibration_bins(probs, targets, n_bins=10)
    assert bins["count"].sum().item() == 500
    from_bins = (bins["count"] / 500 * (bins["accuracy"] - bins["confidence"]).abs()).sum().item()
    assert from_bins == pytest.approx(expected_calibration_error(probs, targets, n_bins=10), abs=1e-6)


def test_evaluate_probs_keys_and_plain_floats():
    result = evaluate_probs(PROBS, TARGETS)
    assert set(result) == {"accuracy", "nll", "ece", "brier"}
    assert all(type(v) is float for v in result.values())
    assert result["accuracy"] == pytest.approx(0.75)


def test_segmentation_shapes_flatten_pixels_and_ignore_index():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=gen), dim=1)
    targets = torch.randint(0, 3, (2, 4, 5), generator=gen)
    flat_p, flat_t = probs.permute(0, 2, 3, 1).reshape(-1, 3), targets.reshape(-1)
    assert evaluate_probs(probs, targets) == pytest.approx(evaluate_probs(flat_p, flat_t))
    masked = targets.clone()
    masked[0, 0] = -1  # ignore a row of 5 pixels
    keep = masked.reshape(-1) != -1
    assert evaluate_probs(probs, masked, ignore_index=-1) == pytest.approx(evaluate_probs(flat_p[keep], flat_t[keep]))
    with pytest.raises(DataError):
        accuracy(probs, masked)  # -1 without ignore_index is an out-of-range target


@pytest.mark.parametrize(
    "probs, targets, error",
    [
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), InvalidValueError),  # logits, not probabilities
        (PROBS, torch.tensor([0, 1, 2]), DataError),  # length mismatch
        (PROBS, torch.tensor([0, 1, 3, 0]), DataError),  # class out of range
        (PROBS, TARGETS.float(), DataError),  # float targets
        (PROBS[0], TARGETS[:1], DataError),  # 1-D probs
    ],
)
def test_bad_inputs_raise(probs, targets, error):
    with pytest.raises(error):
        nll(probs, targets)


def test_all_pixels_ignored_raises():
    with pytest.raises(DataError, match="ignore_index"):
        accuracy(PROBS, torch.full((4,), -1), ignore_index=-1)
