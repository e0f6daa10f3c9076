"""Downstream SWAG (Maddox, Izmailov, Garipov, Vetrov & Wilson, NeurIPS 2019, https://arxiv.org/abs/1902.02476):
SGD (or Adam), then a constant (or per-epoch cyclical) learning rate while :class:`~ptyl.training.SWAGCollection`
fits a Gaussian to the iterates; ``num_samples`` models drawn from it are averaged at prediction time.

With a collector given (``SWAGStrategy(config, collector=...)``) the strategy only fills it: that is the source stage
(:func:`ptyl.pipeline.learn_prior`), which turns the collector into the prior.

Learning rate: cosine from ``lr`` to ``swag_lr`` during burn-in, then constant ``swag_lr`` while collecting
(``schedule="cyclical"``: after burn-in, one cosine cycle from ``swag_lr`` to ~0 per epoch, snapshots at cycle ends).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ptyl.errors import ConfigError
from ptyl.inference.samples import SampleBank
from ptyl.posterior.swag import SWAGCollector
from ptyl.training.callbacks import Callback, SWAGCollection
from ptyl.training.schedules import burn_in_factor
from ptyl.training.strategies.base import Strategy, make_optimizer, param_groups
from ptyl.validation import check_int

if TYPE_CHECKING:
    from ptyl.training.config import TrainConfig
    from ptyl.training.trainer import Trainer

__all__ = ["SWAGStrategy"]


class SWAGStrategy(Strategy):
    """SWAG collection after burn-in; draws ``num_samples`` models unless an external ``collector`` is filled.

    Args:
        config: the run's settings (``swag_rank``, ``swag_lr``, ``swag_collect_every``, ``burn_in_fraction``).
        collector: fill this :class:`~ptyl.posterior.SWAGCollector` (source stage) instead of a fresh one over every
            trainable parameter; then no samples are drawn.
    """

    schedules = ("cosine", "constant", "cyclical")
    collects_samples = True
    proximal = True

    def __init__(self, config: TrainConfig, collector: SWAGCollector | None = None) -> None:
        super().__init__(config)
        self.collector = collector
        self.draw_samples = collector is None
        self.collection: SWAGCollection | None = None

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        super().validate(config)
        check_int(config.swag_rank, "swag_rank", minimum=0)
        if config.swag_collect_every is not None:
            check_int(config.swag_collect_every, "swag_collect_every", minimum=1)

    @classmethod
    def adapt_to_budget(cls, config: TrainConfig, total_steps: int) -> None:
        """Constant learning rate; about ``2 * swag_rank`` snapshots spread over the second half of the run."""
        config.burn_in_fraction = 0.5
        config.schedule = "constant"
        config.swag_collect_every = max(1, (total_steps // 2) // (2 * config.swag_rank))

    def setup(self, trainer: Trainer) -> None:
        c = self.config
        self.optimizer = make_optimizer(param_groups(trainer.model, trainer.head, c.lr, c.head_lr), c)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor(trainer))
        if self.collector is None:
            self.collector = SWAGCollector(trainer.model, rank=c.swag_rank)
        self.collection = SWAGCollection(self.collector, every_steps=c.swag_collect_every,
                                         start_step=int(c.burn_in_fraction * trainer.total_steps),
                                         start_epoch=int(c.burn_in_fraction * c.epochs))
        if self.draw_samples:
            self.bank = SampleBank()
            if self.collection.snapshots_due(trainer.total_steps, c.epochs) < 2:
                raise ConfigError("downstream SWAG would collect fewer than 2 snapshots: use more epochs, a lower "
                                  "burn_in_fraction or a smaller swag_collect_every")

    def _lr_factor(self, trainer: Trainer):
        c, per_epoch = self.config, trainer.steps_per_epoch
        burn = max(int(c.burn_in_fraction * trainer.total_steps), 1)
        ratio = (c.swag_lr or c.lr) / c.lr

        def factor(step: int) -> float:
            if step >= burn and c.schedule == "cyclical":
                pos = (step % per_epoch + 1) / per_epoch
                return ratio * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * pos)))
            return burn_in_factor(step, burn, ratio)

        return factor

    def callbacks(self) -> list[Callback]:
        return [self.collection]

    def finalize(self, trainer: Trainer) -> SampleBank | None:
        """Draw ``num_samples`` models from the SWAG posterior (generator seeded ``seed + 2``); the trained
        weights are restored afterwards."""
        if not self.draw_samples:
            return None
        model = trainer.model
        last_iterate = {k: v.clone() for k, v in model.state_dict().items()}
        generator = torch.Generator(device=trainer.device).manual_seed(self.config.seed + 2)
        self.bank.clear()
        for _ in range(self.config.num_samples):
            self.collector.sample_into(model, generator=generator)
            self.bank.add(model)
        model.load_state_dict(last_iterate)
        return self.bank
