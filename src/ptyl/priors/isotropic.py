"""Isotropic Gaussian priors: L2-SP (centred on pretrained weights) and plain weight decay (centred on zero).

    -log N(theta; c, s2 I) = 1/2 [ ||theta - c||^2 / s2 + P log(2 pi s2) ],     grad = (theta - c) / s2

L2-SP: Li, Grandvalet, Davoine, "Explicit inductive bias for transfer learning with convolutional networks", ICML 2018.
Weight decay ``wd`` in a mean loss equals this prior with ``c = 0`` and ``s2 = 1 / (N wd)``
(see :func:`variance_from_weight_decay`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from ptyl.errors import InvalidValueError
from ptyl.priors.base import LOG_2PI, Prior, rows_by_name
from ptyl.priors.checks import check_flat
from ptyl.priors.lowrank import operand
from ptyl.sharding import ShardLayout


def variance_from_weight_decay(weight_decay: float, num_data: int) -> float:
    """Prior variance equivalent to ``weight_decay/2 * ||theta||^2`` added to a mean loss over ``num_data`` examples."""
    if weight_decay <= 0 or num_data < 1:
        raise InvalidValueError(f"need weight_decay > 0 and num_data >= 1, got {weight_decay}, {num_data}")
    return 1.0 / (num_data * weight_decay)


class IsotropicGaussianPrior(Prior):
    """N(center, variance * I) over named parameters; ``center=None`` means zero (weight decay).

    Buffers: ``center`` [P] when centred, and an empty non-persistent ``anchor`` that follows ``.to(device)``.
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        variance: float,
        center: Mapping[str, torch.Tensor] | None = None,
    ):
        if not (isinstance(variance, (int, float)) and math.isfinite(variance) and variance > 0):
            raise InvalidValueError(f"prior variance must be a positive finite number, got {variance!r}")
        super().__init__(list(shapes), list(shapes.values()))
        self.variance = float(variance)
        self.centered = center is not None
        self._log_norm = 0.5 * self.num_parameters * (LOG_2PI + math.log(self.variance))
        device = next(iter(center.values())).device if center else None
        self.register_buffer("anchor", torch.empty(0, device=device), persistent=False)
        if center is not None:
            first = center[self.names[0]]
            self.register_buffer("center", torch.empty(self.num_parameters, dtype=first.dtype, device=device))
            start = 0
            for name, shape in zip(self.names, self.shapes, strict=False):
                c = center[name]
                if tuple(c.shape) != shape:
                    raise InvalidValueError(f"center of {name!r} has shape {tuple(c.shape)}, expected {shape}")
                stop = start + math.prod(shape)
                self.center[start:stop].copy_(c.detach().reshape(-1))
                start = stop
            check_flat(self.center, "center", self.names, self.shapes)

    @classmethod
    def from_model(
        cls, params: Mapping[str, torch.Tensor], variance: float, centered: bool = True
    ) -> IsotropicGaussianPrior:
        """L2-SP (``centered=True``: centred on the current values) or weight decay (``centered=False``)."""
        shapes = {n: tuple(t.shape) for n, t in params.items()}
        return cls(shapes, variance, {n: t for n, t in params.items()} if centered else None)

    def penalty_partials(self, xs: Iterable[torch.Tensor], need_value: bool, need_grad: bool):
        quad, grads, start = None, [], 0
        for x in xs:
            if self.centered:
                whole = x.numel() == self.num_parameters
                x.sub_(operand(self.center if whole else self.center[start:start + x.numel()], x.dtype))
            start += x.numel()
            if need_value:  # float64 across groups
                q = torch.dot(x, x)
                quad = q.double() if quad is None else quad + q
            if need_grad:
                grads.append(x.mul_(1.0 / self.variance))  # x is a fresh copy: the gradient overwrites it
        return quad, None, grads

    def penalty_finish(self, quad, vec, grads, need_value: bool, need_grad: bool):
        value = quad * (0.5 / self.variance) + self._log_norm if need_value else None
        return value, grads if need_grad else None

    def flat_parts(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``(c, v 1, None)`` (see :meth:`Prior.flat_parts`).

        Args:
            dtype: of the returned tensors.

        Returns:
            The centre (zeros when not centred), the variances and no factor.
        """
        variance = torch.full((self.num_parameters,), self.variance, dtype=dtype, device=self.anchor.device)
        return self.mean_flat().to(dtype), variance, None

    def precision_diagonal(self) -> torch.Tensor:
        """``1 / v`` for every parameter (float64, flat).

        Returns:
            The precision diagonal.
        """
        return torch.full((self.num_parameters,), 1.0 / self.variance, dtype=torch.float64, device=self.anchor.device)

    def log_det_partials(self, h: torch.Tensor) -> torch.Tensor:
        """``[sum log(h + 1/v)]`` (see :meth:`Prior.log_det_partials`).

        Args:
            h: the curvature diagonal, float64.

        Returns:
            One float64 number.
        """
        return torch.log(h.to(self.anchor.device) + 1.0 / self.variance).sum().reshape(1)

    def mean_flat(self) -> torch.Tensor:
        """The centre (a copy; zeros for weight decay).

        Returns:
            A flat [P] tensor.
        """
        if self.centered:
            return self.center.clone()
        return torch.zeros(self.num_parameters, device=self.anchor.device)

    def local_rows(self, layout: ShardLayout) -> IsotropicGaussianPrior:
        """This rank's rows with the global normaliser (see :meth:`Prior.local_rows`).

        Args:
            layout: the rows of every parameter.

        Returns:
            The isotropic prior over the rows.
        """
        center = rows_by_name(self.center, layout, self.shapes) if self.centered else None
        local = IsotropicGaussianPrior(layout.local_shapes, self.variance, center)
        local._log_norm = self._log_norm
        return local

    def normalizer_partials(self) -> torch.Tensor:
        """Nothing to sum: the normaliser needs only the global P.

        Returns:
            An empty float64 tensor.
        """
        return torch.zeros(0, dtype=torch.float64, device=self.anchor.device)

    def set_global_normalizer(self, sums: torch.Tensor, numel: int) -> None:
        """``1/2 P log(2 pi v)`` with the global P.

        Args:
            sums: unused (empty).
            numel: the global P.
        """
        self._log_norm = 0.5 * numel * (LOG_2PI + math.log(self.variance))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variance={self.variance:g}, centered={self.centered}"
