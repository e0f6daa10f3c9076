"""Builders of the isotropic backbone priors (registered in :mod:`ptyl.priors.registry`).

``l2sp``: N(theta_pretrained, variance I) (Li, Grandvalet & Davoine, ICML 2018, https://arxiv.org/abs/1802.01483);
``standard``: N(0, variance I), i.e. weight decay ``1 / (N variance)``; ``none``: no backbone prior.
"""

from __future__ import annotations

import torch

from ptyl.priors.isotropic import IsotropicGaussianPrior
from ptyl.priors.registry import PriorOptions


def build_l2sp(backbone: dict[str, torch.Tensor], posterior, options: PriorOptions) -> IsotropicGaussianPrior:
    """N(current backbone values, ``options.variance`` I): build it before training, on the pretrained weights."""
    return IsotropicGaussianPrior.from_model(backbone, options.variance, centered=True)


def build_standard(backbone: dict[str, torch.Tensor], posterior, options: PriorOptions) -> IsotropicGaussianPrior:
    """N(0, ``options.variance`` I)."""
    return IsotropicGaussianPrior.from_model(backbone, options.variance, centered=False)


def build_none(backbone: dict[str, torch.Tensor], posterior, options: PriorOptions) -> None:
    """No backbone prior: maximum likelihood on the backbone."""
    return None
