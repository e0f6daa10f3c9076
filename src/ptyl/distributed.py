"""Multi-process data-parallel training with ``torchrun`` and PyTorch's DistributedDataParallel (DDP).

Launch any script that calls :func:`init_from_env` with::

    torchrun --nproc_per_node=N script.py ...

Every helper here is a no-op (or the identity) in an ordinary single-process run, so the same script runs both ways.
:func:`ptyl.training.fit` (and with it :func:`ptyl.pipeline.learn_prior`) uses them by itself once a process
group exists (through :class:`ptyl.training.environment.DistributedEnvironment`): it wraps the model in DDP, shards a
Dataset with a :class:`DistributedSampler`, averages the logged loss over ranks, collects SWAG on rank 0 only and
writes checkpoints from rank 0 only.

Why the prior is counted exactly once (Shwartz-Ziv et al. 2022, arXiv 2205.10279, eq. 2). Rank r, holding a shard
B_r of the global batch B (|B_r| = b, W ranks, |B| = W b), minimises

    U_r(theta) = (1/b) sum_{i in B_r} loss_i(theta) - log p(theta) / N

and DDP replaces every gradient by its mean over ranks (https://pytorch.org/docs/stable/notes/ddp.html):

    g = (1/W) sum_r grad U_r = grad [ (1/(W b)) sum_{i in B} loss_i ] - (W/W) grad log p(theta) / N

which is the single-process gradient of U on the global batch: the penalty is added W times and divided by W.
N must be the GLOBAL number of training examples; ``fit`` uses ``len(loader.dataset)``, the full dataset behind the
sampler, not the shard size ``N / W``. ``tests/test_distributed.py`` checks both facts.

Other notes: BatchNorm statistics are per rank unless you pass ``wrap_model(model, sync_batchnorm=True)`` to ``fit``;
SimCLR's negatives come from the rank's own shard; :class:`DistributedSampler` pads the data to a multiple of W by
repeating a few examples (``drop_last=True`` drops them instead); ``fit(..., checkpoint=...)`` needs the same path
on a file system every rank sees.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ptyl.errors import ConfigError

__all__ = [
    "init_from_env", "is_distributed", "is_main_process", "rank", "local_rank", "world_size", "wrap_model",
    "unwrap_model", "distributed_loader", "set_epoch", "all_reduce_mean", "all_reduce_sum", "all_reduce_min",
    "gather_tensor",
    "broadcast_state", "barrier", "run_on_main", "cleanup", "per_rank_batch_size",
]

T = TypeVar("T")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float = 600.0,
) -> torch.device:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT).

    Returns the device this process should train on: ``cuda:LOCAL_RANK`` when CUDA is available (and ``device``
    does not say otherwise), else the CPU. The backend follows the device: ``nccl`` for CUDA, ``gloo`` for the CPU.
    Without torchrun's variables nothing is initialised and the device is returned as for one process.
    """
    device = torch.device(device) if device is not None else None
    launched = all(v in os.environ for v in _TORCHRUN_VARS)
    local = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    use_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if device is None or (device.type == "cuda" and device.index is None):
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # "cuda" without an index and NCCL's own buffers then mean this rank's GPU
    if not launched or _initialized():
        return device
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("backend 'nccl' needs CUDA devices; use 'gloo' on the CPU")
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=timeout_s))
    return device


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return _initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if _initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (always true in a single process): the one that logs, collects SWAG and writes files."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU otherwise."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- model and data ------------------------------------------------------------------------------------------------
def wrap_model(
    model: nn.Module,
    *,
    sync_batchnorm: bool = False,
    find_unused_parameters: bool = False,
    **ddp_kwargs: Any,
) -> nn.Module:
    """``DistributedDataParallel(model)`` on the model's device; the model itself when not distributed or already
    wrapped. Building DDP broadcasts rank 0's parameters and buffers, so every rank starts from the same weights.

    Args:
        sync_batchnorm: convert BatchNorm layers to :class:`torch.nn.SyncBatchNorm` (statistics over the global
            batch, so results match one process; costs one all-reduce per BatchNorm layer).
        find_unused_parameters: needed only when some trainable parameters get no gradient in a step.
    """
    if isinstance(model, DistributedDataParallel) or not is_distributed():
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = next(model.parameters()).device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (its ``state_dict`` keys carry no ``module.`` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def distributed_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int = 0,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader over this rank's shard: ``batch_size`` is PER PROCESS (global batch = W * batch_size).

    The permutation depends on ``seed + epoch`` only: call :func:`set_epoch` (``fit`` does) before each epoch so the
    shards change between epochs. Rank r reads positions r, r + W, r + 2W, ... of the permutation, so batch t of all
    ranks together is positions [t W b, (t+1) W b) -- the same examples as batch t of
    ``distributed_loader(dataset, W * batch_size, seed)`` in one process.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                                                     seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **loader_kwargs)


