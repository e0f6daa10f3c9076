"""Posterior predictive: a bank of posterior samples and Bayesian model averaging of their predictions, and the
post-hoc Laplace predictive around a MAP model (:func:`laplace`).

Training (MAP, SGLD, cyclical SGLD, SWAG) lives in :mod:`ptyl.training`; choosing hyper-parameters in
:mod:`ptyl.tuning`.
"""

from ptyl.batches import recompute_batchnorm
from ptyl.inference.bma import bma_predict, collect_targets, predict_probs
from ptyl.inference.laplace_posterior import PosteriorPrecision
from ptyl.inference.laplace_predictive import LaplacePredictive, laplace
from ptyl.inference.samples import SampleBank

__all__ = ["LaplacePredictive", "PosteriorPrecision", "SampleBank", "bma_predict", "collect_targets", "laplace",
           "predict_probs", "recompute_batchnorm"]
