"""Weights files: a model's ``state_dict`` (parameters and buffers) as one ``.safetensors`` file.

Layout: one tensor per state-dict key, plus JSON metadata under the header key ``ptyl_weights`` with
``"format": "ptyl-weights"`` and whatever the writer records to rebuild the model (``model``, ``model_kwargs``,
``num_classes``, ``task``...; :func:`ptyl.pipeline.load_weights` reads them). No pickle; atomic writes.

>>> import tempfile, torch
>>> path = save_weights(torch.nn.Linear(2, 1), tempfile.mkdtemp() + "/w.safetensors", {"model": "linear"})
>>> state, meta = read_weights(path)
>>> sorted(state), meta["model"], meta["format"]
(['bias', 'weight'], 'linear', 'ptyl-weights')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ptyl.errors import ParameterMismatchError, PriorFileError
from ptyl.io.atomic import atomic_write
from ptyl.io.header import read_json_header

__all__ = ["HEADER_KEY", "WEIGHTS_FORMAT", "load_state_checked", "read_weights", "read_weights_metadata",
           "save_weights"]

WEIGHTS_FORMAT = "ptyl-weights"
HEADER_KEY = "ptyl_weights"  # the JSON header key of every model-state file (weights and sample banks)


def cpu_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the tensors of a state dict (clones break storage sharing, e.g. tied
    weights, which safetensors refuses)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def write_state_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, Any], fmt: str) -> Path:
    """Write ``tensors`` with ``metadata`` (``format`` set last, so copied metadata cannot mislabel the file)."""
    header = {HEADER_KEY: json.dumps({**metadata, "format": fmt})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_state_metadata(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """The JSON metadata of a model-state file of format ``fmt``; :class:`PriorFileError` naming the file otherwise."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    meta = read_json_header(path, HEADER_KEY, what=what)
    if meta.get("format") != fmt:
        raise PriorFileError(f"{path}: format {meta.get('format')!r} is not {fmt!r}; is it a ptyl {what} file?")
    return meta


def read_state_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a damaged file raises :class:`PriorFileError` naming it."""
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise PriorFileError(f"{path}: could not read tensors (truncated or corrupt?): {err}") from err


def save_weights(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write a model's ``state_dict()`` (or a state dict) with JSON metadata; atomic, no pickle.

    Args:
        model: the module (or its state dict).
        path: the ``.safetensors`` file to write.
        metadata: JSON-able description, e.g. how to rebuild the model (``model``, ``model_kwargs``, ``task``).

    Returns:
        ``path``.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return write_state_file(path, cpu_state(state), metadata, WEIGHTS_FORMAT)


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of the weights file at ``path`` (written by :func:`save_weights`; tensors are not read)."""
    return read_state_metadata(path, WEIGHTS_FORMAT, "weights")


def read_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weights file.

    Args:
        path: the file.
        map_location: where the tensors are loaded.

    Returns:
        ``(state dict, metadata)``.
    """
    meta = read_weights_metadata(path)
    return read_state_tensors(path, map_location), meta


def load_state_checked(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Load a state dict into a model after checking every key and shape.

    Args:
        model: the model.
        state: its new state (e.g. from :func:`read_weights`).
        path: the file it came from (named in errors).

    Returns:
        ``model``.

    Raises:
        ParameterMismatchError: missing keys or other shapes, naming ``path`` and the first offending keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = "; ".join(part for part in (f"missing {missing[:4]}" if missing else "",
                                             f"shape mismatch {wrong[:3]}" if wrong else "") if part)
        raise ParameterMismatchError(f"{path}: weights do not fit {type(model).__name__}: {detail}")
    model.load_state_dict({k: state[k] for k in own})
    return model
