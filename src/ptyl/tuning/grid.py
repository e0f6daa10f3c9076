"""Hyper-parameter selection by grid search on a validation split -- the one protocol every method and every
baseline goes through, so that baselines are tuned as hard as the method.

For every point of the grid (the Cartesian product of the axes):

1. split the n training examples into 80 % / 20 % (``val_fraction``) train/validation parts
   (:func:`ptyl.tuning.validation_split`: class-balanced for labelled data, seeded-random for masks; ``seed`` picks
   the split, the same for every trial);
2. build a fresh model (``model_fn()``) and its prior (:class:`PriorSpec`, see :func:`ptyl.priors.make_prior`);
3. fit with :func:`ptyl.training.fit` on the 80 % (``num_data`` = its size) and score the validation part
   (NLL, accuracy, ECE, Brier; per pixel for masks) with :meth:`FitResult.predict`.

The best point by validation NLL (or ``metric``) wins. If its value on any numeric axis with two or more values is the
smallest or largest of that axis, the optimum may lie outside the grid: a warning is issued and recorded in
``edge_warnings``. With ``refit=True`` the model is retrained on all n examples with the chosen values.

Only numerical failure (:class:`~ptyl.errors.DivergenceError`) makes a trial lose and the search go on; every user
error (an unknown axis, a bad value, a missing posterior) is raised before the first fit.

Grid axes:
    prior: ``scale`` (lambda, learned priors), ``eps``, ``rank``, ``variance``, ``head_variance``;
    training: any :class:`TrainConfig` field (``lr``, ``head_lr``, ``temperature``, ``epochs``, ...) except ``seed``,
    ``progress`` and ``device``.
Baselines are parametrised by the **prior variance** ``variance`` of N(0, variance I) (``standard``) or
N(theta_0, variance I) (``l2sp``), never by weight decay: the variance is a property of the prior, independent of n,
so the value chosen on the 80 % split transfers unchanged to the refit on all n (its equivalent weight decay
``1 / (n variance)`` shrinks accordingly). Convert with :func:`ptyl.priors.variance_from_weight_decay`.

Same-budget grids (:func:`default_grid`): ``budget = B`` trials, ``L = len(lrs)`` learning rates and ``B // L``
log-spaced values of the kind's strength axis over its default range (both from :class:`ptyl.priors.PriorKind`):
``scale`` in 10^[0, 8] for the learned kinds (SWAG variances are tiny: lambda is usually >> 1), ``variance`` in
10^[-4, 0] for ``l2sp`` and 10^[-2, 2] for ``standard``; ``none`` spends the whole budget on the learning rate.

>>> default_grid("lowrank", budget=15)["scale"]
[1.0, 100.0, 10000.0, 1000000.0, 100000000.0]
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.errors import ConfigError, DivergenceError, InvalidValueError
from ptyl.priors.factory import make_prior
from ptyl.priors.registry import PriorKind
from ptyl.training.config import TrainConfig
from ptyl.training.fit import fit
from ptyl.training.result import FitResult
from ptyl.tuning.result import TuneResult, edge_warnings
from ptyl.tuning.splits import SPLITS, stacked_targets, validation_split
from ptyl.validation import check_choice, check_int, check_positive_number

__all__ = ["DEFAULT_LRS", "PriorSpec", "default_grid", "tune"]

PRIOR_KEYS = ("scale", "eps", "rank", "variance", "head_variance")
_FORBIDDEN_CONFIG_KEYS = ("seed", "progress", "device")
METRICS = {"nll": "min", "ece": "min", "brier": "min", "accuracy": "max"}
DEFAULT_LRS = (0.003, 0.01, 0.03)


@dataclass
class PriorSpec:
    """The prior a tuned method trains under (the fixed part; grid axes override the fields named in ``PRIOR_KEYS``).

    Attributes:
        kind: a :class:`~ptyl.priors.PriorKind` (learned kinds need ``posterior``; ``l2sp`` / ``standard`` need
            ``variance``, here or as a grid axis).
        posterior, scale, eps, rank, variance, blocks, head, head_variance, unregularized: as in
            :func:`ptyl.priors.make_prior`.
    """

    kind: str = PriorKind.STANDARD
    posterior: Any = None  # SourcePosterior
    scale: float = 1.0
    eps: float = 0.0
    rank: int | None = None
    variance: float | None = None
    blocks: str | Sequence[str] = "auto"
    head: str | Sequence[str] | None = "head"
    head_variance: float | None = 1.0
    unregularized: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.kind = PriorKind.parse(self.kind)

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
    if recipe.axis is not None and getattr(spec, recipe.axis) is None and recipe.axis not in out:
        raise ConfigError(f"prior kind {str(spec.kind)!r} needs a prior {recipe.axis}: set PriorSpec.{recipe.axis} "
                          f"or a {recipe.axis!r} axis")
    if recipe.needs_posterior and spec.posterior is None:
        raise ConfigError(f"prior kind {str(spec.kind)!r} needs PriorSpec.posterior (the learned source posterior)")
    for key in ("scale", "variance", "head_variance"):
        for value in out.get(key, ()):
            if value is not None:
                check_positive_number(value, f"grid axis {key!r}")
    for combo in itertools.product(*(out[k] for k in out if k not in PRIOR_KEYS)):
        replace(base, **dict(zip([k for k in out if k not in PRIOR_KEYS], combo))).validate()
    return out


def tune(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    prior_spec: PriorSpec | str | Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    config: TrainConfig | None = None,
    metric: str = "nll",
    progress: bool = True,
    refit: bool = True,
    objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    split: str = "auto",
    collate_fn: Callable | None = None,
) -> TuneResult:
    """Grid search on a validation split (see the module docstring).

    Args:
        model_fn: returns a fresh pretrained / initialised model on every call (called after
            ``torch.manual_seed(seed)``, so random heads are the same in every trial).
        train_set: the n training examples.
        prior_spec: a :class:`PriorSpec`, a kind name (``"standard"``...), or a dict of PriorSpec fields.
        grid: axis name -> values (see the module docstring).
        val_fraction: share of the examples held out for validation.
        seed: picks the split and seeds every fit (``config.seed`` is replaced): same seed, same table.
        config: training settings (grid axes override them).
        metric: selection criterion on the validation set: ``nll`` (default), ``ece``, ``brier`` or ``accuracy``.
        progress: progress bars (the refit's too).
        refit: retrain on all of ``train_set`` with the chosen values.
        objective: training objective (default cross-entropy).
        split: ``"balanced"``, ``"random"`` or ``"auto"`` (see :func:`validation_split`).
        collate_fn: how a Dataset's examples become batches (text).

    Returns:
        A :class:`TuneResult`.

    Raises:
        DivergenceError: every trial diverged.
    """
    from tqdm.auto import tqdm

    from ptyl.metrics import evaluate_probs

    spec = _as_spec(prior_spec)
    check_choice(metric, tuple(METRICS), "metric")
    check_choice(split, SPLITS, "split")
    base = replace(config or TrainConfig(), seed=int(seed), progress=False)
    axes = check_grid(grid, spec, base)
    fit_part, val_part = validation_split(train_set, val_fraction, seed, split)
    val_targets = stacked_targets(val_part)
    table = []
    for combo in tqdm(list(itertools.product(*axes.values())), desc=f"tune[{spec.kind}]", disable=not progress):
        values = dict(zip(axes, combo))
        row = dict(values)
        try:
            result = _fit_once(model_fn, fit_part, spec, base, values, objective, collate_fn)
            probs = result.predict(val_part)
            if not torch.isfinite(probs).all():
                raise DivergenceError("non-finite validation predictions")
            row.update({f"val_{k}": v for k, v in evaluate_probs(probs, val_targets).items()})
        except DivergenceError as err:  # numerical failure: the trial loses, the search goes on
            row.update({"val_nll": math.inf, "val_accuracy": math.nan, "val_ece": math.nan, "val_brier": math.inf,
                        "error": str(err)})
        table.append(row)
    sign = 1.0 if METRICS[metric] == "min" else -1.0
    finite = [r for r in table if math.isfinite(r[f"val_{metric}"])]
    if not finite:
        raise DivergenceError(f"every one of the {len(table)} trials diverged; lower the learning rates or widen the "
                              "prior (a stiff prior, lr / (n variance) > 2, makes SGD diverge) "
                              f"(first error: {table[0].get('error')})")
    best_row = min(finite, key=lambda r: sign * r[f"val_{metric}"])  # first of ties, in grid order
    best = {k: best_row[k] for k in axes}
    edges = edge_warnings(axes, best)
    for message in edges:
        warnings.warn(message, stacklevel=2)
    final = None
    if refit:
        final = _fit_once(model_fn, train_set, spec, replace(base, progress=progress), best, objective, collate_fn)
    sizes = {"train": len(fit_part), "val": len(val_part), "total": len(train_set)}
    return TuneResult(best, table, edges, final, metric, axes, sizes)


def _fit_once(model_fn, data: Dataset, spec: PriorSpec, base: TrainConfig, values: dict[str, Any], objective,
              collate_fn) -> FitResult:
    prior_values = {k: v for k, v in values.items() if k in PRIOR_KEYS}
    config = replace(base, **{k: v for k, v in values.items() if k not in PRIOR_KEYS})
    torch.manual_seed(config.seed)  # same initial head in every trial: differences come from the grid values only
    model = model_fn()
    prior = spec.build_prior(model, **prior_values)  # before training: L2-SP centres on the pretrained weights
    return fit(model, data, prior, config, objective=objective, num_data=len(data), head=spec.head,
               collate_fn=collate_fn)

