"""Validation splits for tuning: class-balanced for labelled examples, seeded-random for dense targets (masks).

>>> import torch
>>> from torch.utils.data import TensorDataset
>>> data = TensorDataset(torch.zeros(10, 1), torch.tensor([0] * 5 + [1] * 5))
>>> train, val = validation_split(data, 0.2, seed=0)
>>> len(train), len(val)
(8, 2)
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ptyl.data import balanced_split, stratified_split_indices
from ptyl.errors import DataError, InvalidValueError
from ptyl.validation import check_choice, check_int

__all__ = ["SPLITS", "has_class_labels", "k_folds", "stacked_targets", "validation_split"]

SPLITS = ("auto", "balanced", "random")


def validation_split(
    train_set: Dataset, val_fraction: float = 0.2, seed: int = 0, split: str = "balanced"
) -> tuple[Dataset, Dataset]:
    """Disjoint ``(train, val)`` split.

    Args:
        train_set: an :class:`~ptyl.data.ImageDataset`, a ``TextDataset``, an ``(x, y)`` :class:`TensorDataset`, or
            (``split="random"``) any Dataset.
        val_fraction: share of the examples in the validation part.
        seed: picks the split.
        split: ``"balanced"`` (``round(val_fraction * n_c)`` of every class in val; needs integer class labels),
            ``"random"`` (seeded uniform split, at least one example on each side; for targets that are not one
            class per example, e.g. segmentation masks) or ``"auto"`` (balanced when the labels allow it).

    Returns:
        ``(train, val)`` datasets.
    """
    check_choice(split, SPLITS, "split")
    if split == "auto":
        split = "balanced" if has_class_labels(train_set) else "random"
    if split == "random":
        return _random_split(train_set, val_fraction, seed)
    if hasattr(train_set, "subset") and hasattr(train_set, "targets"):
        return balanced_split(train_set, val_fraction, seed)
    if isinstance(train_set, TensorDataset) and len(train_set.tensors) >= 2:
        targets = train_set.tensors[1]
        if targets.is_floating_point() or targets.dim() != 1:
            raise DataError("validation_split needs integer class labels of shape [n] to balance classes "
                            "(pass split='random' for targets without one class label per example)")
        train_idx, val_idx = stratified_split_indices(targets, val_fraction, seed)
        if val_idx.numel() == 0:
            raise DataError("no class has 2 or more examples, so the validation set would be empty")
        return Subset(train_set, train_idx.tolist()), Subset(train_set, val_idx.tolist())
    raise DataError(f"cannot split a {type(train_set).__name__} by class: pass an ImageDataset or an (x, y) "
                    "TensorDataset, or split='random'")


def _random_split(train_set: Dataset, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    if not 0.0 < float(val_fraction) < 1.0:
        raise InvalidValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(train_set)
    if n < 2:
        raise DataError(f"a random split needs at least 2 examples, got {n}")
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    train_idx, val_idx = perm[n_val:].sort().values, perm[:n_val].sort().values
    return Subset(train_set, train_idx.tolist()), Subset(train_set, val_idx.tolist())


def k_folds(dataset: Dataset, folds: int = 5, seed: int = 0) -> list[tuple[Dataset, Dataset]]:
    """Stratified k-fold cross-validation: ``folds`` disjoint validation parts covering every example once.

    Examples of each class are shuffled (``seed``) and dealt to the folds in turn, so every fold holds ``n_c / k``
    of class ``c`` (within one). Labels that are not one class per example are dealt at random.

    Args:
        dataset: an :class:`~ptyl.data.ImageDataset` / ``TextDataset`` (``subset``, ``targets``), an ``(x, y)``
            :class:`TensorDataset` or any Dataset.
        folds: k >= 2.
        seed: picks the folds (repeat CV with several seeds).

    Returns:
        ``[(train_i, val_i)]`` for i = 1..k.

    >>> data = TensorDataset(torch.zeros(10, 1), torch.tensor([0] * 6 + [1] * 4))
    >>> tuple(len(val) for _, val in k_folds(data, 2, seed=0))
    (5, 5)
    """
    folds = check_int(folds, "folds", minimum=2)
    n = len(dataset)
    if n < folds:
        raise DataError(f"{folds}-fold cross-validation needs at least {folds} examples, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    fold_of = torch.empty(n, dtype=torch.int64)
    if has_class_labels(dataset):
        targets = torch.as_tensor(dataset.targets if hasattr(dataset, "targets") else dataset.tensors[1])
        offset = 0
        for c in torch.unique(targets).tolist():
            idx = torch.nonzero(targets == c).flatten()
            idx = idx[torch.randperm(idx.numel(), generator=gen)]
            fold_of[idx] = (torch.arange(idx.numel()) + offset) % folds
            offset += idx.numel()  # rotate, so small classes do not all start in fold 0
    else:
        fold_of[torch.randperm(n, generator=gen)] = torch.arange(n) % folds
    out = []
    for i in range(folds):
        val_idx = torch.nonzero(fold_of == i).flatten()
        train_idx = torch.nonzero(fold_of != i).flatten()
        out.append((_take(dataset, train_idx), _take(dataset, val_idx)))
    return out


def _take(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if hasattr(dataset, "subset") and hasattr(dataset, "targets"):
        return dataset.subset(indices)
    return Subset(dataset, indices.tolist())


def has_class_labels(dataset: Dataset) -> bool:
    """Whether :func:`validation_split` can balance classes: integer labels of shape ``[n]``."""
    if hasattr(dataset, "subset") and hasattr(dataset, "targets"):
        targets = torch.as_tensor(dataset.targets)
    elif isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        targets = dataset.tensors[1]
    else:
        return False
    return targets.dim() == 1 and not targets.is_floating_point()


def stacked_targets(dataset: Dataset) -> torch.Tensor:
    """Targets of every example stacked: labels ``[n]``, or masks ``[n, H, W]`` for segmentation."""
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets).long()
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))]).long()
