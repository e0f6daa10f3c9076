"""Cyclical SGLD (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020, https://arxiv.org/abs/1902.03932): cosine learning-rate
cycles; the first ``exploration_fraction`` of each cycle is plain SGD (exploring a new mode), the rest samples with
Langevin noise and keeps ``samples_per_cycle`` iterates (:class:`ptyl.training.schedules.CyclicalSchedule`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ptyl.inference.samples import SampleBank
from ptyl.training.schedules import CyclicalSchedule
from ptyl.training.strategies.base import Strategy
from ptyl.training.strategies.sgld import sgld_optimizer

if TYPE_CHECKING:
    from ptyl.training.config import TrainConfig
    from ptyl.training.trainer import Trainer

__all__ = ["CyclicalSGLDStrategy"]


class CyclicalSGLDStrategy(Strategy):
    """SGLD with ``num_cycles`` cosine cycles over the run, ``samples_per_cycle`` samples at the end of each."""

    optimizers = ("sgd",)
    collects_samples = True
    uses_temperature = True

    @classmethod
    def adapt_to_budget(cls, config: TrainConfig, total_steps: int) -> None:
        """Up to 4 cycles, at least 2 epochs each; the samples spread evenly over them."""
        config.num_cycles = min(4, max(1, config.epochs // 2))
        config.samples_per_cycle = max(1, config.num_samples // config.num_cycles)

    def setup(self, trainer: Trainer) -> None:
        c = self.config
        self.optimizer = sgld_optimizer(trainer)
        self.scheduler = CyclicalSchedule(self.optimizer, trainer.total_steps, c.num_cycles, c.exploration_fraction)
        self.scheduler.collection_positions(c.samples_per_cycle)  # a bad samples_per_cycle fails before training
        self.bank = SampleBank()

    def on_step(self, trainer: Trainer) -> None:
        if self.scheduler.should_collect(self.config.samples_per_cycle):
            assert self.bank is not None  # setup made it
            self.bank.add(trainer.model)
        self.scheduler.step()
