"""The mathematics of choosing the prior's strength without a grid: differentiable prior families, K-FAC / diagonal /
last-layer curvature, the Laplace evidence with a low-rank prior (Immer et al. 2021) and the data-emphasized ELBO
(Harvey et al. 2024). The training loops that use them live in :mod:`ptyl.tuning` (``tune(..., strategy="de-elbo" |
"marglik")``):

    family = build_family(model, "lowrank", posterior=posterior, head="head")      # log lam, log v_h learnable
    curv = compute_curvature(model, loader, Categorical(), family.names)            # K-FAC at the current weights
    evidence = LaplaceEvidence(family, curv)(model)                                  # differentiable in log lam
    prior = family.to_prior()                                                        # a ptyl Prior at the values
"""

from ptyl.autotune.blocks import DenseBlock, DiagBlock, KronBlock
from ptyl.autotune.build import HYPERS, KINDS, build_family
from ptyl.autotune.curvature import Curvature, compute_curvature
from ptyl.autotune.deelbo import deelbo_loss, resolve_kappa
from ptyl.autotune.families import BlockFamily, CompositeFamily, IsotropicFamily, LeafFamily, LearnedFamily
from ptyl.autotune.likelihoods import Categorical, Gaussian, Likelihood, get_likelihood
from ptyl.autotune.marglik import CURVATURES, evidence_part, update_hypers
from ptyl.autotune.occam import LaplaceEvidence, laplace_log_evidence
from ptyl.autotune.share import OFF_SHARE, PriorShare, prior_share
from ptyl.autotune.variational import SampledModel, VariationalPosterior

__all__ = [
    "CURVATURES",
    "HYPERS",
    "OFF_SHARE",
    "KINDS",
    "BlockFamily",
    "Categorical",
    "CompositeFamily",
    "Curvature",
    "DenseBlock",
    "DiagBlock",
    "Gaussian",
    "IsotropicFamily",
    "KronBlock",
    "LaplaceEvidence",
    "LeafFamily",
    "LearnedFamily",
    "Likelihood",
    "PriorShare",
    "SampledModel",
    "VariationalPosterior",
    "build_family",
    "compute_curvature",
    "deelbo_loss",
    "evidence_part",
    "get_likelihood",
    "laplace_log_evidence",
    "prior_share",
    "resolve_kappa",
    "update_hypers",
]
