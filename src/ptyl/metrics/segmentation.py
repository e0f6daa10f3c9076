"""Semantic-segmentation metrics: mIoU, pixel accuracy, per-pixel NLL and ECE (torchmetrics back end).

mIoU is the data-set-level one used by segmentation benchmarks: one confusion matrix over all pixels
of all images, ``IoU_k = TP_k / (TP_k + FP_k + FN_k)``, averaged over the classes that occur in the
predictions or the targets (torchmetrics' ``multiclass_jaccard_index`` with ``average="macro"``).
Pixels whose target equals ``ignore_index`` are left out of every metric.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_jaccard_index,
)

from ptyl.errors import DataError, InvalidValueError

__all__ = ["evaluate_segmentation", "mean_iou", "per_class_iou", "pixel_accuracy"]


def _labels(preds_or_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Hard labels ``[N, H, W]`` from labels (same shape as masks) or scores ``[N, K, H, W]`` (argmax over K)."""
    if preds_or_probs.ndim == masks.ndim + 1:
        if preds_or_probs.shape[:1] + preds_or_probs.shape[2:] != masks.shape:
            raise DataError(f"scores {tuple(preds_or_probs.shape)} do not match masks {tuple(masks.shape)}")
        return preds_or_probs.argmax(dim=1)
    if preds_or_probs.shape != masks.shape:
        raise DataError(f"predictions {tuple(preds_or_probs.shape)} do not match masks {tuple(masks.shape)}")
    if preds_or_probs.is_floating_point():
        raise DataError("label predictions must be integer class indices (pass [N, K, H, W] scores for probabilities)")
    return preds_or_probs.long()


def _check_masks(masks: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    if masks.is_floating_point():
        raise DataError(f"masks must hold integer class indices, got dtype {masks.dtype}")
    masks = masks.long()
    valid = masks if ignore_index is None else masks[masks != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= num_classes):
        raise DataError(f"mask values must be in [0, {num_classes}) (or ignore_index), "
                        f"got [{int(valid.min())}, {int(valid.max())}]")
    return masks


def mean_iou(
    preds_or_probs: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> float:
    """Data-set-level mean IoU over classes present in predictions or targets (see module doc)."""
    masks = _check_masks(masks, num_classes, ignore_index)
    preds = _labels(preds_or_probs, masks)
    value = multiclass_jaccard_index(
        preds.reshape(-1), masks.reshape(-1), num_classes=num_classes, average="macro", ignore_index=ignore_index
    )
    return float(value)


def per_class_iou(
    preds_or_probs: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """IoU of every class, ``[K]``; NaN for a class absent from both predictions and targets."""
    masks = _check_masks(masks, num_classes, ignore_index)
    preds = _labels(preds_or_probs, masks).reshape(-1)
    target = masks.reshape(-1)
    iou = multiclass_jaccard_index(preds, target, num_classes=num_classes, average="none", ignore_index=ignore_index)
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    seen = torch.zeros(num_classes, dtype=torch.bool, device=target.device)
    seen[preds[keep].clamp(0, num_classes - 1)] = True
    seen[target[keep]] = True
    return torch.where(seen, iou.float(), torch.full_like(iou.float(), float("nan")))


def pixel_accuracy(
    preds_or_probs: torch.Tensor, masks: torch.Tensor, num_classes: int | None = None, ignore_index: int | None = None
) -> float:
    """Fraction of (non-ignored) pixels whose predicted class equals the target."""
    if num_classes is None:
        if preds_or_probs.ndim == masks.ndim + 1:
            num_classes = preds_or_probs.shape[1]
        else:
            num_classes = int(max(int(preds_or_probs.max()), int(masks.max()))) + 1
    masks = _check_masks(masks, num_classes, ignore_index)
    preds = _labels(preds_or_probs, masks)
    value = multiclass_accuracy(
        preds.reshape(-1), masks.reshape(-1), num_classes=num_classes, average="micro", ignore_index=ignore_index
    )
    return float(value)


def evaluate_segmentation(
    probs: torch.Tensor,
    masks: torch.Tensor,
    ignore_index: int | None = None,
    n_bins: int = 15,
    max_calibration_pixels: int = 1_000_000,
    seed: int = 0,
) -> dict[str, float]:
    """``{"miou", "pixel_accuracy", "nll", "ece"}`` of predictive probabilities ``[N, K, H, W]`` vs masks ``[N, H, W]``.

    NLL is the mean ``-log p(mask)`` over pixels. ECE (L1, ``n_bins`` equal-width bins) treats every
    pixel as one prediction; above ``max_calibration_pixels`` pixels it is estimated on a uniform random
    subsample drawn with ``seed`` (deterministic).
    """
    if probs.ndim != 4 or masks.ndim != 3:
        raise DataError(f"expected probs [N, K, H, W] and masks [N, H, W], "
                        f"got {tuple(probs.shape)}, {tuple(masks.shape)}")
    k = probs.shape[1]
    masks = _check_masks(masks, k, ignore_index)
    if not torch.isfinite(probs).all() or probs.min() < 0:
        raise InvalidValueError("probs must be finite and non-negative")
    sums = probs.sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise InvalidValueError("probs must sum to 1 over the class dimension (pass softmax outputs, not logits)")
    if max_calibration_pixels < 1:
        raise InvalidValueError(f"max_calibration_pixels must be >= 1, got {max_calibration_pixels}")

    flat_p = probs.movedim(1, -1).reshape(-1, k).float()
    flat_t = masks.reshape(-1)
    if ignore_index is not None:
        keep = flat_t != ignore_index
        flat_p, flat_t = flat_p[keep], flat_t[keep]
    if flat_t.numel() == 0:
        raise DataError("no pixels to evaluate (all are ignore_index)")
    nll = -torch.log(flat_p.gather(1, flat_t[:, None]).clamp_min(1e-12)).mean()
    if flat_t.numel() > max_calibration_pixels:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(flat_t.numel(), generator=g)[:max_calibration_pixels].to(flat_t.device)
        cal_p, cal_t = flat_p[pick], flat_t[pick]
    else:
        cal_p, cal_t = flat_p, flat_t
    ece = multiclass_calibration_error(cal_p, cal_t, num_classes=k, n_bins=n_bins, norm="l1")
    return {
        "miou": mean_iou(probs, masks, k, ignore_index),
        "pixel_accuracy": pixel_accuracy(probs, masks, k, ignore_index),
        "nll": float(nll),
        "ece": float(ece),
    }
