"""SWAG: a Gaussian fitted to the SGD trajectory (Maddox, Izmailov, Garipov, Vetrov, Wilson, NeurIPS 2019,
arXiv 1902.02476).

After each collected snapshot theta_n (Welford's update, in float64 so sigma^2 survives cancellation):

    mu_n    = mu_{n-1} + (theta_n - mu_{n-1}) / n
    M2_n    = M2_{n-1} + (theta_n - mu_{n-1}) * (theta_n - mu_n)         sigma^2 = M2_n / n
    D[:, n] = theta_n - mu_n          (only the last K columns are kept)

and the SWAG covariance is Sigma = 1/2 (diag sigma^2 + D D^T / (K - 1)). Memory is (K + 2) P numbers: mean and M2 in
float64, deviations in float32 (or ``deviation_dtype``).

BatchNorm: running statistics are buffers, not parameters, so they are *not* part of the posterior or the prior. Any
model built from the posterior (its mean or a sample) must recompute them on training data
(``torch.optim.swa_utils.update_bn``), which :meth:`SWAGCollector.sample_into` does when given a loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ptyl.errors import InvalidValueError, ParameterMismatchError
from ptyl.params import Selector, named_parameters, select_parameters
from ptyl.posterior.gaussian import SourcePosterior


class SWAGCollector:
    """Collects SWAG moments of a model's parameters, selected by name.

    Example::

        swag = SWAGCollector(model, rank=20, head="head")
        for epoch in range(epochs):
            train_one_epoch(model, lr=high_constant_lr)
            swag.collect(model)
        posterior = swag.posterior(metadata={"source": "kmnist"})

    Args:
        model: the model whose parameters are tracked (only names and shapes are read here).
        rank: K, the number of deviation columns kept (0 gives a diagonal-only posterior).
        include / exclude / head: parameter selection, see :func:`ptyl.params.select_parameters`.
        var_clamp: floor applied to sigma^2 when the posterior is exported (SWAG's ``var_clamp``).
        deviation_dtype: storage dtype of the deviation columns.
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
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.num_snapshots = 0
        self._mean = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
        self._m2 = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
        self._dev = {
            n: torch.zeros((rank, *p.shape), dtype=deviation_dtype, device=p.device) for n, p in params.items()
        }

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @torch.no_grad()
    def collect(self, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Add the model's current parameters as one snapshot."""
        params = named_parameters(model)
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ParameterMismatchError(f"model lacks tracked parameters: {missing[:5]}")
        self.num_snapshots += 1
        n = self.num_snapshots
        slot = (n - 1) % self.rank if self.rank else None
        for name in self.names:
            theta = params[name].detach()
            if tuple(theta.shape) != self.shapes[name]:
                raise ParameterMismatchError(f"{name!r} changed shape to {tuple(theta.shape)}")
            mean = self._mean[name]
            theta64 = theta.to(device=mean.device, dtype=torch.float64)
            delta = theta64 - mean
            mean.add_(delta / n)
            deviation = theta64 - mean  # from the updated mean: Welford's second factor and the new column
            self._m2[name].add_(delta * deviation)
            if slot is not None:
                self._dev[name][slot].copy_(deviation)

    def _deviation_order(self) -> list[int]:
        """Ring-buffer slots from oldest to newest."""
        if self.rank == 0:
            return []
        if self.num_snapshots <= self.rank:
            return list(range(self.num_snapshots))
        start = self.num_snapshots % self.rank
        return [(start + i) % self.rank for i in range(self.rank)]

    def mean(self) -> dict[str, torch.Tensor]:
        return {n: m.clone() for n, m in self._mean.items()}

    def variance(self) -> dict[str, torch.Tensor]:
        """Population variance sigma^2 = E[theta^2] - E[theta]^2 (float64, unclamped)."""
        self._need(1)
        return {n: m2 / self.num_snapshots for n, m2 in self._m2.items()}

    def deviations(self) -> dict[str, torch.Tensor]:
        """(K', *shape) deviation columns, oldest first, K' = min(K, snapshots)."""
        order = self._deviation_order()
        return {n: d[order].clone() for n, d in self._dev.items()}

    def _need(self, k: int) -> None:
        if self.num_snapshots < k:
            raise InvalidValueError(f"SWAG has {self.num_snapshots} snapshot(s); need at least {k}")

    def posterior(self, metadata: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> SourcePosterior:
        """Export mean, clamped variance and deviations as a :class:`SourcePosterior`."""
        self._need(2)
        meta = {"num_snapshots": self.num_snapshots, "rank": min(self.rank, self.num_snapshots), **(metadata or {})}
        var = {n: v.clamp_min(self.var_clamp).to(dtype) for n, v in self.variance().items()}
        mean = {n: m.to(dtype) for n, m in self._mean.items()}
        dev = {n: d.to(dtype) for n, d in self.deviations().items()}
        return SourcePosterior(mean, var, dev, meta)

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
        BatchNorm statistics afterwards."""
        self._need(2)
        params = named_parameters(model)
        order = self._deviation_order()
        k = len(order)
        device = next(iter(self._mean.values())).device
        z2 = torch.randn(k, generator=generator, dtype=torch.float64, device=device) if k > 0 else None
        var = self.variance()
        for name in self.names:
            mean = self._mean[name]
            z1 = torch.randn(mean.shape, generator=generator, dtype=torch.float64, device=device)
            theta = mean + math.sqrt(scale / 2.0) * var[name].clamp_min(0).sqrt() * z1
            if z2 is not None:
                dev = self._dev[name][order].double().reshape(k, -1)
                theta += math.sqrt(scale / (2.0 * max(k - 1, 1))) * (z2 @ dev).reshape(mean.shape)
            params[name].copy_(theta.to(params[name].dtype))
        if bn_loader is not None:  # update_bn takes x from (x, y) batches itself
            torch.optim.swa_utils.update_bn(bn_loader, model, device=next(model.parameters()).device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "num_snapshots": self.num_snapshots,
            "names": list(self.names),
            "mean": {n: t.clone() for n, t in self._mean.items()},
            "m2": {n: t.clone() for n, t in self._m2.items()},
            "deviations": {n: t.clone() for n, t in self._dev.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names or int(state["rank"]) != self.rank:
            raise ParameterMismatchError("SWAG state was collected for other parameters or another rank")
        for n in self.names:
            for store, key in ((self._mean, "mean"), (self._m2, "m2"), (self._dev, "deviations")):
                src = state[key][n]
                if tuple(src.shape) != tuple(store[n].shape):
                    raise ParameterMismatchError(f"SWAG state {key} of {n!r} has shape {tuple(src.shape)}")
                store[n].copy_(src)
        self.num_snapshots = int(state["num_snapshots"])

