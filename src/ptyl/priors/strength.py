"""How wide a prior is in the units of the weights it regularises: a descriptive number every tuned selection
carries next to the N-aware diagnostic.

    std_ratio = median_i sqrt(Sigma_ii) / median_i |theta0_i|        (backbone parameters)

``theta0`` are the weights fine-tuning starts from (the pretrained backbone, which is the learned prior's mean and
L2-SP's centre). A ratio near or below 1 is a prior that holds the weights near its mean at the scale they have.
The ratio does not say whether a prior is *off*: the prior enters the objective as ``-log p(theta) / N``, so the
same ratio is a strong pull at N = 50 and a negligible one at N = 50,000 (``N(theta0, v I)`` is a weight decay of
``1 / (N v)``). Whether a prior is off is the curvature share's call (:func:`ptyl.autotune.prior_share`), which
sees N.

>>> import torch
>>> from ptyl.priors import IsotropicGaussianPrior
>>> prior = IsotropicGaussianPrior({"w": (4,)}, variance=100.0)
>>> round(prior_strength(prior, {"w": torch.full((4,), 0.1)}).std_ratio)
100
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ptyl.params import named_parameters
from ptyl.priors.base import CompositePrior, Prior
from ptyl.priors.separable import leaves, marginal_variance

__all__ = ["PriorStrength", "prior_strength"]


@dataclass(frozen=True)
class PriorStrength:
    """The width of one prior against the weights.

    Attributes:
        median_std: median prior standard deviation over the backbone parameters (``inf``: no backbone prior).
        median_weight: median |theta0| over the same parameters.
        std_ratio: ``median_std / median_weight``.
    """

    median_std: float
    median_weight: float
    std_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def prior_strength(prior: Prior | None, reference: nn.Module | Mapping[str, torch.Tensor], *,
                   part: str = "backbone") -> PriorStrength:
    """The std ratio of a prior (see the module docstring).

    Args:
        prior: the prior (a :class:`CompositePrior` from :func:`ptyl.priors.make_prior`: its ``part`` is measured;
            any other prior: all of it). ``None`` or a composite without that part: no prior (ratio ``inf``).
        reference: the starting weights (a model or name -> tensor).
        part: which part of a composite prior to measure.

    Returns:
        A :class:`PriorStrength`.
    """
    if isinstance(prior, CompositePrior):
        prior = prior.parts[part] if part in prior.parts else None
    if prior is None:
        return PriorStrength(math.inf, math.nan, math.inf)
    named = named_parameters(reference) if isinstance(reference, nn.Module) else dict(reference)
    variances = torch.cat([marginal_variance(leaf) for leaf in leaves(prior)])
    weights = torch.cat([named[n].detach().double().reshape(-1).cpu() for n in prior.names])
    median_std = float(variances.median().sqrt())
    median_weight = float(weights.abs().median())
    ratio = median_std / median_weight if median_weight > 0 else math.inf
    return PriorStrength(median_std, median_weight, ratio)
