"""The JSON header every ptyl safetensors file carries (prior, weights, samples and checkpoint files share it).

safetensors keeps ``str -> str`` metadata next to the tensors; ptyl stores one JSON object under a key naming the
kind of file (``"ptyl"`` for priors, ``"ptyl_weights"`` for weights and samples). :func:`read_json_header` reads it
without touching the tensors and, given a schema (:mod:`ptyl.io.schema`), validates it, so every malformed header is a
ptyl error naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ptyl.errors import PriorFileError, PtylError
from ptyl.io.schema import Spec, describe, validate_header

__all__ = ["HEADER_KINDS", "existing_file", "read_json_header"]

# the JSON keys ptyl writes -> what they hold
HEADER_KINDS = {"ptyl": "prior", "ptyl_weights": "weights", "ptyl_shard": "prior shard"}


def existing_file(path: str | Path, what: str = "prior", error: type[PtylError] = PriorFileError) -> Path:
    """``path`` as a :class:`Path` if it is a regular file, else ``error`` ("not found" / "is a directory")."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} file {path} is a directory")
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    return path


def read_json_header(
    path: str | Path,
    key: str,
    what: str = "prior",
    schema: Spec | None = None,
    error: type[PtylError] = PriorFileError,
) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a safetensors file's metadata (tensors are not read).

    Raises ``error`` (default :class:`PriorFileError`) naming the file when it is missing, not safetensors, has no
    entry ``key`` (saying which kind of ptyl file it is instead, if any), the entry is not a JSON object, or, with
    ``schema``, a field does not match it.
    """
    path = existing_file(path, what, error)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise error(f"{path}: not a readable safetensors {what} file (truncated or corrupt?): {err}") from err
    if key not in header:
        found = [kind for k, kind in HEADER_KINDS.items() if k in header]
        hint = f"it is a ptyl {found[0]} file, not a {what} file" if found else f"is it a ptyl {what} file?"
        if found == ["prior shard"]:
            hint += " (one file of a sharded prior: open its .index.json)"
        raise error(f"{path}: safetensors file without ptyl metadata for a {what} file; {hint}")
    try:
        meta = json.loads(header[key])
    except json.JSONDecodeError as err:
        raise error(f"{path}: metadata is not valid JSON: {err}") from err
    except RecursionError:
        raise error(f"{path}: the {key!r} metadata entry nests too deeply to be a ptyl header") from None
    if not isinstance(meta, dict):
        raise error(f"{path}: the {key!r} metadata entry must be a JSON object, got {describe(meta)}")
    if schema is not None:
        validate_header(meta, schema, path, entry=key, error=error)
    return meta
