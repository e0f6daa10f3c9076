"""Validation pools of the strategies that learn from one: the checks a pool must pass (never empty, never sharing
an example with the training set), its score, random subsets of it, and the base of the pool strategies
(:class:`PoolSettings`, :class:`PoolTuner`: continuation, hypergradient)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Dataset, Subset

from ptyl.autotune.data import checked_batches
from ptyl.errors import DataError
from ptyl.tuning.automatic import AutomaticRun, AutomaticSettings, AutomaticTuner
from ptyl.validation import check_int

__all__ = ["PoolSettings", "PoolTuner", "check_pool", "pool_loss", "random_subset"]


def _example_key(example: Any) -> bytes:
    """A digest of an example's tensors (inputs and target): equal examples, equal keys."""
    digest = hashlib.sha1()
    for leaf in tree_leaves(example):
        if torch.is_tensor(leaf):
            digest.update(str((leaf.dtype, tuple(leaf.shape))).encode())
            digest.update(leaf.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(leaf).encode())
    return digest.digest()


def check_pool(train_set: Dataset, pool: Dataset) -> None:
    """A validation pool must hold examples, none of them a training example (equal inputs and target).

    Args:
        train_set: the training examples.
        pool: the validation pool.

    Raises:
        DataError: an empty pool, or pool examples equal to training examples (naming the first of them).
    """
    if len(pool) == 0:
        raise DataError("the validation pool (val_set) is empty: the hypergradient needs held-out examples")
    if pool is train_set:
        raise DataError("the validation pool (val_set) is the training set: pass examples never trained on")
    seen = {_example_key(train_set[i]): i for i in range(len(train_set))}
    shared = [(j, seen[key]) for j in range(len(pool)) if (key := _example_key(pool[j])) in seen]
    if shared:
        j, i = shared[0]
        raise DataError(f"the validation pool overlaps the training set: {len(shared)} of its {len(pool)} examples "
                        f"are training examples (pool example {j} = training example {i}); the pool must never be "
                        "trained on")


def pool_loss(model: torch.nn.Module, pool: Dataset, loss, batch_size: int = 256, collate_fn=None) -> float:
    """The mean of ``loss(model, batch)`` (a batch mean, e.g. the NLL) over ``pool``, in evaluation mode.

    Args:
        model: the model.
        pool: the examples.
        loss: ``loss(model, batch) -> 0-dim tensor``.
        batch_size, collate_fn: how the pool is batched.

    Returns:
        The example-weighted mean.
    """
    loader = DataLoader(pool, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in checked_batches(loader, device):
                total += float(loss(model, batch)) * len(batch[1])
                count += len(batch[1])
    finally:
        model.train(was_training)
    return total / count


def random_subset(data: Dataset, size: int | None, seed: int) -> Dataset:
    """``size`` examples of ``data`` drawn by ``seed`` (in their order), or all of it (``None`` or not fewer).

    Args:
        data: the data set.
        size: how many examples.
        seed: picks them.

    Returns:
        A :class:`~torch.utils.data.Subset` or ``data`` itself.
    """
    if size is None or len(data) <= size:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Subset(data, order[:size].sort().values.tolist())


@dataclass
class PoolSettings(AutomaticSettings):
    """What the settings of every pool strategy (continuation, hypergradient) hold besides their own fields.

    Attributes:
        batch_size: batch size of the pool passes (and of the curvature passes, for those that make any).
    """

    batch_size: int = 256

    def check(self) -> None:
        """The shared fields, checked before training (each subclass adds its own and calls this)."""
        check_int(self.batch_size, "batch_size", minimum=1)


class PoolTuner(AutomaticTuner):
    """The base of the strategies that score the validation pool (continuation, hypergradient): their settings and
    the pool are checked before anything is trained, and the pool is scored with the training objective's loss."""

    metric = "val_nll"
    uses_validation = True
    settings: PoolSettings

    def check_data(self, train_set: Dataset, val_set: Dataset | None, name: str) -> None:
        """:meth:`AutomaticTuner.check_data`, the settings' own checks, and :func:`~ptyl.tuning.pool.check_pool`
        (never empty, no training example in it)."""
        self.settings.check()
        super().check_data(train_set, val_set, name)
        check_pool(train_set, val_set)

    def _loss(self, run: AutomaticRun):
        """The per-example loss the pool is scored with: the run's objective, else its likelihood's NLL."""
        return run.objective or run.likelihood

    def score_pool(self, run: AutomaticRun, model: nn.Module, loss=None) -> float:
        """The pool's mean loss under ``model`` (``loss``: default :meth:`_loss`), batched by the settings."""
        return pool_loss(model, run.val_set, loss or self._loss(run), self.settings.batch_size, run.collate_fn)
