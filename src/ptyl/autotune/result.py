"""What every tuning engine returns, and the few loop pieces the engines share (phase B replaces the loops by the
Trainer; these keep the engines runnable and testable on their own)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptyl.autotune.families import Family
from ptyl.errors import ConfigError, DataError, InvalidValueError
from ptyl.priors.base import Prior

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class TuneResult:
    """Outcome of :func:`~ptyl.autotune.deelbo_tune` or :func:`~ptyl.autotune.marglik_tune`.

    Attributes:
        strategy: ``"de-elbo"`` or ``"marglik"``.
        hyper: the selected hyper-parameters by name (``scale``, ``eps``, ``variance``, ``head_variance``,
            ``scale[<block>]``).
        prior_kwargs: the same as keyword arguments of :func:`ptyl.priors.make_prior` (block: ``scale`` per block).
        history: one dict per epoch (objective terms, hyper-parameters, elapsed seconds; marglik: the log evidence on
            the epochs where it was updated).
        objective: the final value of the objective (DE-ELBO estimate / Laplace log evidence).
        wall_time_s: seconds spent in the engine (the search cost).
        model: the trained model (MAP weights; DE-ELBO: the variational mean).
        family: the prior family at the selected hyper-parameters.
        posterior: DE-ELBO's variational posterior (for BMA), else None.
    """

    strategy: str
    hyper: dict[str, float]
    prior_kwargs: dict[str, Any]
    history: list[dict[str, float]]
    objective: float
    wall_time_s: float
    model: nn.Module
    family: Family
    posterior: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def prior(self) -> Prior:
        """The ptyl prior at the selected hyper-parameters (``family.to_prior()``)."""
        return self.family.to_prior()

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "hyper": self.hyper, "prior_kwargs": self.prior_kwargs,
                "objective": self.objective, "wall_time_s": self.wall_time_s, "history": self.history,
                **self.info}


def check_int(value: int, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def check_rate(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def make_optimizer(params: Iterable, name: str, lr: float) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum 0.9 (the trainer's default)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


def make_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int):
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if name == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


def check_epoch(epoch: int, loss_sum: torch.Tensor, data_ok: list[torch.Tensor], model: nn.Module) -> float:
    """One host sync per epoch: name the first batch with NaN/Inf data, else fail on a non-finite loss or
    parameter."""
    bad = [i for i, ok in enumerate(torch.stack(data_ok).tolist()) if not ok] if data_ok else []
    if bad:
        raise DataError(f"batch {bad[0]} of the data holds NaN/Inf values (epoch {epoch})")
    if not data_ok:
        raise DataError("the data loader yielded no batches")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    finite = torch.stack([loss_sum.isfinite().all(), *(p.detach().isfinite().all() for _, p in named)]).tolist()
    if not all(finite):
        what = "the training loss" if not finite[0] else f"parameter {named[finite.index(False, 1) - 1][0]!r}"
        raise InvalidValueError(f"{what} became non-finite in epoch {epoch}: lower the learning rate")
    return float(loss_sum)


def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        model.to(device)
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ConfigError("the model has no parameters") from None


__all__ = ["TuneResult", "make_optimizer", "make_schedule"]
