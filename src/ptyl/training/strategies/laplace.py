"""Laplace: MAP training (:class:`~ptyl.training.strategies.map.MAPStrategy`), then the post-hoc Laplace
approximation around the trained model under the prior it was trained with, whose linearised predictive
:meth:`FitResult.predict <ptyl.training.FitResult.predict>` returns (:func:`ptyl.inference.laplace`):

    A = H + tau Sigma^-1   (GGN of the summed NLL + tau times the prior's precision),
    p(y | x, D) ~= E_{f ~ N(f(x; theta*), J A^-1 J^T)} softmax(f)   (probit or Monte Carlo)

``laplace_subset`` (``last-layer``: the head's exact GGN; ``all``: every parameter with a prior),
``laplace_curvature`` (``kfac`` / ``diag``, for ``all``), ``laplace_predictive`` (``probit`` / ``mc``) and
``laplace_prior_precision`` (tau, or a tuple of values: a tuning trial chooses among them on its validation data,
:meth:`LaplacePredictive.select <ptyl.inference.LaplacePredictive.select>`; a plain fit by the Laplace evidence) are
:class:`~ptyl.training.TrainConfig` fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.utils.data import DataLoader

from ptyl.errors import ConfigError
from ptyl.inference.laplace_predictive import CURVATURES, PREDICTIVES, SUBSETS, laplace
from ptyl.training.strategies.map import MAPStrategy
from ptyl.validation import check_choice, check_positive_number

if TYPE_CHECKING:
    from ptyl.inference.laplace_predictive import LaplacePredictive
    from ptyl.training.config import TrainConfig
    from ptyl.training.trainer import Trainer

__all__ = ["LaplaceStrategy"]


class LaplaceStrategy(MAPStrategy):
    """MAP training whose :meth:`finalize` builds the Laplace predictive (``self.predictive``)."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.predictive: LaplacePredictive | None = None

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        super().validate(config)
        check_choice(config.laplace_subset, SUBSETS, "laplace_subset")
        check_choice(config.laplace_curvature, CURVATURES, "laplace_curvature")
        check_choice(config.laplace_predictive, PREDICTIVES, "laplace_predictive")
        values = config.laplace_prior_precision
        for value in (values if isinstance(values, (tuple, list)) else [values]):
            check_positive_number(value, "laplace_prior_precision")
        if isinstance(values, (tuple, list)) and not values:
            raise ConfigError("laplace_prior_precision needs at least one value")

    def setup(self, trainer: Trainer) -> None:
        if trainer.prior is None:
            raise ConfigError("inference 'laplace' needs a prior: the posterior precision is the data's curvature "
                              "plus the prior's precision")
        super().setup(trainer)

    def finalize(self, trainer: Trainer) -> None:
        """The Laplace predictive around the trained weights, its GGN summed over the training set (in order)."""
        c = self.config
        extra = {"collate_fn": trainer.collate_fn} if trainer.collate_fn is not None else {}
        loader = DataLoader(trainer.loader.dataset, batch_size=trainer.loader.batch_size, shuffle=False, **extra)
        self.predictive = laplace(trainer.model, loader, trainer.prior, subset=c.laplace_subset,
                                  curvature=c.laplace_curvature, prior_precision=c.laplace_prior_precision,
                                  predictive=c.laplace_predictive, num_data=trainer.num_data, head=trainer.head,
                                  collate_fn=trainer.collate_fn, seed=c.seed + 3)
        return None

