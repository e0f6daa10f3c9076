"""Row shards of a model's parameters under FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 turns every parameter into a DTensor sharded along dim 0: rank r of W holds rows ``[r c, (r + 1) c)`` of a
tensor with n rows, ``c = ceil(n / W)`` (``torch.chunk``; the last ranks may hold fewer rows, or none). A row block
of a tensor is one contiguous slice of its flattened values, so a per-rank flat buffer in ``names`` order holds
exactly this rank's coordinates of every parameter -- all a prior or SWAG needs to work shard-locally.

A :class:`ShardLayout` records, for each parameter name, the global shape and the rows held here, plus the process
group to sum partial results over (:meth:`ShardLayout.reduce_sum`). Built from a model
(:meth:`ShardLayout.from_params`) it reads the DTensors' placements; :meth:`ShardLayout.even` builds the layout any
number of ranks *would* have (resharding a prior file on load, tests). An unsharded model gives a layout holding
every row and no group: everything built on it behaves exactly as unsharded code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist
from torch import nn

from ptyl.errors import ConfigError, ParameterMismatchError
from ptyl.params import named_parameters

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

__all__ = ["RowShard", "ShardLayout", "chunk_rows", "is_dtensor", "is_fsdp_module", "local_tensor", "module_class_name"]


def is_dtensor(tensor: object) -> bool:
    """True when ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's parameters and gradients)."""
    if not dist.is_available():
        return False
    # only sharded (FSDP2) models need torch.distributed.tensor
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_fsdp_module(module: object) -> TypeGuard[FSDPModule]:
    """True when ``module`` was wrapped by FSDP2's ``fully_shard`` (a ``torch.distributed.fsdp.FSDPModule``)."""
    if not dist.is_available():
        return False
    # only sharded (FSDP2) models need torch.distributed.fsdp
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``.

    Args:
        tensor: a DTensor, or a plain tensor.

    Returns:
        ``tensor.to_local()`` (a differentiable view sharing its storage) for a DTensor, else ``tensor`` itself.
    """
    return tensor.to_local() if is_dtensor(tensor) else tensor


def module_class_name(model: nn.Module) -> str:
    """The class name of ``model``, also after ``fully_shard`` (which swaps in a subclass named ``FSDP<name>``)."""
    cls = type(model)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) > 1:
        return cls.__bases__[-1].__name__
    return cls.__name__


def chunk_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows one rank holds under ``torch.chunk`` semantics (FSDP2's ``Shard(0)``): chunks of
    ``ceil(rows / world_size)``, the last ranks get fewer or none.

    Args:
        rows: the tensor's size along dim 0.
        world_size: ranks sharing it.
        rank: this rank.

    Returns:
        ``(start, stop)``.
    """
    size = math.ceil(rows / world_size) if rows else 0
    return min(rank * size, rows), min((rank + 1) * size, rows)


