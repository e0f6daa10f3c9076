"""The prior's strength learned from a validation pool: the implicit hypergradient of the pool's NLL
(``tune(..., strategy="hypergradient", val_set=pool)``).

Lorraine, Vicol & Duvenaud, AISTATS 2020, https://arxiv.org/abs/1911.02590 (the mathematics:
:mod:`ptyl.autotune.hypergradient`). At weights theta trained under the prior family's current values h:

    g     = grad_theta mean NLL of the pool at theta            (``val_examples`` of it; never trained on)
    G     = curvature of the summed training NLL at theta      (K-FAC / diagonal GGN, ``curvature_examples``)
    w     = (G + Sigma(h)^-1)^-1 g                             (``solver_steps`` of CG or Neumann; ``one-step``: lr g)
    dh    = -d_h [w^T Sigma(h)^-1 (theta - mu)]                (closed form in h, autograd)

h is log lambda (and log eps where learned) of the learned kinds, per block for ``block``, log v of L2-SP / standard,
and log v_h of the head. Every step stays inside the kind's hard bounds (``recipe.bounds``; the top one is the off
limit). The pool only ever gives h a gradient and picks among trained models: no parameter is trained on it.
Two schedules (``mode``):

``restarts`` (default)  a warm-started continuation driven by the hypergradient. With ``off_first`` the run first
    trains ``first_fraction`` of the budget (a grid trial's steps) at the off limit -- no backbone prior term, the
    grid's off-limit trial -- and scores it on the pool; it then continues from those weights under a broad prior
    (``start_log10``: default the weak end of the kind's default range, ``recipe.log10_range[1]``) for
    ``segment_fraction`` of the budget (without ``off_first``: it trains ``first_fraction`` there from the start).
    Then ``segments`` times: the hypergradient at the trained weights (annealed: the implicit function theorem's
    optimum), one Rprop step on log h (the first of ``hyper_step`` decades; x1.2 while its sign holds, halved when
    it flips: Riedmiller & Braun 1993), and ``segment_fraction`` of the budget continuing from the previous weights
    under the new prior, with its own cosine schedule. Every trained point is scored on the pool; the best -- the
    off limit included -- is the result (its weights and values; ``inf`` for the off limit).
``online``  one training run of the budget; after ``warmup`` of it and every ``every`` steps until ``freeze``, an
    Adam step (``hyper_lr``, cosine-decayed) on the hypergradient at the current, not yet converged, weights
    (:class:`ValidationHypergradient`).

Optionally (``confirm``) three short trials around the selected strength (it times ``1 / confirm_factor``, 1 and
``confirm_factor``, within the bounds), each continuing from the selected model for ``confirm_fraction`` of the
budget, are scored on the pool and the best is kept. Every second of it is in ``search_cost_s``.

The result's ``path`` holds one entry per hyper step (step, the values, the pool NLL there, the hypergradient
``grad_h``, the solver's iterations and residual; restarts: per segment, ``selected`` marking the chosen one) and the
confirmation trials; ``table`` the per-epoch history of every segment; ``objective`` the final model's pool NLL (the
metric ``val_nll``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ptyl.autotune.hypergradient import SOLVERS
from ptyl.errors import ConfigError
from ptyl.tuning.automatic import AutomaticRun
from ptyl.tuning.deelbo import LOG_LIMIT
from ptyl.tuning.hypergradient_step import PoolHypergradient, ValidationHypergradient
from ptyl.tuning.pool import PoolSettings, PoolTuner
from ptyl.tuning.segments import (
    LOG10,
    BestPoint,
    budget,
    continue_training,
    merged_history,
    refit_selected,
    strength_bounds,
)
from ptyl.validation import check_choice, check_fraction, check_int, check_nonnegative_number, check_positive_number

if TYPE_CHECKING:
    from ptyl.training.result import FitResult

__all__ = ["CURVATURES", "MODES", "HypergradientSettings", "HypergradientTuner", "PoolHypergradient",
           "ValidationHypergradient"]

CURVATURES = ("kfac", "diag", "hessian")  # hessian: exact Hessian-vector products (small models, checks)
FISHERS = ("exact", "mc")
MODES = ("restarts", "online")


@dataclass
class HypergradientSettings(PoolSettings):
    """Settings of ``tune(..., strategy="hypergradient")`` (see the module docstring).

    Attributes:
        mode: ``"restarts"`` or ``"online"``.
        off_first: restarts: the first point is the off limit (no backbone prior), scored like the others.
        start_log10: log10 of the strength axis at the first finite point (``None``: the weak end of the kind's
            default range).
        first_fraction, segments, segment_fraction, segment_lr, hyper_step: restarts: the first segment's share of
            the budget, the number of hyper steps, each later segment's share and peak learning rate (a multiple of
            ``config.lr``), the first Rprop step (log10 units).
        every, warmup, freeze, hyper_lr: online: training steps between hyper steps; the shares of the run before
            the first and after the last hyper step; Adam's learning rate (natural-log units per hyper step).
        solver, solver_steps, damping: ``"cg"``, ``"neumann"`` or ``"one-step"``; iterations; a ridge ``delta`` added
            to H, relative to the mean of its diagonal.
        curvature, fisher, mc_samples, curvature_examples: the training curvature (``"kfac"``, ``"diag"``,
            ``"hessian"``), its Fisher (``"exact"`` / ``"mc"`` with ``mc_samples`` draws) and the most training
            examples a curvature pass reads (a fresh random subset per hyper step, scaled up to N; ``None``: all).
        val_examples: pool examples per hyper step (a fresh random subset; ``None``: the whole pool).
        confirm, confirm_fraction, confirm_factor: the optional confirmation trials.
        refit: at the end, train a fresh model at the selected values with the full budget (a grid trial at them).
    """

    mode: str = "restarts"
    off_first: bool = True
    start_log10: float | None = None
    first_fraction: float = 0.4
    segments: int = 3
    segment_fraction: float = 0.2
    segment_lr: float = 0.3
    hyper_step: float = 1.0
    every: int = 10
    warmup: float = 0.1
    freeze: float = 0.8
    hyper_lr: float = 0.3
    solver: str = "cg"
    solver_steps: int = 20
    damping: float = 1e-4
    curvature: str = "kfac"
    fisher: str = "mc"
    mc_samples: int = 1
    curvature_examples: int | None = 1000
    val_examples: int | None = None
    confirm: bool = False
    confirm_fraction: float = 0.2
    confirm_factor: float = 10.0
    refit: bool = False

    def check(self) -> None:
        """Every setting, checked before training (:class:`~ptyl.errors.ConfigError` naming it)."""
        super().check()
        check_choice(self.mode, MODES, "hypergradient mode")
        for name in ("first_fraction", "segment_fraction", "confirm_fraction"):
            if not 0.0 < check_fraction(getattr(self, name), name, closed_right=True):
                raise ConfigError(f"{name} must be > 0")
        check_int(self.segments, "segments", minimum=1)
        check_positive_number(self.hyper_step, "hyper_step")
        check_positive_number(self.segment_lr, "segment_lr")
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
        if not self.confirm_factor > 1.0:
            raise ConfigError(f"confirm_factor must be > 1, got {self.confirm_factor!r}")


class HypergradientTuner(PoolTuner):
    """``tune(..., strategy="hypergradient", val_set=pool)`` (see the module docstring)."""

    Settings = HypergradientSettings

    def start_values(self, spec) -> dict[str, float]:
        recipe = spec.kind.recipe
        top = recipe.log10_range[1] if self.settings.start_log10 is None else float(self.settings.start_log10)
        lo, hi = recipe.bounds
        if not lo <= top <= hi:
            raise ConfigError(f"start_log10 {top} lies outside the hard bounds {recipe.bounds} of prior kind "
                              f"{str(spec.kind)!r}")
        return {recipe.axis: 10.0 ** top}

    def learned(self, spec) -> tuple[str, ...]:
        """``settings.learn``, else the strength axis alone (the grid's axis; ``learn=("scale", "eps",
        "head_variance")`` learns the rest too)."""
        return tuple(self.settings.learn) if self.settings.learn is not None else (spec.kind.recipe.axis,)

    def parts(self, run: AutomaticRun) -> tuple[Any, None, list]:
        self.bounds = strength_bounds(run.family, run.spec, LOG_LIMIT)
        self.hyper = PoolHypergradient(run.family, run.val_set, run.likelihood, self.settings, loss=self._loss(run),
                                   bounds=self.bounds, collate_fn=run.collate_fn)
        self.budget, self.full_config = budget(run.config, len(run.train_set)), run.config
        if self.settings.mode == "online":
            self.callback = ValidationHypergradient(self.hyper)
            return run.family.to_prior(), None, [self.callback]
        run.off = self.settings.off_first
        run.config = replace(run.config, max_steps=max(1, round(self.settings.first_fraction * self.budget)))
        return run.prior(), None, []

    def objective_value(self, run: AutomaticRun, result: FitResult) -> float:
        return self.score_pool(run, result.model)

    def finish(self, run: AutomaticRun, result: FitResult) -> tuple[dict[str, Any], FitResult]:
        if self.settings.mode == "online":
            run.path.extend(self.callback.path)
        else:
            result = self._restarts(run, result)
        if self.settings.confirm:
            result = self._confirm(run, result)
        if self.settings.refit:
            result = refit_selected(run, result, self.full_config, self._loss(run), self.settings.batch_size)
        return run.selected(), result

    def _continue(self, run: AutomaticRun, model, fraction: float, seed: int) -> FitResult:
        return continue_training(run, model, round(fraction * self.budget), seed=seed,
                                 lr_factor=self.settings.segment_lr)

    def _restarts(self, run: AutomaticRun, result: FitResult) -> FitResult:
        """The ``restarts`` schedule after its first segment: (the off limit's score and the broad prior's
        segment,) then hyper step, continue, score; the best point is restored."""
        s, model, n = self.settings, result.model, len(run.train_set)
        optimizer = torch.optim.Rprop(run.family.parameters(), lr=s.hyper_step * LOG10, etas=(0.5, 1.2),
                                      step_sizes=(1e-3 * LOG10, 2.0 * LOG10))
        results, values, steps, best = [result], [run.selected()], result.steps, BestPoint()
        if run.off:  # the off limit: scored, then the path goes on from its weights under the broad prior
            start = time.perf_counter()
            score = self.score_pool(run, model, self.hyper.loss)
            best.offer(-1, score, model, run)
            run.path.append({"segment": -1, "step": steps, "val_nll": score, **run.selected(),
                             "seconds": time.perf_counter() - start})
            run.off = False
            results.append(self._continue(run, model, s.segment_fraction, run.config.seed * 1_000_003 - 1))
            values.append(run.selected())
            steps += results[-1].steps
        for k in range(s.segments + 1):
            start = time.perf_counter()
            seed = run.config.seed * 1_000_003 + k
            if k < s.segments:
                grads, val_nll, info = self.hyper(model, run.train_set, n, step=steps, seed=seed,
                                                  step_size=run.config.lr / (1.0 - run.config.momentum) / n)
                entry = self.hyper.entry(steps, val_nll, grads, info)
            else:  # the last point: scored only
                val_nll = self.score_pool(run, model, self.hyper.loss)
                entry = {"step": steps, "val_nll": val_nll, **run.selected()}
            best.offer(k, val_nll, model, run)
            if k < s.segments:
                self.hyper.apply(optimizer, grads)
                results.append(self._continue(run, model, s.segment_fraction, seed))
                values.append(run.selected())
                steps += results[-1].steps
            run.path.append({"segment": k, **entry, "seconds": time.perf_counter() - start})
        best.restore(model, run)
        for entry in run.path:
            entry["selected"] = entry.get("segment") == best.index
        return replace(results[-1], model=model, history=merged_history(results, values), steps=steps)

    def _confirm(self, run: AutomaticRun, result: FitResult) -> FitResult:
        """Three short continuations around the selected strength, scored on the pool; the best is kept."""
        s, loss = self.settings, self._loss(run)
        if run.off:  # no strength around the off limit to confirm
            run.path.append({"confirm": True, "skipped": "the off limit was selected"})
            return result
        selected = copy.deepcopy(run.family.state_dict())
        best, tried = None, set()
        for offset in (-math.log(s.confirm_factor), 0.0, math.log(s.confirm_factor)):
            run.family.load_state_dict(selected)
            with torch.no_grad():
                for p in run.family.parameters():
                    lo, hi = self.bounds[id(p)]
                    if (lo, hi) != (-LOG_LIMIT, LOG_LIMIT):  # the strength axis only
                        p.add_(offset).clamp_(lo, hi)
            key = tuple(round(float(p), 9) for p in run.family.parameters())
            if key in tried:
                continue
            tried.add(key)
            start = time.perf_counter()
            fitted = self._continue(run, copy.deepcopy(result.model), s.confirm_fraction, run.config.seed)
            score = self.score_pool(run, fitted.model, loss)
            run.path.append({"confirm": True, "offset_log10": offset / LOG10, "val_nll": score,
                             **run.selected(), "steps": fitted.steps,
                             "seconds": time.perf_counter() - start})
            if best is None or score < best[0]:
                best = (score, copy.deepcopy(run.family.state_dict()), fitted)
        run.family.load_state_dict(best[1])
        history = result.history + [{**r, "epoch": len(result.history) + r["epoch"], "confirm": True}
                                    for r in best[2].history]
        return replace(best[2], history=history, steps=result.steps + best[2].steps)
