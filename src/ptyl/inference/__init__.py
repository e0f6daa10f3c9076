"""Posterior predictive: a bank of posterior samples and Bayesian model averaging of their predictions.

Training (MAP, SGLD, cyclical SGLD, SWAG) lives in :mod:`ptyl.training`; choosing hyper-parameters in
:mod:`ptyl.tuning`.
"""

from ptyl.inference.bma import bma_predict, collect_targets, predict_probs
from ptyl.inference.samples import SampleBank

__all__ = ["SampleBank", "bma_predict", "collect_targets", "predict_probs"]
