"""Sample files: posterior samples (full state dicts) in one ``.safetensors`` file, one layout for every writer.

Layout: tensor ``<index>::<state-dict key>`` for every sample (``index`` a zero-padded integer, samples in index
order) and JSON metadata under the header key ``ptyl_weights`` with ``"format": "ptyl-samples"`` and
``num_samples``, with the integrity records of :mod:`ptyl.io.weights`. ``ptyl finetune`` writes all its samples to
one such file; an on-disk :class:`~ptyl.inference.SampleBank` writes one file per sample in the same layout.

>>> import tempfile, torch
>>> path = save_samples([{"w": torch.zeros(2)}, {"w": torch.ones(2)}], tempfile.mkdtemp() + "/s.safetensors")
>>> [sample["w"].tolist() for sample in load_samples(path)]
[[0.0, 0.0], [1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ptyl.errors import PriorFileError
from ptyl.io.weights import cpu_state, read_state_file, read_state_metadata, write_state_file

__all__ = ["SAMPLES_FORMAT", "load_samples", "read_samples_metadata", "save_samples"]

SAMPLES_FORMAT = "ptyl-samples"
_SEP = "::"


def save_samples(
    samples: Iterable[Mapping[str, torch.Tensor]],
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
    *,
    first_index: int = 0,
) -> Path:
    """Write posterior samples (state dicts) to ``path`` atomically.

    Args:
        samples: state dicts (e.g. a :class:`~ptyl.inference.SampleBank`), written in order.
        path: the ``.safetensors`` file.
        metadata: JSON-able entries recorded next to ``num_samples`` (e.g. how to rebuild the model).
        first_index: index of the first sample (an on-disk bank numbers its files globally).

    Returns:
        ``path``.
    """
    tensors: dict[str, torch.Tensor] = {}
    count = 0
    for count, state in enumerate(samples, start=1):
        for name, tensor in cpu_state(state).items():
            tensors[f"{first_index + count - 1:04d}{_SEP}{name}"] = tensor
    return write_state_file(path, tensors, {**(metadata or {}), "num_samples": count}, SAMPLES_FORMAT)


def read_samples_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of the sample file at ``path`` (tensors are not read)."""
    return read_state_metadata(path, SAMPLES_FORMAT, "samples")


def load_samples(path: str | Path, map_location: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """The samples of a file written by :func:`save_samples`.

    Args:
        path: the file.
        map_location: where the tensors are loaded.

    Returns:
        The state dicts, in index order.

    Raises:
        PriorFileError: not a ptyl samples file, or a damaged one (the message names it).
    """
    tensors, meta = read_state_file(path, SAMPLES_FORMAT, "samples", map_location)
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, sep, name = key.partition(_SEP)
        if not sep or not index.isdigit():
            raise PriorFileError(f"{path}: tensor {key!r} is not '<index>{_SEP}<name>'; not a ptyl samples file")
        by_index.setdefault(int(index), {})[name] = tensor
    if len(by_index) != int(meta.get("num_samples", len(by_index))):
        raise PriorFileError(f"{path}: holds {len(by_index)} samples, its metadata says {meta.get('num_samples')}")
    return [by_index[i] for i in sorted(by_index)]
