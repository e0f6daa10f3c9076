"""Divergence: what to change after one (:func:`divergence_hint`, named by every
:class:`~ptyl.errors.DivergenceError` of the loop) and the final check of a run (issue 25): the model it returns,
and every sample it keeps, has a finite objective.

The loss window checks the loss of every step, and a step's loss is computed on the parameters *before* its update,
so the model after the last update is seen by no step: its weights can be finite while its logits overflow. One
forward on a batch closes the gap:

    U(theta_E) = loss(f(x; theta_E), y) + (-log p(theta_E)) / N      must be finite (theta_E: after the E-th step)

It runs once, after ``strategy.finalize`` (the one host synchronisation it adds), in evaluation mode and without
gradients, under the run's autocast, with the global RNG and a stateful objective's state restored afterwards, so a
finished run is exactly what it was before. A failure is a :class:`~ptyl.errors.DivergenceError` naming step E, the
step a longer run's loss window would name. Kept samples (SGLD iterates, SWAG's drawn models, draws of q) are
checked the same way, one at a time, and the trained weights are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ptyl.batches import to_device
from ptyl.errors import DivergenceError
from ptyl.inference.samples import SampleBank, cpu_copy
from ptyl.sharding import is_fsdp_module, local_tensor

if TYPE_CHECKING:
    from ptyl.training.trainer import Trainer

__all__ = ["check_final_objective", "divergence_hint"]


def divergence_hint(trainer: Trainer) -> str:
    """What to change after a divergence: under a prior whose stiffest direction makes the gradient step overshoot
    (``lr * max diag(Sigma^-1) / N > 2``), eps or a weaker prior, not only the learning rate.

    Args:
        trainer: the running :class:`~ptyl.training.Trainer` (its prior, strategy, learning rate and N).

    Returns:
        The advice, one sentence.
    """
    if trainer.prior is None:
        return "lower the learning rate"
    advice = ("lower the learning rate, or, under a strong learned prior, add eps (e.g. eps=1e-4, `--eps 1e-4`: "
              "it caps the prior's precisions at 1/eps) or weaken it (a larger scale)")
    if trainer.proximal is None and trainer.strategy.proximal:
        advice += "; or take the prior's diagonal as a proximal step (prior_step='proximal', SGD: stable for any prior)"
    try:
        top = float(trainer.prior.precision_diagonal().max())  # the issue-12 prior interface
    except (AttributeError, NotImplementedError, RuntimeError):
        return advice
    step = trainer.config.lr * top / trainer.num_data
    if step <= 2:
        return advice
    proximal = "; or use prior_step='proximal' (SGD), stable for any prior" if trainer.strategy.proximal else ""
    return (f"the prior's stiffest direction (precision {top:.3g}) makes lr * precision / N = {step:.3g} > 2, so "
            f"every gradient step overshoots: add eps (e.g. eps=1e-4, `--eps 1e-4`), weaken the prior (a larger "
            f"scale), or lower the learning rate below {2 * trainer.num_data / top:.3g}{proximal}")


def final_batch(trainer: Trainer) -> Any:
    """The last batch trained on; after a resume with nothing left to train, the loader's first (its shuffling
    stream restored, so nothing downstream changes).

    Args:
        trainer: the finished :class:`~ptyl.training.Trainer`.

    Returns:
        A batch as the loader yields it.
    """
    if trainer._last_batch is not None:
        return trainer._last_batch
    state = trainer.loader_generator.get_state()
    try:
        return next(iter(trainer.loader))
    finally:
        trainer.loader_generator.set_state(state)


@contextlib.contextmanager
def _untouched(trainer: Trainer) -> Iterator[None]:
    """Evaluation mode, no gradients, the run's autocast; training mode, the RNG streams and the objective's state
    (SimCLR's augmentation stream) as they were afterwards."""
    model, objective = trainer.model, trainer.objective
    was_training = model.training
    saved = objective.state_dict() if hasattr(objective, "state_dict") else None
    devices = [trainer.device] if trainer.device.type not in ("cpu", "meta") else []
    device_type = trainer.device.type if devices else "cuda"
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad():
            model.eval()
            with trainer.precision.autocast():
                yield
    finally:
        model.train(was_training)
        if saved is not None:
            objective.load_state_dict(saved)
        for module in model.modules():  # FSDP2 keeps the root's parameters gathered after a forward: shard them again
            if is_fsdp_module(module):
                module.reshard()


def _objective(trainer: Trainer, batch: Any) -> torch.Tensor:
    """Data term + prior term of the model's current weights on ``batch`` (a 0-dim tensor on the device)."""
    dtype = torch.float32 if trainer.device.type == "mps" else torch.float64  # MPS has no float64
    data = trainer.objective(trainer.model, batch).detach().to(dtype)
    return data + trainer.prior_term(trainer.model).detach().to(dtype)


def _finite(trainer: Trainer, value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank (every rank answers the same)."""
    return bool(trainer.env.min(int(torch.isfinite(value).all())))


def _check_samples(trainer: Trainer, bank: SampleBank, batch: Any, when: str) -> None:
    """Every kept sample: finite tensors and (unsharded models) a finite objective on ``batch``."""
    model = trainer.model
    sharded = any(local_tensor(p) is not p for p in model.parameters())
    trained = None if sharded else cpu_copy(model.state_dict())
    try:
        for index, sample in enumerate(bank, start=1):
            tensors = [local_tensor(t) for t in sample.values() if t.is_floating_point()]
            ok = _finite(trainer, torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
            if ok and not sharded:
                model.load_state_dict(sample)
                ok = _finite(trainer, _objective(trainer, batch))
            if not ok:
                raise DivergenceError(f"kept sample {index} of {len(bank)} has a non-finite loss or weights ({when}): "
                                      f"{divergence_hint(trainer)}")
    finally:
        if trained is not None:
            model.load_state_dict(trained)


def check_final_objective(trainer: Trainer, samples: SampleBank | None) -> None:
    """Raise :class:`DivergenceError` if the trained model's objective on a training batch (:func:`final_batch`), or
    a kept sample's, is not finite.

    Args:
        trainer: the finished :class:`~ptyl.training.Trainer` (its model, objective, prior term and step count).
        samples: what the strategy kept (``None``: one model).

    Raises:
        DivergenceError: naming step ``trainer.step`` (the model after the last update) or the sample.
    """
    batch = to_device(final_batch(trainer), trainer.device)
    with _untouched(trainer):
        if not _finite(trainer, _objective(trainer, batch)):
            raise DivergenceError(f"non-finite loss at step {trainer.step} (the trained model, after the last "
                                  f"update; one forward on a training batch): {divergence_hint(trainer)}")
        if samples is not None and len(samples):
            _check_samples(trainer, samples, batch, f"checked after the last update, step {trainer.step}")
