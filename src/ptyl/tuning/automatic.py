"""Choosing the prior's strength without a grid: one training run that learns it (``tune(..., strategy=...)``).

The automatic strategies are entries of :class:`~ptyl.tuning.registry.TuningStrategy`, each an
:class:`AutomaticTuner` subclass in its own file with its own settings (an :class:`AutomaticSettings` subclass):

=================  ==============================================================  ===================================
strategy           what the run does                                               reference
=================  ==============================================================  ===================================
``de-elbo``        trains the weights, a diagonal q and log lam / log v jointly    Harvey et al. 2024,
                   on the data-emphasized ELBO (:mod:`ptyl.tuning.deelbo`)         https://arxiv.org/abs/2410.19675
``marglik``        MAP training; every few epochs log lam / log v take Adam steps  Immer et al. 2021,
                   on the Laplace evidence (:mod:`ptyl.tuning.marglik`)            https://arxiv.org/abs/2104.04975
``hypergradient``  from the off limit, warm-started MAP segments; between them     Lorraine et al. 2020,
                   log lam / log v take an Rprop step on the implicit              https://arxiv.org/abs/1911.02590
                   hypergradient of the validation pool's NLL; the best point on
                   the pool is kept (:mod:`ptyl.tuning.hypergradient`)
``continuation``   from the off limit, weak to strong: each strength continues     issue 22 (a warm-started
                   from the previous one's weights for a share of the budget; the  continuation path)
                   best point on the pool is kept; may choose lr too
                   (:mod:`ptyl.tuning.continuation`)
=================  ==============================================================  ===================================

All run through :class:`~ptyl.training.Trainer` with the caller's :class:`~ptyl.training.TrainConfig` -- the same
optimizer, learning rate, schedule and epochs as one grid trial -- on all n training examples, and start from the
tuner's :meth:`AutomaticTuner.start_values` (default: the registry's, :class:`~ptyl.priors.PriorKind`: the strength
axis at the recipe's ``default``; the head variance at ``PriorSpec.head_variance``). What they learn is the kind's
strength axis and the head variance unless :attr:`AutomaticSettings.learn` says otherwise; the registry declares
what each kind may learn (``recipe.learnable``). Strategies with ``uses_validation`` learn from a validation pool
(``tune(..., val_set=pool)``, never trained on); the others refuse one.

The result is a :class:`~ptyl.tuning.TuneResult` like the grid's: ``best`` holds the selected values as keyword
arguments of :func:`ptyl.priors.make_prior` (the strength axis ``inf`` where a pool strategy selected the off limit,
plain fine-tuning with no backbone prior), ``table`` the per-epoch path (loss, hyper-parameters, the strategy's
objective; the last row also the strength diagnostics of the selected prior, as every grid trial has them
(:func:`selection_diagnostic`): the N-aware curvature share at the trained model on the training set,
``prior_share`` / ``prior_off``, and the std ratio against the starting weights), ``path`` the strategy's own record
of its updates (the hypergradient: h per hyper step; the continuation: one entry per point), ``final`` the trained
model (DE-ELBO: the variational mean), ``search_cost_s`` the seconds spent choosing. A config whose inference samples
(``lowrank-sgld``) is refit with it at the selected values. What ``--tune auto`` means:
:data:`ptyl.tuning.registry.AUTO`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.autotune.build import build_family
from ptyl.autotune.families import Family
from ptyl.autotune.likelihoods import Categorical, Likelihood, get_likelihood
from ptyl.errors import ConfigError
from ptyl.params import named_parameters
from ptyl.priors.registry import PriorKind
from ptyl.training.config import TrainConfig
from ptyl.training.fitting import fit
from ptyl.training.registry import Inference
from ptyl.training.result import FitResult
from ptyl.tuning.registry import AUTO, TuningStrategy
from ptyl.tuning.result import TuneResult
from ptyl.tuning.selection import selected_prior, selection_diagnostic
from ptyl.tuning.trials import BACKBONE_KEYS, OFF, PRIOR_KEYS

__all__ = ["AutomaticRun", "AutomaticSettings", "AutomaticTuner", "tune_automatic"]


@dataclass
class AutomaticSettings:
    """What every automatic strategy's settings hold (each strategy subclasses it with its own fields).

    Attributes:
        learn: hyper-parameters to learn, from ``("scale", "eps", "variance", "head_variance")``; ``None``: the
            kind's strength axis and, when the head has a prior, ``head_variance``.
        initial: starting values by name (default: the tuner's :meth:`AutomaticTuner.start_values`).
        likelihood, noise_variance: the model of the data (``"categorical"`` or ``"gaussian"``); the training
            objective defaults to it.
    """

    learn: Sequence[str] | None = None
    initial: Mapping[str, float] | None = None
    likelihood: str | Likelihood = "categorical"
    noise_variance: float = 1.0

    def check(self) -> None:
        """Refuse out-of-range fields with a clear error (each strategy's settings check their own; none here)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a Likelihood instance by its name)."""
        out = asdict(self)
        out["likelihood"] = getattr(self.likelihood, "name", self.likelihood)
        return out


@dataclass
class AutomaticRun:
    """Everything one automatic run works with (built by :func:`tune_automatic`, handed to the tuner's hooks).

    Attributes:
        model_fn, train_set, val_set, spec: as given to :func:`tune_automatic` (``val_set``: ``None`` unless the
            tuner ``uses_validation``).
        model: the model being trained; ``start_weights``: its weights before training (CPU copies).
        family: the differentiable prior family over it (:func:`ptyl.autotune.build_family`).
        config: the run's :class:`~ptyl.training.TrainConfig` (MAP); ``likelihood``: the model of the data.
        objective, collate_fn: the training objective (``None``: cross-entropy) and how examples become batches.
        path: the tuner's record of its updates (``TuneResult.path``).
        lrs: the learning rates the tuner may choose among (a tuner with ``tunes_lr``; else ``(config.lr,)``).
        off: the model trains (and, at the end, was selected) at the off limit: no backbone prior term, the
            family's head prior only (:meth:`prior`).
    """

    model_fn: Callable[[], nn.Module]
    train_set: Dataset
    val_set: Dataset | None
    spec: Any
    model: nn.Module
    start_weights: dict[str, torch.Tensor]
    family: Family
    config: TrainConfig
    likelihood: Likelihood
    objective: Callable | None
    collate_fn: Callable | None
    path: list[dict[str, Any]] = field(default_factory=list)
    lrs: tuple[float, ...] = ()
    off: bool = False

    def prior(self, model: nn.Module | None = None):
        """The prior the run trains under now: the family's, or at the off limit (``off``) the spec's head prior
        alone (kind ``none``, the family's head variance), built for ``model`` (default ``self.model``)."""
        if not self.off:
            return self.family.to_prior()
        head_variance = self.family.prior_kwargs().get("head_variance", self.spec.head_variance)
        return replace(self.spec, kind=PriorKind.NONE).build_prior(model or self.model, head_variance=head_variance)

    def selected(self) -> dict[str, Any]:
        """The selected values as :func:`ptyl.priors.make_prior` keyword arguments: the family's, or at the off
        limit the strength axis at ``inf`` (:data:`~ptyl.tuning.trials.OFF`) and the head variance."""
        values = self.family.prior_kwargs()
        if not self.off:
            return values
        return {self.spec.kind.recipe.axis: OFF, **{k: v for k, v in values.items() if k not in BACKBONE_KEYS}}


class AutomaticTuner:
    """An automatic strategy: what it trains with, and what it reports. Subclasses set ``Settings``, ``metric`` and
    ``uses_validation`` and define :meth:`parts`; the rest has defaults.

    Attributes:
        Settings: the settings dataclass (an :class:`AutomaticSettings` subclass).
        metric: the history column holding the strategy's own objective (``TuneResult.metric``).
        uses_validation: learns from a validation pool (``tune(..., val_set=...)``, required); otherwise a pool is
            refused (the strategy learns from the training data alone).
        tunes_lr: chooses the learning rate too, among several (``tune(..., {"lr": [...]})``: ``run.lrs``); the
            others run at one.
    """

    Settings: type[AutomaticSettings] = AutomaticSettings
    metric = "objective"
    uses_validation = False
    tunes_lr = False

    def __init__(self, settings: AutomaticSettings) -> None:
        self.settings = settings

    def start_values(self, spec) -> dict[str, float]:
        """Where the learned values start (before ``settings.initial``).

        Args:
            spec: the :class:`~ptyl.tuning.PriorSpec`.

        Returns:
            ``{axis: value}``; by default the registry's default strength of the kind.
        """
        recipe = spec.kind.recipe
        return {recipe.axis: recipe.default}

    def learned(self, spec) -> tuple[str, ...]:
        """What the run learns.

        Args:
            spec: the :class:`~ptyl.tuning.PriorSpec`.

        Returns:
            ``settings.learn``, else the kind's strength axis and (with a head prior) ``head_variance``.
        """
        if self.settings.learn is not None:
            return tuple(self.settings.learn)
        return (spec.kind.recipe.axis,) + (("head_variance",) if spec.head_variance is not None else ())

    def check_data(self, train_set: Dataset, val_set: Dataset | None, name: str) -> None:
        """Refuse a pool this strategy would not use, or a missing one it needs (before anything is trained).

        Args:
            train_set, val_set: the training examples and the validation pool (or ``None``).
            name: the strategy's name (for the messages).

        Raises:
            ConfigError: a pool given to a strategy that learns without one, or missing for one that needs it.
        """
        if self.uses_validation and val_set is None:
            raise ConfigError(f"tuning strategy {name!r} learns from a validation pool: pass val_set (examples never "
                              "trained on)")
        if not self.uses_validation and val_set is not None:
            raise ConfigError(f"tuning strategy {name!r} learns from the training data alone: drop val_set (the "
                              "strategies that learn from a pool: "
                              f"{[str(s) for s in TuningStrategy if s.automatic and s.tuner.uses_validation]})")

    def parts(self, run: AutomaticRun) -> tuple[Any, Any, list]:  # pragma: no cover - abstract
        """What the training run uses.

        Args:
            run: the :class:`AutomaticRun` (its family, config, likelihood, data).

        Returns:
            ``(prior the loop starts under or None, a training Strategy or None for MAP, callbacks)``.
        """
        raise NotImplementedError

    def objective_value(self, run: AutomaticRun, result: FitResult) -> float:
        """The strategy's objective for the selected model.

        Args:
            run: the :class:`AutomaticRun`.
            result: the selected model (what :meth:`finish` returned).

        Returns:
            By default the last ``metric`` in ``result.history`` (NaN if none).
        """
        return next((float(r[self.metric]) for r in reversed(result.history) if self.metric in r), math.nan)

    def finish(self, run: AutomaticRun, result: FitResult) -> tuple[dict[str, Any], FitResult]:
        """After the run. A tuner may change both outputs here (e.g. confirmation trials, counted in the search cost),
        adding its record to ``run.path``.

        Args:
            run: the :class:`AutomaticRun`.
            result: the training run's :class:`~ptyl.training.FitResult`.

        Returns:
            ``(selected values as make_prior keyword arguments, the selected model's FitResult)``.
        """
        return run.selected(), result


def resolve_settings(strategy: TuningStrategy, auto: AutomaticSettings | Mapping[str, Any] | None
                     ) -> AutomaticSettings:
    """The strategy's settings from ``auto``: ``None`` (defaults), its settings class, or a mapping of its fields."""
    cls = strategy.settings
    if auto is None:
        return cls()
    if isinstance(auto, Mapping):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(auto) - names)
        if unknown:
            raise ConfigError(f"tuning strategy {strategy.value!r} has no setting(s) {unknown}; its settings "
                              f"({cls.__name__}): {sorted(names)}")
        return cls(**auto)
    if type(auto) is not cls:
        raise ConfigError(f"tuning strategy {strategy.value!r} takes {cls.__name__} settings, got "
                          f"{type(auto).__name__}")
    return auto


def build_run_family(model: nn.Module, spec, tuner: AutomaticTuner) -> Family:
    """The prior family of ``spec`` at the tuner's starting values, learning what the tuner says."""
    recipe = spec.kind.recipe
    if not recipe.learnable:
        raise ConfigError(f"prior kind {str(spec.kind)!r} has no usable scale to learn (its registry recipe declares "
                          "no learnable hyper-parameter); tune it with strategy 'grid'")
    if recipe.needs_posterior and spec.posterior is None:
        raise ConfigError(f"prior kind {str(spec.kind)!r} needs PriorSpec.posterior (the learned source posterior)")
    initial = {**tuner.start_values(spec), **(tuner.settings.initial or {})}
    values = {"scale": spec.scale, "variance": spec.variance, "eps": spec.eps,  # None: the registry's defaults
              "head_variance": spec.head_variance}
    values.update({k: v for k, v in initial.items() if k in values})
    return build_family(model, spec.kind, posterior=spec.posterior, rank=spec.rank, blocks=spec.blocks,
                        head=spec.head, unregularized=spec.unregularized, learn=tuner.learned(spec), **values)


def tune_automatic(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    spec,
    strategy: str | TuningStrategy = AUTO,
    *,
    config: TrainConfig | None = None,
    auto: AutomaticSettings | Mapping[str, Any] | None = None,
    val_set: Dataset | None = None,
    seed: int = 0,
    progress: bool = True,
    refit: bool = True,
    objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    collate_fn: Callable | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
    lrs: Sequence[float] | None = None,
) -> TuneResult:
    """Learn the prior's strength in one training run (see the module docstring).

    Args:
        model_fn: returns a fresh pretrained / initialised model (called once, after ``torch.manual_seed(seed)``).
        train_set: the n training examples (all of them train).
        spec: a :class:`~ptyl.tuning.PriorSpec` (its strength field is not used: it is learned).
        strategy: an automatic :class:`~ptyl.tuning.registry.TuningStrategy` (or its name).
        config: training settings, as for one grid trial (``seed`` and ``progress`` are replaced).
        auto: the strategy's settings (``TuningStrategy.parse(strategy).settings``, or a mapping of its fields;
            ``None``: its defaults).
        val_set: the validation pool of a strategy that ``uses_validation`` (never trained on).
        seed, progress: seeds the model, the run and its draws; progress bars.
        refit: when ``config.inference`` samples (SGLD, ...), refit with it at the selected values (the
            automatic run itself is MAP / DE-ELBO); otherwise the run's model is final either way.
        objective, collate_fn: the training objective (default: the likelihood's) and how examples become batches.
        checkpoint, resume: a checkpoint file written after every epoch, and resuming from it.
        lrs: learning rates to choose among (a tuner with ``tunes_lr`` only; ``None``: ``config.lr``).

    Returns:
        A :class:`~ptyl.tuning.TuneResult` with ``strategy``, ``best`` (make_prior keyword arguments), ``table``
        (per-epoch path), ``path`` (the tuner's updates), ``final`` and ``search_cost_s``.

    Raises:
        ConfigError: the kind has nothing to learn, the head or the posterior is missing, a bad setting, a pool
            given to a strategy that does not use one (or missing for one that does).
        DataError: no training batches; a bad validation pool.
        DivergenceError: the run diverged.
    """
    start = time.perf_counter()
    entry = TuningStrategy.parse(strategy)
    if not entry.automatic:
        raise ConfigError(f"tune_automatic runs the automatic strategies, not {entry.value!r}: use tune()")
    tuner = entry.tuner(resolve_settings(entry, auto))
    tuner.check_data(train_set, val_set, entry.value)
    if lrs is not None and len(lrs) > 1 and not tuner.tunes_lr:
        raise ConfigError(f"strategy {entry.value!r} runs once: give one value for ['lr'], or use a strategy that "
                          f"chooses it too ({[str(s) for s in TuningStrategy if s.automatic and s.tuner.tunes_lr]}) "
                          "or strategy 'grid'")
    likelihood = get_likelihood(tuner.settings.likelihood, tuner.settings.noise_variance)
    if objective is None and not isinstance(likelihood, Categorical):
        objective = likelihood  # the default objective is the cross-entropy, the categorical likelihood
    config = replace(config or TrainConfig(), seed=int(seed), progress=progress)
    config.validate()
    torch.manual_seed(config.seed)  # the same initial head as the grid's trials
    model = model_fn()
    family = build_run_family(model, spec, tuner)  # before training: l2sp centres on the pretrained weights
    start_weights = {n: p.detach().to("cpu", copy=True) for n, p in named_parameters(model).items()}
    run = AutomaticRun(model_fn, train_set, val_set, spec, model, start_weights, family,
                       replace(config, inference=Inference.MAP), likelihood, objective, collate_fn)
    run.lrs = tuple(lrs) if lrs else (run.config.lr,)
    prior, strategy_object, callbacks = tuner.parts(run)
    result = fit(model, train_set, prior, run.config, strategy=strategy_object, callbacks=callbacks,
                 objective=objective, num_data=len(train_set), head=spec.head, collate_fn=collate_fn,
                 checkpoint=checkpoint, resume=resume)
    selected, final = tuner.finish(run, result)
    score = tuner.objective_value(run, final)
    search_cost = time.perf_counter() - start  # everything up to the selection: the run, finish()'s trials
    table = [dict(record) for record in final.history]
    table[-1].update(selection_diagnostic(run, final.model))
    table[-1].setdefault(tuner.metric, score)  # the selected model's objective, where the history lacks it
    if refit and Inference.parse(config.inference) is not Inference.MAP:
        torch.manual_seed(config.seed)
        model = model_fn()
        values = {k: v for k, v in selected.items() if k in PRIOR_KEYS}
        train = replace(config, **{k: v for k, v in selected.items() if k not in PRIOR_KEYS})
        final = fit(model, train_set, selected_prior(spec, model, values), train, objective=objective,
                    num_data=len(train_set), head=spec.head, collate_fn=collate_fn)
    pool = len(val_set) if val_set is not None else 0
    sizes = {"train": len(train_set), "val": pool, "total": len(train_set)}
    return TuneResult(selected, table, [], final, tuner.metric, {}, sizes, path=run.path,
                      validation="pool" if tuner.uses_validation else "none", strategy=entry.value,
                      search_cost_s=search_cost, objective=float(score), settings=tuner.settings.to_dict())
