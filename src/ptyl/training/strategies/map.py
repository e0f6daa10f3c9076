"""Maximum a posteriori fine-tuning: minimise U(theta) = mean-batch loss - log p(theta) / N with SGD (Nesterov
momentum) or Adam, at a cosine-decaying or constant learning rate. One model, no samples."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ptyl.training.strategies.base import Strategy, make_optimizer, param_groups

if TYPE_CHECKING:
    from ptyl.training.trainer import Trainer

__all__ = ["MAPStrategy"]


class MAPStrategy(Strategy):
    """SGD / Adam on U; ``schedule="cosine"`` decays the learning rate to 0 over the run (Loshchilov & Hutter 2017,
    https://arxiv.org/abs/1608.03983), ``"constant"`` keeps it."""

    def setup(self, trainer: Trainer) -> None:
        c = self.config
        self.optimizer = make_optimizer(param_groups(trainer.model, trainer.head, c.lr, c.head_lr), c)
        if c.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(trainer.total_steps, 1))
