"""Learned diagonal Gaussian prior N(mu, diag(v)).

From a SWAG posterior, ``v = lam * sigma^2 + eps`` (see :func:`ptyl.priors.learned_prior`):

    log N(theta; mu, diag v) = -1/2 [ sum_j (theta_j - mu_j)^2 / v_j + sum_j log v_j + P log 2 pi ]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ptyl.errors import InvalidValueError
from ptyl.priors.base import LOG_2PI, Prior
from ptyl.priors.checks import check_finite, check_positive


class DiagonalGaussianPrior(Prior):
    """N(mean, diag(variance)) over named parameters. Tensors may be stored in a low precision (fp16/bf16);
    computation happens in the parameters' dtype."""

    def __init__(self, mean: Mapping[str, torch.Tensor], variance: Mapping[str, torch.Tensor]):
        if set(mean) != set(variance):
            raise InvalidValueError("mean and variance must name the same parameters")
        super().__init__(list(mean), [tuple(t.shape) for t in mean.values()])
        log_det = torch.zeros((), dtype=torch.float64)  # CPU scalar: `+` below moves it to the tensors' device
        for i, name in enumerate(self.names):
            m, v = mean[name].detach(), variance[name].detach()
            if tuple(v.shape) != self.shapes[i]:
                raise InvalidValueError(f"variance of {name!r} has shape {tuple(v.shape)}, expected {self.shapes[i]}")
            check_finite(m, f"mean of {name!r}")
            check_positive(v, f"variance of {name!r}")
            self.register_buffer(f"mean_{i}", m)
            self.register_buffer(f"var_{i}", v)
            log_det = log_det + v.double().log().sum()
        self.register_buffer("log_norm", log_det + self.num_parameters * LOG_2PI)

    def _log_prob(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        quad = None
        for i, theta in enumerate(tensors):
            m = getattr(self, f"mean_{i}").to(theta.dtype)
            v = getattr(self, f"var_{i}").to(theta.dtype)
            term = ((theta - m).pow(2) / v).sum()
            quad = term if quad is None else quad + term
        return -0.5 * (quad + self.log_norm.to(quad.dtype))
