"""JSON results files: atomic writes, tensors / numpy values converted to plain Python."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptyl.errors import DataError, InvalidValueError
from ptyl.io.atomic import atomic_write_text

__all__ = ["save_json", "load_json", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Recursively convert tensors, numpy arrays/scalars, paths, tuples/sets and dataclasses to JSON-ready Python."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()  # 0-dim -> Python scalar
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        converted = {}
        for key, value in obj.items():
            if isinstance(key, (np.generic, torch.Tensor)):
                key = key.item()
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise InvalidValueError(f"cannot write a JSON object key of type {type(key).__name__}: {key!r}")
            converted[key if isinstance(key, str) else json.dumps(key)] = to_jsonable(value)
        return converted
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(value) for value in obj)
    raise InvalidValueError(f"cannot convert a value of type {type(obj).__name__} to JSON")


def save_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same directory + ``os.replace``).

    NaN and infinities are written as ``NaN``/``Infinity`` (Python's json reads them back; strict parsers do not).
    """
    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def load_json(path: str | Path) -> Any:
    """Read a JSON file; malformed content raises :class:`ptyl.errors.DataError` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error

