"""How strong a prior is in the units of the weights it regularises: the effective-strength diagnostic every tuned
selection carries.

    std_ratio = median_i sqrt(Sigma_ii) / median_i |theta0_i|        (backbone parameters)

``theta0`` are the weights fine-tuning starts from (the pretrained backbone, which is the learned prior's mean and
L2-SP's centre). A prior whose typical standard deviation is ``OFF_RATIO`` = 10 times the typical weight magnitude or
more lets fine-tuning move the weights anywhere they would go without it: such a selection is labelled "prior
effectively off" (issue 10: the old grids chose lambda = 1e7, a std ratio near 1000). A ratio near or below 1 is a
prior that holds the weights near its mean at the scale they actually have.

>>> import torch
>>> from ptyl.priors import IsotropicGaussianPrior
>>> prior = IsotropicGaussianPrior({"w": (4,)}, variance=100.0)
>>> s = prior_strength(prior, {"w": torch.full((4,), 0.1)})
>>> round(s.std_ratio), s.off, s.label
(100, True, 'prior effectively off')
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

__all__ = ["OFF_RATIO", "PriorStrength", "prior_strength"]

OFF_RATIO = 10.0


@dataclass(frozen=True)
class PriorStrength:
    """The effective-strength diagnostic of one prior.

    Attributes:
        median_std: median prior standard deviation over the backbone parameters (``inf``: no backbone prior).
        median_weight: median |theta0| over the same parameters.
        std_ratio: ``median_std / median_weight``.
        off: ``std_ratio >= OFF_RATIO``: the prior is effectively off.
    """

    median_std: float
    median_weight: float
    std_ratio: float
    off: bool

    @property
    def label(self) -> str:
        """``"prior effectively off"`` or ``"prior active"``."""
        return "prior effectively off" if self.off else "prior active"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (and the label)."""
        return {**asdict(self), "label": self.label}


def prior_strength(prior: Prior | None, reference: nn.Module | Mapping[str, torch.Tensor], *,
                   part: str = "backbone", off_ratio: float = OFF_RATIO) -> PriorStrength:
    """The effective-strength diagnostic (see the module docstring).

    Args:
        prior: the prior (a :class:`CompositePrior` from :func:`ptyl.priors.make_prior`: its ``part`` is measured;
            any other prior: all of it). ``None`` or a composite without that part: no prior, ``off``.
        reference: the starting weights (a model or name -> tensor).
        part: which part of a composite prior to measure.
        off_ratio: the threshold of ``off``.

    Returns:
        A :class:`PriorStrength`.
    """
    if isinstance(prior, CompositePrior):
        prior = prior.parts[part] if part in prior.parts else None
    if prior is None:
        return PriorStrength(math.inf, math.nan, math.inf, True)
    named = named_parameters(reference) if isinstance(reference, nn.Module) else dict(reference)
    variances = torch.cat([marginal_variance(leaf) for leaf in leaves(prior)])
    weights = torch.cat([named[n].detach().double().reshape(-1).cpu() for n in prior.names])
    median_std = float(variances.median().sqrt())
    median_weight = float(weights.abs().median())
    ratio = median_std / median_weight if median_weight > 0 else math.inf
    return PriorStrength(median_std, median_weight, ratio, ratio >= off_ratio)
