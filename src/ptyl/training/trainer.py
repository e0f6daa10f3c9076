"""The training loop: one plain loop for every way of training, a :class:`~ptyl.training.strategies.base.Strategy`
for what differs (optimizer, schedule, what to keep) and callbacks for the rest.

Every strategy minimises (or samples) the same objective (Shwartz-Ziv et al. 2022, eq. 2):

    U(theta) = mean_batch loss(f(x; theta), y) - log p(theta) / N

with N the number of training examples. The hot loop never waits for the device: losses go into a device buffer
and are checked for NaN/Inf every ``config.check_every`` steps and at every epoch end, when the parameters are
checked too; after the last step one forward checks the objective of the model returned, and of every sample kept
(:mod:`ptyl.training.divergence`: a step's loss is computed before its update, so no window sees the last one). A
failure raises :class:`~ptyl.errors.DivergenceError` naming the step. The budget is ``epochs`` or
``max_steps``; MAP may stop earlier under the convergence rule (:class:`~ptyl.training.callbacks.ConvergenceStop`),
and with SGD the prior's separable part is a closed-form proximal step (:class:`ptyl.priors.ProximalPrior`), so no
prior strength makes training unstable. After each epoch the loop writes a checkpoint (model, strategy, callbacks,
RNG streams) and ``resume=True`` continues a run exactly where it stopped: the final weights equal an uninterrupted
run's.

Under ``torchrun`` the loop runs data-parallel through :class:`~ptyl.training.environment.DistributedEnvironment`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ptyl import distributed as ddp
from ptyl.batches import to_device
from ptyl.errors import CheckpointError, ConfigError, DataError, DivergenceError
from ptyl.io.checkpoint import load_checkpoint, save_checkpoint
from ptyl.io.weights import load_state_checked
from ptyl.priors.base import Prior
from ptyl.priors.separable import ProximalPrior
from ptyl.sharding import local_tensor
from ptyl.training.callbacks import Callback, ConvergenceStop
from ptyl.training.config import TrainConfig
from ptyl.training.divergence import check_final_objective, divergence_hint
from ptyl.training.environment import current_environment
from ptyl.training.objective import Objective, PriorTerm, supervised_objective
from ptyl.training.precision import MixedPrecision
from ptyl.training.registry import Inference
from ptyl.training.result import FitResult
from ptyl.training.strategies.base import Strategy

__all__ = ["Objective", "Trainer", "supervised_objective"]

_CHECKPOINT_KEYS = ("epoch", "step", "config", "model", "strategy", "callbacks", "loader_rng", "torch_rng", "history")


class _LossWindow:
    """Data and prior terms of the last steps, kept on the device; checked and summed only when flushed."""

    def __init__(self, size: int, device: torch.device) -> None:
        # float64 holds any loss dtype exactly (a float64 loss above 3e38 is finite, not a divergence); MPS has none
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.buffer = torch.zeros(size, 2, dtype=dtype, device=device)
        self.count, self.first_step = 0, 0
        self.sums = torch.zeros(2, dtype=dtype, device=device)
        self.steps = 0

    def add(self, data_loss: torch.Tensor, prior_term: torch.Tensor, step: int) -> bool:
        if self.count == 0:
            self.first_step = step
        self.buffer[self.count, 0] = data_loss.detach()  # device copies: no host synchronisation
        self.buffer[self.count, 1] = prior_term.detach()
        self.count += 1
        return self.count == self.buffer.shape[0]

    def flush(self, env, hint: Callable[[], str]) -> None:
        """Add the window to the epoch sums; :class:`DivergenceError` naming the first non-finite step and ``hint()``
        (what to change)."""
        if self.count == 0:
            return
        window = self.buffer[: self.count]
        finite = torch.isfinite(window).all(dim=1)
        bad = torch.nonzero(~finite)  # the one synchronisation per window
        first = self.first_step + int(bad[0, 0]) if bad.numel() else -1
        first = env.min(first if first >= 0 else 2**62)
        if first < 2**62:
            raise DivergenceError(f"non-finite loss at step {first}: {hint()}")
        self.sums += window.sum(dim=0).to(self.sums.dtype)
        self.steps += self.count
        self.count = 0

    def means(self) -> torch.Tensor:
        return self.sums / max(self.steps, 1)


class Trainer:
    """Train ``model`` on ``data`` under ``prior`` with one strategy (see the module docstring).

    Args:
        model: the model (a DDP-wrapped model is trained through its wrapper; checkpoints use the module).
        data: a Dataset (shuffled with the config's seed) or your own DataLoader.
        prior: e.g. from :func:`ptyl.priors.make_prior`; ``None`` trains by maximum likelihood.
        config: a :class:`TrainConfig` (validated here).
        strategy: a :class:`Strategy` instance; default: the class registered for ``config.inference``.
        objective: ``objective(model, batch) -> loss``; default mean cross-entropy.
        num_data: N in ``-log p(theta)/N`` (default: dataset size; under DDP the global size).
        head: module name(s) trained with ``config.head_lr``.
        callbacks: extra :class:`~ptyl.training.callbacks.Callback` objects, run after the strategy's own.
        checkpoint: file written after every epoch (:func:`ptyl.io.save_checkpoint`).
        collate_fn: how a Dataset's examples become batches (e.g. :func:`ptyl.data.collate_text`).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Dataset | DataLoader,
        prior: Prior | None = None,
        config: TrainConfig | None = None,
        *,
        strategy: Strategy | None = None,
        objective: Objective | None = None,
        num_data: int | None = None,
        head: str | Sequence[str] | None = "head",
        callbacks: Iterable[Callback] = (),
        checkpoint: str | os.PathLike | None = None,
        collate_fn: Callable | None = None,
    ) -> None:
        given_config = config or TrainConfig()
        given_config.validate()
        self.config = replace(given_config)  # max_steps below resolves epochs on the copy
        self.env = current_environment(model)
        self.given_model = model
        self.model = ddp.unwrap_model(model)
        self.net = self.model  # replaced by the DDP wrapper in fit(); forward/backward go through it
        self.prior, self.head, self.collate_fn = prior, head, collate_fn
        self.objective = objective or supervised_objective
        self.device = torch.device(self.config.device) if self.config.device else next(self.model.parameters()).device
        self.model.to(self.device)  # before the strategy builds optimizer state, SWAG moments and noise generators
        if isinstance(prior, nn.Module):  # a prior built on another device
            prior.to(self.device)
        self.loader, self.loader_generator = self.env.loader(data, self.config.batch_size, self.config.seed, collate_fn)
        self.num_data = int(num_data or len(self.loader.dataset))
        self.prior_term = PriorTerm(prior, self.num_data, self.device)
        self.precision = MixedPrecision(self.config.precision, self.device)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise DataError("the data loader yields no batches (an empty data set, or drop_last with fewer examples "
                            "than one batch)")
        if self.config.max_steps is not None:
            self.config.epochs = max(1, math.ceil(self.config.max_steps / max(self.steps_per_epoch, 1)))
        self.total_steps = self.config.epochs * self.steps_per_epoch
        if strategy is not None and strategy.config is given_config:
            strategy.config = self.config
        self.strategy = strategy or Inference.parse(self.config.inference).strategy(self.config)
        self.strategy.setup(self)
        self.proximal = self._proximal(prior)
        c = self.config
        self.stop_rule = None
        if self.strategy.early_stopping and (c.stop_loss is not None or c.stop_plateau is not None):
            self.stop_rule = ConvergenceStop(c.stop_loss, c.stop_plateau, c.plateau_steps, c.min_steps)
        self.callbacks = [*self.strategy.callbacks(), *([self.stop_rule] if self.stop_rule else []), *callbacks]
        self.checkpoint = Path(checkpoint) if checkpoint else None
        if self.checkpoint is not None and not self.env.supports_checkpoints:
            raise ConfigError(f"{type(self.env).__name__}: checkpoints of sharded (FSDP2) runs are not supported yet; "
                              "leave checkpoint=None")
        self.epoch = self.step = 0
        self.stop_reason: str | None = None
        self.stop_epoch: int | None = None  # the run ends after this many epochs (the rule was met; annealing)
        self.history: list[dict[str, float]] = []
        self._zero = torch.zeros((), device=self.device)
        self._last_batch: Any = None  # the final check's batch

    def set_prior(self, prior: Prior | None) -> None:
        """Train under ``prior`` from the next step on (e.g. a prior whose hyper-parameters were just updated:
        :class:`ptyl.tuning.MarginalLikelihood`).

        Args:
            prior: the new prior (over the same parameters), or ``None``.
        """
        if isinstance(prior, nn.Module):
            prior.to(self.device)
        self.prior = prior
        self.prior_term = PriorTerm(prior, self.num_data, self.device)
        self.proximal = self._proximal(prior)

    # --- the loop -------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> FitResult:
        """Run the remaining epochs.

        Args:
            resume: continue from the checkpoint if there is one (else start from epoch 0).

        Returns:
            A :class:`FitResult`: the trained model, the per-epoch history and the strategy's samples.

        Raises:
            DivergenceError: the loss or the parameters became non-finite (the message names the step).
        """
        torch.manual_seed(self.config.seed)
        if resume:
            self.load()
        self.net = self.env.wrap(self.given_model)
        for callback in self.callbacks:
            callback.on_fit_start(self)
        show = self.config.progress and self.env.is_main_process
        bar = tqdm(total=self.config.epochs, initial=self.epoch, desc=f"fit[{self.config.inference}]",
                   disable=not show)
        while self.epoch < min(self.config.epochs, self.stop_epoch or self.config.epochs):
            record = self._epoch()
            self.history.append(record)
            self.epoch += 1
            self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", prior=f"{record['prior']:.3g}")
        bar.close()
        for callback in self.callbacks:
            callback.on_fit_end(self)
        samples = self.strategy.finalize(self)
        self._check_parameters("at the end of training")
        check_final_objective(self, samples)
        converged = None
        if self.stop_rule is not None:
            converged = self.stop_reason is not None or self.stop_rule.met(self.history, self.steps_per_epoch)
        return FitResult(self.given_model, self.config, self.history, samples,
                         getattr(self.strategy, "collector", None), self.loader, self.collate_fn,
                         stop_reason=self.stop_reason or "budget", steps=self.step, converged=converged,
                         predictive=getattr(self.strategy, "predictive", None))

    def request_stop(self, reason: str) -> None:
        """End training: callbacks call this after an epoch; ``reason`` is recorded in the result. A strategy that
        anneals (MAP) first decays the learning rate to 0 over ``anneal_fraction`` of the steps taken (whole epochs,
        within the budget); otherwise training ends now."""
        if self.stop_reason is not None:
            return
        self.stop_reason = str(reason)
        done = self.epoch + 1  # called from the end of epoch index self.epoch
        extra = 0
        if self.config.anneal_fraction > 0 and hasattr(self.strategy, "begin_anneal"):
            extra = math.ceil(self.config.anneal_fraction * self.step / max(self.steps_per_epoch, 1))
            extra = min(max(extra, 1), self.config.epochs - done)
            if extra > 0:
                self.strategy.begin_anneal(self, extra * self.steps_per_epoch)
        self.stop_epoch = done + extra

    def _epoch(self) -> dict[str, float]:
        self.net.train()
        self.env.set_epoch(self.loader, self.epoch)
        window = _LossWindow(min(self.config.check_every, max(self.steps_per_epoch, 1)), self.device)
        for batch in self.loader:
            self._last_batch = batch  # a reference: no copy
            data_loss, prior_term = self._train_step(batch)
            full = window.add(data_loss, prior_term, self.step)
            self.strategy.on_step(self)
            self.step += 1
            for callback in self.callbacks:
                callback.on_step_end(self)
            if full:
                window.flush(self.env, self._hint)
        window.flush(self.env, self._hint)
        if window.steps == 0:
            raise DataError(f"the data loader yielded no batches in epoch {self.epoch + 1}")
        self._check_parameters(f"after epoch {self.epoch + 1} (step {self.step})")
        self.strategy.on_epoch(self)
        loss, prior = self.env.mean(window.means()).tolist()
        record = {"epoch": self.epoch + 1, "loss": loss, "prior": prior, "objective": loss + prior}
        for callback in self.callbacks:
            callback.on_epoch_end(self, record)
        return record

    def _train_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the detached data term and the logged prior term (no normalising constant)."""
        batch = to_device(batch, self.device)
        optimizer = self.strategy.optimizer
        optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            data_loss = self.strategy.data_loss(self, batch)
        self.precision.backward(data_loss)
        if self.prior is not None or self.config.grad_clip:
            self.precision.unscale_(optimizer)  # fp16: the true gradients before the prior's are added and clipping
        # the prior's gradient goes straight into .grad in a few fused kernels, in full precision (the same update as
        # backpropagating penalty/N). DDP: backward has averaged the data gradients; every rank adds the same term once
        prior_term = self.strategy.add_prior_grad(self)
        if self.proximal is not None:  # the separable part is the proximal step below, not a gradient
            self.proximal.remove_separable_grad_()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.precision.step(optimizer)
        if self.proximal is not None:
            self.proximal.step(optimizer)
        return data_loss.detach(), self.prior_term.logged(prior_term)

    def _proximal(self, prior: Prior | None) -> ProximalPrior | None:
        """The proximal step of the prior's separable part, where the strategy, the optimizer and the precision
        allow it (``prior_step="auto"``: else the plain gradient; ``"proximal"``: else an error)."""
        if prior is None or not self.strategy.uses_proximal_step(self.config):
            return None
        sharded = any(local_tensor(p) is not p for p in self.model.parameters())
        why = ("sharded (FSDP2) parameters" if sharded else
               "fp16 loss scaling (a skipped step must not shrink the weights)" if self.config.precision == "fp16"
               else None)
        if why is None:
            try:
                return ProximalPrior(prior, self.model, self.num_data, self.config.momentum)
            except ConfigError as err:  # a prior of your own: no known separable part
                why = str(err)
        if self.config.prior_step == "proximal":
            raise ConfigError(f"prior_step 'proximal' is not available here: {why}")
        return None

    def _hint(self) -> str:
        return divergence_hint(self)

    def _check_parameters(self, when: str) -> None:
        params = [local_tensor(p.detach()) for p in self.model.parameters()]  # this rank's shard under FSDP2
        finite = not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if not self.env.min(int(finite)):  # every rank raises together
            bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(local_tensor(p)).all()]
            raise DivergenceError(f"non-finite parameters {when}: {bad[:4] or 'on another rank'}; "
                                  f"{self._hint()}")

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs.

        Returns:
            Epoch and step, config, model, strategy, stateful callbacks, RNG streams, history, objective state.
        """
        return {
            "epoch": self.epoch,
            "step": self.step,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "strategy": self.strategy.state_dict(),
            "callbacks": [callback.state_dict() for callback in self.callbacks if callback.stateful],
            "loader_rng": self.loader_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "stop_reason": self.stop_reason,
            "stop_epoch": self.stop_epoch,
            # stateful objectives (SimCLR's augmentation stream) resume where they stopped
            "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else None,
            "scaler": self.precision.state_dict(),
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0 only; the others wait, so nobody reads a half-written file)."""
        if self.checkpoint is None:
            return
        if self.env.is_main_process:
            save_checkpoint(self.state_dict(), self.checkpoint)
        self.env.barrier()

    def load(self) -> bool:
        """Restore the checkpoint if it exists.

        Returns:
            ``False`` when there is none to resume from.

        Raises:
            ConfigError: it was written with other settings.
            CheckpointError: it cannot be read or does not fit this run (the message names the file).
        """
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        state = load_checkpoint(self.checkpoint, required=_CHECKPOINT_KEYS)
        own = asdict(self.config)
        if state["config"] != own:
            changed = sorted(k for k in set(state["config"]) | set(own) if state["config"].get(k) != own.get(k))
            raise ConfigError(f"checkpoint {self.checkpoint} was made with other settings ({changed}); "
                              "remove it or pass the same settings to resume")
        try:
            load_state_checked(self.model, state["model"], self.checkpoint, what="the model state")
            self.strategy.load_state_dict(state["strategy"])
            for callback, saved in zip([c for c in self.callbacks if c.stateful], state["callbacks"], strict=True):
                callback.load_state_dict(saved)
            self.loader_generator.set_state(state["loader_rng"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("objective") is not None and hasattr(self.objective, "load_state_dict"):
                self.objective.load_state_dict(state["objective"])
            self.precision.load_state_dict(state.get("scaler"))
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {self.checkpoint} does not fit this run: {err}") from err
        self.epoch, self.step, self.history = int(state["epoch"]), int(state["step"]), list(state["history"])
        self.stop_reason, self.stop_epoch = state.get("stop_reason"), state.get("stop_epoch")
        return True