@dataclass(frozen=True)
class RowShard:
    """The rows of one tensor held by this rank.

    Attributes:
        shape: the tensor's global shape.
        start, stop: rows ``[start, stop)`` of dim 0 held here (a 0-dim tensor counts as one row).
    """

    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.shape[1:]) if self.shape else (() if self.stop else (0,))

    @property
    def local_numel(self) -> int:
        return (self.stop - self.start) * self.row_numel

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.rows

    def take(self, full: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """These rows of a full tensor.

        Args:
            full: a tensor whose dim ``dim`` is the parameter's dim 0.
            dim: 0, or 1 for deviation columns ``(K, *shape)``.

        Returns:
            A view.
        """
        if not self.shape:
            return full if self.stop else full.reshape(*full.shape[:dim], 0)
        return full.narrow(dim, self.start, self.stop - self.start)


class ShardLayout:
    """Which rows of each named parameter this rank holds, and the process group the shards are summed over.

    Args:
        shards: name -> :class:`RowShard`, in the order flat buffers use.
        group: the process group over which the shards partition the parameters (``None``: not sharded, every row
            is here, :meth:`reduce_sum` is the identity).
        rank, world_size: this rank's index in ``group`` and its size.
    """

    def __init__(self, shards: Mapping[str, RowShard], group=None, rank: int = 0, world_size: int = 1):
        self.shards = dict(shards)
        self.group, self.rank, self.world_size = group, int(rank), int(world_size)

    def __deepcopy__(self, memo) -> ShardLayout:  # a process group is a handle: shared, never copied
        return ShardLayout(self.shards, self.group, self.rank, self.world_size)

    def __repr__(self) -> str:
        return (f"ShardLayout(tensors={len(self.shards)}, rank={self.rank}, world_size={self.world_size}, "
                f"local={self.local_numel:,} of {self.num_parameters:,})")

    # --- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: nn.Module | Mapping[str, torch.Tensor]) -> ShardLayout:
        """The layout of a model's parameters.

        Args:
            params: a model or a name -> tensor mapping: DTensors sharded along dim 0 over one mesh dimension
                (FSDP2, also HSDP's ``(Replicate, Shard(0))``), or plain tensors (unsharded, every row here).

        Returns:
            The :class:`ShardLayout` (group: the mesh dimension's process group).

        Raises:
            ConfigError: a parameter sharded otherwise (another dim, several mesh dimensions), or plain and sharded
                parameters mixed (wrap the whole model with ``fully_shard``), naming the parameter.
        """
        named = named_parameters(params)
        sharded = {n: t for n, t in named.items() if is_dtensor(t)}
        if not sharded:
            return cls({n: RowShard(tuple(t.shape), 0, t.shape[0] if t.dim() else 1) for n, t in named.items()})
        plain = [n for n in named if n not in sharded]
        if plain:
            raise ConfigError(f"parameters {plain[:4]} are not sharded while others are DTensors: wrap the whole "
                              "model with fully_shard (its root too)")
        group = key = None
        shards = {}
        for name, t in sharded.items():
            mesh_dim, this_key = _shard_dim(name, t)
            if key is not None and this_key != key:
                raise ConfigError(f"parameter {name!r} is sharded over another device mesh than the others")
            key = this_key
            if mesh_dim is None:  # replicated everywhere: every row here, nothing to sum
                shards[name] = RowShard(tuple(t.shape), 0, t.shape[0] if t.dim() else 1)
                continue
            mesh = t.device_mesh
            group, rank, world = mesh.get_group(mesh_dim), mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)
            start, stop = chunk_rows(t.shape[0], world, rank)
            shard = RowShard(tuple(t.shape), start, stop)
            if tuple(t.to_local().shape) != shard.local_shape:
                raise ConfigError(f"parameter {name!r}: local shard {tuple(t.to_local().shape)} is not the "
                                  f"torch.chunk row block {shard.local_shape} of {tuple(t.shape)} (uneven sharding "
                                  "is not supported)")
            shards[name] = shard
        if group is None:
            return cls(shards)
        return cls(shards, group, dist.get_rank(group), dist.get_world_size(group))

    @classmethod
    def even(cls, shapes: Mapping[str, Sequence[int]], rank: int, world_size: int, group=None) -> ShardLayout:
        """The layout FSDP2 would give ``world_size`` ranks (``torch.chunk`` along dim 0), as seen by ``rank``.

        Args:
            shapes: name -> global shape.
            rank, world_size: the rank and the number of ranks.
            group: their process group (None: a layout to read or slice with, no collectives).

        Returns:
            The :class:`ShardLayout`.
        """
        shards = {}
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            start, stop = chunk_rows(shape[0] if shape else 1, world_size, rank)
            shards[name] = RowShard(shape, start, stop)
        return cls(shards, group, rank, world_size)

    def restrict(self, names: Sequence[str]) -> ShardLayout:
        """The layout of a subset of the parameters (same group).

        Args:
            names: the parameters to keep, in the order wanted.

        Returns:
            A new :class:`ShardLayout`.
        """
        missing = [n for n in names if n not in self.shards]
        if missing:
            raise ParameterMismatchError(f"not in the shard layout: {missing[:5]}")
        return ShardLayout({n: self.shards[n] for n in names}, self.group, self.rank, self.world_size)

    # --- what is here --------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.shards)

    @property
    def sharded(self) -> bool:
        """True when the parameters are split over more than one rank (collectives are needed)."""
        return self.group is not None and self.world_size > 1

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Global shapes."""
        return {n: s.shape for n, s in self.shards.items()}

    @property
    def local_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s.local_shape for n, s in self.shards.items()}

    @property
    def num_parameters(self) -> int:
        """Global number of values."""
        return sum(math.prod(s.shape) for s in self.shards.values())

    @property
    def local_numel(self) -> int:
        return sum(s.local_numel for s in self.shards.values())

    def same_rows(self, other: ShardLayout) -> bool:
        """True when ``other`` holds the same rows of the same tensors (the group is not compared)."""
        return self.shards == other.shards

    # --- data ------------------------------------------------------------------------------------------------------
    def take(self, full: Mapping[str, torch.Tensor], dim: int = 0) -> dict[str, torch.Tensor]:
        """This rank's rows of full tensors.

        Args:
            full: name -> full tensor, for every name of the layout.
            dim: the dim that is the parameter's dim 0 (1 for deviation columns ``(K, *shape)``).

        Returns:
            name -> view of the rows.
        """
        return {n: self.shards[n].take(full[n], dim) for n in self.shards}

    def _comm_device(self, device: torch.device) -> torch.device:
        if dist.get_backend(self.group) == "nccl" and device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks of the group; every rank must call it, in the same order.

        Returns:
            A new tensor on ``tensor``'s device (``tensor`` itself when not sharded).
        """
        if not self.sharded:
            return tensor
        buffer = tensor.to(self._comm_device(tensor.device), copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer.to(tensor.device)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (a collective).

        Returns:
            The list of every rank's bytes in rank order (``[data]`` when not sharded).
        """
        if not self.sharded:
            return [data]
        device = self._comm_device(torch.device("cpu"))
        local = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else \
            torch.zeros(0, dtype=torch.uint8, device=device)
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.long, device=device), group=self.group)
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:local.numel()] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return [bytes(part[:int(size.item())].cpu().numpy()) for part, size in zip(parts, sizes, strict=False)]

    def gather_rows(self, local: torch.Tensor, name: str, dim: int = 0) -> torch.Tensor:
        """The full tensor from every rank's rows (a collective, for tests and small models only).

        Args:
            local: this rank's rows of ``name``.
            name: the parameter.
            dim: the dim holding the rows (1 for deviation columns).

        Returns:
            The full tensor on every rank.
        """
        if not self.sharded:
            return local
        shard = self.shards[name]
        size = math.ceil(shard.rows / self.world_size) if shard.rows else 0
        pad = list(local.shape)
        pad[dim] = size
        padded = local.new_zeros(pad, device=self._comm_device(local.device))
        padded.narrow(dim, 0, local.shape[dim]).copy_(local)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        parts = [part.to(local.device) for part in parts]
        pieces = []
        for r, part in enumerate(parts):
            start, stop = chunk_rows(shard.rows, self.world_size, r)
            pieces.append(part.narrow(dim, 0, stop - start))
        full = torch.cat(pieces, dim=dim)
        return full if shard.shape else full.reshape(*full.shape[:dim], *full.shape[dim + 1:])


def _shard_dim(name: str, t) -> tuple[int | None, tuple]:
    """The mesh dimension a DTensor parameter is row-sharded over (None: replicated), and a key of its mesh."""
    # only sharded (FSDP2) models need torch.distributed.tensor
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = []
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ConfigError(f"parameter {name!r} has placement {placement}: only Shard(0) (FSDP2's default) and "
                              "Replicate are supported")
    if len(shard_dims) > 1:
        raise ConfigError(f"parameter {name!r} is sharded over several mesh dimensions {shard_dims}")
    mesh = t.device_mesh
    return (shard_dims[0] if shard_dims else None), (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape))
