"""Digit-canvas semantic segmentation built from real digit images (deterministic, vectorised).

How a canvas is made (:class:`DigitCanvasSegmentation`):

1. Digit images ``[M, 1, d, d]`` in [0, 1] (e.g. 28x28 MNIST/KMNIST; with ``digit_size`` set they are
   first resized bilinearly, e.g. 8x8 sklearn digits -> 20x20, then clamped to [0, 1]).
2. For canvas ``n`` a generator seeded with ``seed`` draws the number of digits
   ``n_digits ~ U{lo, ..., hi}`` (``digits_per_canvas = (lo, hi)``), ``hi`` digit indices uniformly with
   replacement from the pool (only the first ``n_digits`` are placed), and a top-left position for each:
   * ``placement="grid"`` (default, non-overlapping): the canvas is cut into ``g x g`` cells of side
     ``canvas_size // g`` with ``g = canvas_size // d``; each digit gets a distinct random cell and a
     uniform offset inside it (so digits never overlap; needs ``g*g >= hi``);
   * ``placement="free"``: top-left uniform in ``[0, canvas_size - d]^2``; digits may overlap.
3. The canvas is the pixel-wise **maximum** of the placed digits (background 0). The mask at a pixel is
   ``1 + class`` of the digit that attains that maximum (ties -> the digit placed first) if that maximum
   is ``> threshold``, else ``0`` (background). Without overlaps this is exactly "class + 1 where the
   digit's intensity > threshold". So ``num_classes = num_digit_classes + 1`` (11 for 10 digit classes).

Samples are ``(image [1, S, S] float32, mask [S, S] int64)``. ``placements`` records, per canvas and
slot, ``(active, digit_index, class, top, left)`` so the construction can be checked or replayed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ptyl.data.datasets import load_dataset
from ptyl.errors import DataError, InvalidValueError

__all__ = ["DigitCanvasSegmentation", "make_segmentation_splits"]


def _digit_batch(images: torch.Tensor, digit_size: int | None) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] != images.shape[-2]:
        raise DataError(f"digit images must be [M, 1, d, d] or [M, d, d] (square, grey-scale), "
                        f"got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError("digit image pool is empty")
    images = images.to(torch.float32)
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise DataError("digit images must be finite and in [0, 1]")
    if digit_size is not None and digit_size != images.shape[-1]:
        images = F.interpolate(images, size=(digit_size, digit_size), mode="bilinear", align_corners=False)
        images = images.clamp(0.0, 1.0)
    return images


class DigitCanvasSegmentation(Dataset):
    """Canvases of real digits with per-pixel class masks; see the module docstring for the exact recipe.

    Args:
        images: digit pool ``[M, 1, d, d]`` (or ``[M, d, d]``) in [0, 1].
        targets: digit classes ``[M]`` in ``[0, num_digit_classes)``.
        num_samples: number of canvases.
        canvas_size: canvas side ``S``.
        digits_per_canvas: inclusive ``(lo, hi)`` range of digits per canvas.
        threshold: intensity above which a digit pixel is foreground.
        seed: seed of the generator that draws digits and positions.
        digit_size: resize digits to this side first (``None`` keeps their size).
        placement: ``"grid"`` (non-overlapping) or ``"free"`` (max-composited, may overlap).
        num_digit_classes: number of digit classes (default ``max(targets) + 1``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        num_samples: int,
        canvas_size: int = 64,
        digits_per_canvas: tuple[int, int] = (1, 3),
        threshold: float = 0.5,
        seed: int = 0,
        digit_size: int | None = None,
        placement: str = "grid",
        num_digit_classes: int | None = None,
    ) -> None:
        digits = _digit_batch(images, digit_size)
        targets = torch.as_tensor(targets).to(torch.int64).reshape(-1)
        if targets.shape[0] != digits.shape[0]:
            raise DataError(f"images and targets disagree in length: {digits.shape[0]} vs {targets.shape[0]}")
        if targets.min() < 0:
            raise DataError("digit targets must be >= 0")
        n_cls = int(targets.max()) + 1 if num_digit_classes is None else int(num_digit_classes)
        if targets.max() >= n_cls:
            raise DataError(f"digit target {int(targets.max())} >= num_digit_classes={n_cls}")
        lo, hi = (int(digits_per_canvas[0]), int(digits_per_canvas[1]))
        d = digits.shape[-1]
        if num_samples < 1:
            raise InvalidValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= lo <= hi or hi < 1:
            raise InvalidValueError(f"digits_per_canvas must be (lo, hi) with 0 <= lo <= hi, hi >= 1, "
                                    f"got {digits_per_canvas}")
        if canvas_size < d:
            raise InvalidValueError(f"canvas_size={canvas_size} is smaller than the digit size {d}")
        if not 0.0 <= threshold < 1.0:
            raise InvalidValueError(f"threshold must be in [0, 1), got {threshold}")
        if placement not in ("grid", "free"):
            raise InvalidValueError(f"placement must be 'grid' or 'free', got {placement!r}")
        cells = canvas_size // d
        if placement == "grid" and cells * cells < hi:
            raise InvalidValueError(
                f"placement='grid' fits {cells * cells} non-overlapping {d}x{d} digits on a {canvas_size} canvas, "
                f"asked for up to {hi}; use a larger canvas or placement='free'"
            )

        self.canvas_size, self.threshold = int(canvas_size), float(threshold)
        self.seed, self.placement = int(seed), placement
        self.digits_per_canvas = (lo, hi)
        self.num_digit_classes = n_cls
        self.num_classes = n_cls + 1  # + background
        self.images, self.masks, self.placements = self._generate(digits, targets, int(num_samples), cells)

    def _generate(
        self, digits: torch.Tensor, targets: torch.Tensor, n: int, cells: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = self.digits_per_canvas
        s, d = self.canvas_size, digits.shape[-1]
        count = torch.randint(lo, hi + 1, (n,), generator=g)
        index = torch.randint(0, digits.shape[0], (n, hi), generator=g)
        if self.placement == "grid":
            cell = s // cells
            slot = torch.rand(n, cells * cells, generator=g).argsort(dim=1)[:, :hi]  # distinct cells per canvas
            offset = torch.randint(0, cell - d + 1, (n, hi, 2), generator=g)
            top = (slot // cells) * cell + offset[..., 0]
            left = (slot % cells) * cell + offset[..., 1]
        else:
            top = torch.randint(0, s - d + 1, (n, hi), generator=g)
            left = torch.randint(0, s - d + 1, (n, hi), generator=g)
        active = torch.arange(hi)[None, :] < count[:, None]

        best = torch.zeros(n, s, s)
        label = torch.zeros(n, s, s, dtype=torch.int64)
        rows = torch.arange(d)[None, :, None]
        cols = torch.arange(d)[None, None, :]
        canvas_idx = torch.arange(n)[:, None, None]
        for k in range(hi):  # hi is small (a few digits); everything else is batched over canvases
            layer = torch.zeros(n, s, s)
            patch = digits[index[:, k], 0] * active[:, k, None, None]
            layer[canvas_idx, top[:, k, None, None] + rows, left[:, k, None, None] + cols] = patch
            wins = layer > best  # strict: ties keep the earlier digit
            best = torch.where(wins, layer, best)
            label = torch.where(wins, targets[index[:, k]][:, None, None] + 1, label)
        masks = torch.where(best > self.threshold, label, torch.zeros_like(label))
        placements = torch.stack([active.long(), index, targets[index], top, left], dim=-1)
        return best[:, None].contiguous(), masks, placements

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.masks[i]

    def __repr__(self) -> str:
        return (
            f"DigitCanvasSegmentation(n={len(self)}, canvas_size={self.canvas_size}, "
            f"digits_per_canvas={self.digits_per_canvas}, num_classes={self.num_classes}, placement={self.placement!r})"
        )


def _split_pool(pool: Any, seed: int, test_fraction: float = 0.2) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Disjoint train/test digit pools (so no digit image appears in both canvas splits)."""
    images, targets = torch.as_tensor(pool.images), torch.as_tensor(pool.targets)
    if images.shape[0] < 2:
        raise DataError(f"need at least 2 digit images to split a pool, got {images.shape[0]}")
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * images.shape[0])))
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], targets[train]), (images[test], targets[test])


def make_segmentation_splits(
    dataset: Any,
    n_train: int,
    n_test: int,
    seed: int = 0,
    **canvas_kwargs: Any,
) -> tuple[DigitCanvasSegmentation, DigitCanvasSegmentation]:
    """Train and test canvas sets built from disjoint digit images.

    Args:
        dataset: a data set name for :func:`ptyl.data.datasets.load_dataset` (its ``"train"`` split feeds
            the train canvases, its ``"test"`` split the test canvases), or an object with ``.images``,
            ``.targets`` (e.g. an ``ImageDataset``), split 80/20 at random (``seed``) into disjoint pools.
        n_train, n_test: number of canvases in each split.
        seed: seeds the pool split and the canvases (train uses ``seed``, test ``seed + 1``).
        **canvas_kwargs: forwarded to :class:`DigitCanvasSegmentation` (canvas_size, digits_per_canvas, ...).
    """
    if isinstance(dataset, str):
        train_pool, test_pool = load_dataset(dataset, "train"), load_dataset(dataset, "test")
        n_cls = int(train_pool.num_classes)
        (tr_x, tr_y), (te_x, te_y) = (train_pool.images, train_pool.targets), (test_pool.images, test_pool.targets)
    elif hasattr(dataset, "images") and hasattr(dataset, "targets"):
        (tr_x, tr_y), (te_x, te_y) = _split_pool(dataset, seed)
        n_cls = int(getattr(dataset, "num_classes", int(torch.as_tensor(dataset.targets).max()) + 1))
    else:
        raise DataError(f"dataset must be a data set name or have .images and .targets, got {type(dataset).__name__}")
    canvas_kwargs.setdefault("num_digit_classes", n_cls)
    train = DigitCanvasSegmentation(tr_x, tr_y, n_train, seed=seed, **canvas_kwargs)
    test = DigitCanvasSegmentation(te_x, te_y, n_test, seed=seed + 1, **canvas_kwargs)
    return train, test
