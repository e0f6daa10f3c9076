"""The two terms of the training objective (Shwartz-Ziv et al. 2022, eq. 2):

    U(theta) = mean_batch loss(f(x; theta), y)  +  (-log p(theta)) / N

:func:`supervised_objective` is the data term for the batch shapes people have: ``(x, y)`` tuples, ``(inputs_dict,
y)`` (tokenised text) and Hugging Face dicts with ``labels`` (the model's own loss when it returns one).
:class:`PriorTerm` is the prior term, computed in full precision, and its *logged* value: ``-log p(theta)`` without
the normalising constant ``1/2 log det(2 pi Sigma)``, so the logged objective is a sum of non-negative terms whose
prior part is ``1/2 (theta - mu)^T Sigma^-1 (theta - mu) / N``. ``log_prob`` itself stays normalised.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(3, 2)
>>> batch = {"x": torch.randn(4, 3), "labels": torch.tensor([0, 1, 1, 0])}
>>> supervised_objective(lambda x, labels=None: model(x), batch).shape
torch.Size([])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptyl import distributed as ddp
from ptyl.errors import DataError
from ptyl.priors.base import Prior
from ptyl.priors.sharded import ShardedPrior
from ptyl.training.precision import full_precision

__all__ = ["Objective", "PriorTerm", "log_normalizer", "supervised_objective"]

Objective = Callable[[nn.Module, Any], torch.Tensor]
_LABEL_KEYS = ("labels", "label")


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, or a Hugging Face ``ModelOutput`` / dict with ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise DataError(f"the model returned {type(output).__name__} without 'logits'; pass objective=...")
    return logits


def _accepts(model: Any, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name`` (or ``**kwargs``)."""
    forward = getattr(ddp.unwrap_model(model), "forward", model) if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _dict_loss(model: Callable, batch: Mapping[str, Any]) -> torch.Tensor:
    key = next((k for k in _LABEL_KEYS if k in batch), None)
    if key is None:
        raise DataError(f"the default objective needs a 'labels' entry in dict batches (keys: {sorted(batch)}); "
                        "pass objective=lambda model, batch: ...")
    labels = batch[key]
    inputs = dict(batch)
    if not _accepts(model, key):
        inputs.pop(key)
    output = model(**inputs)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is not None and key in inputs:  # the model's own loss (Hugging Face: problem_type, ignore_index...)
        return loss
    return F.cross_entropy(_logits(output), labels)


def supervised_objective(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default data term: mean cross-entropy.

    Args:
        model: returns logits ``[B, C]`` / ``[B, C, H, W]`` (or an output with ``.logits`` / ``.loss``).
        batch: ``(x, y)``; ``(inputs_dict, y)`` (``model(**inputs_dict)``); or a dict with ``labels``
            (``model(**batch)``; the model's own ``loss`` when it returns one, as Hugging Face models do).

    Returns:
        The mean loss of the batch.

    Raises:
        DataError: a batch of another shape (the message says what to pass instead).
    """
    if isinstance(batch, Mapping):
        return _dict_loss(model, batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        output = model(**x) if isinstance(x, Mapping) else model(x)
        return F.cross_entropy(_logits(output), y)
    raise DataError(f"the default objective takes (inputs, targets) batches or dicts with 'labels', got "
                    f"{type(batch).__name__}; pass objective=lambda model, batch: ...")


def _split(flat: torch.Tensor, names, shapes) -> dict[str, torch.Tensor]:
    pieces = torch.split(flat.reshape(-1), [math.prod(s) for s in shapes])
    return {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=False)}


def _mode(prior: Prior) -> dict[str, torch.Tensor] | None:
    """The prior's centre by name (``mean_flat`` of the prior interface); ``None`` for a prior without one."""
    try:
        flat = prior.mean_flat()
    except (AttributeError, NotImplementedError):
        return None
    return _split(flat, prior.names, prior.shapes)


@torch.no_grad()
def log_normalizer(prior: Prior, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``1/2 log det(2 pi Sigma)`` = ``-log p(mu)``: the part of ``prior.penalty`` that does not depend on theta.

    Args:
        prior: a Gaussian prior (every kind ptyl builds).
        dtype: the penalty is evaluated at the centre in this dtype.

    Returns:
        A 0-dim tensor; ``0`` for a prior over no parameters or one whose centre is unknown.
    """
    if not prior.names:
        return torch.zeros((), dtype=dtype)
    if isinstance(prior, ShardedPrior):  # this rank's rows at their centre: the global value (a collective)
        return log_normalizer(prior.local, dtype)
    mode = _mode(prior)
    if mode is None:  # a prior of your own without a centre: logged with its constant
        return torch.zeros((), dtype=dtype)
    return prior.penalty({n: t.to(dtype) for n, t in mode.items()}).detach()


class PriorTerm:
    """``-log p(theta) / N`` for a training step, in full precision, and its value without normalising constants.

    Args:
        prior: the prior (``None``: no prior term).
        num_data: N, the number of training examples (the global N under DDP).
        device: where the model trains (autocast is switched off there for the prior).
    """

    def __init__(self, prior: Prior | None, num_data: int, device: torch.device) -> None:
        self.prior, self.num_data, self.device = prior, int(num_data), device
        self._constant: torch.Tensor | None = None

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The differentiable prior term of ``model``'s parameters (0 without a prior).

        Args:
            model: the model (or its DDP wrapper: names are normalised).

        Returns:
            ``penalty / N``, a 0-dim tensor.
        """
        if self.prior is None:
            return torch.zeros((), device=self.device)
        with full_precision(self.device):
            return self.prior.penalty(model) / self.num_data

    def add_grad_(self, model: nn.Module) -> torch.Tensor:
        """Add ``grad(penalty) / N`` into the ``.grad`` of the covered parameters (created where ``None``) with
        :meth:`Prior.add_grad_ <ptyl.priors.Prior.add_grad_>` (fused kernels, no autograd graph), in full precision:
        the update of ``loss + penalty / N`` for loops that have run their backward already (ptyl's own, Lightning).
        Under DDP the data gradients are averaged by then and every rank adds the same prior gradient.

        Args:
            model: the model (names are normalised).

        Returns:
            The detached term ``penalty / N``.
        """
        if self.prior is None:
            return torch.zeros((), device=self.device)
        with full_precision(self.device):
            return self.prior.add_grad_(model, weight=1.0 / self.num_data, return_value=True) / self.num_data

    def constant(self, device: torch.device | None = None) -> torch.Tensor:
        """``log_normalizer(prior) / N``: the part of the term that does not depend on theta (computed once).

        Args:
            device: where the value is wanted (default: the training device).

        Returns:
            A float64 0-dim tensor (float32 on MPS); 0 without a prior.
        """
        device = device or self.device
        if self._constant is None or self._constant.device != torch.device(device):
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
            value = log_normalizer(self.prior) / self.num_data if self.prior is not None else torch.zeros(())
            self._constant = value.to(device=device, dtype=dtype)
        return self._constant

    def logged(self, term: torch.Tensor) -> torch.Tensor:
        """``term`` (from :meth:`__call__`) minus :meth:`constant`: ``>= 0``, what the history records.

        Args:
            term: the prior term of a step.

        Returns:
            The detached value, on the device (clamped at 0 against the rounding of ``term``).
        """
        if self.prior is None:
            return term.detach()
        constant = self.constant(term.device)
        return (term.detach().to(constant.dtype) - constant).clamp_min(0.0)
