"""Training: one loop (:class:`Trainer`, :func:`fit`) for every inference strategy -- MAP, SGLD, cyclical SGLD,
SWAG (:class:`Inference`) -- with callbacks (:class:`SWAGCollection` for learning priors and downstream SWAG), the
SGLD optimizer and the cyclical schedule."""

from ptyl.training.callbacks import Callback, EvalCallback, SWAGCollection
from ptyl.training.config import TrainConfig
from ptyl.training.fit import fit
from ptyl.training.registry import Inference
from ptyl.training.result import FitResult
from ptyl.training.schedules import CyclicalSchedule, cyclical_lr
from ptyl.training.sgld import SGLD
from ptyl.training.strategies.base import Strategy
from ptyl.training.trainer import Objective, Trainer, supervised_objective

__all__ = [
    "SGLD",
    "Callback",
    "CyclicalSchedule",
    "EvalCallback",
    "FitResult",
    "Inference",
    "Objective",
    "SWAGCollection",
    "Strategy",
    "TrainConfig",
    "Trainer",
    "cyclical_lr",
    "fit",
    "supervised_objective",
]
