"""Isotropic Gaussian priors: L2-SP (centred on pretrained weights) and plain weight decay (centred on zero).

    log N(theta; c, s2 I) = -1/2 [ ||theta - c||^2 / s2 + P log(2 pi s2) ]

L2-SP: Li, Grandvalet, Davoine, "Explicit inductive bias for transfer learning with convolutional networks", ICML 2018.
Weight decay ``wd`` in a mean loss equals this prior with ``c = 0`` and ``s2 = 1 / (N wd)``
(see :func:`variance_from_weight_decay`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ptyl.errors import InvalidValueError
from ptyl.priors.base import LOG_2PI, Prior
from ptyl.priors.checks import check_finite


def variance_from_weight_decay(weight_decay: float, num_data: int) -> float:
    """Prior variance equivalent to ``weight_decay/2 * ||theta||^2`` added to a mean loss over ``num_data`` examples."""
    if weight_decay <= 0 or num_data < 1:
        raise InvalidValueError(f"need weight_decay > 0 and num_data >= 1, got {weight_decay}, {num_data}")
    return 1.0 / (num_data * weight_decay)


class IsotropicGaussianPrior(Prior):
    """N(center, variance * I) over named parameters; ``center=None`` means zero (weight decay)."""

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
        for i, name in enumerate(self.names):
            if center is not None:
                c = center[name].detach().clone()
                if tuple(c.shape) != self.shapes[i]:
                    raise InvalidValueError(f"center of {name!r} has shape {tuple(c.shape)}, expected {self.shapes[i]}")
                check_finite(c, f"center of {name!r}")
                self.register_buffer(f"center_{i}", c)

    @classmethod
    def from_model(
        cls, params: Mapping[str, torch.Tensor], variance: float, centered: bool = True
    ) -> IsotropicGaussianPrior:
        """L2-SP (``centered=True``: centred on the current values) or weight decay (``centered=False``)."""
        shapes = {n: tuple(t.shape) for n, t in params.items()}
        return cls(shapes, variance, {n: t for n, t in params.items()} if centered else None)

    def _log_prob(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        sq = None
        for i, theta in enumerate(tensors):
            r = theta - getattr(self, f"center_{i}").to(theta.dtype) if self.centered else theta
            term = r.pow(2).sum()
            sq = term if sq is None else sq + term
        const = self.num_parameters * (LOG_2PI + math.log(self.variance))
        return -0.5 * (sq / self.variance + const)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variance={self.variance:g}, centered={self.centered}"
