"""The in-memory image dataset (:class:`ImageDataset`) and the image conversions every loader shares. Its own module
below :mod:`ptyl.data.datasets` (the named datasets) and :mod:`ptyl.data.loaders` (files and folders), which both
build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ptyl.errors import DataError

__all__ = ["ImageDataset", "resize_images", "to_image_tensor"]


def to_image_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert ``[N,H,W]`` or ``[N,C,H,W]`` images to float32 ``[N,C,H,W]``; ``uint8`` is scaled to [0, 1]."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise DataError(f"images must have shape [N,H,W] or [N,C,H,W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.dtype == torch.bool:
        return images.to(torch.float32)
    if not images.is_floating_point():
        if images.numel() and (int(images.min()) < 0 or int(images.max()) > 255):
            raise DataError(
                f"integer images of dtype {images.dtype} must lie in [0, 255] to be scaled to [0, 1]"
            )
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize ``[N,C,H,W]`` images with antialiased bilinear interpolation (values stay in the input range)."""
    hw: tuple[int, ...] = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise DataError(f"image_size must be a positive int or (height, width), got {hw!r}")
    if tuple(images.shape[-2:]) == hw:
        return images
    lo, hi = images.min(), images.max()
    resized = F.interpolate(images, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp_(lo, hi)  # clamp guards against rounding just outside the input range


class ImageDataset(Dataset):
    """Images and integer labels held in memory as tensors.

    Attributes:
        images: float32 ``[N, C, H, W]`` (embedded and loaded data lie in [0, 1]).
        targets: int64 ``[N]`` with values in ``0..num_classes-1``.
        classes: class names; ``classes[k]`` is the name of label ``k``.
        num_classes: ``len(classes)``.
        name: a short name used in messages and reports.
        transform: optional callable applied to each image (``[C,H,W]`` tensor) in ``__getitem__``.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        targets: np.ndarray | torch.Tensor | Sequence[int],
        classes: Sequence[str] | None = None,
        name: str = "dataset",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        images = to_image_tensor(images)
        targets = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
        if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
            if targets.is_floating_point() and torch.equal(targets, targets.round()):
                targets = targets.to(torch.int64)
            else:
                raise DataError(f"dataset {name!r}: targets must be integer class labels, got {targets.dtype}")
        targets = targets.to(torch.int64).flatten() if targets.dim() <= 1 else targets
        if targets.dim() != 1:
            raise DataError(f"dataset {name!r}: targets must be 1-D, got shape {tuple(targets.shape)}")
        if images.shape[0] == 0:
            raise DataError(f"dataset {name!r} is empty")
        if images.shape[0] != targets.shape[0]:
            raise DataError(
                f"dataset {name!r}: {images.shape[0]} images but {targets.shape[0]} labels"
            )
        if not torch.isfinite(images).all():
            raise DataError(f"dataset {name!r}: images contain NaN or Inf")
        if int(targets.min()) < 0:
            raise DataError(f"dataset {name!r}: negative label {int(targets.min())}")
        if classes is None:
            classes = [str(k) for k in range(int(targets.max()) + 1)]
        classes = [str(c) for c in classes]
        if int(targets.max()) >= len(classes):
            raise DataError(
                f"dataset {name!r}: label {int(targets.max())} but only {len(classes)} classes {classes}"
            )
        self.images = images.contiguous()
        self.targets = targets.contiguous()
        self.classes = classes
        self.name = str(name)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """A new dataset with the examples at ``indices`` (ints or a boolean mask); names and transform kept."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DataError(f"boolean mask of shape {tuple(idx.shape)} for a dataset of {len(self)}")
            idx = torch.nonzero(idx, as_tuple=False).flatten()
        idx = idx.to(torch.int64).flatten()
        if idx.numel() == 0:
            raise DataError(f"subset of dataset {self.name!r} is empty")
        if int(idx.min()) < -len(self) or int(idx.max()) >= len(self):
            raise DataError(f"subset index out of range for dataset {self.name!r} of {len(self)} examples")
        return ImageDataset(self.images[idx], self.targets[idx], self.classes, self.name, self.transform)

    def resized(self, image_size: int | tuple[int, int]) -> ImageDataset:
        """A copy with images resized (antialiased bilinear)."""
        images = resize_images(self.images, image_size)
        return ImageDataset(images, self.targets, self.classes, self.name, self.transform)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, targets)``, untransformed — for fast full-batch evaluation."""
        return self.images, self.targets

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )
