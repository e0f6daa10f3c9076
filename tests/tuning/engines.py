"""Run the automatic strategies on a model and a family directly (the tests' reference problems are float64 models
with a Gaussian likelihood): the strategy / callback through :func:`ptyl.training.fit`, as ``tune`` runs them."""

from __future__ import annotations

from torch.utils.data import TensorDataset

from ptyl.training import Callback, TrainConfig, fit
from ptyl.tuning import DEELBOStrategy, MarginalLikelihood


class StopTraining(Exception):
    """Raised by :class:`StopAfter`: an interrupted run."""


class StopAfter(Callback):
    """Interrupt a run at the end of epoch ``epochs + 1``, before its checkpoint: the file holds ``epochs``."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer, record):
        if trainer.epoch == self.epochs:
            raise StopTraining


def config(epochs: int, lr: float, n: int, optimizer: str = "adam", **extra) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, batch_size=n, optimizer=optimizer, schedule="cosine", progress=False,
                       **extra)


def run_deelbo(model, family, x, y, likelihood, *, epochs, lr, optimizer="adam", batch_size=None, **options):
    """(strategy, FitResult) of a DE-ELBO run on ``(x, y)``."""
    cfg = config(epochs, lr, batch_size or len(x), optimizer)
    strategy = DEELBOStrategy(cfg, family, **options)
    result = fit(model, TensorDataset(x, y), None, cfg, strategy=strategy, objective=likelihood, head=None)
    return strategy, result


def run_marglik(model, family, x, y, likelihood, *, epochs, lr, optimizer="adam", batch_size=None, **options):
    """(callback, FitResult) of an online-marglik run on ``(x, y)``."""
    cfg = config(epochs, lr, batch_size or len(x), optimizer)
    callback = MarginalLikelihood(family, likelihood, **options)
    result = fit(model, TensorDataset(x, y), family.to_prior(), cfg, callbacks=[callback], objective=likelihood,
                 head=None)
    return callback, result
