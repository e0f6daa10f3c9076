"""The data passes of the curvature and the variational posterior: batches of ``(inputs, targets, ...)`` whose inputs
are a tensor or a dict of tensors (a tokenizer's output), moved to the model's device and checked; every failure is
a :class:`~ptyl.errors.DataError` naming the batch."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map

from ptyl.autotune.likelihoods import unpack
from ptyl.errors import DataError


def model_outputs(model: Any, x: Any, params: dict | None = None) -> torch.Tensor:
    """The model's outputs on inputs ``x`` as the training objective calls it: ``model(x)``, or ``model(**x)`` for a
    dict of tensors (a tokenizer's output) whose keys the forward takes as keywords (else ``model(x)``: a forward
    taking the dict); a Hugging Face output's ``logits``. With ``params``, through
    ``torch.func.functional_call`` (per-example gradients)."""
    args, kwargs = ((), dict(x)) if isinstance(x, Mapping) and _takes_keywords(model, x) else ((x,), {})
    out = functional_call(model, params, args, kwargs) if params is not None else model(*args, **kwargs)
    if torch.is_tensor(out):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if logits is None:
        raise DataError(f"the model returned {type(out).__name__} without 'logits'")
    return logits


def _takes_keywords(model: Any, x: Mapping) -> bool:
    try:
        params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in named}
    return set(x) <= names


def num_examples(x: Any) -> int:
    """Rows of a batch's inputs (the first dimension of its first tensor)."""
    leaves = [t for t in tree_leaves(x) if torch.is_tensor(t)]
    if not leaves:
        raise DataError(f"a batch's inputs hold no tensor (got {type(x).__name__})")
    return int(leaves[0].shape[0])


def rows(x: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor of the inputs."""
    return tree_map(lambda t: t[start:stop] if torch.is_tensor(t) else t, x)


def finite(*parts: Any) -> bool:
    """Whether every floating tensor in ``parts`` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tree_leaves(parts) if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def to_device(batch: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a batch on ``device``."""
    x, y = unpack(batch)
    return tree_map(lambda t: t.to(device) if torch.is_tensor(t) else t, x), y.to(device)


def checked_batches(data: Iterable, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(x, y)`` on ``device``, each checked for NaN/Inf (one host sync per batch: for curvature passes, not for
    training steps); raises if the data yields nothing."""
    count = 0
    for i, batch in enumerate(data):
        x, y = to_device(batch, device)
        if num_examples(x) == 0:
            continue
        if not finite(x, y):
            raise DataError(f"batch {i} of the data holds NaN/Inf values")
        count += 1
        yield x, y
    if count == 0:
        raise DataError("the data loader yielded no batches")


__all__ = ["checked_batches", "finite", "num_examples", "rows", "to_device"]
