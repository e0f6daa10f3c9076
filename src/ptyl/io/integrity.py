"""Per-tensor integrity records for ptyl's safetensors files: dtype, shape and SHA-256 of the raw bytes.

A writer stores ``tensor_records(tensors)`` in its JSON header; a reader calls :func:`check_tensor` on every tensor it
loads. The dtype check catches a header whose ``"F32"`` was changed to ``"I32"`` (same byte length, so safetensors
itself cannot tell); the checksum catches any flipped data byte, including flips that keep every value finite.

Hashing runs at roughly 1-2 GB/s per core (hashlib's SHA-256). For very large files verification can be switched off
per call (``verify=False``) or for the whole process with the environment variable ``PTYL_VERIFY_CHECKSUMS=0``;
dtype and shape checks always run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ptyl.errors import ConfigError, PriorFileError, PtylError
from ptyl.io.schema import Integer, ListOf, Object, String

__all__ = ["TENSOR_RECORD", "VERIFY_ENV", "check_tensor", "checksums_enabled", "dtype_name", "sha256_of",
           "tensor_records"]

VERIFY_ENV = "PTYL_VERIFY_CHECKSUMS"

# the header entry one tensor gets; use it in a schema as MapOf(TENSOR_RECORD)
TENSOR_RECORD = Object(required={"dtype": String(nonempty=True), "shape": ListOf(Integer(minimum=0)),
                                 "sha256": String(pattern="[0-9a-f]{64}")})


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling ptyl headers use)."""
    return str(dtype).removeprefix("torch.")


def sha256_of(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw bytes in memory order (what safetensors writes; little-endian hosts)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def tensor_records(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``{key: {"dtype", "shape", "sha256"}}`` for the tensors about to be written."""
    return {key: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": sha256_of(t)}
            for key, t in tensors.items()}


def checksums_enabled(verify: bool | None = None) -> bool:
    """``verify`` if given, else the environment variable ``PTYL_VERIFY_CHECKSUMS`` (default on; ``0``/``false``/
    ``no``/``off`` turn it off)."""
    if verify is not None:
        return bool(verify)
    value = os.environ.get(VERIFY_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment variable {VERIFY_ENV}={value!r}: use 1 (verify checksums) or 0 (skip)")


def check_tensor(
    path: str | Path,
    key: str,
    tensor: torch.Tensor,
    record: dict[str, Any] | None,
    *,
    dtypes: dict[str, torch.dtype] | None = None,
    verify: bool = True,
    error: type[PtylError] = PriorFileError,
) -> None:
    """Check one tensor loaded from ``path`` against its header ``record`` (validated against
    :data:`TENSOR_RECORD`; a partial record checks what it has, ``None`` nothing): dtype among ``dtypes``
    (name -> dtype) if given, dtype and shape as recorded, and, with ``verify``, the SHA-256 of its bytes."""
    found = dtype_name(tensor.dtype)
    if dtypes is not None and tensor.dtype not in dtypes.values():
        raise error(f"{path}: tensor {key!r} has dtype {found}; expected one of {', '.join(dtypes)}")
    if record is None:
        return
    if "dtype" in record and found != record["dtype"]:
        raise error(f"{path}: tensor {key!r} has dtype {found} but the metadata records {record['dtype']}")
    if "shape" in record and list(tensor.shape) != record["shape"]:
        raise error(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but the metadata records "
                    f"{tuple(record['shape'])}")
    if verify and "sha256" in record and sha256_of(tensor) != record["sha256"]:
        raise error(f"{path}: tensor {key!r} fails its SHA-256 checksum: the file's data is damaged (load with "
                    f"verify=False or {VERIFY_ENV}=0 to skip the check at your own risk)")
