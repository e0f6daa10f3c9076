"""Callbacks: code the training loop runs at fixed points, with a state that checkpoints save and restore.

:class:`SWAGCollection` is the one the library itself needs: it takes SWAG snapshots while a model trains, for the
source stage (learning a prior) and for downstream SWAG alike, and works in your own loop too, in the spirit of
:meth:`torch.optim.swa_utils.AveragedModel.update_parameters`::

    collection = SWAGCollection(SWAGCollector(model, rank=20, head="head"), every_steps=10)
    for batch in loader:
        loss_fn(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
        collection.step(model)                 # a snapshot every 10th step
    posterior = collection.collector.posterior()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from ptyl.posterior.swag import SWAGCollector
from ptyl.validation import check_int

if TYPE_CHECKING:
    from ptyl.training.trainer import Trainer

__all__ = ["Callback", "ConvergenceStop", "EvalCallback", "SWAGCollection"]


class Callback:
    """Base class: override the hooks you need. A callback with ``stateful = True`` has its :meth:`state_dict` saved
    in checkpoints (stateless ones may be added or dropped between an interrupted run and its resumption)."""

    stateful = False

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after a checkpoint was restored) of ``trainer`` (the running
        :class:`~ptyl.training.Trainer`: its ``model``, ``step``, ``epoch``, ``config``, ``env``)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After every optimizer step of ``trainer``; ``trainer.step`` counts the steps taken."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        """After every epoch.

        Args:
            trainer: the running :class:`~ptyl.training.Trainer` (``trainer.epoch`` is the epoch just finished).
            record: epoch, mean loss, mean prior term; it goes into the history: add to it.
        """

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch of ``trainer``, before the strategy's ``finalize``."""

    def state_dict(self) -> Any:
        """What a checkpoint must keep to resume exactly (``None``: nothing)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore ``state``, what :meth:`state_dict` returned."""


