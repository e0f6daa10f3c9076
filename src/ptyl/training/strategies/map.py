"""Maximum a posteriori fine-tuning: minimise U(theta) = mean-batch loss - log p(theta) / N with SGD (Nesterov
momentum) or Adam, at a cosine-decaying or constant learning rate. One model, no samples."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ptyl.training.strategies.base import Strategy, make_optimizer, param_groups

if TYPE_CHECKING:
    from ptyl.training.trainer import Trainer

__all__ = ["MAPStrategy"]


class MAPStrategy(Strategy):
    """SGD / Adam on U; ``schedule="cosine"`` decays the learning rate to 0 over the budget (Loshchilov & Hutter 2017,
    https://arxiv.org/abs/1608.03983), ``"constant"`` keeps it. Under the convergence rule
    (``TrainConfig.stop_loss`` / ``stop_plateau``) the run ends early: once the rule is met, the learning rate
    anneals from its current value to 0 (half a cosine) over ``anneal_fraction`` of the steps taken so far
    (:meth:`begin_anneal`), so every run ends annealed whenever it stops. With SGD the prior's separable part is a
    proximal step."""

    proximal = True
    early_stopping = True

    def setup(self, trainer: Trainer) -> None:
        c = self.config
        self.optimizer = make_optimizer(param_groups(trainer.model, trainer.head, c.lr, c.head_lr), c)
        self.total = max(trainer.total_steps, 1)
        self.anneal: tuple[int, int, float] | None = None  # (start step, length, factor at the start)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._factor)

    def _base(self, step: int) -> float:
        if self.config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))
        return 1.0

    def _factor(self, step: int) -> float:
        if self.anneal is None:
            return self._base(step)
        start, length, factor = self.anneal
        progress = min(max(step - start, 0) / max(length, 1), 1.0)
        return factor * 0.5 * (1.0 + math.cos(math.pi * progress))

    def begin_anneal(self, trainer: Trainer, steps: int) -> None:
        """From the next step on, decay the learning rate from its current value to 0 over ``steps`` steps."""
        self.anneal = (trainer.step, int(steps), self._base(trainer.step))  # continuous: same lr at the start

    def state_dict(self) -> dict:
        return {**super().state_dict(), "anneal": self.anneal}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.anneal = tuple(state["anneal"]) if state.get("anneal") is not None else None
