"""Training checkpoints: one file per run, written atomically, read back safely.

A checkpoint is a nested dict of tensors and plain Python values (no classes), saved with :func:`torch.save` and
loaded with ``torch.load(weights_only=True)``, which refuses to unpickle anything but tensors and containers. Every
way reading can fail -- a missing, truncated or damaged file (``OSError``, ``RuntimeError``, ``EOFError``), a hostile
pickle (``UnpicklingError``), a file that is not a checkpoint -- becomes one :class:`~ptyl.errors.CheckpointError`
naming the file.

>>> import tempfile
>>> path = save_checkpoint({"epoch": 3}, tempfile.mkdtemp() + "/run.pt")
>>> load_checkpoint(path, required=("epoch",))["epoch"]
3
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ptyl.errors import CheckpointError
from ptyl.io.atomic import atomic_write

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically (a crash never leaves a half-written one).

    Args:
        state: tensors and plain Python containers / numbers / strings.
        path: the file.

    Returns:
        ``path``.
    """
    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded.
        required: keys the checkpoint must hold.

    Returns:
        The state dict.

    Raises:
        CheckpointError: the file is missing, unreadable, unsafe, or lacks a ``required`` key (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways; all mean "not a usable checkpoint"
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated, corrupt or not a ptyl checkpoint): "
                              f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a ptyl checkpoint")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a ptyl checkpoint of this kind")
    return state
