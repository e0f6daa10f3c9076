"""Warm-started training segments of the automatic strategies that learn from a validation pool: continue a model
for a share of the run's budget under the run's current prior (the family's, or none at the off limit), set the
strength axis, keep the best point scored on the pool (:class:`BestPoint`), merge the segments' histories into one,
and refit at the selection."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ptyl.autotune.families import CompositeFamily, Family
from ptyl.errors import DivergenceError
from ptyl.training.fitting import fit
from ptyl.tuning.pool import pool_loss
from ptyl.tuning.selection import selected_prior

if TYPE_CHECKING:
    from ptyl.training.result import FitResult
    from ptyl.tuning.automatic import AutomaticRun

__all__ = ["BestPoint", "budget", "continue_training", "merged_history", "refit_selected", "set_strength",
           "snapshot", "strength_bounds", "strength_parameters"]

LOG10 = math.log(10.0)


def budget(config, examples: int) -> int:
    """The run's optimizer steps (one grid trial's budget: ``max_steps``, else ``epochs`` whole epochs)."""
    examples = max(int(examples), 1)  # no examples: the trainer raises its DataError
    return config.max_steps or config.epochs * math.ceil(examples / min(config.batch_size, examples))


def continue_training(run: AutomaticRun, model, steps: int, *, seed: int, lr_factor: float = 1.0,
                      lr: float | None = None) -> FitResult:
    """Train ``model`` (in place) for ``steps`` more steps under the run's current prior (:meth:`AutomaticRun.prior`:
    the family's, or the head prior alone at the off limit), with a fresh optimizer and schedule peaking at
    ``lr_factor * lr``.

    Args:
        run: the automatic run (its data, config, objective).
        model: the model to continue.
        steps: the optimizer steps (rounded up to whole epochs by the trainer).
        seed: the segment's seed (batch order).
        lr_factor: the peak learning rate as a multiple of ``lr``.
        lr: the path's learning rate (default the run's).

    Returns:
        The segment's :class:`~ptyl.training.FitResult`.
    """
    config = replace(run.config, max_steps=max(1, int(steps)), seed=int(seed), progress=False,
                     lr=(run.config.lr if lr is None else lr) * lr_factor)
    return fit(model, run.train_set, run.prior(model), config, objective=run.objective,
               num_data=len(run.train_set), head=run.spec.head, collate_fn=run.collate_fn)


class BestPoint:
    """The best point of a path scored on the pool (the lowest finite score): its weights, the family's values and
    whether it was the off limit, to go back to at the end."""

    def __init__(self) -> None:
        self.score, self.index, self.state = math.inf, None, None

    def offer(self, index: int, score: float, model, run: AutomaticRun, **extra: Any) -> bool:
        """Keep point ``index`` if its ``score`` beats the best so far.

        Returns:
            Whether it was kept.
        """
        if not (math.isfinite(score) and score < self.score):
            return False
        self.score, self.index = score, index
        self.state = {**snapshot(model, run.family), "off": run.off, **extra}
        return True

    def restore(self, model, run: AutomaticRun) -> dict[str, Any]:
        """Load the best point into ``model`` and ``run`` (family values, ``off``).

        Returns:
            The extra fields given to :meth:`offer`.

        Raises:
            DivergenceError: no point had a finite score.
        """
        if self.state is None:
            raise DivergenceError("every point of the path gave a non-finite pool loss (or diverged); lower lr")
        model.load_state_dict(self.state["model"])
        run.family.load_state_dict(self.state["family"])
        run.off = self.state["off"]
        return {k: v for k, v in self.state.items() if k not in ("model", "family", "off")}


def strength_parameters(family: Family, axis: str | None) -> list[torch.nn.Parameter]:
    """The learnable log-strength parameters of the backbone part (``log_scale`` per learned leaf or block,
    ``log_variance`` of L2-SP / standard)."""
    name = {"scale": "log_scale", "variance": "log_variance"}.get(axis)
    if name is None or not (isinstance(family, CompositeFamily) and "backbone" in family.part_names):
        return []
    return [getattr(leaf, name) for leaf in family.part("backbone").leaves()
            if isinstance(getattr(leaf, name, None), torch.nn.Parameter)]


@torch.no_grad()
def set_strength(family: Family, axis: str | None, log10_value: float) -> None:
    """Set every backbone strength parameter to ``10 ** log10_value``."""
    for p in strength_parameters(family, axis):
        p.fill_(LOG10 * float(log10_value))


def snapshot(model, family: Family) -> dict[str, Any]:
    """CPU copies of the model's state and the family's values (to go back to the best point)."""
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "family": copy.deepcopy(family.state_dict())}


def merged_history(results: list[FitResult], values: list[dict[str, float]]) -> list[dict[str, Any]]:
    """The segments' histories as one: epochs numbered on, each record with its segment and the values it trained
    under."""
    out, epoch = [], 0
    for k, (result, hyper) in enumerate(zip(results, values, strict=True)):
        for record in result.history:
            epoch += 1
            out.append({**record, "epoch": epoch, "segment": k, **hyper})
    return out


def strength_bounds(family: Family, spec, limit: float) -> dict[int, tuple[float, float]]:
    """id(log parameter) -> (lo, hi) in natural-log units: the kind's hard bounds (``recipe.bounds``) for the
    backbone's strength axis, ``+-limit`` for the rest (eps, the head variance)."""
    lo, hi = (LOG10 * b for b in spec.kind.recipe.bounds)
    strength = {id(p) for p in strength_parameters(family, spec.kind.recipe.axis)}
    return {id(p): ((lo, hi) if id(p) in strength else (-limit, limit)) for p in family.parameters()}


def refit_selected(run: AutomaticRun, path_result: FitResult, config, loss, batch_size: int, *,
                   lr: float | None = None) -> FitResult:
    """A fresh model (``run.model_fn()`` after ``torch.manual_seed(seed)``, as a grid trial) trained at the selected
    values (:meth:`AutomaticRun.selected`; the off limit without a backbone prior) with the full ``config``; its pool
    score and seconds go into ``run.path``.

    Args:
        run: the automatic run (``run.family`` and ``run.off`` hold the selection).
        path_result: the selection run's result (its history is kept in front of the refit's).
        config: the full training config (a grid trial's budget).
        loss, batch_size: how the pool is scored.
        lr: the selected learning rate (default ``config.lr``).

    Returns:
        The refit's :class:`~ptyl.training.FitResult` (history: the selection's, then the refit's, marked).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = run.model_fn()
    prior = selected_prior(run.spec, model, run.selected())
    config = replace(config, progress=False, lr=config.lr if lr is None else lr)
    fitted = fit(model, run.train_set, prior, config, objective=run.objective, num_data=len(run.train_set),
                 head=run.spec.head, collate_fn=run.collate_fn)
    run.path.append({"refit": True, "val_nll": pool_loss(model, run.val_set, loss, batch_size, run.collate_fn),
                     **run.selected(), "lr": config.lr, "steps": fitted.steps,
                     "seconds": time.perf_counter() - start})
    history = path_result.history + [{**r, "epoch": len(path_result.history) + r["epoch"], "refit": True}
                                     for r in fitted.history]
    return replace(fitted, history=history, steps=path_result.steps + fitted.steps)
