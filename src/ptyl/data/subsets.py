"""Class-balanced subsets: few-shot subsamples, train/validation splits, class counts.

Every function here is deterministic given its ``seed`` (a local :class:`torch.Generator`; the global RNG is
never touched), so experiments that report "n examples per class, seed s" are reproducible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ptyl.errors import DataError, InvalidValueError

if TYPE_CHECKING:  # avoid a circular import: datasets.py uses stratified_split_indices
    from ptyl.data.images import ImageDataset
    from ptyl.data.text import TextDataset

__all__ = ["class_counts", "few_shot_subset", "balanced_split", "hold_out", "stratified_split_indices"]


def class_counts(dataset: ImageDataset | TextDataset) -> dict[int, int]:
    """Number of examples of every class ``0..num_classes-1`` (absent classes count 0)."""
    counts = torch.bincount(dataset.targets, minlength=dataset.num_classes)
    return {c: int(n) for c, n in enumerate(counts.tolist())}


def _class_permutations(targets: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    """For each class, the indices of its examples in a seeded random order (class by class, so
    adding examples of one class never changes the order drawn for another)."""
    generator = torch.Generator().manual_seed(int(seed))
    perms = []
    for c in range(num_classes):
        idx = torch.nonzero(targets == c, as_tuple=False).flatten()
        perms.append(idx[torch.randperm(idx.numel(), generator=generator)])
    return perms


def few_shot_subset(dataset: ImageDataset, n_per_class: int, seed: int) -> ImageDataset:
    """Exactly ``n_per_class`` examples of every class, chosen at random by ``seed``.

    Subsets are nested: for one seed, the subset with ``n`` examples per class contains the one with
    ``m < n``, so learning curves over ``n`` vary only the amount of data. The result keeps the order of
    ``dataset``. Raises :class:`DataError` if some class has fewer than ``n_per_class`` examples.
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise InvalidValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
    counts = class_counts(dataset)
    short = {c: n for c, n in counts.items() if n < n_per_class}
    if short:
        detail = ", ".join(f"{dataset.classes[c]!r}: {n}" for c, n in short.items())
        raise DataError(
            f"few_shot_subset of {dataset.name!r}: n_per_class={n_per_class} but these classes have fewer "
            f"examples ({detail})"
        )
    perms = _class_permutations(dataset.targets, dataset.num_classes, seed)
    chosen = torch.cat([p[:n_per_class] for p in perms]).sort().values
    return dataset.subset(chosen)


def stratified_split_indices(
    targets: torch.Tensor, val_fraction: float = 0.2, seed: int = 0, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, sorted ``(train_idx, val_idx)`` with ``round(val_fraction * n_c)`` of each class in val.

    A class with at least 2 examples gets at least one on each side; a class with a single example goes
    to train.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise InvalidValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    targets = torch.as_tensor(targets, dtype=torch.int64)
    if num_classes is None:
        num_classes = int(targets.max()) + 1 if targets.numel() else 0
    train, val = [], []
    for perm in _class_permutations(targets, num_classes, seed):
        n = perm.numel()
        n_val = min(max(round(val_fraction * n), 1), n - 1) if n >= 2 else 0
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    empty = torch.empty(0, dtype=torch.int64)
    return torch.cat(train + [empty]).sort().values, torch.cat(val + [empty]).sort().values


def balanced_split(
    dataset: ImageDataset, val_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Class-balanced ``(train, val)`` split of ``dataset`` (see :func:`stratified_split_indices`)."""
    train_idx, val_idx = stratified_split_indices(dataset.targets, val_fraction, seed, dataset.num_classes)
    if val_idx.numel() == 0:
        raise DataError(
            f"balanced_split of {dataset.name!r}: no class has 2 or more examples, so the validation set "
            "would be empty"
        )
    return dataset.subset(train_idx), dataset.subset(val_idx)


POOL_SEED = 10_000


def hold_out(dataset: ImageDataset | TextDataset, total: int,
             seed: int = POOL_SEED) -> tuple[ImageDataset | TextDataset, ImageDataset | TextDataset | None]:
    """Split off a class-balanced validation pool of ``total // C`` examples per class.

    Args:
        dataset: a labelled dataset with ``subset``, ``targets`` and ``num_classes`` (image or text).
        total: the pool's size (0: no pool).
        seed: draws the pool (fixed: the same pool for every training draw).

    Returns:
        ``(rest, pool)``; ``(dataset, None)`` for ``total = 0``.

    Raises:
        DataError: some class has too few examples to give the pool its share and leave one to train on.
    """
    if not total:
        return dataset, None
    per_class = int(total) // int(dataset.num_classes)
    short = {c: n for c, n in class_counts(dataset).items() if n <= per_class}
    if per_class < 1 or short:
        raise DataError(f"a validation pool of {total} leaves no training examples of classes {sorted(short)} "
                        f"(or fewer than 1 per class): use a smaller pool or cross-validation")
    targets = torch.as_tensor(dataset.targets)
    gen = torch.Generator().manual_seed(int(seed))
    pool, rest = [], []
    for c in range(int(dataset.num_classes)):
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        pool.append(idx[:per_class])
        rest.append(idx[per_class:])
    return dataset.subset(torch.cat(rest).sort().values), dataset.subset(torch.cat(pool).sort().values)
