"""Weights files: a model's ``state_dict`` (parameters and buffers) as one ``.safetensors`` file.

Layout: one tensor per state-dict key, plus JSON metadata under the header key ``ptyl_weights`` with
``"format": "ptyl-weights"``, ``"tensors"`` (one integrity record per tensor: dtype, shape, SHA-256 of the raw bytes,
see :mod:`ptyl.io.integrity`; verified on read unless ``PTYL_VERIFY_CHECKSUMS=0``; files written before the records
existed still load, unverified) and whatever the writer records to rebuild the model (``model``, ``model_kwargs``,
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
from ptyl.io.integrity import TENSOR_RECORD, check_tensor, checksums_enabled, tensor_records
from ptyl.io.schema import MapOf, Object, String

__all__ = ["HEADER_KEY", "WEIGHTS_FORMAT", "load_state_checked", "read_weights", "read_weights_metadata",
           "save_weights", "state_mismatch"]

WEIGHTS_FORMAT = "ptyl-weights"
HEADER_KEY = "ptyl_weights"  # the JSON header key of every model-state file (weights and sample banks)
_RECORDS = "tensors"  # header field holding the per-tensor integrity records
STATE_METADATA = Object(required={"format": String(nonempty=True)}, optional={_RECORDS: MapOf(TENSOR_RECORD)})


def cpu_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the tensors of a state dict (clones break storage sharing, e.g. tied
    weights, which safetensors refuses)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def write_state_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, Any], fmt: str) -> Path:
    """Write ``tensors`` with ``metadata`` plus their integrity records (``tensors`` and ``format`` set last, so
    copied metadata cannot mislabel the file)."""
    header = {HEADER_KEY: json.dumps({**metadata, _RECORDS: tensor_records(tensors), "format": fmt})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _read_header(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    meta = read_json_header(path, HEADER_KEY, what=what, schema=STATE_METADATA)
    if meta["format"] != fmt:
        raise PriorFileError(f"{path}: format {meta['format']!r} is not {fmt!r}; is it a ptyl {what} file?")
    return meta


def read_state_metadata(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """The JSON metadata of a model-state file of format ``fmt`` (without its integrity records);
    :class:`PriorFileError` naming the file otherwise."""
    meta = _read_header(path, fmt, what)
    meta.pop(_RECORDS, None)
    return meta


def read_state_file(
    path: str | Path, fmt: str, what: str, map_location: str | torch.device = "cpu", *, verify: bool | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a model-state file, every tensor checked against its integrity record (dtype,
    shape and, unless ``verify=False`` / ``PTYL_VERIFY_CHECKSUMS=0``, SHA-256); a damaged file raises
    :class:`PriorFileError` naming it and the tensor."""
    meta = _read_header(path, fmt, what)
    records = meta.pop(_RECORDS, None)
    verify = records is not None and checksums_enabled(verify)
    try:  # checksums are taken on the host
        tensors = load_file(str(path), device="cpu" if verify else str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise PriorFileError(f"{path}: could not read tensors (truncated or corrupt?): {err}") from err
    if records is not None:
        if set(records) != set(tensors):
            odd = sorted(set(records) ^ set(tensors))[:5]
            raise PriorFileError(f"{path}: the tensors and the metadata's records disagree on {odd}")
        for key, tensor in tensors.items():
            check_tensor(path, key, tensor, records[key], verify=verify)
    if verify:
        tensors = {k: t.to(map_location) for k, t in tensors.items()}
    return tensors, meta


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
    return read_state_file(path, WEIGHTS_FORMAT, "weights", map_location)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _listed(items: list[str], limit: int = 4) -> str:
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def state_mismatch(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """What keeps ``state`` from loading into ``model`` (strictly, as :meth:`nn.Module.load_state_dict`), or ``None``.

    Args:
        model: the model.
        state: a state dict.

    Returns:
        One line naming the tensors whose shapes differ (expected by the model vs found in ``state``), the missing
        and the unexpected keys (the first few of each, with how many more); ``None`` when ``state`` fits.
    """
    own = model.state_dict()
    wrong = [f"{k} (expected {_shape(own[k])}, found {_shape(state[k])})" for k in own
             if k in state and _shape(own[k]) != _shape(state[k])]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = [f"{len(wrong)} tensor(s) of another shape: {_listed(wrong)}" if wrong else "",
             f"missing {len(missing)}: {_listed(missing)}" if missing else "",
             f"{len(unexpected)} the model does not have: {_listed(unexpected)}" if unexpected else ""]
    return "; ".join(p for p in parts if p) or None


def load_state_checked(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path,
                       what: str = "weights") -> nn.Module:
    """Load a state dict into a model after checking every key and shape: the one way ptyl loads weights into a
    model (the command line, the pipeline, :meth:`ptyl.io.PretrainedPrior.load_weights_into`, checkpoints, samples).

    Args:
        model: the model.
        state: its new state (e.g. from :func:`read_weights`).
        path: the file it came from (named in errors).
        what: what ``state`` is, for the message ("weights", "the model state", "sample 3"...).

    Returns:
        ``model``.

    Raises:
        ParameterMismatchError: naming ``path``, the tensors whose shapes differ (expected vs found) and the missing
            or unexpected keys; the model is left unchanged.
    """
    problem = state_mismatch(model, state)
    if problem is not None:
        raise ParameterMismatchError(f"{path}: {what} cannot be loaded into {type(model).__name__}: {problem}")
    model.load_state_dict(dict(state))
    return model
