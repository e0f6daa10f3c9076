"""Hyper-parameter selection by grid search on validation data -- the one protocol every method and every baseline
goes through, so that baselines are tuned as hard as the method.

For every point of the grid (the Cartesian product of the axes) a fresh model (``model_fn()``) and its prior
(:class:`PriorSpec`, :func:`ptyl.priors.make_prior`) are fitted with :func:`ptyl.training.fit` and scored (NLL,
accuracy, ECE, Brier; per pixel for masks) on validation data (:mod:`ptyl.tuning.trials`):

* ``val_set=pool``: a validation pool never trained on (>= 500 examples where the target has them). Each trial
  trains once on all n examples; ``test_set`` scores every trial on the test set too, so the test-selected upper
  bound comes for free (``TuneResult.test_selected``). No refit.
* ``folds=k, repeats=r``: repeated stratified k-fold cross-validation (targets too small for a pool); refit on n.
* neither: one class-balanced 80/20 split (``val_fraction``); refit on all n. Quick, and noisy at small n (20
  validation images at 10 per class): use a pool or folds to rank methods.

The best point by validation NLL (or ``metric``) wins. A grid never stops on an edge silently
(:mod:`ptyl.tuning.search`): while the best value of the prior-strength axis is its smallest or largest, the axis
is extended by ``decades`` in that direction and the new trials run, until the best value is interior or the next
value would pass the hard bound of the kind's recipe (:class:`ptyl.priors.PriorRecipe` ``bounds``). The search
path is in ``TuneResult.path``; an axis left on an edge that was not extended gets a warning (``edge_warnings``).
Every trial records the effective strength of its prior (median prior std / median |theta0|, ``prior_off``) and how
its training ended (``final_loss``, ``steps``, ``stop_reason``, ``undertrained``).

Only numerical failure (:class:`~ptyl.errors.DivergenceError`) makes a trial lose and the search go on; every user
error (an unknown axis, a bad value, a missing posterior) is raised before the first fit.

Grid axes:
    prior: ``scale`` (lambda, learned priors), ``eps``, ``rank``, ``variance``, ``head_variance``;
    training: any :class:`TrainConfig` field (``lr``, ``head_lr``, ``temperature``, ``epochs``, ...) except ``seed``,
    ``progress`` and ``device``.
Baselines are parametrised by the **prior variance** ``variance`` of N(0, variance I) (``standard``) or
N(theta_0, variance I) (``l2sp``), never by weight decay: the variance is a property of the prior, independent of n,
so the value chosen on a split transfers unchanged to the refit on all n (its equivalent weight decay
``1 / (n variance)`` shrinks accordingly). Convert with :func:`ptyl.priors.variance_from_weight_decay`.

Same-budget grids (:func:`default_grid`): ``budget = B`` trials, ``L = len(lrs)`` learning rates and ``B // L``
log-spaced values of the kind's strength axis over its default range (both from :class:`ptyl.priors.PriorKind`):
``scale`` in 10^[0, 4] for the learned kinds, ``variance`` in 10^[-5, -1] for ``l2sp`` and 10^[-1, 3] for
``standard``; ``none`` spends the whole budget on the learning rate. Edge extensions come on top, by the same rule
for every method.

>>> default_grid("lowrank", budget=5, lrs=(0.1,))["scale"]
[1.0, 10.0, 100.0, 1000.0, 10000.0]
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.priors.factory import make_prior
from ptyl.priors.registry import HEAD_VARIANCE, PriorKind
from ptyl.training.config import TrainConfig
from ptyl.tuning.automatic import AutomaticSettings, tune_automatic
from ptyl.tuning.registry import TuningStrategy
from ptyl.tuning.result import TuneResult
from ptyl.tuning.search import FLAT_RTOL, MAX_ROUNDS, METRICS, is_number
from ptyl.tuning.searches import GridSearch, winner
from ptyl.tuning.splits import SPLITS
from ptyl.tuning.trials import OFF, PRIOR_KEYS, TrialRunner, is_off_limit, make_validation
from ptyl.validation import check_choice, check_int, check_positive_number

__all__ = ["DEFAULT_LRS", "PriorSpec", "default_grid", "tune"]
_FORBIDDEN_CONFIG_KEYS = ("seed", "progress", "device")
DEFAULT_LRS = (0.003, 0.01, 0.03)


@dataclass
class PriorSpec:
    """The prior a tuned method trains under (the fixed part; grid axes override the fields named in ``PRIOR_KEYS``).

    Attributes:
        kind: a :class:`~ptyl.priors.PriorKind` (learned kinds need ``posterior``).
        posterior, scale, eps, rank, variance, blocks, head, head_variance, unregularized: as in
            :func:`ptyl.priors.make_prior`; ``None``: the kind's registry default (:attr:`PriorRecipe.defaults`).
    """

    kind: str = PriorKind.STANDARD
    posterior: Any = None  # SourcePosterior
    scale: float | None = None
    eps: float | None = None
    rank: int | None = None
    variance: float | None = None
    blocks: str | Sequence[str] = "auto"
    head: str | Sequence[str] | None = "head"
    head_variance: float | None = HEAD_VARIANCE
    unregularized: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.kind = PriorKind.parse(self.kind)

    def resolved(self) -> PriorSpec:
        """This spec with every value left out (``None``) replaced by the kind's registry default.

        Returns:
            A new :class:`PriorSpec` (the prior it builds is the same).
        """
        options = self.kind.recipe.options(scale=self.scale, eps=self.eps, rank=self.rank, variance=self.variance)
        return replace(self, scale=options.scale, eps=options.eps, rank=options.rank, variance=options.variance)

    def build_prior(self, model: nn.Module, **values: Any):
        """The prior of this spec for a model.

        Args:
            model: the freshly built model (build the prior before training: L2-SP centres on its weights).
            values: grid-axis values replacing fields (``scale=1e4``...).

        Returns:
            :func:`ptyl.priors.make_prior`'s :class:`~ptyl.priors.CompositePrior`.
        """
        spec = replace(self, **values)
        return make_prior(model, spec.kind, posterior=spec.posterior, scale=spec.scale, eps=spec.eps, rank=spec.rank,
                          variance=spec.variance, blocks=spec.blocks, head=spec.head,
                          head_variance=spec.head_variance, unregularized=spec.unregularized)


def default_grid(
    kind: str | PriorKind,
    budget: int = 15,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    log10_range: tuple[float, float] | None = None,
) -> dict[str, list[float]]:
    """A grid of ``(budget // len(lrs)) * len(lrs)`` trials for a prior kind.

    Args:
        kind: a :class:`~ptyl.priors.PriorKind`; its recipe gives the strength axis and its default range.
        budget: number of trials; equal budgets give every method the same number of trials.
        lrs: learning rates crossed with the strength axis.
        log10_range: the strength axis' interval in log10 (default: the recipe's).

    Returns:
        ``{axis: values, "lr": lrs}``; for a kind without a strength axis (``none``), ``budget`` log-spaced learning
        rates between ``min(lrs)`` and ``max(lrs)`` (one, if they are equal).
    """
    recipe = PriorKind.parse(kind).recipe
    budget = check_int(budget, "budget", minimum=1)
    lrs = [check_positive_number(v, "lrs") for v in lrs]
    if not lrs:
        raise ConfigError("lrs must not be empty")
    if recipe.axis is None:  # no prior to tune: the budget goes to the learning rate (one value if lrs has one)
        return {"lr": list(dict.fromkeys(_logspace(math.log10(min(lrs)), math.log10(max(lrs)), budget)))}
    lo, hi = map(float, log10_range if log10_range is not None else recipe.log10_range)
    points = budget // len(lrs)
    if points < 2:
        raise InvalidValueError(f"budget {budget} leaves fewer than 2 values of {recipe.axis!r} per learning rate "
                                f"({len(lrs)} learning rates): raise the budget or pass fewer lrs")
    return {recipe.axis: _logspace(lo, hi, points), "lr": lrs}


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    if n == 1:
        return [10.0**lo]
    return [float(f"{10.0 ** (lo + (hi - lo) * i / (n - 1)):.6g}") for i in range(n)]


def _as_spec(prior_spec: PriorSpec | str | Mapping[str, Any]) -> PriorSpec:
    if isinstance(prior_spec, PriorSpec):
        return prior_spec
    if isinstance(prior_spec, str):
        return PriorSpec(kind=prior_spec)
    if isinstance(prior_spec, Mapping):
        return PriorSpec(**prior_spec)
    raise ConfigError(f"prior_spec must be a PriorSpec, a kind name or a dict, got {type(prior_spec).__name__}")


def check_grid(grid: Mapping[str, Sequence[Any]], spec: PriorSpec, base: TrainConfig) -> dict[str, list[Any]]:
    """The grid as ``{axis: values}`` after checking every axis, every value and every trial's training settings;
    :class:`~ptyl.errors.ConfigError` / ``InvalidValueError`` before anything is trained."""
    config_keys = {f.name for f in fields(TrainConfig)} - set(_FORBIDDEN_CONFIG_KEYS)
    out = {}
    for key, values in grid.items():
        if key == "weight_decay":
            raise ConfigError("grid axis 'weight_decay' is not used: tune the prior 'variance' (weight decay = "
                              "1/(n variance), see ptyl.priors.variance_from_weight_decay)")
        if key not in PRIOR_KEYS and key not in config_keys:
            raise ConfigError(f"unknown grid axis {key!r}; prior axes {PRIOR_KEYS}, or a TrainConfig field "
                              f"other than {_FORBIDDEN_CONFIG_KEYS}")
        values = list(values) if not isinstance(values, (str, bytes)) else [values]
        if not values:
            raise ConfigError(f"grid axis {key!r} has no values")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"grid axis {key!r} repeats a value: {values}")
        out[key] = [float(v) if isinstance(v, torch.Tensor) else v for v in values]
    recipe = spec.kind.recipe
    if recipe.needs_posterior and spec.posterior is None:
        raise ConfigError(f"prior kind {str(spec.kind)!r} needs PriorSpec.posterior (the learned source posterior)")
    for key in ("scale", "variance", "head_variance"):
        for value in out.get(key, ()):
            if value is not None:
                check_positive_number(value, f"grid axis {key!r}")
    for combo in itertools.product(*(out[k] for k in out if k not in PRIOR_KEYS)):
        replace(base, **dict(zip([k for k in out if k not in PRIOR_KEYS], combo, strict=False))).validate()
    return out


def _extended_axes(spec: PriorSpec, axes: dict[str, list[Any]], extend: bool | Mapping[str, tuple[float, float]]
                   ) -> dict[str, tuple[float, float]]:
    """The axes the search may extend and their hard log10 bounds (default: the prior-strength axis)."""
    if extend is False or extend is None:
        return {}
    if extend is True:
        recipe = spec.kind.recipe
        wanted = {recipe.axis: recipe.bounds} if recipe.axis in axes and recipe.bounds else {}
    else:
        wanted = {k: (float(lo), float(hi)) for k, (lo, hi) in dict(extend).items()}
    for key in wanted:
        if key not in axes:
            raise ConfigError(f"cannot extend axis {key!r}: it is not in the grid ({list(axes)})")
        if not all(is_number(v) and v > 0 for v in axes[key]):
            raise ConfigError(f"axis {key!r} is extended by decades: its values must be positive numbers")
    return {k: b for k, b in wanted.items() if len(axes[k]) >= 2}


def tune(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    prior_spec: PriorSpec | str | Mapping[str, Any],
    grid: Mapping[str, Any] | None = None,
    *,
    kinds: Sequence[str | PriorKind] | None = None,
    strategy: str | TuningStrategy = TuningStrategy.GRID,
    auto: AutomaticSettings | Mapping[str, Any] | None = None,
    val_set: Dataset | None = None,
    folds: int | None = None,
    repeats: int = 1,
    test_set: Dataset | None = None,
    extend: bool | Mapping[str, tuple[float, float]] = True,
    off_limit: bool = True,
    decades: float = 1.0,
    flat_rtol: float = FLAT_RTOL,
    max_rounds: int = MAX_ROUNDS,
    val_fraction: float = 0.2,
    seed: int = 0,
    config: TrainConfig | None = None,
    metric: str = "nll",
    progress: bool = True,
    refit: bool = True,
    objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    likelihood: Any = None,
    split: str = "auto",
    collate_fn: Callable | None = None,
    evaluate: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
    cache: Any = None,
) -> TuneResult:
    """Choose the prior's hyper-parameters -- and, with ``kinds``, the prior kind -- by grid search with edge
    extension on validation data (see the module docstring), or one run of an automatic strategy that learns them
    (:mod:`ptyl.tuning.automatic`).

    Args:
        model_fn: returns a fresh pretrained / initialised model on every call (called after
            ``torch.manual_seed(seed)``, so random heads are the same in every trial).
        train_set: the n training examples.
        prior_spec: a :class:`PriorSpec`, a kind name (``"standard"``...), or a dict of PriorSpec fields; with
            ``kinds``, the fields they share (posterior, head, head variance...).
        grid: axis name -> values (see the module docstring); default :func:`default_grid` of the kind. With
            ``kinds``: kind name -> its grid (a kind left out gets its default grid). Automatic strategies take no
            prior axis and one value per training axis (``{"lr": [0.03]}``).
        kinds: compare these prior kinds (:class:`~ptyl.priors.PriorKind` names), each tuned the same way, on the
            validation data and return the best; their shared trials (the off limit) run once. ``"none"`` is the
            off limit itself. ``None``: tune ``prior_spec``'s kind only. Grid only.
        strategy: a :class:`~ptyl.tuning.registry.TuningStrategy` (or its name): ``"grid"``, or an automatic one.
        auto: the automatic strategy's settings (``TuningStrategy.parse(strategy).settings``, e.g.
            :class:`~ptyl.tuning.MarglikSettings`, or a mapping of its fields); the grid's validation options
            (``folds``, ``test_set``, ``extend``, ``metric``, ``cache``...) do not apply to them, and ``val_set``
            only to those that learn from a pool (``tuner.uses_validation``: ``hypergradient``, ``continuation``).
        val_set: a validation pool of examples never trained on: every trial trains on all of ``train_set`` and is
            scored on the pool; no refit (``final`` is the selected trial's model).
        folds, repeats: repeated stratified k-fold cross-validation instead (then refit on all n).
        test_set: with ``val_set``: score every trial on it too (``TuneResult.test_selected``, an upper bound).
        extend: extend the prior-strength axis by decades while its best value is on an edge, within the hard
            bounds of the kind's recipe (``True``); a mapping ``{axis: (log10 lo, log10 hi)}`` names the axes and
            bounds; ``False`` only warns.
        off_limit: add the off limit (``inf``: plain fine-tuning from the same start, no backbone prior) to the
            strength axis, so the selection is never worse on the validation data than switching the prior off.
        decades, max_rounds: step of one extension and the most extension rounds.
        flat_rtol: stop extending the strong edge when the edge value beats its inner neighbour by less than this
            relative margin (status ``flat``); 0 disables it.
        val_fraction: without a pool or folds: the share of one class-balanced split held out.
        seed: picks the split / folds and seeds every fit (``config.seed`` is replaced): same seed, same table.
        config: training settings (grid axes override them).
        metric: selection criterion on the validation data: ``nll`` (default), ``ece``, ``brier`` or ``accuracy``.
        progress: progress bars (the refit's too).
        refit: retrain on all of ``train_set`` with the chosen values (split / cv; and pool when the selected trial
            came from ``cache``).
        objective: training objective (default cross-entropy).
        likelihood: the data term's likelihood for the N-aware strength diagnostic (default categorical with the
            default objective; with a custom objective and no likelihood, the diagnostic is skipped).
        split: ``"balanced"``, ``"random"`` or ``"auto"`` (see :func:`validation_split`).
        collate_fn: how a Dataset's examples become batches (text).
        evaluate: ``evaluate(probs, targets) -> metrics`` (default :func:`ptyl.metrics.evaluate_probs`).
        cache: an object with ``get(values) -> row | None`` and ``put(values, row)``: finished trials are stored
            there and not re-run (resumable benchmarks); with ``kinds`` the values carry the ``kind``.

    Returns:
        A :class:`TuneResult` (``search_cost_s``: the seconds spent choosing); with ``kinds``, the winning kind's
        search with ``kind`` (``"none"`` when the off limit won) and ``kinds`` (every kind's search).

    Raises:
        ConfigError: an unknown kind, a learned kind without a posterior, a bad grid (before anything is trained).
        DivergenceError: every trial (automatic: the run) diverged.
    """
    spec = _as_spec(prior_spec)
    strategy = TuningStrategy.parse(strategy)
    if strategy.automatic:
        if kinds is not None:
            raise ConfigError(f"strategy {strategy.value!r} tunes one prior kind: pass kinds=None (the grid compares "
                              "kinds)")
        fixed, lrs = _single_values(grid or {}, spec, config or TrainConfig(), strategy)
        return tune_automatic(model_fn, train_set, spec, strategy, config=replace(config or TrainConfig(), **fixed),
                              auto=auto, val_set=val_set, seed=seed, progress=progress, refit=refit,
                              objective=objective, collate_fn=collate_fn, lrs=lrs)
    check_choice(metric, tuple(METRICS), "metric")
    check_choice(split, SPLITS, "split")
    max_rounds = check_int(max_rounds, "max_rounds", minimum=0)
    base = replace(config or TrainConfig(), seed=int(seed), progress=False)
    searches = _searches(spec, grid, kinds, base, extend, off_limit)  # every user error surfaces here
    start = time.perf_counter()
    validation = make_validation(train_set, val_set=val_set, folds=folds, repeats=repeats, val_fraction=val_fraction,
                                 seed=seed, split=split, test_set=test_set)
    search = GridSearch(model_fn, validation, base, metric=metric, decades=decades, flat_rtol=flat_rtol,
                        max_rounds=max_rounds, objective=objective, likelihood=likelihood, collate_fn=collate_fn,
                        evaluate=evaluate, cache=cache, tag_kind=kinds is not None, progress=progress)
    results = {str(kind_spec.kind): search.run(kind_spec, axes, bounds) for kind_spec, axes, bounds in searches}
    search.close()
    best_kind = winner(results, search.key, search.sign)
    chosen = results[best_kind]
    final = search.fits.get(best_kind) if search.best_kind == best_kind else None
    kind = str(PriorKind.NONE) if is_off_limit(chosen.best) else best_kind
    if (validation.refit or final is None) and refit:
        final, _ = TrialRunner(model_fn, chosen.spec, base, validation, objective=objective, collate_fn=collate_fn,
                               evaluate=evaluate, likelihood=likelihood).fit_once(
            train_set, {**chosen.best, **(chosen.selected.get("posthoc") or {})}, progress=progress)
    return replace(chosen, final=final, search_cost_s=time.perf_counter() - start,
                   kind=kind if kinds is not None else None, kinds=results if kinds is not None else {})


def _searches(spec: PriorSpec, grid: Mapping[str, Any] | None, kinds: Sequence[str | PriorKind] | None,
              base: TrainConfig, extend, off_limit: bool) -> list[tuple[PriorSpec, dict[str, list], dict]]:
    """``(spec, checked axes, extension bounds)`` per kind to search, checked before anything is trained."""
    if kinds is None:
        wanted, grids = [spec.kind], {str(spec.kind): grid}
    else:
        kinds = list(kinds)
        if not kinds:
            raise ConfigError("kinds must name at least one prior kind")
        wanted = list(dict.fromkeys(PriorKind.parse(k, "prior kind in kinds") for k in kinds))
        grids = dict(grid or {})
        unknown = [k for k in grids if k not in {str(w) for w in wanted}]
        if unknown:
            raise ConfigError(f"grid names {unknown}, which are not among the compared kinds "
                              f"{[str(w) for w in wanted]}: with kinds, grid maps a kind to its grid")
        learned = [str(k) for k in wanted if k.recipe.needs_posterior]
        if learned and spec.posterior is None:
            raise ConfigError(f"the learned prior kind(s) {learned} need a source posterior (a prior file); without "
                              f"one compare {[str(k) for k in PriorKind if not k.recipe.needs_posterior]}")
        if PriorKind.NONE in wanted and len(wanted) > 1 and off_limit:
            wanted.remove(PriorKind.NONE)  # the off limit of every other kind's search
    out = []
    for kind in wanted:
        kind_spec = replace(spec, kind=kind)
        axes = check_grid(grids.get(str(kind)) if grids.get(str(kind)) is not None else default_grid(kind),
                          kind_spec, base)
        bounds = _extended_axes(kind_spec, axes, extend)
        axis = kind.recipe.axis
        if off_limit and axis in axes and OFF not in axes[axis]:
            axes[axis] = [*axes[axis], OFF]
        out.append((kind_spec, axes, bounds))
    return out


def _single_values(grid: Mapping[str, Sequence[Any]], spec: PriorSpec, base: TrainConfig,
                   strategy: TuningStrategy) -> tuple[dict[str, Any], list[float] | None]:
    """The training settings an automatic strategy takes from a grid: one value per axis, no prior axis; a tuner
    that ``tunes_lr`` takes several learning rates (returned apart: ``(fixed values, lrs or None)``)."""
    learned = [k for k in grid if k in PRIOR_KEYS]
    if learned:
        raise ConfigError(f"strategy {strategy.value!r} learns the prior's values: drop the grid axes {learned} (set "
                          "the starting values with the settings' initial)")
    axes = check_grid(grid, replace(spec, kind=PriorKind.NONE), base)  # the training axes, checked as the grid's
    lrs = axes.pop("lr") if strategy.tuner.tunes_lr and len(axes.get("lr", ())) > 1 else None
    several = [k for k, v in axes.items() if len(v) > 1]
    if several:
        choosers = [str(s) for s in TuningStrategy if s.automatic and s.tuner.tunes_lr]
        raise ConfigError(f"strategy {strategy.value!r} runs once: give one value for {several} (the strategies that "
                          f"choose lr too: {choosers}), or use strategy 'grid'")
    return {k: v[0] for k, v in axes.items()}, lrs
