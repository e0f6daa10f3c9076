"""Choosing the prior's strength without a grid: differentiable prior families, a data-emphasized ELBO (Harvey et
al. 2024) and an online Laplace marginal likelihood with K-FAC curvature (Immer et al. 2021).

    family = build_family(model, "lowrank", posterior=posterior, head="head")      # log lam, log v_h learnable
    result = deelbo_tune(model, family, train_loader)                              # or marglik_tune(...)
    result.hyper, result.prior_kwargs, result.wall_time_s, result.history
    prior = result.prior()                                                         # a ptyl Prior at the values
"""

from ptyl.autotune.build import HYPERS, KINDS, build_family
from ptyl.autotune.curvature import Curvature, DenseBlock, DiagBlock, KronBlock, compute_curvature
from ptyl.autotune.deelbo import deelbo_loss, deelbo_tune
from ptyl.autotune.families import BlockFamily, CompositeFamily, IsotropicFamily, LeafFamily, LearnedFamily
from ptyl.autotune.likelihoods import Categorical, Gaussian, Likelihood, get_likelihood
from ptyl.autotune.marglik import CURVATURES, marglik_tune, update_hypers
from ptyl.autotune.occam import LaplaceEvidence, laplace_log_evidence
from ptyl.autotune.result import TuneResult
from ptyl.autotune.variational import VariationalPosterior

__all__ = [
    "CURVATURES",
    "HYPERS",
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
    "TuneResult",
    "VariationalPosterior",
    "build_family",
    "compute_curvature",
    "deelbo_loss",
    "deelbo_tune",
    "get_likelihood",
    "laplace_log_evidence",
    "marglik_tune",
    "update_hypers",
]
