"""Where the loop runs: one process (:class:`Environment`, every method the identity) or several under ``torchrun``
(:class:`DistributedEnvironment`, DistributedDataParallel; :class:`FSDPEnvironment` for a model the caller sharded
with FSDP2's ``fully_shard``). The trainer calls these few methods and nothing else, so data parallelism wraps the
loop instead of being threaded through it.

Under FSDP2 each rank holds row shards of the parameters and their gradients; the reduce-scatter in backward
averages the data gradients over ranks, so the prior (a :class:`~ptyl.priors.sharded.ShardedPrior`, built on the
sharded model) adds its gradient once per rank, on that rank's rows, after backward -- the same update as DDP's.

Why the prior is counted once under DDP, and what ``batch_size`` means there, is explained in
:mod:`ptyl.distributed`: each rank adds ``penalty / N`` with the GLOBAL N and DDP averages the gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl import distributed as ddp
from ptyl.errors import DataError
from ptyl.sharding import is_dtensor

__all__ = ["DistributedEnvironment", "Environment", "FSDPEnvironment", "current_environment"]


class Environment:
    """A single process."""

    is_main_process = True
    supports_checkpoints = True

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module forward and backward passes go through."""
        return model

    def loader(self, data: Dataset | DataLoader, batch_size: int, seed: int,
               collate_fn: Callable | None = None) -> tuple[DataLoader, torch.Generator]:
        """A shuffling loader over ``data`` (a DataLoader is used as given) and the generator that shuffles it."""
        if isinstance(data, DataLoader):
            return data, (data.generator if data.generator is not None else torch.Generator().manual_seed(seed))
        if len(data) == 0:
            raise DataError("the training set is empty")
        generator = torch.Generator().manual_seed(seed)
        return self._dataset_loader(data, batch_size, seed, generator, collate_fn), generator

    def _dataset_loader(self, data: Dataset, batch_size: int, seed: int, generator: torch.Generator,
                        collate_fn: Callable | None) -> DataLoader:
        extra = {"collate_fn": collate_fn} if collate_fn is not None else {}
        return DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True, generator=generator, **extra)

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        """Reshuffle a loader with a DistributedSampler for ``epoch`` (one given by the caller, too)."""
        ddp.set_epoch(loader, epoch)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over processes."""
        return value

    def min(self, value: int) -> int:
        """Minimum over processes."""
        return value

    def broadcast(self, state: Any) -> Any:
        """Rank 0's ``state`` on every process."""
        return state

    def barrier(self) -> None:
        """Wait for every process."""


class DistributedEnvironment(Environment):
    """Several processes in an initialised process group (see :mod:`ptyl.distributed`)."""

    @property
    def is_main_process(self) -> bool:  # type: ignore[override]
        return ddp.is_main_process()

    def wrap(self, model: nn.Module) -> nn.Module:
        return ddp.wrap_model(model)

    def _dataset_loader(self, data, batch_size, seed, generator, collate_fn) -> DataLoader:
        per_rank = ddp.per_rank_batch_size(batch_size, len(data))  # the ranks together read one global batch
        if per_rank * ddp.world_size() != min(batch_size, len(data)):
            warnings.warn(f"global batch {min(batch_size, len(data))} is not divisible by {ddp.world_size()} ranks; "
                          f"using {per_rank} per rank", stacklevel=4)
        extra = {"collate_fn": collate_fn} if collate_fn is not None else {}
        return ddp.distributed_loader(data, per_rank, seed, **extra)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return ddp.all_reduce_mean(value)  # the mean of equal shards' means is the global mean

    def min(self, value: int) -> int:
        return int(ddp.all_reduce_min(value))

    def broadcast(self, state: Any) -> Any:
        return ddp.broadcast_state(state)

    def barrier(self) -> None:
        ddp.barrier()


class FSDPEnvironment(DistributedEnvironment):
    """Several processes training a model sharded with ``fully_shard`` (by the caller, before the prior is built on
    it): the model is trained as given, each rank loads its part of every global batch, SWAG collectors of the
    sharded model keep each rank's rows. Checkpoints of sharded runs are not supported yet."""

    supports_checkpoints = False

    def wrap(self, model: nn.Module) -> nn.Module:
        return model


def current_environment(model: nn.Module | None = None) -> Environment:
    """Inside a process group of more than one rank: :class:`FSDPEnvironment` for a sharded ``model`` (DTensor
    parameters), else :class:`DistributedEnvironment`; otherwise :class:`Environment`."""
    if not ddp.is_distributed():
        return Environment()
    if model is not None and any(is_dtensor(p) for p in model.parameters()):
        return FSDPEnvironment()
    return DistributedEnvironment()
