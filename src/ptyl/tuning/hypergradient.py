"""The prior's strength learned from a validation pool in one training run: the implicit hypergradient of the pool's
NLL (``tune(..., strategy="hypergradient", val_set=pool)``).

Lorraine, Vicol & Duvenaud, AISTATS 2020, https://arxiv.org/abs/1911.02590 (the mathematics:
:mod:`ptyl.autotune.hypergradient`). MAP training on the n training examples under the prior family's current
values; after a warm-up (``warmup`` of the run's steps) and then every ``every`` steps until ``freeze`` of them:

    g     = grad_theta mean NLL of the pool at theta            (``val_examples`` of it per step, never trained on)
    G     = curvature of the summed training NLL at theta      (K-FAC / diagonal GGN, ``curvature_examples``)
    w     = (G + Sigma(h)^-1)^-1 g                             (``solver_steps`` of CG or Neumann; ``one-step``: lr g)
    dh    = -d_h [w^T Sigma(h)^-1 (theta - mu)]                (closed form in h, autograd)
    log h <- Adam step on dh (``hyper_lr``), clipped to the kind's hard bounds; the loop trains under the new prior

h is log lambda (and log eps where learned) of the learned kinds, per block for ``block``, log v of L2-SP / standard,
and log v_h of the head. The run starts from a broad prior (``start_log10``: default the weak end of the kind's
default range, :class:`~ptyl.priors.PriorRecipe` ``log10_range[1]``) and may go as far as the kind's hard bound
(``recipe.bounds``: the off limit). After ``freeze`` h stays fixed and training finishes at the learned values. The
pool only ever gives h a gradient: no parameter is trained on it.

Optionally (``confirm``) three short trials around the learned strength (it times ``1 / confirm_factor``, 1 and
``confirm_factor``, within the bounds), each continuing from the trained model for ``confirm_fraction`` of the run's
steps, are scored on the pool and the best is kept; their seconds are counted in ``search_cost_s``.

The result's ``path`` holds one entry per hyper step (step, the values, the pool NLL at that step, the
hypergradient ``grad_h``, the solver's iterations and residual) and the confirmation trials; ``objective`` is the
final model's pool NLL (the metric ``val_nll``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Dataset, Subset

from ptyl.autotune.curvature import compute_curvature
from ptyl.autotune.data import checked_batches
from ptyl.autotune.families import CompositeFamily, Family
from ptyl.autotune.hypergradient import (
    SOLVERS,
    CurvatureOperator,
    HessianOperator,
    hypergradient,
    solve_direction,
    validation_gradient,
)
from ptyl.autotune.likelihoods import Likelihood
from ptyl.errors import ConfigError, DataError, DivergenceError
from ptyl.training.callbacks import Callback
from ptyl.training.fit import fit
from ptyl.tuning.automatic import AutomaticRun, AutomaticSettings, AutomaticTuner
from ptyl.tuning.deelbo import LOG_LIMIT, single_process
from ptyl.validation import check_choice, check_fraction, check_int, check_nonnegative_number, check_positive_number

if TYPE_CHECKING:
    from ptyl.training.result import FitResult
    from ptyl.training.trainer import Trainer

__all__ = ["CURVATURES", "HypergradientSettings", "HypergradientTuner", "ValidationHypergradient",
           "check_pool"]

CURVATURES = ("kfac", "diag", "hessian")  # hessian: exact Hessian-vector products (small models, checks)
FISHERS = ("exact", "mc")


@dataclass
class HypergradientSettings(AutomaticSettings):
    """Settings of ``tune(..., strategy="hypergradient")`` (see the module docstring).

    Attributes:
        every: training steps between hyper steps.
        warmup, freeze: fractions of the run's steps: the first hyper step after ``warmup``, the last before
            ``freeze`` (h fixed for the rest).
        hyper_lr: Adam learning rate of the log hyper-parameters (natural-log units per hyper step).
        start_log10: log10 of the strength axis at the start (``None``: the weak end of the kind's default range).
        solver, solver_steps, damping: ``"cg"``, ``"neumann"`` or ``"one-step"``; iterations; a ridge ``delta`` added
            to H, relative to the mean of its diagonal.
        curvature, fisher, mc_samples, curvature_examples: the training curvature (``"kfac"``, ``"diag"``,
            ``"hessian"``), its Fisher (``"exact"`` / ``"mc"`` with ``mc_samples`` draws) and the most training
            examples a curvature pass reads (a fresh random subset per hyper step, scaled up to N; ``None``: all).
        val_examples: pool examples per hyper step (a fresh random subset; ``None``: the whole pool).
        batch_size: batch size of the curvature and pool passes.
        confirm, confirm_fraction, confirm_factor: the optional confirmation trials.
    """

    every: int = 10
    warmup: float = 0.1
    freeze: float = 0.8
    hyper_lr: float = 0.3
    start_log10: float | None = None
    solver: str = "cg"
    solver_steps: int = 20
    damping: float = 1e-4
    curvature: str = "kfac"
    fisher: str = "mc"
    mc_samples: int = 1
    curvature_examples: int | None = 1000
    val_examples: int | None = 500
    batch_size: int = 256
    confirm: bool = False
    confirm_fraction: float = 0.2
    confirm_factor: float = 10.0

    def check(self) -> None:
        """Every setting, checked before training (:class:`~ptyl.errors.ConfigError` naming it)."""
        check_int(self.every, "every", minimum=1)
        check_fraction(self.warmup, "warmup")
        check_fraction(self.freeze, "freeze", closed_right=True)
        if self.freeze <= self.warmup:
            raise ConfigError(f"freeze ({self.freeze}) must come after warmup ({self.warmup})")
        check_positive_number(self.hyper_lr, "hyper_lr")
        check_choice(self.solver, SOLVERS, "solver")
        check_int(self.solver_steps, "solver_steps", minimum=1)
        check_nonnegative_number(self.damping, "damping")
        check_choice(self.curvature, CURVATURES, "curvature")
        check_choice(self.fisher, FISHERS, "fisher")
        check_int(self.mc_samples, "mc_samples", minimum=1)
        for name in ("curvature_examples", "val_examples"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_fraction(self.confirm_fraction, "confirm_fraction", closed_right=True)
        if not self.confirm_factor > 1.0:
            raise ConfigError(f"confirm_factor must be > 1, got {self.confirm_factor!r}")


def _example_key(example: Any) -> bytes:
    """A digest of an example's tensors (inputs and target): equal examples, equal keys."""
    digest = hashlib.sha1()
    for leaf in tree_leaves(example):
        if torch.is_tensor(leaf):
            digest.update(str((leaf.dtype, tuple(leaf.shape))).encode())
            digest.update(leaf.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(leaf).encode())
    return digest.digest()


def check_pool(train_set: Dataset, pool: Dataset) -> None:
    """A validation pool must hold examples, none of them a training example.

    Raises:
        DataError: an empty pool, or pool examples equal to training examples (naming the first of them).
    """
    if len(pool) == 0:
        raise DataError("the validation pool (val_set) is empty: the hypergradient needs held-out examples")
    if pool is train_set:
        raise DataError("the validation pool (val_set) is the training set: pass examples never trained on")
    seen = {_example_key(train_set[i]): i for i in range(len(train_set))}
    shared = [(j, seen[key]) for j in range(len(pool)) if (key := _example_key(pool[j])) in seen]
    if shared:
        j, i = shared[0]
        raise DataError(f"the validation pool overlaps the training set: {len(shared)} of its {len(pool)} examples "
                        f"are training examples (pool example {j} = training example {i}); the pool must never be "
                        "trained on")


def _strength_bounds(family: Family, spec) -> dict[int, tuple[float, float]]:
    """id(log parameter) -> (lo, hi) in natural-log units: the kind's hard bounds for the strength axis of the
    backbone, ``+-LOG_LIMIT`` for the rest."""
    recipe = spec.kind.recipe
    lo, hi = (math.log(10.0) * b for b in recipe.bounds)
    backbone = family.part("backbone") if isinstance(family, CompositeFamily) and \
        "backbone" in family.part_names else None
    axis = {"scale": "log_scale", "variance": "log_variance"}.get(recipe.axis)
    strength = {id(getattr(leaf, axis)) for leaf in (backbone.leaves() if backbone is not None else [])
                if axis is not None and isinstance(getattr(leaf, axis, None), torch.nn.Parameter)}
    return {id(p): ((lo, hi) if id(p) in strength else (-LOG_LIMIT, LOG_LIMIT)) for p in family.parameters()}


def _subset(data: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None or len(data) <= size:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Subset(data, order[:size].sort().values.tolist())


class ValidationHypergradient(Callback):
    """Learn ``family``'s hyper-parameters from a validation pool's NLL while a MAP run trains (see the module
    docstring). The trainer's prior is replaced by the family's at the start and after every hyper step.

    Args:
        family: the prior family over the trained model (:func:`ptyl.autotune.build_family`).
        pool: the validation examples (never trained on).
        likelihood: the model of the data (its curvature); ``loss``: ``loss(model, batch)``, the batch-mean NLL
            the pool is scored with (default: the likelihood).
        settings: a :class:`HypergradientSettings`.
        bounds: ``id(log parameter) -> (lo, hi)`` (default: ``+-LOG_LIMIT``).
        collate_fn: how examples become batches.
    """

    stateful = True

    def __init__(self, family: Family, pool: Dataset, likelihood: Likelihood, settings: HypergradientSettings, *,
                 loss=None, bounds: dict[int, tuple[float, float]] | None = None, collate_fn=None) -> None:
        settings.check()
        hypers = list(family.parameters())
        if not hypers:
            raise ConfigError("the prior family has no learnable hyper-parameter (see build_family(learn=...))")
        self.family, self.pool, self.likelihood, self.settings = family, pool, likelihood, settings
        self.loss = loss or likelihood
        self.bounds = bounds or {}
        self.collate_fn = collate_fn
        self.optimizer = torch.optim.Adam(hypers, lr=settings.hyper_lr)
        self.schedule: torch.optim.lr_scheduler.LRScheduler | None = None
        self._saved_schedule: dict | None = None
        self.path: list[dict[str, Any]] = []
        self.last_val_nll: float | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        single_process(trainer, "the validation hypergradient")
        self.family.to(trainer.device)
        trainer.set_prior(self.family.to_prior())
        total = trainer.total_steps
        self.first = max(1, math.ceil(self.settings.warmup * total))
        self.last = max(self.first, math.floor(self.settings.freeze * total))
        updates = (self.last - self.first) // self.settings.every + 1  # the hyper lr decays to 0 over them
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=updates)
        if self._saved_schedule is not None:  # resumed from a checkpoint
            self.schedule.load_state_dict(self._saved_schedule)

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.step  # steps taken
        if self.first <= step <= self.last and (step - self.first) % self.settings.every == 0:
            self._update(trainer)

    def _loader(self, data: Dataset) -> DataLoader:
        return DataLoader(data, batch_size=self.settings.batch_size, shuffle=False, collate_fn=self.collate_fn)

    def _operator(self, trainer: Trainer, seed: int):
        s, names = self.settings, list(self.family.names)
        train = _subset(trainer.loader.dataset, s.curvature_examples, seed)
        if s.curvature == "hessian":
            return HessianOperator(trainer.model, self._loader(train), self.loss, names)
        curvature = compute_curvature(trainer.model, self._loader(train), self.likelihood, names, method=s.curvature,
                                      fisher=s.fisher, mc_samples=s.mc_samples, seed=seed)
        if len(train) != trainer.num_data:
            curvature = curvature.scaled(trainer.num_data / len(train), trainer.num_data)
        return CurvatureOperator(curvature, names, self.family.shapes)

    def _update(self, trainer: Trainer) -> None:
        s, step = self.settings, trainer.step
        seed = trainer.config.seed * 1_000_003 + step
        pool = _subset(self.pool, s.val_examples, seed)
        grad, val_nll, _ = validation_gradient(trainer.model, self._loader(pool), self.loss, self.family.names)
        if not (math.isfinite(val_nll) and bool(torch.isfinite(grad).all())):
            self._diverged(step, val_nll, "the pool's loss or its gradient")
        step_size = trainer.config.lr / (1.0 - trainer.config.momentum) / trainer.num_data
        operator = None if s.solver == "one-step" else self._operator(trainer, seed)
        direction, info = solve_direction(operator, self.family, grad, solver=s.solver, steps=s.solver_steps,
                                          damping=s.damping, step_size=step_size)
        grads = hypergradient(self.family, trainer.model, direction)
        values = [float(g) for g in grads]
        if not all(math.isfinite(v) for v in values):
            self._diverged(step, val_nll, f"the hypergradient {values}")
        self.optimizer.zero_grad(set_to_none=True)
        hypers = list(self.family.parameters())
        for p, g in zip(hypers, grads):
            p.grad = g.detach().to(p)
        self.optimizer.step()
        self.schedule.step()
        with torch.no_grad():
            for p in hypers:
                lo, hi = self.bounds.get(id(p), (-LOG_LIMIT, LOG_LIMIT))
                p.clamp_(lo, hi)
        trainer.set_prior(self.family.to_prior())
        self.last_val_nll = val_nll
        self.path.append({"step": step, "val_nll": val_nll, **self.family.hyper_values(),
                          "grad_h": values, "solver_iterations": info.iterations,
                          "solver_residual": info.residual})

    def _diverged(self, step: int, val_nll: float, what: str) -> None:
        raise DivergenceError(f"the validation hypergradient is non-finite at step {step}: {what} (pool NLL "
                              f"{val_nll:.4g}, hyper-parameters {self.family.hyper_values()}); the weights diverged "
                              "(lower lr) or the pool gives a non-finite loss")

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        record.update(self.family.hyper_values())
        if self.last_val_nll is not None:
            record["val_nll"] = self.last_val_nll

    def state_dict(self) -> dict[str, Any]:
        return {"family": self.family.state_dict(), "optimizer": self.optimizer.state_dict(), "path": self.path,
                "last_val_nll": self.last_val_nll,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.family.load_state_dict(state["family"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.path, self.last_val_nll = list(state["path"]), state["last_val_nll"]
        self._saved_schedule = state["schedule"]


def pool_nll(model, pool: Dataset, loss, batch_size: int, collate_fn=None) -> float:
    """The mean loss of ``model`` (evaluation mode) over ``pool``."""
    loader = DataLoader(pool, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in checked_batches(loader, device):
                total += float(loss(model, batch)) * len(batch[1])
                count += len(batch[1])
    finally:
        model.train(was_training)
    return total / count


class HypergradientTuner(AutomaticTuner):
    """``tune(..., strategy="hypergradient", val_set=pool)``: a MAP run with the :class:`ValidationHypergradient`
    callback, then the optional confirmation trials (see the module docstring)."""

    Settings = HypergradientSettings
    metric = "val_nll"
    uses_validation = True

    def start_values(self, spec) -> dict[str, float]:
        recipe = spec.kind.recipe
        top = recipe.log10_range[1] if self.settings.start_log10 is None else float(self.settings.start_log10)
        lo, hi = recipe.bounds
        if not lo <= top <= hi:
            raise ConfigError(f"start_log10 {top} lies outside the hard bounds {recipe.bounds} of prior kind "
                              f"{str(spec.kind)!r}")
        return {recipe.axis: 10.0 ** top}

    def check_data(self, train_set, val_set, name: str) -> None:
        self.settings.check()
        super().check_data(train_set, val_set, name)
        check_pool(train_set, val_set)

    def _loss(self, run: AutomaticRun):
        return run.objective or run.likelihood

    def parts(self, run: AutomaticRun) -> tuple[Any, None, list]:
        self.bounds = _strength_bounds(run.family, run.spec)
        self.callback = ValidationHypergradient(run.family, run.val_set, run.likelihood, self.settings,
                                                loss=self._loss(run), bounds=self.bounds,
                                                collate_fn=run.collate_fn)
        return run.family.to_prior(), None, [self.callback]

    def objective_value(self, run: AutomaticRun, result: FitResult) -> float:
        return pool_nll(result.model, run.val_set, self._loss(run), self.settings.batch_size, run.collate_fn)

    def finish(self, run: AutomaticRun, result: FitResult) -> tuple[dict[str, Any], FitResult]:
        run.path.extend(self.callback.path)
        if not self.settings.confirm:
            return run.family.prior_kwargs(), result
        return self._confirm(run, result)

    def _confirm(self, run: AutomaticRun, result: FitResult) -> tuple[dict[str, Any], FitResult]:
        """Three short continuations around the learned strength, scored on the pool; the best is kept."""
        s, loss = self.settings, self._loss(run)
        shift = math.log(s.confirm_factor)
        steps = max(1, math.ceil(s.confirm_fraction * result.steps))
        config = replace(run.config, max_steps=steps, progress=False)
        best = None
        tried: set[tuple[float, ...]] = set()
        for offset in (-shift, 0.0, shift):
            family = copy.deepcopy(run.family)
            with torch.no_grad():
                for p, original in zip(family.parameters(), run.family.parameters()):
                    lo, hi = self.bounds.get(id(original), (-LOG_LIMIT, LOG_LIMIT))
                    if (lo, hi) != (-LOG_LIMIT, LOG_LIMIT):  # the strength axis only
                        p.add_(offset).clamp_(lo, hi)
            key = tuple(round(float(p), 9) for p in family.parameters())
            if key in tried:
                continue
            tried.add(key)
            start = time.perf_counter()
            model = copy.deepcopy(result.model)
            fitted = fit(model, run.train_set, family.to_prior(), config, objective=run.objective,
                         num_data=len(run.train_set), head=run.spec.head, collate_fn=run.collate_fn)
            score = pool_nll(fitted.model, run.val_set, loss, s.batch_size, run.collate_fn)
            seconds = time.perf_counter() - start
            run.extra_cost_s += seconds
            run.path.append({"confirm": True, "offset_log10": offset / math.log(10.0), "val_nll": score,
                             **family.hyper_values(), "steps": fitted.steps, "seconds": seconds})
            if best is None or score < best[0]:
                best = (score, family, fitted)
        _, family, fitted = best
        run.family.load_state_dict(family.state_dict())  # the selection's diagnostic reads run.family
        return family.prior_kwargs(), fitted
