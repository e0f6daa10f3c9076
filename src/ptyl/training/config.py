"""The settings of one training run: a flat dataclass, so tuning grids, config files and checkpoints can name any
field. The inference strategy (``inference``) reads the fields it needs and checks them in
:meth:`Strategy.validate <ptyl.training.strategies.base.Strategy.validate>`.

>>> config = TrainConfig(inference="sgld", epochs=5, temperature=0.01)
>>> config.validate()
>>> TrainConfig(epochs=0).validate()
Traceback (most recent call last):
...
ptyl.errors.InvalidValueError: epochs must be an integer >= 1, got 0
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ptyl.training.precision import PRECISIONS
from ptyl.training.registry import Inference
from ptyl.validation import check_choice, check_fraction, check_int, check_nonnegative_number, check_positive_number

__all__ = ["OPTIMIZERS", "PRIOR_STEPS", "SAMPLE_LR_FACTOR", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant", "cyclical")
PRIOR_STEPS = ("auto", "proximal", "gradient")
SAMPLE_LR_FACTOR = 0.01  # SGLD's default sampling step, relative to lr (TrainConfig.sample_lr)


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`ptyl.training.fit`. Learning rates apply to the per-example objective U.

    Attributes:
        inference: the strategy, an :class:`~ptyl.training.Inference` name: ``map``, ``sgld``, ``csgld``, ``swag``,
            ``laplace``.
        epochs, batch_size: passes over the data and the (global) batch size.
        max_steps: the budget in optimizer steps instead of ``epochs`` (rounded up to whole epochs; the schedule
            spans it).
        stop_loss, stop_plateau, plateau_steps, min_steps: the convergence rule (MAP; samplers run the whole
            budget). After every epoch, once ``min_steps`` steps were taken, training stops when the epoch-mean data
            loss is ``<= stop_loss`` ("loss"), or when the mean objective (data + prior term, nats per example) of the
            last ``plateau_steps`` steps is less than ``stop_plateau`` below that of the ``plateau_steps`` before
            ("plateau"). Once met, MAP anneals the learning rate to 0 over ``anneal_fraction`` of the steps taken so
            far, then stops. A run that uses up its budget without meeting the rule (also checked at its end) is
            flagged unconverged (:attr:`FitResult.converged`).
        prior_step: how the prior's separable (diagonal) part enters the update: ``proximal`` (a closed-form
            proximal step after each SGD step, stable for any prior strength: :class:`ptyl.priors.ProximalPrior`),
            ``gradient`` (plain gradient of the penalty) or ``auto`` (proximal for MAP / SWAG with SGD, else
            gradient).
        lr, head_lr: learning rate (``head_lr``: of the head's parameters; ``None``: ``lr``).
        optimizer: ``sgd`` (Nesterov momentum) or ``adam`` (map / swag; SGLD samplers have their own update).
        momentum, nesterov: SGD momentum (SGLD: SGHMC friction ``1 - momentum``).
        schedule: ``cosine`` | ``constant`` (map, swag before collection); swag also ``cyclical``.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        temperature: posterior temperature of the SGLD samplers: 0.01 (a cold posterior) by default; 1 is the exact
            Bayes posterior, whose model average is poor with few examples per class (benchmarks/results/pairs.md).
        num_cycles, samples_per_cycle, exploration_fraction: cyclical SGLD.
        burn_in_fraction: share of the run before samples / SWAG snapshots are collected.
        sample_lr: SGLD's step size while it samples: the burn-in decays the learning rate from ``lr`` to it (half a
            cosine), then it stays constant (``None``: ``lr * SAMPLE_LR_FACTOR``, a hundredth). A sampler's step must
            be small against the curvature for its iterates to follow the posterior: at a MAP-sized step the
            stationary spread is inflated (+34% variance on a Gaussian at lr times the largest curvature = 1.7,
            ``tests/training/test_sgld.py``), and on MNIST at 10 per class (lr 0.1, momentum 0.9) the iterates fit the
            training data worse than MAP even at T = 0 (``benchmarks/results/predictive_diagnostics.md``). Set it
            to ``lr`` for the constant step of Welling & Teh.
        num_samples: samples kept (SGLD) or drawn (SWAG) for Bayesian model averaging.
        swag_rank, swag_lr, swag_collect_every: downstream SWAG (rank K, collection learning rate, snapshot every n
            steps; ``None``: once per epoch).
        laplace_subset, laplace_curvature, laplace_predictive, laplace_prior_precision: ``inference="laplace"``
            (MAP, then the Laplace approximation around it: :func:`ptyl.inference.laplace`): ``last-layer`` or
            ``all`` parameters, ``kfac`` or ``diag`` GGN (``all``), ``probit`` or ``mc`` predictive, and the factor tau
            on the prior's precision (1: the prior trained under; large: back to the MAP), or a tuple of values to
            choose from: a tuning trial chooses on its validation data (at one MAP fit for all of them), a plain
            :func:`~ptyl.training.fit` by the Laplace evidence.
        check_every: check that the loss is finite every this many steps (and at every epoch end); the loop does
            not wait for the device in between.
        precision: ``"fp32"``, or mixed precision ``"bf16"`` / ``"fp16"``: the data term under ``torch.autocast``
            (fp16 with a gradient scaler, unscaled before clipping), the prior term in the parameters' dtype.
        seed, device, progress: random seed, device (``None``: the model's), progress bar.
    """

    inference: str = Inference.MAP
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    head_lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"
    grad_clip: float | None = None
    temperature: float = 0.01
    num_cycles: int = 4
    samples_per_cycle: int = 3
    exploration_fraction: float = 0.5
    burn_in_fraction: float = 0.5
    sample_lr: float | None = None
    num_samples: int = 10
    swag_rank: int = 10
    swag_lr: float | None = None
    swag_collect_every: int | None = None
    laplace_subset: str = "last-layer"
    laplace_curvature: str = "kfac"
    laplace_predictive: str = "probit"
    laplace_prior_precision: float | tuple[float, ...] = 1.0
    stop_loss: float | None = None
    stop_plateau: float | None = None
    plateau_steps: int = 100
    min_steps: int = 0
    anneal_fraction: float = 0.25
    prior_step: str = "auto"
    check_every: int = 100
    precision: str = "fp32"
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        # plain strings, never enum members: checkpoints are loaded with weights_only=True, which unpickles no classes
        for key in ("inference", "optimizer", "schedule", "prior_step"):
            value = getattr(self, key)
            if isinstance(value, Enum):
                setattr(self, key, value.value)

    def validate(self) -> None:
        """Raise a :class:`~ptyl.errors.PtylError` naming the first invalid field (before any training starts)."""
        strategy = Inference.parse(self.inference).strategy
        check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        check_choice(self.schedule, SCHEDULES, "schedule")
        check_choice(self.precision, PRECISIONS, "precision")
        check_choice(self.prior_step, PRIOR_STEPS, "prior_step")
        for key in ("epochs", "batch_size", "num_samples", "check_every", "plateau_steps"):
            check_int(getattr(self, key), key, minimum=1)
        check_int(self.min_steps, "min_steps", minimum=0)
        if self.max_steps is not None:
            check_int(self.max_steps, "max_steps", minimum=1)
        check_nonnegative_number(self.anneal_fraction, "anneal_fraction")
        for key in ("stop_loss", "stop_plateau"):
            if getattr(self, key) is not None:
                check_nonnegative_number(getattr(self, key), key)
        check_positive_number(self.lr, "lr")
        for key in ("head_lr", "swag_lr", "sample_lr", "grad_clip"):
            if getattr(self, key) is not None:
                check_positive_number(getattr(self, key), key)
        check_nonnegative_number(self.temperature, "temperature")
        check_fraction(self.burn_in_fraction, "burn_in_fraction")
        check_fraction(self.momentum, "momentum")
        strategy.validate(self)
