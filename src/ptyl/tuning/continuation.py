"""The prior's strength chosen on a validation pool along one warm-started continuation path, from weak to strong
(``tune(..., strategy="continuation", val_set=pool)``).

The strength axis (lambda of the learned kinds, one for every block of ``block``; the variance of L2-SP / standard)
walks down a ladder in log10 units: the off limit first (``start_log10``, default the kind's hard upper bound
``recipe.bounds[1]``: the prior as weak as the kind allows), then from ``top_log10`` (default two decades above the
kind's default range) down to ``stop_log10`` (default the bottom of that range, ``recipe.log10_range[0]``) in steps
of ``step_decades``. The first point trains ``first_fraction`` of the budget (a grid trial's steps) from the start;
every later one continues from the previous point's weights for ``segment_fraction`` of it, with a fresh schedule
peaking at ``segment_lr`` times the learning rate. Each point is scored on the pool (never trained on); the walk
stops after ``patience`` points in a row worse than the best so far, or at the bottom. The best point -- its weights
and its value -- is the result; ``refit`` retrains a fresh model at that value with the full budget instead (its
seconds counted). Going from weak to strong matters: a strong-prior solution does not move far enough in a fifth of
the budget to find a weaker optimum (issue 22: it chose lambda = 100 instead of the grid's 1e3 that way).

``path``: one entry per point (``log10`` value, the values, its pool NLL, steps, seconds, ``selected``); ``table``:
the per-epoch history of every segment; ``objective``: the selected model's pool NLL (``val_nll``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ptyl.errors import ConfigError, DivergenceError
from ptyl.tuning.automatic import AutomaticRun, AutomaticSettings, AutomaticTuner
from ptyl.tuning.pool import check_pool, pool_loss
from ptyl.tuning.segments import budget, continue_training, merged_history, refit_selected, set_strength, snapshot
from ptyl.validation import check_fraction, check_int, check_positive_number

if TYPE_CHECKING:
    from ptyl.training.result import FitResult

__all__ = ["ContinuationSettings", "ContinuationTuner", "ladder"]


@dataclass
class ContinuationSettings(AutomaticSettings):
    """Settings of ``tune(..., strategy="continuation")`` (see the module docstring).

    Attributes:
        start_log10, top_log10, stop_log10, step_decades: the ladder (``None``: the kind's hard upper bound; two
            decades above its default range; the bottom of that range).
        first_fraction, segment_fraction, segment_lr: the first point's share of the budget, every later point's,
            and the later points' peak learning rate (a multiple of ``config.lr``).
        patience: stop after this many points in a row worse than the best (0: walk the whole ladder).
        refit: retrain a fresh model at the selected value with the full budget.
        batch_size: batch size of the pool passes.
    """

    start_log10: float | None = None
    top_log10: float | None = None
    stop_log10: float | None = None
    step_decades: float = 1.0
    first_fraction: float = 0.4
    segment_fraction: float = 0.2
    segment_lr: float = 0.3
    patience: int = 3
    refit: bool = True
    batch_size: int = 256

    def check(self) -> None:
        """Every setting, checked before training (:class:`~ptyl.errors.ConfigError` naming it)."""
        for name in ("first_fraction", "segment_fraction"):
            if not 0.0 < check_fraction(getattr(self, name), name, closed_right=True):
                raise ConfigError(f"{name} must be > 0")
        check_positive_number(self.step_decades, "step_decades")
        check_positive_number(self.segment_lr, "segment_lr")
        check_int(self.patience, "patience", minimum=0)
        check_int(self.batch_size, "batch_size", minimum=1)


def ladder(recipe, settings: ContinuationSettings) -> list[float]:
    """The log10 values the walk visits, weak to strong, inside the kind's hard bounds.

    Args:
        recipe: the kind's :class:`~ptyl.priors.PriorRecipe`.
        settings: the :class:`ContinuationSettings`.

    Returns:
        The off limit, then ``top_log10`` down to ``stop_log10`` by ``step_decades``.

    Raises:
        ConfigError: a value outside the bounds, or a ladder that does not go down.
    """
    lo, hi = recipe.bounds
    start = hi if settings.start_log10 is None else float(settings.start_log10)
    top = recipe.log10_range[1] + 2.0 if settings.top_log10 is None else float(settings.top_log10)
    stop = recipe.log10_range[0] if settings.stop_log10 is None else float(settings.stop_log10)
    for name, value in (("start_log10", start), ("top_log10", top), ("stop_log10", stop)):
        if not lo <= value <= hi:
            raise ConfigError(f"{name} {value} lies outside the hard bounds {recipe.bounds} of the prior kind")
    if not stop <= min(top, start):
        raise ConfigError(f"the ladder must go from weak to strong: stop_log10 {stop} is above top_log10 {top} or "
                          f"start_log10 {start}")
    values = [start]
    count = int(math.floor((min(top, start) - stop) / settings.step_decades + 1e-9))
    values += [top - i * settings.step_decades for i in range(count + 1) if top - i * settings.step_decades < start]
    return [round(v, 9) for v in values]


class ContinuationTuner(AutomaticTuner):
    """``tune(..., strategy="continuation", val_set=pool)`` (see the module docstring)."""

    Settings = ContinuationSettings
    metric = "val_nll"
    uses_validation = True

    def start_values(self, spec) -> dict[str, float]:
        recipe = spec.kind.recipe
        return {recipe.axis: 10.0 ** ladder(recipe, self.settings)[0]}

    def learned(self, spec) -> tuple[str, ...]:
        axis = spec.kind.recipe.axis
        if self.settings.learn is not None and tuple(self.settings.learn) != (axis,):
            raise ConfigError(f"strategy 'continuation' walks the prior's strength axis ({axis!r}) only: "
                              f"learn={tuple(self.settings.learn)} does not apply (no usable scale to walk)")
        return (axis,)

    def check_data(self, train_set, val_set, name: str) -> None:
        self.settings.check()
        super().check_data(train_set, val_set, name)
        check_pool(train_set, val_set)

    def _loss(self, run: AutomaticRun):
        return run.objective or run.likelihood

    def parts(self, run: AutomaticRun) -> tuple[Any, None, list]:
        self.points = ladder(run.spec.kind.recipe, self.settings)
        self.budget = budget(run.config, len(run.train_set))
        self.full_config = run.config
        run.config = replace(run.config, max_steps=max(1, round(self.settings.first_fraction * self.budget)))
        return run.family.to_prior(), None, []

    def objective_value(self, run: AutomaticRun, result: FitResult) -> float:
        return pool_loss(result.model, run.val_set, self._loss(run), self.settings.batch_size, run.collate_fn)

    def finish(self, run: AutomaticRun, result: FitResult) -> tuple[dict[str, Any], FitResult]:
        s, axis, model = self.settings, run.spec.kind.recipe.axis, result.model
        results, values, steps, best, worse = [result], [run.family.hyper_values()], result.steps, None, 0
        start = time.perf_counter()
        for k, value in enumerate(self.points):
            if k > 0:
                start = time.perf_counter()
                set_strength(run.family, axis, value)
                results.append(continue_training(run, model, round(s.segment_fraction * self.budget),
                                                 seed=run.config.seed * 1_000_003 + k, lr_factor=s.segment_lr))
                values.append(run.family.hyper_values())
                steps += results[-1].steps
            val_nll = pool_loss(model, run.val_set, self._loss(run), s.batch_size, run.collate_fn)
            run.path.append({"point": k, "log10": value, "val_nll": val_nll, **run.family.hyper_values(),
                             "step": steps, "seconds": time.perf_counter() - start})
            if not math.isfinite(val_nll):
                continue  # a diverged point loses; the walk goes on
            if best is None or val_nll < best["val_nll"]:
                best, worse = {"val_nll": val_nll, "point": k, **snapshot(model, run.family)}, 0
            else:
                worse += 1
                if s.patience and worse >= s.patience:
                    break
        if best is None:
            raise DivergenceError("every point of the continuation path gave a non-finite pool loss; lower lr")
        for entry in run.path:
            entry["selected"] = entry["point"] == best["point"]
        model.load_state_dict(best["model"])
        run.family.load_state_dict(best["family"])
        final = replace(results[-1], model=model, history=merged_history(results, values), steps=steps)
        if s.refit:
            final = refit_selected(run, final, self.full_config, self._loss(run), s.batch_size)
        return run.family.prior_kwargs(), final
