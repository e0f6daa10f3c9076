"""How many bytes SWAG collection and a learned prior take, checked against free memory before allocating.

For P selected parameters, K SWAG deviation columns and a prior of rank k (Shwartz-Ziv et al. 2022, arXiv
2205.10279; SWAG: Maddox et al. 2019, arXiv 1902.02476):

    SWAG collector   mean + M2 in float64           16 P
                     deviations, storage dtype      K P s
    posterior        mean + variance + deviations   (2 + K) P s'      (export, e.g. a prior file; float32 by default)
    low-rank prior   mean + diag + factor           (2 + k) P s''     (+ the k x k capacitance Cholesky and the
                                                                       log-normaliser, float64: 8 (k^2 + 1))
    diagonal prior   mean + variance                2 P s''           (k = 0; + the 8-byte log-normaliser)

with s, s', s'' the item sizes of the storage dtypes (4 for float32, 2 for bfloat16/float16). These are exactly the
tensors :class:`ptyl.posterior.SWAGCollector`, :class:`ptyl.posterior.SourcePosterior` and
:class:`ptyl.priors.LowRankGaussianPrior` allocate; temporaries (one parameter tensor at a time) are not counted.

Sharded over W ranks (FSDP2, ``world_size=W``) every P above becomes the rows one rank holds: rank 0's share, the
largest, ``sum over tensors of ceil(rows / W) * row size`` (``torch.chunk``, what ``fully_shard`` does), about P / W;
only the k x k capacitance is replicated.

>>> import torch
>>> from ptyl.models import build_model
>>> model = build_model("smallcnn", width=4)
>>> print(estimate_report(model, rank=20, storage_dtype=torch.bfloat16))   # doctest: +ELLIPSIS
parameters covered: 1,030
...
SWAG collection total                            57,680   56.33 KiB
...
>>> check_fits(estimate_memory(model, 20)["swag_total"], device="cuda")   # raises before allocating  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ptyl.errors import InvalidValueError
from ptyl.params import Selector, select_parameters

__all__ = ["available_memory", "check_fits", "estimate_memory", "estimate_report", "format_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(num_bytes: float) -> str:
    """``1536 -> '1.50 KiB'`` (binary units)."""
    value = float(num_bytes)
    if not math.isfinite(value):
        return str(value)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{sign}{int(value)} B" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise InvalidValueError(f"expected a torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def _count(model_or_num_params: nn.Module | Mapping[str, torch.Tensor] | int, include: Selector, exclude: Selector,
           head: str | Sequence[str] | None, world_size: int = 1) -> tuple[int, int]:
    """(P, the values rank 0 holds -- the largest share -- when sharded over ``world_size`` ranks)."""
    if isinstance(model_or_num_params, bool):
        raise InvalidValueError("the number of parameters must be an int, not a bool")
    if isinstance(model_or_num_params, int):
        if model_or_num_params < 1:
            raise InvalidValueError(f"the number of parameters must be >= 1, got {model_or_num_params}")
        if include is not None or exclude is not None or head is not None:
            raise InvalidValueError("include/exclude/head select parameters by name: pass a model, not a count")
        return model_or_num_params, math.ceil(model_or_num_params / world_size)
    params = select_parameters(model_or_num_params, include=include, exclude=exclude, head=head)
    share = 0
    for t in params.values():
        rows = t.shape[0] if t.dim() else 1
        share += math.ceil(rows / world_size) * (t.numel() // rows if rows else 0)
    return sum(t.numel() for t in params.values()), share


def estimate_memory(
    model_or_num_params: nn.Module | Mapping[str, torch.Tensor] | int,
    rank: int,
    include: Selector = None,
    *,
    exclude: Selector = None,
    head: str | Sequence[str] | None = None,
    storage_dtype: torch.dtype = torch.float32,
    prior_rank: int | None = None,
    prior_dtype: torch.dtype | None = None,
    posterior_dtype: torch.dtype = torch.float32,
    world_size: int = 1,
) -> dict[str, int]:
    """Bytes of every tensor SWAG collection, the exported posterior and the prior hold (see the module docstring),
    on one rank of ``world_size`` sharding the parameters (FSDP2).

    Args:
        model_or_num_params: a model (its trainable parameters are selected with ``include`` / ``exclude`` /
            ``head`` exactly as :class:`~ptyl.posterior.SWAGCollector` does), a name -> tensor mapping, or P itself.
        rank: K, SWAG deviation columns.
        storage_dtype: dtype of the deviation columns (``SWAGCollector(deviation_dtype=...)``) and, unless
            ``prior_dtype`` is given, of the prior's tensors (``ptyl.priors.learned_prior(..., dtype=...)``).
        prior_rank: k <= K columns used by the prior (default K; 0 gives a diagonal prior).
        world_size: W ranks sharding the parameters by rows (``fully_shard``); byte counts are then per rank (rank
            0's, the largest share).

    Returns:
        ``num_parameters`` (P, all ranks), ``parameters_per_rank``, ``world_size``, ``rank``, ``prior_rank`` and
        byte counts per rank ``swag_mean``, ``swag_m2``, ``swag_deviations``, ``swag_total``, ``posterior_total``,
        ``prior_mean``, ``prior_diag``, ``prior_factor``, ``prior_extra``, ``prior_total``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for value, what in ((rank, "rank"), (prior_rank, "prior_rank")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidValueError(f"{what} must be a non-negative int, got {value!r}")
    k = rank if prior_rank is None else prior_rank
    if k > rank:
        raise InvalidValueError(f"prior_rank k={k} exceeds the K={rank} SWAG deviation columns")
    total, p = _count(model_or_num_params, include, exclude, head, world_size)
    s_dev = _itemsize(storage_dtype)
    s_prior = _itemsize(prior_dtype if prior_dtype is not None else storage_dtype)
    s_post = _itemsize(posterior_dtype)
    out = {
        "num_parameters": total,
        "parameters_per_rank": p,
        "world_size": world_size,
        "rank": rank,
        "prior_rank": k,
        "swag_mean": 8 * p,
        "swag_m2": 8 * p,
        "swag_deviations": rank * p * s_dev,
        "posterior_total": (2 + rank) * p * s_post,
        "prior_mean": p * s_prior,
        "prior_diag": p * s_prior,
        "prior_factor": k * p * s_prior,
        # float64 log-normaliser, plus (low-rank) the float64 k x k Cholesky of the capacitance
        "prior_extra": 8 * (k * k + 1),
    }
    out["swag_total"] = out["swag_mean"] + out["swag_m2"] + out["swag_deviations"]
    out["prior_total"] = out["prior_mean"] + out["prior_diag"] + out["prior_factor"] + out["prior_extra"]
    return out


def _cgroup_free() -> int | None:
    """Free bytes under a cgroup-v2 memory limit (containers), if one is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((root / "memory.current").read_text().strip()), 0)
    except (OSError, ValueError):
        return None


def _host_available() -> int | None:
    try:
        import psutil  # optional

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:  # Linux: MemAvailable counts reclaimable page cache, unlike the free-page count below
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def available_memory(device: torch.device | str | None = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``; ``None`` when it cannot be told (e.g. MPS).

    CPU: psutil's ``available`` if installed, else ``MemAvailable`` from /proc/meminfo, else free pages from
    ``os.sysconf``; capped by a container's cgroup limit. CUDA: free bytes from ``torch.cuda.mem_get_info``.
    """
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu":
        values = [v for v in (_host_available(), _cgroup_free()) if v is not None]
        return min(values) if values else None
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return None


def check_fits(
    bytes_needed: int | float,
    device: torch.device | str | None = "cpu",
    *,
    what: str = "this step",
    headroom: float = 0.9,
) -> int | None:
    """Raise :class:`InvalidValueError` if ``bytes_needed`` exceeds ``headroom`` x the memory free on ``device``.

    Call it before allocating (e.g. with :func:`estimate_memory`'s ``swag_total``) so a run fails with a readable
    message instead of an out-of-memory kill halfway through. Returns the free bytes (``None``: unknown, not checked).
    """
    if not (isinstance(bytes_needed, (int, float)) and math.isfinite(bytes_needed) and bytes_needed >= 0):
        raise InvalidValueError(f"bytes_needed must be a finite non-negative number, got {bytes_needed!r}")
    if not 0 < headroom <= 1:
        raise InvalidValueError(f"headroom must be in (0, 1], got {headroom!r}")
    free = available_memory(device)
    if free is not None and bytes_needed > headroom * free:
        raise InvalidValueError(
            f"{what} needs {format_bytes(bytes_needed)} but only {format_bytes(free)} are free on {device} "
            f"(using at most {headroom:.0%} of it). Lower the SWAG rank, store deviations and the prior in "
            "bfloat16, or restrict the prior to fewer parameters (include=..., e.g. LoRA or the top layers)."
        )
    return free


def estimate_report(
    model: nn.Module | Mapping[str, torch.Tensor] | int,
    rank: int,
    storage_dtype: torch.dtype = torch.float32,
    *,
    include: Selector = None,
    exclude: Selector = None,
    head: str | Sequence[str] | None = None,
    prior_rank: int | None = None,
    posterior_dtype: torch.dtype = torch.float32,
    world_size: int = 1,
) -> str:
    """A readable table of :func:`estimate_memory` (what ``ptyl inspect --estimate`` prints); ``posterior_dtype`` is
    the prior file's storage dtype (``save_posterior(dtype=...)``); with ``world_size`` > 1, per rank."""
    est = estimate_memory(model, rank, include, exclude=exclude, head=head, storage_dtype=storage_dtype,
                          prior_rank=prior_rank, posterior_dtype=posterior_dtype, world_size=world_size)
    dtype_name = str(storage_dtype).replace("torch.", "")
    file_dtype = str(posterior_dtype).replace("torch.", "")
    k = est["prior_rank"]
    rows = [
        ("SWAG mean (float64)", est["swag_mean"]),
        ("SWAG M2 (float64)", est["swag_m2"]),
        (f"SWAG deviations (K={rank}, {dtype_name})", est["swag_deviations"]),
        ("SWAG collection total", est["swag_total"]),
        (f"posterior / prior file ({file_dtype}, K={rank})", est["posterior_total"]),
        (f"prior mean ({dtype_name})", est["prior_mean"]),
        (f"prior diagonal ({dtype_name})", est["prior_diag"]),
        (f"prior factor (k={k}, {dtype_name})", est["prior_factor"]),
        ("prior capacitance (float64)", est["prior_extra"]),
        ("prior total", est["prior_total"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"parameters covered: {est['num_parameters']:,}"]
    if world_size > 1:
        lines.append(f"sharded over {world_size} ranks (FSDP2): {est['parameters_per_rank']:,} on the largest rank; "
                     "sizes below are per rank")
    lines.append(f"{'':{width}}  {'bytes':>15}  {'size':>10}")
    for label, value in rows:
        lines.append(f"{label:{width}}  {value:>15,}  {format_bytes(value):>10}")
    free = available_memory("cpu")
    if free is not None:
        lines.append(f"free CPU memory now: {format_bytes(free)}")
    return "\n".join(lines)
