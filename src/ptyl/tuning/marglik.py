"""The online Laplace marginal likelihood as a callback of the training loop: MAP training under the prior family's
current values, and every few epochs an update of its hyper-parameters from the Laplace evidence.

Immer, Bauer, Fortuin, Rätsch & Khan, "Scalable marginal likelihood estimation for model selection in deep
learning", ICML 2021, https://arxiv.org/abs/2104.04975, Algorithm 1 (the update: :mod:`ptyl.autotune.marglik`):
after epoch e (``e % every == 0``, ``e >= burnin``, and after the last epoch) the curvature of the summed NLL at the
current weights (K-FAC, diagonal GGN or last layer, over all N training examples), then ``steps`` Adam steps on
``log h`` maximising ``log p(D | h)``; the loop then trains under ``family.to_prior()``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Subset

from ptyl.autotune.families import Family
from ptyl.autotune.likelihoods import Likelihood, get_likelihood
from ptyl.autotune.marglik import CURVATURES, evidence_part, update_hypers
from ptyl.errors import ConfigError
from ptyl.training.callbacks import Callback
from ptyl.tuning.automatic import AutomaticRun, AutomaticSettings, AutomaticTuner
from ptyl.tuning.deelbo import single_process
from ptyl.validation import check_choice, check_int, check_positive_number

if TYPE_CHECKING:
    from ptyl.training.trainer import Trainer

__all__ = ["MarginalLikelihood", "MarglikSettings", "MarglikTuner"]

FISHERS = ("exact", "mc")


class MarginalLikelihood(Callback):
    """Learn ``family``'s hyper-parameters from the online Laplace evidence (see the module docstring).

    The trainer's prior is replaced by the family's at the start and after every update (give the trainer
    ``family.to_prior()`` or ``None``). State (hyper-parameters, their optimizer, the best update) is checkpointed.

    Args:
        family: the prior family over the trained model (:func:`ptyl.autotune.build_family`).
        likelihood: ``"categorical"``, ``"gaussian"`` (``noise_variance``) or a
            :class:`~ptyl.autotune.Likelihood`; it must be the training objective's model.
        curvature: ``"kfac"`` (default), ``"diag"`` (exact diagonal GGN) or ``"last-layer"`` (head variance only).
        every, burnin: update after every ``every``-th epoch from epoch ``burnin`` on (and after the last one);
            ``every=None``: ``updates`` updates spread over the run's epochs (``max(1, epochs // updates)``).
        steps, lr: Adam steps and learning rate on ``log h`` per update.
        fisher, mc_samples: exact GGN or a sampled Fisher with ``mc_samples`` draws.
        restore_best: at the end, go back to the weights and values of the update with the highest evidence.
        batch_size: batch size of the curvature passes.
        max_examples: take the curvature of at most this many training examples (a fresh random subset per update,
            its sums scaled up to N; ``None``: all of them).
        frozen_shape: fit the Kronecker shape of the prior variances once per update (default; milliseconds per
            evaluation) or at every evaluation (exact gradients, ~0.5 s per evaluation on a CNN with eps > 0): see
            :class:`~ptyl.autotune.LaplaceEvidence`.
    """

    stateful = True

    def __init__(self, family: Family, likelihood: str | Likelihood = "categorical", *, curvature: str = "kfac",
                 every: int | None = None, updates: int = 5, burnin: int = 0, steps: int = 20, lr: float = 0.1,
                 fisher: str = "exact",
                 mc_samples: int = 1, restore_best: bool = False, batch_size: int = 256,
                 noise_variance: float = 1.0, frozen_shape: bool = True, max_examples: int | None = None) -> None:
        self.curvature = check_choice(curvature, CURVATURES, "curvature")
        self.fisher = check_choice(fisher, FISHERS, "fisher")
        self.every = None if every is None else check_int(every, "every", minimum=1)
        self.updates = check_int(updates, "updates", minimum=1)
        self.burnin = check_int(burnin, "burnin", minimum=0)
        self.steps = check_int(steps, "steps", minimum=1)
        self.mc_samples = check_int(mc_samples, "mc_samples", minimum=1)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.max_examples = None if max_examples is None else check_int(max_examples, "max_examples", minimum=1)
        self.likelihood = get_likelihood(likelihood, noise_variance)
        self.family, self.restore_best, self.frozen_shape = family, bool(restore_best), bool(frozen_shape)
        self.part = evidence_part(family, self.curvature)
        hypers = list(self.part.parameters())
        if not hypers:
            raise ConfigError("the prior family has no learnable hyper-parameter for this curvature "
                              "(see build_family(learn=...))")
        self.optimizer = torch.optim.Adam(hypers, lr=check_positive_number(lr, "lr"))
        self.best: dict[str, Any] | None = None
        self.updated_at, self.last_evidence = 0, None

    def on_fit_start(self, trainer: Trainer) -> None:
        single_process(trainer, "the online marginal likelihood")
        self.period = self.every or max(1, trainer.config.epochs // self.updates)
        self.family.to(trainer.device)
        trainer.set_prior(self.family.to_prior())

    def _loader(self, trainer: Trainer, seed: int) -> DataLoader:
        """Every training example once (or a random subset of ``max_examples``), the training order untouched."""
        dataset = trainer.loader.dataset
        if self.max_examples is not None and len(dataset) > self.max_examples:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
            dataset = Subset(dataset, order[: self.max_examples].sort().values.tolist())
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=trainer.loader.collate_fn)

    def _update(self, trainer: Trainer, epoch: int) -> float:
        seed = trainer.config.seed + epoch
        value = update_hypers(self.part, trainer.model, self._loader(trainer, seed), self.likelihood, self.optimizer,
                              curvature=self.curvature, steps=self.steps, fisher=self.fisher,
                              mc_samples=self.mc_samples, seed=seed, epoch=epoch, frozen_shape=self.frozen_shape,
                              num_data=trainer.num_data)
        trainer.set_prior(self.family.to_prior())
        self.updated_at, self.last_evidence = epoch, value
        if self.restore_best and (self.best is None or value > self.best["log_evidence"]):
            self.best = {"log_evidence": value, "epoch": epoch, "family": copy.deepcopy(self.family.state_dict()),
                         "model": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}}
        return value

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        epoch = trainer.epoch + 1
        due = epoch >= self.burnin and epoch % self.period == 0
        if due or epoch == trainer.config.epochs:
            record["log_evidence"] = self._update(trainer, epoch)
        record.update(self.family.hyper_values())

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.updated_at != trainer.epoch and trainer.history:  # the run stopped between updates
            trainer.history[-1]["log_evidence"] = self._update(trainer, trainer.epoch)
            trainer.history[-1].update(self.family.hyper_values())
        if self.best is not None:
            trainer.model.load_state_dict(self.best["model"])
            self.family.load_state_dict(self.best["family"])
            trainer.set_prior(self.family.to_prior())

    @property
    def log_evidence(self) -> float | None:
        """The evidence of the selected update (the best one with ``restore_best``, else the last)."""
        return self.best["log_evidence"] if self.best is not None else self.last_evidence

    def state_dict(self) -> dict[str, Any]:
        return {"family": self.family.state_dict(), "optimizer": self.optimizer.state_dict(), "best": self.best,
                "updated_at": self.updated_at, "last_evidence": self.last_evidence}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.family.load_state_dict(state["family"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best, self.updated_at = state["best"], int(state["updated_at"])
        self.last_evidence = state["last_evidence"]


@dataclass
class MarglikSettings(AutomaticSettings):
    """Settings of ``tune(..., strategy="marglik")`` (the fields of :class:`MarginalLikelihood`). Defaults:
    ``benchmarks/results/autotune_defaults.md`` (a held-out pair, MNIST-5k -> KMNIST, scored on a validation pool):
    K-FAC with a one-sample Monte-Carlo Fisher (5x cheaper than the exact one); the diagonal GGN chose far too strong
    priors (pool accuracy 0.28 against 0.42); ``restore_best`` and 5 instead of 10 updates changed nothing beyond the
    seed spread (5 kept: each update costs a curvature pass and 21 evidence evaluations, ~1 s each for the MiniLM
    layer's 1.8M-parameter rank-10 prior).

    Attributes:
        hyper_lr: Adam learning rate of the log hyper-parameters per hyper step of an update.
        curvature: this one and ``updates``, ``burnin``, ``hyper_steps``, ``fisher``, ``mc_samples``,
            ``restore_best``, ``curvature_batch_size``, ``curvature_examples``: as in :class:`MarginalLikelihood`
            (``steps``, ``batch_size``, ``max_examples``);
            ``updates`` spreads that many evidence updates over the run (an update every ``max(1, epochs //
            updates)`` epochs, and one after the last); ``curvature_examples`` caps the examples each curvature pass
            reads (a random subset, scaled up to N).
    """

    hyper_lr: float = 0.1
    curvature: str = "kfac"
    updates: int = 5
    burnin: int = 0
    hyper_steps: int = 20
    fisher: str = "mc"
    mc_samples: int = 1
    restore_best: bool = False
    curvature_batch_size: int = 256
    curvature_examples: int | None = 1000


class MarglikTuner(AutomaticTuner):
    """``tune(..., strategy="marglik")``: a MAP run with the :class:`MarginalLikelihood` callback; the objective is
    the selected update's log evidence."""

    Settings = MarglikSettings
    metric = "log_evidence"

    def parts(self, run: AutomaticRun) -> tuple[Any, None, list]:
        s = self.settings
        self.callback = MarginalLikelihood(run.family, run.likelihood, curvature=s.curvature, updates=s.updates,
                                           burnin=s.burnin, steps=s.hyper_steps, lr=s.hyper_lr, fisher=s.fisher,
                                           mc_samples=s.mc_samples, restore_best=s.restore_best,
                                           batch_size=s.curvature_batch_size, max_examples=s.curvature_examples)
        return run.family.to_prior(), None, [self.callback]

    def objective_value(self, run: AutomaticRun, result) -> float:
        value = self.callback.log_evidence
        return float("nan") if value is None else float(value)
