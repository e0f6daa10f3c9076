"""Choosing hyper-parameters: :func:`tune` -- the same-budget validation grid every method and baseline goes through
(``strategy="grid"``), or one run of an automatic strategy that learns the prior's strength
(:class:`TuningStrategy`: ``"de-elbo"``, the data-emphasized ELBO; ``"marglik"``, the online Laplace marginal
likelihood; ``"hypergradient"``, the implicit hypergradient of a validation pool's NLL; ``"continuation"``, a
warm-started path from weak to strong scored on a validation pool)."""

from ptyl.tuning.automatic import AutomaticSettings, AutomaticTuner, tune_automatic
from ptyl.tuning.continuation import ContinuationSettings
from ptyl.tuning.deelbo import DEELBOSettings, DEELBOStrategy
from ptyl.tuning.grid import DEFAULT_LRS, PriorSpec, default_grid, tune
from ptyl.tuning.hypergradient import HypergradientSettings, ValidationHypergradient
from ptyl.tuning.marglik import MarginalLikelihood, MarglikSettings
from ptyl.tuning.registry import AUTO, TuningStrategy
from ptyl.tuning.result import TuneResult
from ptyl.tuning.splits import k_folds, validation_split

__all__ = [
    "AUTO",
    "DEFAULT_LRS",
    "AutomaticSettings",
    "AutomaticTuner",
    "ContinuationSettings",
    "DEELBOSettings",
    "DEELBOStrategy",
    "HypergradientSettings",
    "MarginalLikelihood",
    "MarglikSettings",
    "PriorSpec",
    "TuneResult",
    "TuningStrategy",
    "ValidationHypergradient",
    "default_grid",
    "k_folds",
    "tune",
    "tune_automatic",
    "validation_split",
]
