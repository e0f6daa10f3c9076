"""Data checks shared by the tuning engines: every failure is a :class:`~ptyl.errors.DataError` naming the batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ptyl.autotune.likelihoods import unpack
from ptyl.errors import DataError


def as_loader(data: Dataset | Iterable, batch_size: int = 256) -> Iterable:
    """A re-iterable of ``(x, y, ...)`` batches: a DataLoader / list of batches as given, a Dataset wrapped."""
    if isinstance(data, Dataset) and not isinstance(data, Iterable):
        if len(data) == 0:
            raise DataError("the training set is empty")
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Iterator):
        raise DataError("pass a DataLoader or a list of batches, not a one-shot iterator: the data is read many times")
    return data


def finite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: every floating tensor is finite (no host sync: check it later, once)."""
    flag = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            flag = flag & torch.isfinite(t).all()
    return flag


def to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = unpack(batch)
    return x.to(device), y.to(device)


def checked_batches(data: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` on ``device``, each checked for NaN/Inf (one host sync per batch: for curvature passes, not for
    training steps); raises if the data yields nothing."""
    count = 0
    for i, batch in enumerate(data):
        x, y = to_device(batch, device)
        if x.shape[0] == 0:
            continue
        if not bool(finite_flag(x, y)):
            raise DataError(f"batch {i} of the data holds NaN/Inf values")
        count += 1
        yield x, y
    if count == 0:
        raise DataError("the data loader yielded no batches")


def count_examples(data: Iterable, num_data: int | None = None) -> int:
    """N: ``num_data`` if given, else ``len(loader.dataset)``, else by reading the data once."""
    if num_data is not None:
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise DataError(f"num_data must be a positive integer, got {num_data!r}")
        return num_data
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        n = len(dataset)
    else:
        n = sum(int(unpack(b)[0].shape[0]) for b in data)
    if n == 0:
        raise DataError("the data loader yielded no batches")
    return n


__all__ = ["as_loader", "checked_batches", "count_examples", "finite_flag", "to_device"]
