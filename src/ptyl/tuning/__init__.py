"""Choosing hyper-parameters: the same-budget validation grid every method and baseline goes through (:func:`tune`)
and the Laplace evidence (:func:`select_prior_scale`)."""

from ptyl.tuning.curvature import Curvature, curvature, gaussian_objective
from ptyl.tuning.evidence import (
    EvidenceResult,
    laplace_log_evidence,
    posterior_log_det,
    prior_precision_diagonal,
    select_prior_scale,
)
from ptyl.tuning.grid import DEFAULT_LRS, PriorSpec, default_grid, tune
from ptyl.tuning.result import TuneResult
from ptyl.tuning.splits import k_folds, validation_split

__all__ = [
    "DEFAULT_LRS",
    "Curvature",
    "EvidenceResult",
    "PriorSpec",
    "TuneResult",
    "curvature",
    "default_grid",
    "gaussian_objective",
    "k_folds",
    "laplace_log_evidence",
    "posterior_log_det",
    "prior_precision_diagonal",
    "select_prior_scale",
    "tune",
    "validation_split",
]
