"""Priors over named parameters: learned (low-rank, diagonal, per block) and isotropic (L2-SP, weight decay).

The kinds are listed once in :class:`PriorKind` (:mod:`ptyl.priors.registry`); :func:`make_prior` builds any of
them with an isotropic prior on the new head, :func:`learned_prior` turns a source posterior into a prior. On a model
sharded with FSDP2 both build a :class:`ShardedPrior` holding this rank's rows (:mod:`ptyl.priors.sharded`).
"""

from ptyl.priors.base import CompositePrior, Prior
from ptyl.priors.block import BlockLowRankPrior, block_prior
from ptyl.priors.diagonal import DiagonalGaussianPrior
from ptyl.priors.factory import make_prior
from ptyl.priors.isotropic import IsotropicGaussianPrior, variance_from_weight_decay
from ptyl.priors.learned import learned_prior
from ptyl.priors.lowrank import LowRankGaussianPrior
from ptyl.priors.registry import PriorKind, PriorOptions, PriorRecipe
from ptyl.priors.separable import ProximalPrior, marginal_variance, separable_parts
from ptyl.priors.sharded import ShardedPrior, shard_prior
from ptyl.priors.strength import PriorStrength, prior_strength

__all__ = [
    "BlockLowRankPrior",
    "CompositePrior",
    "DiagonalGaussianPrior",
    "IsotropicGaussianPrior",
    "LowRankGaussianPrior",
    "Prior",
    "PriorKind",
    "PriorOptions",
    "PriorRecipe",
    "PriorStrength",
    "ProximalPrior",
    "ShardedPrior",
    "block_prior",
    "learned_prior",
    "make_prior",
    "marginal_variance",
    "prior_strength",
    "separable_parts",
    "shard_prior",
    "variance_from_weight_decay",
]
