"""The interface between the training loop and a way of training: a :class:`Strategy` owns the optimizer and the
learning-rate schedule, decides what to keep after each step and epoch, and returns it at the end.

The loop (:class:`ptyl.training.Trainer`) calls, for every batch::

    strategy.optimizer.zero_grad(); loss.backward(); strategy.optimizer.step()
    strategy.on_step(trainer)        # collect a sample, advance the schedule
    trainer.step += 1; callbacks.on_step_end(trainer)

then ``strategy.on_epoch(trainer)`` after each epoch and ``strategy.finalize(trainer)`` once at the end (it returns
a :class:`~ptyl.inference.SampleBank` for sampling methods, ``None`` for one model). A new strategy subclasses
:class:`Strategy`, implements :meth:`setup` (and whichever hooks it needs), and is registered with one line in
:mod:`ptyl.training.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ptyl.errors import ConfigError
from ptyl.inference.samples import SampleBank
from ptyl.params import as_name_list, name_matches, named_parameters

if TYPE_CHECKING:
    from ptyl.training.callbacks import Callback
    from ptyl.training.config import TrainConfig
    from ptyl.training.trainer import Trainer

__all__ = ["Strategy", "make_optimizer", "param_groups"]


class Strategy:
    """Base class of the inference strategies (see the module docstring).

    Class attributes say what a strategy accepts and produces: ``optimizers`` and ``schedules`` (values of
    :class:`TrainConfig` fields it supports), ``collects_samples`` (predicts by Bayesian model averaging),
    ``uses_temperature`` (``TrainConfig.temperature`` matters, so tuning may search it), ``proximal`` (its SGD
    update can take the prior's separable part as a proximal step, ``TrainConfig.prior_step``) and
    ``early_stopping`` (the convergence rule of ``TrainConfig.stop_loss`` / ``stop_plateau`` applies; samplers run
    their whole budget).

    Args:
        config: the run's :class:`~ptyl.training.TrainConfig`.
    """

    optimizers: ClassVar[tuple[str, ...]] = ("sgd", "adam")
    schedules: ClassVar[tuple[str, ...]] = ("cosine", "constant")
    collects_samples: ClassVar[bool] = False
    uses_temperature: ClassVar[bool] = False
    proximal: ClassVar[bool] = False
    early_stopping: ClassVar[bool] = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.bank: SampleBank | None = None

    # --- configuration ------------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """Raise :class:`ConfigError` if ``config`` asks for something this strategy does not do."""
        name = config.inference
        if config.optimizer not in cls.optimizers:
            raise ConfigError(f"inference {str(name)!r} does not use optimizer {config.optimizer!r} "
                              f"(it supports {cls.optimizers})")
        if config.schedule not in cls.schedules:
            raise ConfigError(f"schedule {config.schedule!r} is not for inference {str(name)!r} "
                              f"(it supports {cls.schedules})")
        if config.prior_step == "proximal" and not (cls.proximal and config.optimizer == "sgd"):
            raise ConfigError(f"prior_step 'proximal' needs an SGD strategy that supports it (map, swag with "
                              f"optimizer 'sgd'), not inference {str(name)!r} with optimizer {config.optimizer!r}")

    @classmethod
    def uses_proximal_step(cls, config: TrainConfig) -> bool:
        """Whether the prior's separable part is applied as a proximal step.

        Args:
            config: the run's settings (``prior_step``: ``auto`` means yes where supported; ``optimizer``).

        Returns:
            ``True`` for ``proximal`` / ``auto`` with a strategy that supports it and SGD.
        """
        return config.prior_step != "gradient" and cls.proximal and config.optimizer == "sgd"

    @classmethod
    def adapt_to_budget(cls, config: TrainConfig, total_steps: int) -> None:
        """Set the strategy's own fields of a config for a fixed step budget (used by
        :func:`ptyl.pipeline.train_config`, which gives every method the same budget). Default: nothing.

        Args:
            config: changed in place (its ``epochs`` are already set).
            total_steps: optimizer steps of the run.
        """

    # --- the hooks the loop calls ---------------------------------------------------------------------------------
    def data_loss(self, trainer: Trainer, batch: Any) -> torch.Tensor:
        """The data term of one batch, which the loop back-propagates (under autocast); default
        ``objective(model, batch)``.

        Args:
            trainer: the running :class:`~ptyl.training.Trainer` (its ``net`` and ``objective``).
            batch: the batch, on the device.

        Returns:
            A 0-dim tensor.
        """
        return trainer.objective(trainer.net, batch)

    def add_prior_grad(self, trainer: Trainer) -> torch.Tensor:
        """Add the prior term's gradient into ``.grad`` after the data term's backward; default ``grad(penalty) / N``
        through :meth:`PriorTerm.add_grad_ <ptyl.training.PriorTerm.add_grad_>` (fused kernels, full precision).

        Args:
            trainer: the running :class:`~ptyl.training.Trainer` (its ``model``, ``prior``, ``prior_term``).

        Returns:
            The detached prior term of the step (the loop logs it; no host synchronisation).
        """
        if trainer.prior is None:
            return trainer._zero
        return trainer.prior_term.add_grad_(trainer.model)

    def setup(self, trainer: Trainer) -> None:  # pragma: no cover - abstract
        """Build ``self.optimizer`` (and ``self.scheduler`` / ``self.bank``) for ``trainer``'s model; called once,
        before any step and before a checkpoint is restored."""
        raise NotImplementedError

    def callbacks(self) -> list[Callback]:
        """Callbacks the strategy needs the loop to run; called after :meth:`setup`.

        Returns:
            The callbacks (e.g. SWAG collection), run before the user's.
        """
        return []

    def on_step(self, trainer: Trainer) -> None:
        """After ``optimizer.step()`` of ``trainer``: advance the schedule (``trainer.step`` is the index of the
        step just taken)."""
        if self.scheduler is not None:
            self.scheduler.step()

    def on_epoch(self, trainer: Trainer) -> None:
        """After the last step of an epoch of ``trainer`` (``trainer.epoch`` is its 0-based index)."""

    def finalize(self, trainer: Trainer) -> SampleBank | None:
        """After the last epoch of ``trainer``: the samples to average over.

        Returns:
            A :class:`~ptyl.inference.SampleBank`, or ``None`` to predict with the trained model.
        """
        return self.bank

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs.

        Returns:
            ``{"optimizer", "scheduler", "bank"}`` state dicts (``None`` where there is none).
        """
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "bank": self.bank.state_dict() if self.bank is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state``, what :meth:`state_dict` returned."""
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])


def param_groups(model: nn.Module, head: str | Sequence[str] | None, lr: float,
                 head_lr: float | None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``backbone`` at ``lr`` and ``head`` (the modules named ``head``) at
    ``head_lr or lr``; frozen parameters are left out."""
    heads = as_name_list(head)
    head_params: list[nn.Parameter] = []
    body: list[nn.Parameter] = []
    for name, p in named_parameters(model).items():
        if not p.requires_grad:
            continue
        (head_params if any(name_matches(name, h) for h in heads) else body).append(p)
    groups = [{"params": body, "lr": lr, "name": "backbone"}]
    if head_params:
        groups.append({"params": head_params, "lr": head_lr or lr, "name": "head"})
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum, or Adam, as ``config.optimizer`` says."""
    if config.optimizer == "adam":  # same objective, adaptive steps (dense prediction trains poorly with SGD)
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)
