"""Choosing the prior's strength without a grid: one training run that learns it (``tune(..., strategy=...)``).

=============  ==================================================================  ===================================
strategy       what the run does                                                   reference
=============  ==================================================================  ===================================
``de-elbo``    trains the weights, a diagonal q and log lam / log v jointly on     Harvey et al. 2024,
               the data-emphasized ELBO (:class:`DEELBOStrategy`)                  https://arxiv.org/abs/2410.19675
``marglik``    MAP training; every few epochs log lam / log v take Adam steps on   Immer et al. 2021,
               the Laplace evidence with K-FAC curvature (``curvature="diag"``:    https://arxiv.org/abs/2104.04975
               the exact diagonal GGN) (:class:`MarginalLikelihood`)
=============  ==================================================================  ===================================

Both run through :class:`~ptyl.training.Trainer` with the caller's :class:`~ptyl.training.TrainConfig` -- the same
optimizer, learning rate, schedule and epochs as one grid trial -- on all n training examples (no validation split:
that is their point), and start from the registry's values (:class:`~ptyl.priors.PriorKind`: the strength axis at
the recipe's ``default``, the midpoint of its grid range; the head variance at ``PriorSpec.head_variance``). What
they learn is the kind's strength axis and the head variance unless :attr:`AutoConfig.learn` says otherwise; the
registry declares what each kind may learn (``recipe.learnable``).

The result is a :class:`~ptyl.tuning.TuneResult` like the grid's: ``best`` holds the selected values as keyword
arguments of :func:`ptyl.priors.make_prior`, ``table`` the per-epoch path (loss, hyper-parameters, objective; the
last row also the strength diagnostics of the selected prior, as every grid trial has them: the N-aware curvature
share at the trained model, ``prior_share`` / ``prior_off``, and the std ratio against the starting weights), ``final`` the trained model (DE-ELBO: the variational mean),
``search_cost_s`` the run's seconds. A config whose
inference samples (``lowrank-sgld``) is refit with it at the selected values.

``auto`` (:data:`AUTO`, the command line's ``--tune auto``) is DE-ELBO; neither strategy matches the grid on
any benchmark cell (``benchmarks/results/autotune.md``), see its docstring.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.autotune.build import build_family
from ptyl.autotune.likelihoods import Categorical, Likelihood, get_likelihood
from ptyl.autotune.share import prior_share
from ptyl.errors import ConfigError
from ptyl.params import named_parameters
from ptyl.priors.factory import make_prior
from ptyl.priors.strength import prior_strength
from ptyl.training.config import TrainConfig
from ptyl.training.fitting import fit
from ptyl.training.registry import Inference
from ptyl.tuning.deelbo import DEELBOStrategy
from ptyl.tuning.marglik import MarginalLikelihood
from ptyl.tuning.result import DEELBO, MARGLIK, TuneResult
from ptyl.validation import check_choice

__all__ = ["AUTO", "AutoConfig", "tune_automatic"]

AUTO = DEELBO
"""What ``--tune auto`` runs: DE-ELBO. In the side-by-side benchmark (``benchmarks/results/autotune.md``, four pairs,
n = 10, 100 and full, 5 seeds, learned low-rank prior) neither automatic strategy matches the validation grid on any
cell. DE-ELBO's accuracy is the closer on average (-1.5 points against the marginal likelihood's -3.2) and it never
collapses the way the Laplace evidence does at n = 10 (0.64 against the grid's 0.85 on KMNIST -> MNIST); its NLL is
the worse (+0.27 against +0.13 on average), almost all of it on the text pair, where it is over-confident and the
marginal likelihood ties the grid. So ``auto`` is DE-ELBO (on text, ``marglik`` did better); the grid stays the
default of ``tune`` and ``--tune``."""


@dataclass
class AutoConfig:
    """Settings of the automatic strategies. Defaults: ``benchmarks/results/autotune_defaults.md`` (a held-out pair,
    MNIST-5k -> KMNIST, scored on a validation pool): DE-ELBO's hyper_lr 0.1 beat 1e-2 at each of init_std 1e-4, 1e-3,
    1e-2 (pool NLL and accuracy, 2 seeds), init_std made no consistent difference (1e-3 kept); the exact hyper update
    (``hyper_solver="exact"``) tied that Adam setting there (pool NLL 2.05 vs 2.08 at n = 10, 0.603 vs 0.604 at
    n = 100) and is the default because it reaches the KL's minimiser in runs too short for Adam (the text pair's 60
    steps) at ~15% more time per run on the image pairs; the marglik runs used
    K-FAC with a one-sample Monte-Carlo Fisher (5x cheaper than the exact one), the diagonal GGN chose far too strong
    priors (pool accuracy 0.28 against 0.42), ``restore_best`` and 5 instead of 10 updates changed nothing beyond the
    seed spread (5 kept: each update costs a curvature pass and 21 evidence evaluations, ~1 s each for the MiniLM
    layer's 1.8M-parameter rank-10 prior).

    Attributes:
        learn: hyper-parameters to learn, from ``("scale", "eps", "variance", "head_variance")``; ``None``: the
            kind's strength axis and, when the head has a prior, ``head_variance``.
        initial: starting values by name (default: the registry's ``default`` for the strength axis).
        likelihood, noise_variance: the model of the data (``"categorical"`` or ``"gaussian"``); the training
            objective defaults to it.
        hyper_lr: Adam learning rate of the log hyper-parameters (DE-ELBO with ``hyper_solver="adam"``: per
            training step; marglik: per hyper step of an update).
        kappa, init_std, std_lr, hyper_every, hyper_solver, num_samples, bma_samples: DE-ELBO
            (:class:`DEELBOStrategy`).
        curvature, updates, burnin, hyper_steps, fisher, mc_samples, restore_best: marglik
            (:class:`MarginalLikelihood`); ``updates`` spreads that many evidence updates over the run (an update
            every ``max(1, epochs // updates)`` epochs, and one after the last).
        curvature_batch_size, curvature_examples: marglik's curvature passes: their batch size, and a cap on the
            examples each pass reads (a random subset, scaled up to N).
    """

    learn: Sequence[str] | None = None
    initial: Mapping[str, float] | None = None
    likelihood: str | Likelihood = "categorical"
    noise_variance: float = 1.0
    hyper_lr: float = 0.1
    kappa: float | None = None
    init_std: float = 1e-3
    std_lr: float = 1e-2
    hyper_every: int = 10
    hyper_solver: str = "exact"
    num_samples: int = 1
    bma_samples: int = 0
    curvature: str = "kfac"
    updates: int = 5
    burnin: int = 0
    hyper_steps: int = 20
    fisher: str = "mc"
    mc_samples: int = 1
    restore_best: bool = False
    curvature_batch_size: int = 256
    curvature_examples: int | None = 1000

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a Likelihood instance by its name)."""
        out = asdict(self)
        out["likelihood"] = getattr(self.likelihood, "name", self.likelihood)
        return out


def _family(model: nn.Module, spec, auto: AutoConfig):
    """The prior family of ``spec`` at its starting values, learning what ``auto.learn`` (or the registry) says."""
    recipe = spec.kind.recipe
    if not recipe.learnable:
        raise ConfigError(f"prior kind {str(spec.kind)!r} has no usable scale to learn (its registry recipe declares "
                          "no learnable hyper-parameter); tune it with strategy 'grid'")
    if recipe.needs_posterior and spec.posterior is None:
        raise ConfigError(f"prior kind {str(spec.kind)!r} needs PriorSpec.posterior (the learned source posterior)")
    learn = auto.learn if auto.learn is not None else (
        (recipe.axis,) + (("head_variance",) if spec.head_variance is not None else ()))
    initial = {recipe.axis: recipe.default, **(auto.initial or {})}
    values = {"scale": spec.scale, "variance": spec.variance, "eps": spec.eps,  # None: the registry's defaults
              "head_variance": spec.head_variance}
    values.update({k: v for k, v in initial.items() if k in values})
    return build_family(model, spec.kind, posterior=spec.posterior, rank=spec.rank, blocks=spec.blocks,
                        head=spec.head, unregularized=spec.unregularized, learn=tuple(learn), **values)


def _run_parts(strategy: str, family, config: TrainConfig, auto: AutoConfig, likelihood: Likelihood):
    """(prior, strategy object, callbacks) of the automatic run."""
    if strategy == DEELBO:
        deelbo = DEELBOStrategy(config, family, kappa=auto.kappa, init_std=auto.init_std,
                                hyper_lr=auto.hyper_lr, std_lr=auto.std_lr, hyper_every=auto.hyper_every,
                                num_samples=auto.num_samples, bma_samples=auto.bma_samples,
                                hyper_solver=auto.hyper_solver)
        return None, deelbo, []
    callback = MarginalLikelihood(family, likelihood, curvature=auto.curvature, updates=auto.updates,
                                  burnin=auto.burnin, steps=auto.hyper_steps, lr=auto.hyper_lr,
                                  fisher=auto.fisher, mc_samples=auto.mc_samples, restore_best=auto.restore_best,
                                  batch_size=auto.curvature_batch_size, max_examples=auto.curvature_examples)
    return family.to_prior(), None, [callback]


def tune_automatic(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    spec,
    strategy: str = AUTO,
    *,
    config: TrainConfig | None = None,
    auto: AutoConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    refit: bool = True,
    objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    collate_fn: Callable | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
) -> TuneResult:
    """Learn the prior's strength in one training run (see the module docstring).

    Args:
        model_fn: returns a fresh pretrained / initialised model (called once, after ``torch.manual_seed(seed)``).
        train_set: the n training examples (all of them train).
        spec: a :class:`~ptyl.tuning.PriorSpec` (its strength field is not used: it is learned).
        strategy: ``"de-elbo"`` or ``"marglik"``.
        config: training settings, as for one grid trial (``seed`` and ``progress`` are replaced).
        auto: an :class:`AutoConfig`.
        seed, progress: seeds the model, the run and its draws; progress bars.
        refit: when ``config.inference`` samples (SGLD, ...), refit with it at the selected values (the
            automatic run itself is MAP / DE-ELBO); otherwise the run's model is final either way.
        objective, collate_fn: the training objective (default: the likelihood's) and how examples become batches.
        checkpoint, resume: a checkpoint file written after every epoch, and resuming from it.

    Returns:
        A :class:`~ptyl.tuning.TuneResult` with ``strategy``, ``best`` (make_prior keyword arguments), ``table``
        (per-epoch path), ``final`` and ``search_cost_s``.

    Raises:
        ConfigError: the kind has nothing to learn, the head or the posterior is missing, a bad setting.
        DataError: no training batches.
        DivergenceError: the run diverged.
    """
    start = time.perf_counter()
    strategy = check_choice(strategy, (DEELBO, MARGLIK), "automatic tuning strategy")
    auto = auto or AutoConfig()
    likelihood = get_likelihood(auto.likelihood, auto.noise_variance)
    if objective is None and not isinstance(likelihood, Categorical):
        objective = likelihood  # the default objective is the cross-entropy, the categorical likelihood
    config = replace(config or TrainConfig(), seed=int(seed), progress=progress)
    config.validate()
    run_config = replace(config, inference=Inference.MAP)
    torch.manual_seed(config.seed)  # the same initial head as the grid's trials
    model = model_fn()
    family = _family(model, spec, auto)  # before training: l2sp centres on the pretrained weights
    start_weights = {n: p.detach().to("cpu", copy=True) for n, p in named_parameters(model).items()}
    prior, deelbo, callbacks = _run_parts(strategy, family, run_config, auto, likelihood)
    result = fit(model, train_set, prior, run_config, strategy=deelbo, callbacks=callbacks, objective=objective,
                 num_data=len(train_set), head=spec.head, collate_fn=collate_fn, checkpoint=checkpoint,
                 resume=resume)
    selected = family.prior_kwargs()
    search_cost = time.perf_counter() - start
    table = [dict(record) for record in result.history]
    chosen = family.to_prior()
    share = prior_share(chosen, result.model, train_set, likelihood=likelihood, collate_fn=collate_fn)
    table[-1].update({"std_ratio": prior_strength(chosen, start_weights).std_ratio,  # as the grid's: vs the start
                      "prior_share": share.share, "prior_share_blocks": share.blocks, "prior_off": share.off})
    final = result
    if refit and Inference.parse(config.inference) is not Inference.MAP:
        torch.manual_seed(config.seed)
        model = model_fn()
        prior = make_prior(model, spec.kind, posterior=spec.posterior, rank=spec.rank, blocks=spec.blocks,
                           head=spec.head, unregularized=spec.unregularized,
                           **{"eps": spec.eps, "head_variance": spec.head_variance, **selected})
        final = fit(model, train_set, prior, config, objective=objective, num_data=len(train_set), head=spec.head,
                    collate_fn=collate_fn)
    objective_name = "deelbo" if strategy == DEELBO else "log_evidence"
    score = next((r[objective_name] for r in reversed(result.history) if objective_name in r), math.nan)
    if strategy == MARGLIK:
        score = callbacks[0].log_evidence
    sizes = {"train": len(train_set), "val": 0, "total": len(train_set)}
    return TuneResult(selected, table, [], final, objective_name, {}, sizes, validation="none", strategy=strategy,
                      search_cost_s=search_cost, objective=float(score), settings=auto.to_dict())
