"""The two pieces of :mod:`ptyl.tuning.hypergradient` that touch the training: :class:`PoolHypergradient`, the
validation pool's implicit hypergradient at a model's current weights (both schedules), and
:class:`ValidationHypergradient`, the ``online`` schedule's callback.

Lorraine, Vicol & Duvenaud, AISTATS 2020, https://arxiv.org/abs/1911.02590 (the mathematics:
:mod:`ptyl.autotune.hypergradient`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from ptyl.autotune.curvature import compute_curvature
from ptyl.autotune.families import Family
from ptyl.autotune.hypergradient import (
    CurvatureOperator,
    HessianOperator,
    SolveInfo,
    hypergradient,
    solve_direction,
    validation_gradient,
)
from ptyl.autotune.likelihoods import Likelihood
from ptyl.errors import ConfigError, DivergenceError
from ptyl.training.callbacks import Callback
from ptyl.tuning.deelbo import LOG_LIMIT, single_process
from ptyl.tuning.pool import random_subset

if TYPE_CHECKING:
    from ptyl.training.trainer import Trainer
    from ptyl.tuning.hypergradient import HypergradientSettings

__all__ = ["PoolHypergradient", "ValidationHypergradient"]


class PoolHypergradient:
    """The hypergradient of the module docstring at a model's current weights (shared by both schedules)."""

    def __init__(self, family: Family, pool: Dataset, likelihood: Likelihood, settings: HypergradientSettings, *,
                 loss=None, bounds: dict[int, tuple[float, float]] | None = None, collate_fn=None) -> None:
        if not list(family.parameters()):
            raise ConfigError("the prior family has no learnable hyper-parameter (see build_family(learn=...))")
        self.family, self.pool, self.likelihood, self.settings = family, pool, likelihood, settings
        self.loss = loss or likelihood
        self.bounds, self.collate_fn = bounds or {}, collate_fn

    def _loader(self, data: Dataset) -> DataLoader:
        return DataLoader(data, batch_size=self.settings.batch_size, shuffle=False, collate_fn=self.collate_fn)

    def _operator(self, model, train: Dataset, num_data: int, seed: int):
        s, names = self.settings, list(self.family.names)
        train = random_subset(train, s.curvature_examples, seed)
        if s.curvature == "hessian":
            return HessianOperator(model, self._loader(train), self.loss, names)
        curvature = compute_curvature(model, self._loader(train), self.likelihood, names, method=s.curvature,
                                      fisher=s.fisher, mc_samples=s.mc_samples, seed=seed)
        if len(train) != num_data:
            curvature = curvature.scaled(num_data / len(train), num_data)
        return CurvatureOperator(curvature, names, self.family.shapes)

    def __call__(self, model, train: Dataset, num_data: int, *, step: int, seed: int, step_size: float
                 ) -> tuple[list[torch.Tensor], float, SolveInfo]:
        """(dL_val/dh per hyper-parameter, the pool's mean loss, the solve's info) at ``model``'s weights.

        Raises:
            DivergenceError: a non-finite pool loss, pool gradient or hypergradient (naming ``step``).
        """
        s = self.settings
        pool = random_subset(self.pool, s.val_examples, seed)
        grad, val_nll, _ = validation_gradient(model, self._loader(pool), self.loss, self.family.names)
        if not (math.isfinite(val_nll) and bool(torch.isfinite(grad).all())):
            self._diverged(step, val_nll, "the pool's loss or its gradient")
        operator = None if s.solver == "one-step" else self._operator(model, train, num_data, seed)
        direction, info = solve_direction(operator, self.family, grad, solver=s.solver, steps=s.solver_steps,
                                          damping=s.damping, step_size=step_size)
        grads = hypergradient(self.family, model, direction)
        if not all(math.isfinite(float(g)) for g in grads):
            self._diverged(step, val_nll, f"the hypergradient {[float(g) for g in grads]}")
        return grads, val_nll, info

    def _diverged(self, step: int, val_nll: float, what: str) -> None:
        raise DivergenceError(f"the validation hypergradient is non-finite at step {step}: {what} (pool NLL "
                              f"{val_nll:.4g}, hyper-parameters {self.family.hyper_values()}); the weights diverged "
                              "(lower lr) or the pool gives a non-finite loss")

    def apply(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
        """One ``optimizer`` step of the family's log hyper-parameters on ``grads``, then back inside the bounds."""
        optimizer.zero_grad(set_to_none=True)
        hypers = list(self.family.parameters())
        for p, g in zip(hypers, grads, strict=True):
            p.grad = g.detach().to(p)
        optimizer.step()
        with torch.no_grad():
            for p in hypers:
                p.clamp_(*self.bounds.get(id(p), (-LOG_LIMIT, LOG_LIMIT)))

    def entry(self, step: int, val_nll: float, grads: list[torch.Tensor], info: SolveInfo) -> dict[str, Any]:
        """The path entry of a hyper step taken at ``step`` (the values before it)."""
        return {"step": step, "val_nll": val_nll, **self.family.prior_kwargs(), "grad_h": [float(g) for g in grads],
                "solver_iterations": info.iterations, "solver_residual": info.residual}


class ValidationHypergradient(Callback):
    """The ``online`` schedule: learn ``family``'s hyper-parameters from a validation pool's NLL while one MAP run
    trains (see the module docstring). The trainer's prior is replaced by the family's at the start and after every
    hyper step; the state (values, Adam, its schedule, the path) is checkpointed.

    Args:
        hyper: the :class:`PoolHypergradient` (family, pool, likelihood, settings, bounds).
    """

    stateful = True

    def __init__(self, hyper: PoolHypergradient) -> None:
        self.hyper, self.settings = hyper, hyper.settings
        self.optimizer = torch.optim.Adam(hyper.family.parameters(), lr=self.settings.hyper_lr)
        self.schedule: torch.optim.lr_scheduler.LRScheduler | None = None
        self._saved_schedule: dict | None = None
        self.path: list[dict[str, Any]] = []
        self.last_val_nll: float | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        single_process(trainer, "the validation hypergradient")
        self.hyper.family.to(trainer.device)
        trainer.set_prior(self.hyper.family.to_prior())
        total = trainer.total_steps
        self.first = max(1, math.ceil(self.settings.warmup * total))
        self.last = max(self.first, math.floor(self.settings.freeze * total))
        updates = (self.last - self.first) // self.settings.every + 1  # the hyper lr decays to 0 over them
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=updates)
        if self._saved_schedule is not None:  # resumed from a checkpoint
            self.schedule.load_state_dict(self._saved_schedule)

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.step  # steps taken
        if not (self.first <= step <= self.last and (step - self.first) % self.settings.every == 0):
            return
        config = trainer.config
        grads, val_nll, info = self.hyper(trainer.model, trainer.loader.dataset, trainer.num_data, step=step,
                                          seed=config.seed * 1_000_003 + step,
                                          step_size=config.lr / (1.0 - config.momentum) / trainer.num_data)
        self.path.append(self.hyper.entry(step, val_nll, grads, info))
        self.hyper.apply(self.optimizer, grads)
        self.schedule.step()
        trainer.set_prior(self.hyper.family.to_prior())
        self.last_val_nll = val_nll

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        record.update(self.hyper.family.hyper_values())
        if self.last_val_nll is not None:
            record["val_nll"] = self.last_val_nll

    def state_dict(self) -> dict[str, Any]:
        return {"family": self.hyper.family.state_dict(), "optimizer": self.optimizer.state_dict(),
                "path": self.path, "last_val_nll": self.last_val_nll,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hyper.family.load_state_dict(state["family"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.path, self.last_val_nll = list(state["path"]), state["last_val_nll"]
        self._saved_schedule = state["schedule"]
