"""Learned diagonal Gaussian prior N(mu, diag(v)).

From a SWAG posterior, ``v = lam * sigma^2 + eps`` (see :func:`ptyl.priors.learned_prior`):

    -log N(theta; mu, diag v) = 1/2 [ sum_j (theta_j - mu_j)^2 / v_j + sum_j log v_j + P log 2 pi ]
    grad = (theta - mu) / v,        diag(Sigma^-1) = 1 / v,        log det(diag(h) + Sigma^-1) = sum log(h + 1/v)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ptyl.errors import InvalidValueError
from ptyl.priors.base import LOG_2PI, Prior, rows_by_name
from ptyl.priors.checks import check_flat
from ptyl.priors.lowrank import operand
from ptyl.sharding import ShardLayout


class DiagonalGaussianPrior(Prior):
    """N(mean, diag(variance)) over named parameters. Tensors may be stored in a low precision (fp16/bf16);
    computation happens in the parameters' dtype (float32 for half parameters). Buffers: ``mean`` [P],
    ``variance`` [P] and ``log_norm`` (float64)."""

    def __init__(self, mean: Mapping[str, torch.Tensor], variance: Mapping[str, torch.Tensor]):
        if set(mean) != set(variance):
            raise InvalidValueError("mean and variance must name the same parameters")
        super().__init__(list(mean), [tuple(t.shape) for t in mean.values()])
        first = self.names[0]
        m0, v0 = mean[first], variance[first]
        self.register_buffer("mean", torch.empty(self.num_parameters, dtype=m0.dtype, device=m0.device))
        self.register_buffer("variance", torch.empty(self.num_parameters, dtype=v0.dtype, device=m0.device))
        start = 0
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=False)):
            m, v = (m0, v0) if i == 0 else (mean[name], variance[name])
            if tuple(v.shape) != shape:
                raise InvalidValueError(f"variance of {name!r} has shape {tuple(v.shape)}, expected {shape}")
            stop = start + math.prod(shape)
            self.mean[start:stop].copy_(m.detach().reshape(-1))
            self.variance[start:stop].copy_(v.detach().reshape(-1))
            start = stop
        check_flat(self.mean, "mean", self.names, self.shapes)
        check_flat(self.variance, "variance", self.names, self.shapes, positive=True)
        log_det = self.variance.double().log().sum()
        self.register_buffer("log_norm", log_det + self.num_parameters * LOG_2PI)

    def penalty_partials(self, xs: Iterable[torch.Tensor], need_value: bool, need_grad: bool):
        quad, grads, start = None, [], 0
        for x in xs:
            part = slice(start, start + x.numel())
            start += x.numel()
            whole = x.numel() == self.num_parameters
            r = x.sub_(operand(self.mean if whole else self.mean[part], x.dtype))
            grad = r / operand(self.variance if whole else self.variance[part], x.dtype)
            if need_value:  # float64 across groups
                q = torch.dot(r, grad)
                quad = q.double() if quad is None else quad + q
            if need_grad:
                grads.append(grad)
        return quad, None, grads

    def penalty_finish(self, quad, vec, grads, need_value: bool, need_grad: bool):
        value = (quad + self.log_norm) * 0.5 if need_value else None
        return value, grads if need_grad else None

    def flat_parts(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``(mu, v, None)``: ``Sigma = diag(v)`` (copies in ``dtype``; see :meth:`Prior.flat_parts`).

        Args:
            dtype: of the copies.

        Returns:
            The mean, the variances and no factor.
        """
        return self.mean.to(dtype, copy=True), self.variance.to(dtype, copy=True), None

    def precision_diagonal(self) -> torch.Tensor:
        """``1 / v`` (float64, flat).

        Returns:
            The precision diagonal.
        """
        return 1.0 / self.variance.double()

    def log_det_partials(self, h: torch.Tensor) -> torch.Tensor:
        """``[sum log(h + 1/v)]`` (see :meth:`Prior.log_det_partials`).

        Args:
            h: the curvature diagonal, float64.

        Returns:
            One float64 number.
        """
        return torch.log(h.to(self.variance.device) + 1.0 / self.variance.double()).sum().reshape(1)

    def mean_flat(self) -> torch.Tensor:
        """The centre mu (a copy in the stored dtype).

        Returns:
            A flat [P] tensor.
        """
        return self.mean.clone()

    def local_rows(self, layout: ShardLayout) -> DiagonalGaussianPrior:
        """This rank's rows with the global normaliser (see :meth:`Prior.local_rows`).

        Args:
            layout: the rows of every parameter.

        Returns:
            The diagonal prior over the rows.
        """
        local = DiagonalGaussianPrior(rows_by_name(self.mean, layout, self.shapes),
                                      rows_by_name(self.variance, layout, self.shapes))
        local.log_norm.copy_(self.log_norm)
        return local

    def normalizer_partials(self) -> torch.Tensor:
        """``[sum log v]`` of these rows.

        Returns:
            One float64 number.
        """
        return self.variance.double().log().sum().reshape(1)

    def set_global_normalizer(self, sums: torch.Tensor, numel: int) -> None:
        """``log_norm = sum log v + P log 2 pi`` over the whole model.

        Args:
            sums: :meth:`normalizer_partials` summed over ranks.
            numel: the global P.
        """
        self.log_norm.copy_(sums[0] + numel * LOG_2PI)
