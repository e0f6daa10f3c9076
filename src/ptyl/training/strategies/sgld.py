"""Stochastic gradient Langevin dynamics (Welling & Teh, ICML 2011): a step with injected Gaussian noise; after
burn-in, ``num_samples`` evenly spaced iterates are kept for Bayesian model averaging.

    theta <- theta - lr_t * grad U(theta) + sqrt(2 * lr_t * T / N) * xi,     xi ~ N(0, I)

(the update of :class:`ptyl.training.sgld.SGLD`; ``temperature`` T < 1 samples a cold posterior). The step ``lr_t``
decays from ``lr`` to ``sample_lr`` (default ``lr / 100``) over the burn-in (half a cosine:
:func:`ptyl.training.schedules.burn_in_factor`) and stays there while samples are kept: the iterates follow
``exp(-N U / T)`` only for a step small against the curvature (Welling & Teh's decreasing steps; Teh, Thiery &
Vollmer 2016, https://arxiv.org/abs/1409.0578, for the bias of a fixed step), while a large first step reaches the
posterior's bulk within the budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ptyl.inference.samples import SampleBank
from ptyl.training.config import SAMPLE_LR_FACTOR
from ptyl.training.schedules import burn_in_factor
from ptyl.training.sgld import SGLD
from ptyl.training.strategies.base import Strategy, param_groups

if TYPE_CHECKING:
    from ptyl.training.trainer import Trainer

__all__ = ["SGLDStrategy", "sgld_optimizer"]


def sgld_optimizer(trainer: Trainer) -> SGLD:
    """The SGLD sampler over ``trainer``'s parameter groups; noise from a generator on the model's device (seeded
    ``seed + 1``; a CPU generator would copy its noise to the GPU every step)."""
    c = trainer.config
    generator = torch.Generator(device=trainer.device).manual_seed(c.seed + 1)
    return SGLD(param_groups(trainer.model, trainer.head, c.lr, c.head_lr), lr=c.lr, num_data=trainer.num_data,
                temperature=c.temperature, momentum=c.momentum, generator=generator)


class SGLDStrategy(Strategy):
    """SGLD: the step decays from ``lr`` to ``sample_lr`` over ``burn_in_fraction`` of the run, then keeps
    ``num_samples`` iterates evenly spaced over the rest at that step."""

    optimizers = ("sgd",)
    collects_samples = True
    uses_temperature = True

    def setup(self, trainer: Trainer) -> None:
        self.optimizer = sgld_optimizer(trainer)
        self.bank = SampleBank()
        c, total = self.config, trainer.total_steps
        start = int(c.burn_in_fraction * total)
        span = total - start
        n = min(c.num_samples, span)
        self.collect_at = {start + (i + 1) * span // n - 1 for i in range(n)}
        ratio = c.sample_lr / c.lr if c.sample_lr is not None else SAMPLE_LR_FACTOR
        burn = max(start, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda step: burn_in_factor(step, burn, ratio))

    def on_step(self, trainer: Trainer) -> None:
        if trainer.step in self.collect_at:
            assert self.bank is not None  # setup made it
            self.bank.add(trainer.model)
        self.scheduler.step()
