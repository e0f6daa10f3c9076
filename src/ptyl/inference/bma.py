"""Predictions of one model and Bayesian model averaging (BMA) of softmax predictions over posterior samples.

BMA approximates the posterior predictive with S samples theta_s ~ p(theta | D):

    p(y | x, D) ≈ (1/S) sum_s softmax(f(x; theta_s))

(e.g. Wilson & Izmailov, 2020, https://arxiv.org/abs/2002.08791). For models with BatchNorm, running statistics are
recomputed for each sample (:func:`recompute_batchnorm`: ``torch.optim.swa_utils.update_bn``'s recipe, Izmailov et
al., 2018, SWA, with every example weighted equally), because the stored statistics belong to the weights they were
accumulated with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import RandomSampler
from tqdm.auto import tqdm

from ptyl.batches import call_model, default_input, model_device, recompute_batchnorm, to_device
from ptyl.errors import DataError, InvalidValueError
from ptyl.inference.samples import SampleBank, cpu_copy
from ptyl.io.weights import load_state_checked

__all__ = ["bma_predict", "collect_targets", "predict_probs"]


def _logits(output: Any) -> torch.Tensor:
    """Accept raw logits, HF-style outputs (``.logits``) and torchvision-style dicts (``["out"]``)."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        logits = output.logits
    elif isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        logits = output["out"]
    else:
        raise DataError(f"model output of type {type(output).__name__} is not a logits tensor")
    if logits.dim() < 2:
        raise DataError(f"expected logits of shape [B, C, ...], got shape {tuple(logits.shape)}")
    return logits


def _check_ordered(loader: Iterable[Any]) -> None:
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        raise InvalidValueError("prediction loaders must not shuffle (shuffle=False): passes must see the same order")


def predict_probs(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities of one model over a loader.

    The model is run in eval mode under ``torch.no_grad`` and its train/eval mode is restored afterwards.

    Args:
        model: returns logits (or an HF-style output with ``.logits``, or a dict with ``"out"``).
        loader: yields ``(x, y)`` batches or bare inputs, in a fixed order (no shuffling).
        device: where inputs go (default: the model's device).
        input_fn: ``input_fn(batch)`` -> the model input (a tensor, or a dict of keyword arguments).
        progress: a progress bar.

    Returns:
        ``[N, C]`` (``[N, C, H, W]`` for segmentation), float32 on the CPU.
    """
    _check_ordered(loader)
    device = model_device(model) if device is None else torch.device(device)
    get_input = input_fn or default_input
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
                logits = _logits(call_model(model, to_device(get_input(batch), device)))
                chunks.append(torch.softmax(logits.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise DataError("loader yielded no batches")
    trailing = {chunk.shape[1:] for chunk in chunks}
    if len(trailing) != 1:
        raise DataError(f"batches produced outputs of different shapes {sorted(map(tuple, trailing))}")
    return torch.cat(chunks)


def collect_targets(loader: Iterable[Any]) -> torch.Tensor:
    """The ``y`` of every ``(x, y)`` batch of ``loader``, concatenated in loader order (CPU, int64)."""
    _check_ordered(loader)
    targets = []
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise DataError("collect_targets needs a loader yielding (x, y) batches")
        targets.append(torch.as_tensor(batch[1]).long().cpu())
    if not targets:
        raise DataError("loader yielded no batches")
    return torch.cat(targets)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def bma_predict(
    model: nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]] | SampleBank,
    loader: Iterable[Any],
    *,
    bn_loader: Iterable[Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    input_fn: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """Bayesian model average ``(1/S) sum_s softmax(f(x; theta_s))`` over a loader.

    For each sample the state dict is loaded into ``model`` (strictly: names and shapes must match); if the model has
    BatchNorm layers and ``bn_loader`` is given, running statistics are recomputed with
    :func:`recompute_batchnorm` on the inputs of ``bn_loader`` (otherwise the sample's stored statistics
    are used). The average is accumulated in float64. ``model``'s weights, buffers, train/eval mode and device are
    restored afterwards, also on error.

    Args:
        model: the architecture the samples are state dicts of.
        samples: state dicts, e.g. a :class:`SampleBank` or :func:`ptyl.io.load_samples`.
        loader: the inputs, in a fixed order.
        bn_loader: training inputs to recompute BatchNorm statistics on, per sample.
        device: move the model (and inputs) there for the computation.
        progress: a progress bar over the samples.
        input_fn: as in :func:`predict_probs`.

    Returns:
        As :func:`predict_probs`: ``[N, C]`` or ``[N, C, H, W]``, float32 on the CPU.
    """
    _check_ordered(loader)
    original_device = model_device(model)
    device = original_device if device is None else torch.device(device)
    get_input = input_fn or default_input
    original_state = cpu_copy(model.state_dict())  # CPU: do not double the model's footprint on the accelerator
    was_training = model.training
    use_bn_update = bn_loader is not None and _has_batchnorm(model)

    total: torch.Tensor | None = None
    count = 0
    try:
        if device != original_device:
            model.to(device)
        for sample in tqdm(samples, desc="BMA samples", disable=not progress, leave=False):
            load_state_checked(model, sample, f"sample {count}", what="the posterior sample")
            if use_bn_update:
                assert bn_loader is not None
                recompute_batchnorm(model, bn_loader, device, get_input)
            probs = predict_probs(model, loader, device, input_fn=get_input).double()
            if total is None:
                total = probs
            elif probs.shape != total.shape:
                raise DataError(
                    f"sample {count}: predictions of shape {tuple(probs.shape)}, expected {tuple(total.shape)}"
                )
            else:
                total += probs
            count += 1
    finally:
        model.load_state_dict(original_state)
        if device != original_device:
            model.to(original_device)
        model.train(was_training)
    if total is None:
        raise InvalidValueError("bma_predict needs at least one sample")
    return (total / count).float()
