"""The prior's strength chosen on a validation pool along one warm-started continuation path, from the off limit to
strong (``tune(..., strategy="continuation", val_set=pool)``).

The path visits the strength axis (lambda of the learned kinds, one for every block of ``block``; the variance of
L2-SP / standard) from weak to strong, in log10 units (:func:`ladder`):

    off limit (no backbone prior term: plain fine-tuning, the grid's off-limit trial)
    -> hi + coarse_above, hi + coarse_above - coarse_step, ... down to hi   (``coarse_step`` decades apart)
    -> hi - step_decades, ... down to lo                                    (``step_decades`` apart)

with ``[lo, hi]`` the kind's default range (``recipe.log10_range``), all inside its hard bounds (``recipe.bounds``).
The first point trains ``first_fraction`` of the budget (a grid trial's steps) from the start; every later one
continues from the previous point's weights for ``segment_fraction`` of it, with a fresh schedule peaking at
``segment_lr`` times the learning rate:

    theta_k = argmin U_k(theta) = -(1/N) sum_n log p(y_n | x_n, theta) - (1/N) log p_{h_k}(theta),
              approached from theta_{k-1}   (warm start: Allgower & Georg, Numerical Continuation Methods, 1990)
    score_k = mean NLL of the pool at theta_k   (never trained on)

The walk stops after ``patience`` points in a row worse than the best so far, or at ``lo`` -- unless ``lo`` itself
is the best so far: then it goes on, ``step_decades`` at a time, down to the hard bound (the grid's edge
extension). The best point -- its
weights and its value, ``inf`` for the off limit -- is the result; ``refit`` retrains a fresh model at that value
with the full budget instead (its seconds counted). Going from weak to strong matters: from a strong-prior
solution a fifth of the budget does not move far enough to find a weaker optimum (issue 22: it chose lambda = 100
instead of the grid's 1e3 that way), while the weak solutions are pulled towards the prior mean in a few steps.

With several learning rates (``tune(..., {"lr": [...]}, strategy="continuation")``) the first point (the off
limit) is trained at each, from the same start; the path goes on at the one whose first point scores best on the
pool (plain fine-tuning's learning rate: the prior's proximal step keeps any strength stable at it).

``path``: one entry per point (``log10`` value, ``lr``, the values, its pool NLL, steps, seconds, ``selected``);
``table``: the per-epoch history of every segment; ``objective``: the selected model's pool NLL (``val_nll``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ptyl.errors import ConfigError, DivergenceError
from ptyl.tuning.automatic import AutomaticRun
from ptyl.tuning.pool import PoolSettings, PoolTuner
from ptyl.tuning.segments import BestPoint, budget, continue_training, merged_history, refit_selected, set_strength
from ptyl.validation import check_fraction, check_int, check_positive_number

if TYPE_CHECKING:
    from ptyl.training.result import FitResult

__all__ = ["ContinuationSettings", "ContinuationTuner", "ladder"]


@dataclass
class ContinuationSettings(PoolSettings):
    """Settings of ``tune(..., strategy="continuation")`` (see the module docstring).

    Attributes:
        start_log10: the first point (``None``: the off limit, no backbone prior; a number: that log10 value).
        coarse_above, coarse_step: how far above the top of the kind's default range the finite points begin, and
            their spacing there (decades).
        step_decades: the spacing inside the default range (decades).
        stop_log10: the strongest point (``None``: the bottom of the default range).
        first_fraction, segment_fraction, segment_lr: the first point's share of the budget, every later point's,
            and the later points' peak learning rate (a multiple of the path's).
        patience: stop after this many points in a row worse than the best (0: walk the whole ladder).
        refit: retrain a fresh model at the selected value with the full budget.
    """

    start_log10: float | None = None
    coarse_above: float = 4.0
    coarse_step: float = 2.0
    step_decades: float = 1.0
    stop_log10: float | None = None
    first_fraction: float = 0.4
    segment_fraction: float = 0.2
    segment_lr: float = 0.3
    patience: int = 2
    refit: bool = False

    def check(self) -> None:
        """Every setting, checked before training (:class:`~ptyl.errors.ConfigError` naming it)."""
        super().check()
        for name in ("first_fraction", "segment_fraction"):
            if not 0.0 < check_fraction(getattr(self, name), name, closed_right=True):
                raise ConfigError(f"{name} must be > 0")
        for name in ("coarse_step", "step_decades", "segment_lr"):
            check_positive_number(getattr(self, name), name)
        if not (math.isfinite(self.coarse_above) and self.coarse_above >= 0):
            raise ConfigError(f"coarse_above must be a finite number >= 0, got {self.coarse_above!r}")
        check_int(self.patience, "patience", minimum=0)


def ladder(recipe, settings: ContinuationSettings) -> list[float]:
    """The log10 values the walk visits, weak to strong, inside the kind's hard bounds (``inf``: the off limit).

    Args:
        recipe: the kind's :class:`~ptyl.priors.PriorRecipe`.
        settings: the :class:`ContinuationSettings`.

    Returns:
        The start (the off limit by default), the coarse points above the default range, then its points down to
        ``stop_log10``; the values below the start only.

    Raises:
        ConfigError: a start or stop outside the hard bounds, or a stop above the start.
    """
    lo, hi = recipe.bounds
    low, high = recipe.log10_range
    start = math.inf if settings.start_log10 is None else float(settings.start_log10)
    stop = low if settings.stop_log10 is None else float(settings.stop_log10)
    for name, value in (("start_log10", start), ("stop_log10", stop)):
        if math.isfinite(value) and not lo <= value <= hi:
            raise ConfigError(f"{name} {value} lies outside the hard bounds {recipe.bounds} of the prior kind")
    if not stop <= start:
        raise ConfigError(f"the ladder goes from weak to strong: stop_log10 {stop} lies above start_log10 {start}")
    coarse, value = [], min(high + settings.coarse_above, hi)
    while value > high + 1e-9:
        coarse.append(value)
        value -= settings.coarse_step
    fine = [high - i * settings.step_decades for i in range(int(math.floor((high - lo) / settings.step_decades)) + 1)]
    finite = [v for v in coarse + fine if stop - 1e-9 <= v < start]
    return [start] + [round(v, 9) for v in finite]


def _move_to(run: AutomaticRun, log10_value: float) -> None:
    """Put the run at a point of the ladder: the off limit, or every backbone strength at ``10 ** log10_value``."""
    run.off = math.isinf(log10_value)
    if not run.off:
        set_strength(run.family, run.spec.kind.recipe.axis, log10_value)


class ContinuationTuner(PoolTuner):
    """``tune(..., strategy="continuation", val_set=pool)`` (see the module docstring)."""

    Settings = ContinuationSettings
    tunes_lr = True

    def start_values(self, spec) -> dict[str, float]:
        """The first finite point of the ladder (the family needs a finite value; the off limit trains without it)."""
        recipe = spec.kind.recipe
        finite = [v for v in ladder(recipe, self.settings) if math.isfinite(v)]
        return {recipe.axis: 10.0 ** (finite[0] if finite else recipe.log10_range[1])}

    def learned(self, spec) -> tuple[str, ...]:
        axis = spec.kind.recipe.axis
        if self.settings.learn is not None and tuple(self.settings.learn) != (axis,):
            raise ConfigError(f"strategy 'continuation' walks the prior's strength axis ({axis!r}) only: "
                              f"learn={tuple(self.settings.learn)} does not apply (no usable scale to walk)")
        return (axis,)

    def _score(self, run: AutomaticRun, model) -> float:
        return self.score_pool(run, model)

    def parts(self, run: AutomaticRun) -> tuple[Any, None, list]:
        self.points = ladder(run.spec.kind.recipe, self.settings)
        self.budget, self.full_config = budget(run.config, len(run.train_set)), run.config
        _move_to(run, self.points[0])
        run.config = replace(run.config, lr=run.lrs[0],
                             max_steps=max(1, round(self.settings.first_fraction * self.budget)))
        return run.prior(), None, []

    def objective_value(self, run: AutomaticRun, result: FitResult) -> float:
        return self._score(run, result.model)

    def _first_points(self, run: AutomaticRun, result: FitResult) -> tuple[Any, FitResult, float, float]:
        """The first point at every learning rate (the first one trained by the run); the best one's
        ``(model, result, lr, pool score)``."""
        best, seeds = None, run.config.seed
        for i, lr in enumerate(run.lrs):
            start = time.perf_counter()
            if i > 0:
                torch.manual_seed(seeds)  # the same start and head as the first, as a grid trial
                model = run.model_fn()
                try:
                    result = continue_training(run, model, run.config.max_steps, seed=seeds, lr=lr)
                except DivergenceError:
                    result = None
            score = self._score(run, result.model) if result is not None else math.inf
            run.path.append({"point": 0, "log10": self.points[0], "lr": lr, "val_nll": score,
                             **run.selected(), "step": result.steps if result else 0,
                             "seconds": time.perf_counter() - start})
            if math.isfinite(score) and (best is None or score < best[3]):
                best = (result.model, result, lr, score)
        if best is None:
            raise DivergenceError(f"the first point of the continuation path ({self.points[0]:g} in log10) diverged "
                                  f"or gave a non-finite pool loss at every lr {list(run.lrs)}; lower lr")
        return best

    def _walk(self, run: AutomaticRun, best: BestPoint):
        """The ladder after its first point; past its strong end while the last point is the best (the grid's edge
        extension), one ``step_decades`` at a time down to the hard bound."""
        yield from self.points[1:]
        value, bottom = self.points[-1], run.spec.kind.recipe.bounds[0]
        while (math.isfinite(value) and best.index == self._visited
               and value - self.settings.step_decades >= bottom - 1e-9):
            value = round(value - self.settings.step_decades, 9)
            yield value

    def finish(self, run: AutomaticRun, result: FitResult) -> tuple[dict[str, Any], FitResult]:
        s = self.settings
        model, result, lr, score = self._first_points(run, result)
        results, values, steps, worse = [result], [run.selected()], result.steps, 0
        best, self._visited = BestPoint(), 0
        best.offer(0, score, model, run, lr=lr)
        for k, value in enumerate(self._walk(run, best), 1):
            start = time.perf_counter()
            _move_to(run, value)
            try:
                segment = continue_training(run, model, round(s.segment_fraction * self.budget),
                                            seed=run.config.seed * 1_000_003 + k, lr_factor=s.segment_lr, lr=lr)
            except DivergenceError:  # the weights are lost: the path ends, its best point stands
                run.path.append({"point": k, "log10": value, "lr": lr, "val_nll": math.inf, **run.selected(),
                                 "step": steps, "seconds": time.perf_counter() - start, "diverged": True})
                break
            results.append(segment)
            values.append(run.selected())
            steps += segment.steps
            score = self._score(run, model)
            run.path.append({"point": k, "log10": value, "lr": lr, "val_nll": score, **run.selected(),
                             "step": steps, "seconds": time.perf_counter() - start})
            self._visited = k
            worse = 0 if best.offer(k, score, model, run, lr=lr) else worse + 1
            if s.patience and worse >= s.patience:
                break
        best.restore(model, run)
        for entry in run.path:
            entry["selected"] = entry["point"] == best.index and entry["lr"] == lr
        final = replace(results[-1], model=model, history=merged_history(results, values), steps=steps)
        if s.refit:
            final = refit_selected(run, final, self.full_config, self._loss(run), s.batch_size, lr=lr)
        selected = run.selected()
        return ({**selected, "lr": lr} if len(run.lrs) > 1 else selected), final
