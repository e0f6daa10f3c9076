"""Batches and BatchNorm, below :mod:`ptyl.posterior` and :mod:`ptyl.inference` (both use them): moving a batch to a
device, calling a model on one, and recomputing BatchNorm running statistics (:func:`recompute_batchnorm`, which
:meth:`ptyl.posterior.SWAGCollector.sample_into` and the Bayesian model averages of :mod:`ptyl.inference.bma` run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ptyl.errors import DataError

__all__ = ["call_model", "default_input", "model_device", "recompute_batchnorm", "to_device"]


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def default_input(batch: Any) -> Any:
    """``(x, y)`` -> ``x``; a bare tensor is taken as the input."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise DataError("loader yielded an empty batch")
        return batch[0]
    return batch


def to_device(x: Any, device: torch.device) -> Any:
    """Move a batch (a tensor, or a dict / list / tuple of them) to ``device``; other values pass through."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {key: to_device(value, device) for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(value, device) for value in x)
    return x


def call_model(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def recompute_batchnorm(model: nn.Module, loader: Iterable[Any], device: torch.device | str | None = None,
                        input_fn: Callable[[Any], Any] | None = None) -> int:
    """Recompute the BatchNorm running statistics of ``model`` on the inputs (never the targets) of ``loader``: the
    example-weighted mean of the batches' statistics,

        running = sum_b n_b stat_b / sum_b n_b     (a momentum of n_b / (n_1 + ... + n_b) at batch b)

    :func:`torch.optim.swa_utils.update_bn` (Izmailov et al. 2018) weights every batch equally, so a short last batch
    counts as much as a full one: 4 of 100 training examples at batch size 32 get a quarter of the weight, which cost
    BMA +0.015 test NLL on MNIST at 10 per class (``benchmarks/results/predictive_diagnostics.md``).

    Args:
        model: the model (its train/eval mode and BatchNorm momenta are restored afterwards).
        loader: batches; ``(x, y)`` -> ``x``, a Mapping is passed as keyword arguments.
        device: where the inputs go (default: the model's device).
        input_fn: ``batch -> model input`` (default: the first element of a tuple).

    Returns:
        The number of examples seen (0 when ``model`` has no BatchNorm layer: nothing is run).

    Raises:
        DataError: ``loader`` yielded no batches.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    device = model_device(model) if device is None else torch.device(device)
    get_input = input_fn or default_input
    momenta, was_training, seen = [m.momentum for m in norms], model.training, 0
    for m in norms:
        m.reset_running_stats()
    model.train()
    try:
        with torch.no_grad():
            for batch in loader:
                x = to_device(get_input(batch), device)
                size = _num_examples(x)
                for m in norms:
                    m.momentum = size / (seen + size)
                call_model(model, x)
                seen += size
    finally:
        for m, momentum in zip(norms, momenta, strict=False):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise DataError("the BatchNorm loader yielded no batches: cannot recompute BatchNorm statistics")
    return seen


def _num_examples(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    values = list(x.values()) if isinstance(x, Mapping) else list(x) if isinstance(x, (list, tuple)) else []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise DataError(f"cannot tell the batch size of an input of type {type(x).__name__}")
