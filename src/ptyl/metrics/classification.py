"""Classification metrics on predicted probabilities: accuracy, NLL, expected calibration error (ECE), Brier score.

All functions take ``probs`` of shape ``[N, C]`` (rows sum to 1) and integer ``targets`` of shape ``[N]``, or for
segmentation ``probs [N, C, H, W]`` (or any ``[N, C, *]``) and ``targets [N, H, W]``, whose pixels are flattened into
examples. Pixels whose target equals ``ignore_index`` are dropped. Accuracy and ECE come from torchmetrics.

- accuracy = mean 1[argmax_c p_c == y]
- NLL      = -mean log p_y   (p_y clamped below at the smallest positive float32, so a zero gives a large finite value)
- ECE      = sum_b (n_b / N) |acc_b - conf_b| over ``n_bins`` equal-width confidence bins (Guo et al., 2017,
  https://arxiv.org/abs/1706.04599), top-label, L1 norm
- Brier    = mean over examples of sum_c (p_c - 1[c == y])^2  (Brier, 1950; range [0, 2])
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from ptyl.errors import DataError, InvalidValueError

__all__ = [
    "accuracy",
    "nll",
    "expected_calibration_error",
    "brier_score",
    "evaluate_probs",
    "calibration_bins",
    "flatten_predictions",
]

_PROB_SUM_TOLERANCE = 1e-3
_TINY = torch.finfo(torch.float32).tiny


def flatten_predictions(
    probs: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten to ``probs [M, C]`` and ``targets [M]`` (int64), dropping ``ignore_index`` pixels."""
    probs = torch.as_tensor(probs)
    targets = torch.as_tensor(targets)
    if probs.dim() < 2:
        raise DataError(f"probs must have shape [N, C] or [N, C, ...], got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise DataError(f"probs must be floating point, got {probs.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise DataError(f"targets must be integer class indices, got {targets.dtype}")
    expected = (probs.shape[0], *probs.shape[2:])
    if tuple(targets.shape) != expected:
        raise DataError(
            f"targets of shape {tuple(targets.shape)} do not match probs {tuple(probs.shape)}: expected {expected}"
        )
    num_classes = probs.shape[1]
    flat_probs = probs.movedim(1, -1).reshape(-1, num_classes)
    flat_targets = targets.reshape(-1).long()
    if ignore_index is not None:
        keep = flat_targets != ignore_index
        flat_probs, flat_targets = flat_probs[keep], flat_targets[keep]
    if flat_targets.numel() == 0:
        raise DataError("no examples to evaluate (empty input or every target is ignore_index)")
    if flat_targets.min() < 0 or flat_targets.max() >= num_classes:
        raise DataError(
            f"targets must lie in [0, {num_classes}), got range [{int(flat_targets.min())}, {int(flat_targets.max())}]"
        )
    if not torch.isfinite(flat_probs).all() or (flat_probs < 0).any():
        raise InvalidValueError("probs must be finite and non-negative (did you pass logits?)")
    row_sums = flat_probs.double().sum(dim=1)
    worst = (row_sums - 1).abs().max().item()
    if worst > _PROB_SUM_TOLERANCE:
        raise InvalidValueError(f"probability rows must sum to 1 (max deviation {worst:.3g}); did you pass logits?")
    return flat_probs, flat_targets


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise InvalidValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")


# The metrics on already validated, flattened ``p [M, C]`` / ``y [M]``: evaluate_probs validates once and calls these.
def _accuracy(p: torch.Tensor, y: torch.Tensor) -> float:
    return multiclass_accuracy(p, y, num_classes=p.shape[1], average="micro", validate_args=False).item()


def _nll(p: torch.Tensor, y: torch.Tensor) -> float:
    p_true = p.gather(1, y[:, None]).squeeze(1).double()
    return -torch.log(p_true.clamp_min(_TINY)).mean().item()


def _ece(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> float:
    return multiclass_calibration_error(
        p, y, num_classes=p.shape[1], n_bins=n_bins, norm="l1", validate_args=False
    ).item()


def _brier(p: torch.Tensor, y: torch.Tensor) -> float:
    one_hot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return (p.double() - one_hot).pow(2).sum(dim=1).mean().item()


def accuracy(probs: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None) -> float:
    """Top-1 accuracy (torchmetrics ``multiclass_accuracy``, micro average)."""
    return _accuracy(*flatten_predictions(probs, targets, ignore_index))


def nll(probs: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None) -> float:
    """Mean negative log-likelihood ``-mean log p_y`` (computed in float64, ``p_y`` clamped at float32 tiny)."""
    return _nll(*flatten_predictions(probs, targets, ignore_index))


def expected_calibration_error(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15, ignore_index: int | None = None
) -> float:
    """Top-label L1 ECE over ``n_bins`` equal-width bins (torchmetrics ``multiclass_calibration_error``)."""
    _check_bins(n_bins)
    return _ece(*flatten_predictions(probs, targets, ignore_index), n_bins)


def brier_score(probs: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None) -> float:
    """Mean over examples of ``sum_c (p_c - onehot_c)^2`` (float64)."""
    return _brier(*flatten_predictions(probs, targets, ignore_index))


def evaluate_probs(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15, ignore_index: int | None = None
) -> dict[str, float]:
    """``{"accuracy", "nll", "ece", "brier"}`` as plain floats."""
    _check_bins(n_bins)
    p, y = flatten_predictions(probs, targets, ignore_index)  # validate/flatten once
    return {"accuracy": _accuracy(p, y), "nll": _nll(p, y), "ece": _ece(p, y, n_bins), "brier": _brier(p, y)}


def calibration_bins(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15, ignore_index: int | None = None
) -> dict[str, torch.Tensor]:
    """Per-bin statistics of top-label confidence, for reliability diagrams.

    Bins are ``[b_i, b_{i+1})`` with ``b = linspace(0, 1, n_bins + 1)`` (torchmetrics' convention); a confidence of
    exactly 1 falls in the last bin. Returns float64 tensors ``edges [n_bins+1]``, ``accuracy``, ``confidence`` (0 for
    empty bins) and ``count [n_bins]``, on the device of ``probs``. ``sum(count/N * |accuracy - confidence|)`` equals
    the ECE whenever no confidence is exactly 1 (torchmetrics gives those a separate bin).
    """
    _check_bins(n_bins)
    p, y = flatten_predictions(probs, targets, ignore_index)
    confidence, prediction = p.double().max(dim=1)
    correct = (prediction == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=confidence.device)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = confidence.new_zeros(n_bins).scatter_add_(0, index, torch.ones_like(confidence))
    conf_sum = confidence.new_zeros(n_bins).scatter_add_(0, index, confidence)
    acc_sum = confidence.new_zeros(n_bins).scatter_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {"edges": edges, "accuracy": acc_sum / safe, "confidence": conf_sum / safe, "count": count}
