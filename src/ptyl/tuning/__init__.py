"""Choosing hyper-parameters: :func:`tune` -- the same-budget validation grid every method and baseline goes through
(``strategy="grid"``), or one run of an automatic strategy that learns the prior's strength from the training data
(``"de-elbo"``: the data-emphasized ELBO; ``"marglik"``: the online Laplace marginal likelihood)."""

from ptyl.tuning.automatic import AUTO, AutoConfig, tune_automatic
from ptyl.tuning.deelbo import DEELBOStrategy
from ptyl.tuning.grid import DEFAULT_LRS, PriorSpec, default_grid, tune
from ptyl.tuning.marglik import MarginalLikelihood
from ptyl.tuning.result import STRATEGIES, TuneResult
from ptyl.tuning.splits import k_folds, validation_split

__all__ = [
    "AUTO",
    "DEFAULT_LRS",
    "STRATEGIES",
    "AutoConfig",
    "DEELBOStrategy",
    "MarginalLikelihood",
    "PriorSpec",
    "TuneResult",
    "default_grid",
    "k_folds",
    "tune",
    "tune_automatic",
    "validation_split",
]
