"""SWAG: a Gaussian fitted to the SGD trajectory (Maddox, Izmailov, Garipov, Vetrov, Wilson, NeurIPS 2019,
arXiv 1902.02476).

After each collected snapshot theta_n (Welford's update, in float64 so sigma^2 survives cancellation):

    mu_n    = mu_{n-1} + (theta_n - mu_{n-1}) / n
    M2_n    = M2_{n-1} + (theta_n - mu_{n-1}) * (theta_n - mu_n)         sigma^2 = M2_n / n
    D[:, n] = theta_n - mu_n          (only the last K columns are kept)

and the SWAG covariance is Sigma = 1/2 (diag sigma^2 + D D^T / (K - 1)). Memory is (K + 2) P numbers: mean and M2 in
float64, deviations in float32 (or ``deviation_dtype``, e.g. bf16).

All of it lives in flat buffers on the parameters' device (``names`` order): mean [P], M2 [P] and a preallocated ring
of deviation rows [K, P]. One :meth:`SWAGCollector.collect` is six kernels whatever the number of parameter tensors
(one ``cat``, the Welford update in float64, one row copy), with no host synchronisation. (On the CPU the same six
run per group of >= 2M numbers, see :data:`ptyl.flat.GROUP_NUMEL`.)

Sharded models (FSDP2's ``fully_shard``: DTensor parameters split by rows over ranks): every rank keeps the moments
and deviation columns of its own rows only -- the same kernels on the local shard, no communication, no gather --
and :meth:`SWAGCollector.posterior` returns a :class:`~ptyl.posterior.ShardedPosterior` (write it with
:func:`ptyl.io.save_posterior`, every rank its own file). ``shapes`` are then this rank's row blocks.

BatchNorm: running statistics are buffers, not parameters, so they are *not* part of the posterior or the prior. Any
model built from the posterior (its mean or a sample) must recompute them on training data
(:func:`ptyl.batches.recompute_batchnorm`), which :meth:`SWAGCollector.sample_into` does when given a loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ptyl.batches import recompute_batchnorm
from ptyl.errors import InvalidValueError, ParameterMismatchError
from ptyl.flat import ParamBinder, flatten, groups_for, plan_groups, unflatten
from ptyl.params import Selector, select_parameters
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.sharded import ShardedPosterior
from ptyl.sharding import ShardLayout, is_dtensor, local_tensor

STATE_FORMAT = 2  # flat buffers; format 1 (one tensor per name) still loads


class SWAGCollector:
    """Collects SWAG moments of a model's parameters, selected by name.

    Example::

        swag = SWAGCollector(model, rank=20, head="head")
        for epoch in range(epochs):
            train_one_epoch(model, lr=high_constant_lr)
            swag.collect(model)
        posterior = swag.posterior(metadata={"source": "kmnist"})

    Args:
        model: the model whose parameters are tracked (names, shapes and device are read here).
        rank: K, the number of deviation columns kept (0 gives a diagonal-only posterior).
        include / exclude / head: parameter selection, see :func:`ptyl.params.select_parameters`.
        var_clamp: floor applied to sigma^2 when the posterior is exported (SWAG's ``var_clamp``).
        deviation_dtype: storage dtype of the deviation columns (float32, or bfloat16 / float16 to halve them).
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int = 20,
        include: Selector = None,
        exclude: Selector = None,
        head: str | Sequence[str] | None = None,
        var_clamp: float = 1e-30,
        deviation_dtype: torch.dtype = torch.float32,
    ):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise InvalidValueError(f"rank must be a non-negative integer, got {rank!r}")
        params = select_parameters(model, include=include, exclude=exclude, head=head)
        self.rank = rank
        self.var_clamp = var_clamp
        self.names = list(params)
        # sharded (DTensor parameters): this rank's row blocks; the binder still checks the model's global shapes
        self._dtensors = any(is_dtensor(p) for p in params.values())
        self.layout = ShardLayout.from_params(params)
        self.shapes = dict(self.layout.local_shapes)
        self.num_snapshots = 0
        self._binder = ParamBinder(self.names, [tuple(p.shape) for p in params.values()], what="SWAG collector")
        self._cpu_groups = plan_groups(list(self.shapes.values()))
        device = local_tensor(next(iter(params.values()))).device
        size = self.num_parameters
        self._mean = torch.zeros(size, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(size, dtype=torch.float64, device=device)
        self._dev = torch.zeros((rank, size), dtype=deviation_dtype, device=device)

    @property
    def num_parameters(self) -> int:
        """Values tracked here (this rank's rows when sharded)."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def sharded(self) -> bool:
        """The parameters are split over several ranks; each collects its own rows."""
        return self.layout.sharded

    def _tensors(self, model: nn.Module | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        tensors = self._binder.tensors(model)
        return [local_tensor(t) for t in tensors] if self._dtensors else tensors

    @torch.no_grad()
    def collect(self, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Add the model's current parameters as one snapshot (sharded: this rank's rows; no communication)."""
        tensors = self._tensors(model)
        self.num_snapshots += 1
        n = self.num_snapshots
        slot = (n - 1) % self.rank if self.rank else None
        device, start, i = self._mean.device, 0, 0
        for count in groups_for(tensors[0].device, self._cpu_groups, len(tensors)):
            theta = flatten(tensors[i:i + count]).to(device)  # one cat (a no-op move on the same device)
            i += count
            part = slice(start, start + theta.numel())
            start += theta.numel()
            mean = self._mean[part]
            delta = theta - mean  # float64: the snapshot is promoted inside the kernel
            mean.add_(delta, alpha=1.0 / n)
            deviation = theta - mean  # from the updated mean: Welford's second factor and the new column
            self._m2[part].addcmul_(delta, deviation)
            if slot is not None:
                self._dev[slot, part].copy_(deviation)

    def _deviation_order(self) -> list[int]:
        """Ring-buffer slots from oldest to newest."""
        if self.rank == 0:
            return []
        if self.num_snapshots <= self.rank:
            return list(range(self.num_snapshots))
        start = self.num_snapshots % self.rank
        return [(start + i) % self.rank for i in range(self.rank)]

    def _by_name(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat [..., P] -> name -> [..., *shape] copies (independent tensors, e.g. for safetensors)."""
        lead = tuple(flat.shape[:-1])
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            out[name] = flat[..., start:start + size].reshape(*lead, *shape).clone()
            start += size
        return out

    def mean(self) -> dict[str, torch.Tensor]:
        return self._by_name(self._mean)

    def variance(self) -> dict[str, torch.Tensor]:
        """Population variance sigma^2 = E[theta^2] - E[theta]^2 (float64, unclamped)."""
        self._need(1)
        return self._by_name(self._m2 / self.num_snapshots)

    def deviations(self) -> dict[str, torch.Tensor]:
        """(K', *shape) deviation columns, oldest first, K' = min(K, snapshots)."""
        return self._by_name(self._dev[self._deviation_order()])

    def _need(self, k: int) -> None:
        if self.num_snapshots < k:
            raise InvalidValueError(f"SWAG has {self.num_snapshots} snapshot(s); need at least {k}")

    def posterior(self, metadata: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> SourcePosterior | ShardedPosterior:
        """Export mean, clamped variance and deviations as a :class:`SourcePosterior` (a
        :class:`~ptyl.posterior.ShardedPosterior` of this rank's rows for a sharded model)."""
        self._need(2)
        meta = {"num_snapshots": self.num_snapshots, "rank": min(self.rank, self.num_snapshots), **(metadata or {})}
        var = self._by_name((self._m2 / self.num_snapshots).clamp_min_(self.var_clamp).to(dtype))
        mean = self._by_name(self._mean.to(dtype))
        dev = self._by_name(self._dev[self._deviation_order()].to(dtype))
        posterior = SourcePosterior(mean, var, dev, meta)
        return ShardedPosterior(posterior, self.layout) if self._dtensors else posterior

    @torch.no_grad()
    def sample_into(
        self,
        model: nn.Module,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
        bn_loader: Iterable | None = None,
    ) -> None:
        """Write theta = mu + sqrt(scale/2) sigma z1 + sqrt(scale / (2 max(K-1, 1))) D z2 into the model (the
        covariance of :meth:`SourcePosterior.dense_covariance`, K = 1 included); with ``bn_loader`` recompute
        BatchNorm statistics afterwards. Sharded: z2 comes from ``generator`` (seed it alike on every rank), z1 from
        a stream per rank seeded from it."""
        self._need(2)
        tensors = self._tensors(model)
        order = self._deviation_order()
        k = len(order)
        device = self._mean.device
        z2 = torch.randn(k, generator=generator, dtype=torch.float64, device=device) if k > 0 else None
        if self.sharded:  # independent noise per rank's rows, shared z2 (the low-rank part couples all rows)
            seed = int(torch.randint(2**62, (1,), generator=generator)) + self.layout.rank
            generator = torch.Generator(device=device).manual_seed(seed)
        z1 = torch.randn(self._mean.shape, generator=generator, dtype=torch.float64, device=device)
        std = (self._m2 / self.num_snapshots).clamp_min_(0).sqrt_()
        theta = torch.addcmul(self._mean, std, z1, value=math.sqrt(scale / 2.0))
        if z2 is not None:
            theta += math.sqrt(scale / (2.0 * max(k - 1, 1))) * (z2 @ self._dev[order].double())
        torch._foreach_copy_(tensors, unflatten(theta, tensors))
        if bn_loader is not None:
            recompute_batchnorm(model, bn_loader, device=next(model.parameters()).device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "num_snapshots": self.num_snapshots,
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes.values()],
            "mean": self._mean.clone(),
            "m2": self._m2.clone(),
            "deviations": self._dev.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (this format, or the per-name format 1); anything collected for other
        parameters, shapes or rank raises :class:`ParameterMismatchError` and leaves the collector unchanged."""
        missing = [key for key in ("rank", "num_snapshots", "names", "mean", "m2", "deviations") if key not in state]
        if missing:
            raise ParameterMismatchError(f"SWAG state lacks {missing}: not a SWAGCollector.state_dict()")
        if list(state["names"]) != self.names or int(state["rank"]) != self.rank:
            raise ParameterMismatchError(
                f"SWAG state was collected for other parameters or another rank (rank {int(state['rank'])} over "
                f"{len(state['names'])} tensors; this collector: rank {self.rank} over {len(self.names)})"
            )
        fmt = int(state.get("format", 1))
        if fmt == 1:
            mean, m2, dev = (self._flat_from_names(state[key], key) for key in ("mean", "m2", "deviations"))
        elif fmt == STATE_FORMAT:
            shapes = [tuple(s) for s in state.get("shapes", ())]
            if shapes != list(self.shapes.values()):
                raise ParameterMismatchError("SWAG state was collected for parameters of other shapes")
            mean, m2, dev = state["mean"], state["m2"], state["deviations"]
        else:
            raise ParameterMismatchError(f"unknown SWAG state format {fmt}")
        for src, dst, key in ((mean, self._mean, "mean"), (m2, self._m2, "m2"), (dev, self._dev, "deviations")):
            if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dst.shape):
                got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
                raise ParameterMismatchError(f"SWAG state {key} has shape {got}, expected {tuple(dst.shape)}")
        self._mean.copy_(mean)
        self._m2.copy_(m2)
        self._dev.copy_(dev)
        self.num_snapshots = int(state["num_snapshots"])

    def _flat_from_names(self, per_name: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        lead = (self.rank,) if key == "deviations" else ()
        parts = []
        for n in self.names:
            src = per_name[n]
            if tuple(src.shape) != (*lead, *self.shapes[n]):
                raise ParameterMismatchError(f"SWAG state {key} of {n!r} has shape {tuple(src.shape)}")
            parts.append(src.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)
