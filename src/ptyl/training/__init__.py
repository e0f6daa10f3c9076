"""Training: one loop (:class:`Trainer`, :func:`fit`) for every inference strategy -- MAP, SGLD, cyclical SGLD,
SWAG (:class:`Inference`) -- with callbacks (:class:`SWAGCollection` for learning priors and downstream SWAG), the
SGLD optimizer and the cyclical schedule."""

from ptyl.training.callbacks import Callback, ConvergenceStop, EvalCallback, SWAGCollection
from ptyl.training.config import TrainConfig
from ptyl.training.fitting import fit
from ptyl.training.objective import Objective, PriorTerm, log_normalizer, supervised_objective
from ptyl.training.precision import PRECISIONS, MixedPrecision
from ptyl.training.registry import Inference
from ptyl.training.result import FitResult
from ptyl.training.schedules import CyclicalSchedule, cyclical_lr
from ptyl.training.sgld import SGLD
from ptyl.training.strategies.base import Strategy
from ptyl.training.trainer import Trainer

__all__ = [
    "SGLD",
    "Callback",
    "ConvergenceStop",
    "CyclicalSchedule",
    "EvalCallback",
    "FitResult",
    "Inference",
    "MixedPrecision",
    "Objective",
    "PRECISIONS",
    "PriorTerm",
    "SWAGCollection",
    "Strategy",
    "TrainConfig",
    "Trainer",
    "cyclical_lr",
    "fit",
    "log_normalizer",
    "supervised_objective",
]
