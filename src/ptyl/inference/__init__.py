"""Downstream side: fine-tune (MAP) or sample (SGLD, cyclical SGLD, SWAG) under a prior, predict by model averaging,
and choose hyper-parameters (validation grid or Laplace evidence)."""

from ptyl.inference.bma import SampleBank, bma_predict, collect_targets, predict_probs
from ptyl.inference.schedules import CyclicalSchedule, cyclical_lr
from ptyl.inference.sgld import SGLD
from ptyl.inference.trainer import FitResult, TrainConfig, fit, supervised_objective
from ptyl.inference.tuning import MethodSpec, TuneResult, default_grid, tune
from ptyl.inference.evidence import EvidenceResult, laplace_log_evidence, select_prior_scale

__all__ = [
    "SGLD",
    "EvidenceResult",
    "MethodSpec",
    "TuneResult",
    "CyclicalSchedule",
    "FitResult",
    "SampleBank",
    "TrainConfig",
    "bma_predict",
    "collect_targets",
    "cyclical_lr",
    "default_grid",
    "laplace_log_evidence",
    "select_prior_scale",
    "tune",
    "fit",
    "predict_probs",
    "supervised_objective",
]
