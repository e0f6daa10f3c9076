"""Priors over named parameters: learned (low-rank, diagonal) and isotropic (L2-SP, weight decay)."""

from ptyl.priors.base import CompositePrior, Prior
from ptyl.priors.block import BlockLowRankPrior, block_prior
from ptyl.priors.diagonal import DiagonalGaussianPrior
from ptyl.priors.factory import METHODS, make_prior
from ptyl.priors.isotropic import IsotropicGaussianPrior, variance_from_weight_decay
from ptyl.priors.lowrank import LowRankGaussianPrior

__all__ = [
    "METHODS",
    "BlockLowRankPrior",
    "CompositePrior",
    "DiagonalGaussianPrior",
    "IsotropicGaussianPrior",
    "LowRankGaussianPrior",
    "Prior",
    "block_prior",
    "make_prior",
    "variance_from_weight_decay",
]
