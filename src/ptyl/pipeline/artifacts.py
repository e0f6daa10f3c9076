"""The files a source stage leaves behind and how downstream code gets a model back from them: the prior file, the
pretrained (SWA-mean) weights next to it, and any weights file written by ``ptyl finetune``.

``<stem>.safetensors`` (the prior, :mod:`ptyl.io.prior_file`) goes with ``<stem>.pretrained.safetensors`` (weights,
:mod:`ptyl.io.weights`), whose metadata names the architecture.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ptyl.io.prior_file import load_posterior, read_metadata
from ptyl.io.weights import load_state_checked, read_weights
from ptyl.models import replace_head
from ptyl.pipeline.tasks import build_from_metadata

__all__ = ["load_pretrained", "load_weights", "pretrained_weights_path"]


def load_weights(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a weights file's metadata describes and load its state.

    Args:
        path: the weights file (:func:`ptyl.io.save_weights`).
        map_location: where its tensors are loaded.

    Returns:
        ``(model, metadata)``; a file whose tensors do not fit the described model raises
        :class:`~ptyl.errors.ParameterMismatchError` naming it.
    """
    state, meta = read_weights(path, map_location)
    return load_state_checked(build_from_metadata(meta), state, path), meta


def pretrained_weights_path(prior_path: str | Path) -> Path:
    """Where the source stage puts the pretrained weights of ``prior_path``: ``<stem>.pretrained.safetensors``.

    (Also for a sharded prior's ``<stem>.safetensors.index.json``.)"""
    prior_path = Path(prior_path)
    stem = prior_path.name.removesuffix(".index.json").removesuffix(".safetensors")
    return prior_path.with_name(f"{stem}.pretrained.safetensors")


def load_pretrained(prior_path: str | Path, num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained model that goes with a prior file (the SWA mean with recomputed BatchNorm statistics).

    The model is the architecture the *prior's* metadata describes (what downstream training builds), so weights
    that belong to another model -- another width, say -- fail here, naming their file.

    Args:
        prior_path: the prior file.
        num_classes: give the model a fresh head of this many outputs.

    Returns:
        ``(model, prior metadata)``. Falls back to the prior's mean (BatchNorm statistics at their defaults) with a
        warning when the weights file is missing.

    Raises:
        ParameterMismatchError: the weights file does not fit the prior's architecture (names the file, the tensors
            and their shapes).
    """
    meta = read_metadata(prior_path)
    weights = pretrained_weights_path(prior_path)
    if weights.is_file():
        state, weights_meta = read_weights(weights)
        model = build_from_metadata({**weights_meta, **meta})  # the prior's architecture wins
        load_state_checked(model, state, weights, what=f"the pretrained weights of prior {Path(prior_path).name}")
    else:
        warnings.warn(f"{weights} not found: starting from the prior mean (BatchNorm statistics not recomputed)",
                      stacklevel=2)
        model = build_from_metadata(meta)
        load_posterior(prior_path).matched_to(model).load_mean_into(model)
    if num_classes is not None:
        replace_head(model, num_classes)
    return model, meta