def set_epoch(loader: Any, epoch: int) -> None:
    """Reseed a DistributedSampler's shuffle for ``epoch`` (without it every epoch repeats the same order)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


# --- collectives (identity in one process) -------------------------------------------------------------------------
def _reduce(value: T, mean: bool, op: str = "SUM") -> T:
    if not _initialized():
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to(_comm_device(), copy=True)
    else:
        tensor = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    if mean:
        tensor = tensor / dist.get_world_size()
    return tensor.to(value.device) if isinstance(value, torch.Tensor) else float(tensor)  # type: ignore[return-value]


def all_reduce_mean(value: T) -> T:
    """Mean over ranks of a float or tensor (a new object; the input is left alone). Identity in one process."""
    return _reduce(value, mean=True)


def all_reduce_sum(value: T) -> T:
    """Sum over ranks (e.g. correct-prediction counts). Identity in one process."""
    return _reduce(value, mean=False)


def all_reduce_min(value: T) -> T:
    """Minimum over ranks (e.g. the first step at which any rank saw a non-finite loss). Identity in one process."""
    return _reduce(value, mean=False, op="MIN")


def gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (rank 0's rows first); the sizes along dim 0 may differ.
    Every rank gets the result. Identity in one process."""
    if not _initialized():
        return tensor
    device = _comm_device()
    local = tensor.detach().to(device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)  # all_gather needs equal shapes: pad, then trim
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=False)]).to(tensor.device)


def broadcast_state(state: T, src: int = 0) -> T:
    """Copy a nested state (dicts / lists of tensors, ints, floats, bools; strings must already agree) from rank
    ``src`` to every rank. The structure and tensor shapes must match on all ranks, e.g. ``collector.state_dict()``.
    Tensor-only transport: no pickling. Identity in one process."""
    if not _initialized():
        return state
    device = _comm_device()

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            buffer = value.detach().to(device, copy=True).contiguous()
            dist.broadcast(buffer, src=src)
            return buffer.to(value.device)
        if isinstance(value, Mapping):
            return {k: visit(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(visit(v) for v in value)
        if isinstance(value, bool | int | float):
            buffer = torch.tensor(float(value), dtype=torch.float64, device=device)
            dist.broadcast(buffer, src=src)
            return type(value)(buffer.item()) if not isinstance(value, bool) else bool(buffer.item())
        if value is None or isinstance(value, str):
            return value
        raise ConfigError(f"broadcast_state cannot send a {type(value).__name__}")

    return visit(state)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if not _initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call ``fn`` on rank 0 only (file writes), then wait at a barrier; other ranks get ``None``."""
    result = fn(*args, **kwargs) if is_main_process() else None
    barrier()
    return result


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if _initialized():
        dist.destroy_process_group()


def per_rank_batch_size(global_batch: int, num_data: int) -> int:
    """Per-process batch for a GLOBAL batch of ``global_batch`` (capped at the data size): ceil(B / W)."""
    return max(1, math.ceil(min(global_batch, num_data) / world_size()))