class SWAGCollection(Callback):
    """Take SWAG snapshots (Maddox et al. 2019, arXiv 1902.02476) of a training model.

    Args:
        collector: the :class:`~ptyl.posterior.SWAGCollector` to fill (it selects the parameters).
        every_steps: a snapshot after every ``every_steps``-th step once more than ``start_step`` steps were taken;
            ``None``: one snapshot at the end of every epoch from epoch ``start_epoch`` (0-based) on.
        start_step, start_epoch: burn-in, in steps or epochs.

    Under DDP (a :class:`~ptyl.training.Trainer` on several processes) rank 0 collects and its moments are copied to
    every rank at the end of training, so all ranks return the same posterior. Under FSDP2 (a sharded collector)
    every rank collects its own rows and keeps them.
    """

    stateful = True

    def __init__(self, collector: SWAGCollector, *, every_steps: int | None = None, start_step: int = 0,
                 start_epoch: int = 0) -> None:
        self.collector = collector
        self.every_steps = None if every_steps is None else check_int(every_steps, "every_steps", minimum=1)
        self.start_step = check_int(start_step, "start_step", minimum=0)
        self.start_epoch = check_int(start_epoch, "start_epoch", minimum=0)
        self.steps = 0
        self.epochs = 0

    def step(self, model: nn.Module, collect: bool = True) -> None:
        """Count one optimizer step; take a snapshot when one is due.

        Args:
            model: the model being trained (call after ``optimizer.step()``).
            collect: ``False`` counts the step without collecting (DDP ranks other than 0).
        """
        self.steps += 1
        if self.every_steps and self.steps > self.start_step and self.steps % self.every_steps == 0 and collect:
            self.collector.collect(model)

    def end_epoch(self, model: nn.Module, collect: bool = True) -> None:
        """Count one finished epoch; in per-epoch mode take a snapshot when one is due.

        Args:
            model: the model being trained.
            collect: ``False`` counts the epoch without collecting.
        """
        if not self.every_steps and self.epochs >= self.start_epoch and collect:
            self.collector.collect(model)
        self.epochs += 1

    def snapshots_due(self, total_steps: int, epochs: int) -> int:
        """How many snapshots a whole run takes (checked before training).

        Args:
            total_steps: optimizer steps of the run.
            epochs: epochs of the run.

        Returns:
            The number of snapshots.
        """
        if self.every_steps:
            return max(0, total_steps // self.every_steps - self.start_step // self.every_steps)
        return max(0, epochs - self.start_epoch)

    def on_step_end(self, trainer: Trainer) -> None:
        self.step(trainer.model, collect=self._collects(trainer))

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        self.end_epoch(trainer.model, collect=self._collects(trainer))

    def on_fit_end(self, trainer: Trainer) -> None:
        if not self.collector.sharded:
            self.collector.load_state_dict(trainer.env.broadcast(self.collector.state_dict()))

    def _collects(self, trainer: Trainer) -> bool:
        # DDP replicas are identical: rank 0 collects; FSDP2 shards differ: every rank collects its rows
        return trainer.env.is_main_process or self.collector.sharded

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs, "collector": self.collector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.epochs = int(state["steps"]), int(state["epochs"])
        self.collector.load_state_dict(state["collector"])


class ConvergenceStop(Callback):
    """The convergence rule of :class:`~ptyl.training.TrainConfig` (``stop_loss``, ``stop_plateau``,
    ``plateau_steps``, ``min_steps``): after each epoch, once ``min_steps`` steps were taken, ask the trainer to stop
    when the epoch-mean data loss is ``<= stop_loss`` (reason ``"loss"``), or when the mean objective (data + prior
    term) of the last ``k`` epochs is less than ``stop_plateau`` below that of the ``k`` epochs before, ``k`` the
    fewest epochs that span ``plateau_steps`` steps (reason ``"plateau"``). It reads the trainer's history, so it
    keeps no state of its own.

    Args:
        stop_loss, stop_plateau: the thresholds (``None``: that test is off).
        plateau_steps: the window of the plateau test, in steps.
        min_steps: no stop before this many steps.
    """

    def __init__(self, stop_loss: float | None = None, stop_plateau: float | None = None, plateau_steps: int = 100,
                 min_steps: int = 0) -> None:
        self.stop_loss, self.stop_plateau = stop_loss, stop_plateau
        self.plateau_steps = check_int(plateau_steps, "plateau_steps", minimum=1)
        self.min_steps = check_int(min_steps, "min_steps", minimum=0)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        if trainer.step < self.min_steps or trainer.stop_reason is not None:
            return
        reason = self.reason([*trainer.history, record], trainer.steps_per_epoch)
        if reason is not None:
            trainer.request_stop(reason)

    def reason(self, history: list[dict[str, float]], steps_per_epoch: int) -> str | None:
        """Whether the rule holds after the last epoch of ``history``.

        Args:
            history: the epoch records (``loss``, ``prior``).
            steps_per_epoch: steps of one epoch.

        Returns:
            ``"loss"``, ``"plateau"`` or ``None``.
        """
        if self.stop_loss is not None and history and history[-1]["loss"] <= self.stop_loss:
            return "loss"
        if self.stop_plateau is not None and improvement(history, steps_per_epoch, self.plateau_steps) < \
                self.stop_plateau:
            return "plateau"
        return None

    def met(self, history: list[dict[str, float]], steps_per_epoch: int) -> bool:
        """Whether the rule holds at the end of a run (one that used its whole budget may still have converged in
        its last epochs).

        Args:
            history: the epoch records.
            steps_per_epoch: steps of one epoch.

        Returns:
            ``True`` when :meth:`reason` finds a reason.
        """
        return self.reason(history, steps_per_epoch) is not None


def improvement(history: list[dict[str, float]], steps_per_epoch: int, window_steps: int) -> float:
    """How much the mean objective (``loss + prior`` per epoch) fell from the window before the last to the last one.

    Args:
        history: the epoch records.
        steps_per_epoch: steps of one epoch.
        window_steps: the window, rounded up to whole epochs.

    Returns:
        ``mean(previous window) - mean(last window)`` in nats per example (``inf`` before two windows exist).
    """
    k = max(1, -(-window_steps // max(steps_per_epoch, 1)))
    objective = [r["loss"] + r["prior"] for r in history[-2 * k:]]
    if len(objective) < 2 * k:
        return float("inf")
    return sum(objective[:k]) / k - sum(objective[k:]) / k


class EvalCallback(Callback):
    """Call ``fn(model) -> {name: value}`` after every epoch and add the numbers to the history.

    Args:
        fn: evaluates the model (as given to :func:`~ptyl.training.fit`).
    """

    def __init__(self, fn: Callable[[nn.Module], dict[str, float]]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        record.update(self.fn(trainer.given_model))
