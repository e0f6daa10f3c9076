"""Prior files: one ``.safetensors`` file, tensors keyed by parameter name, JSON metadata.

Layout (format version 1)::

    mean::<param name>         parameter shape
    variance::<param name>     parameter shape, > 0
    deviations::<param name>   (K, *parameter shape)   (present for every parameter, K may be 0 -> omitted)

    metadata["ptyl"] = JSON {"format": "ptyl-prior", "format_version": 1, "rank": K, "num_snapshots": n,
                             "parameters": [{"name", "shape"}...], "dtype", "source", "architecture", "objective", ...}

No pickle anywhere: safetensors holds raw tensors and a JSON header, so a prior file can be shared like pretrained
weights and opened safely. Writes go to a temporary file in the same folder and are renamed into place, so a crash
never leaves a half-written prior behind.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ptyl.errors import InvalidValueError, PriorFileError
from ptyl.io.atomic import atomic_write
from ptyl.posterior.gaussian import SourcePosterior

FORMAT = "ptyl-prior"
FORMAT_VERSION = 1
_KINDS = ("mean", "variance", "deviations")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise InvalidValueError(f"unknown dtype {value!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[value]


def save_posterior(
    posterior: SourcePosterior,
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a posterior (the learned prior) to ``path`` atomically.

    Args:
        dtype: storage dtype (``float16``/``bfloat16`` halve the file); default keeps the posterior's dtype.
        metadata: extra JSON-able entries merged over ``posterior.metadata``.
    """
    dtype = _dtype(dtype)
    posterior.validate()
    tensors: dict[str, torch.Tensor] = {}
    for kind, store in (("mean", posterior.mean), ("variance", posterior.variance), ("deviations", posterior.deviations)):
        for name, t in store.items():
            if kind == "deviations" and t.shape[0] == 0:
                continue
            t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous().clone()
            tensors[f"{kind}::{name}"] = t
    if dtype is not None and dtype in (torch.float16, torch.bfloat16):
        for name, t in posterior.variance.items():  # a tiny variance may underflow to 0 in half precision
            if (tensors[f"variance::{name}"] <= 0).any():
                raise InvalidValueError(f"variance of {name!r} underflows in {dtype}; save in float32 instead")
    meta = {
        **posterior.metadata,
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rank": posterior.rank,
        "parameters": [{"name": n, "shape": list(s)} for n, s in posterior.shapes.items()],
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    header = {"ptyl": json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_json_header(path: str | Path, key: str, what: str = "prior") -> dict[str, Any]:
    """The JSON object stored under ``key`` in a safetensors file's metadata (tensors are not read)."""
    path = _existing(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise PriorFileError(f"{path}: not a readable safetensors {what} file (truncated or corrupt?): {err}") from err
    if key not in header:
        kinds = {"ptyl": "prior", "ptyl_weights": "weights"}  # the JSON keys ptyl writes
        found = [kind for k, kind in kinds.items() if k in header]
        hint = f"it is a ptyl {found[0]} file, not a {what} file" if found else f"is it a ptyl {what} file?"
        raise PriorFileError(f"{path}: safetensors file without ptyl metadata for a {what} file; {hint}")
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as err:
        raise PriorFileError(f"{path}: metadata is not valid JSON: {err}") from err


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a prior file, validated for format and version (tensors are not read)."""
    meta = read_json_header(path, "ptyl")
    if meta.get("format") != FORMAT:
        raise PriorFileError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PriorFileError(
            f"{path}: prior file format version {version!r} is not supported (this ptyl reads version {FORMAT_VERSION})"
        )
    return meta


def load_posterior(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SourcePosterior:
    """Read and validate a prior file. Raises :class:`PriorFileError` for unreadable/foreign files, missing or extra
    tensors and shape disagreements, :class:`InvalidValueError` for NaN/Inf or non-positive variance."""
    path = _existing(path)
    dtype = _dtype(dtype)
    meta = read_metadata(path)
    params = meta.get("parameters")
    if not isinstance(params, list) or not params:
        raise PriorFileError(f"{path}: metadata lists no parameters")
    rank = int(meta.get("rank", 0))
    stores: dict[str, dict[str, torch.Tensor]] = {k: {} for k in _KINDS}
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            keys = set(f.keys())
            expected = set()
            for entry in params:
                name, shape = entry["name"], tuple(entry["shape"])
                for kind in _KINDS:
                    key = f"{kind}::{name}"
                    if kind == "deviations" and rank == 0:  # same device and dtype as the mean read just before
                        stores[kind][name] = stores["mean"][name].new_zeros((0, *shape))
                        continue
                    if key not in keys:
                        raise PriorFileError(f"{path}: tensor {key!r} listed in the metadata is missing")
                    expected.add(key)
                    t = f.get_tensor(key)
                    want = (rank, *shape) if kind == "deviations" else shape
                    if tuple(t.shape) != want:
                        raise PriorFileError(f"{path}: {key!r} has shape {tuple(t.shape)}, metadata says {want}")
                    stores[kind][name] = t.to(dtype) if dtype is not None else t
    except (SafetensorError, OSError) as err:
        raise PriorFileError(f"{path}: could not read tensors (truncated or corrupt?): {err}") from err
    extra = keys - expected
    if extra:
        raise PriorFileError(f"{path}: tensors not listed in the metadata: {sorted(extra)[:5]}")
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "parameters")}
    try:
        return SourcePosterior(stores["mean"], stores["variance"], stores["deviations"], meta)
    except InvalidValueError as err:
        raise type(err)(f"{path}: {err}") from err


def load_prior(
    path: str | Path,
    model: nn.Module,
    *,
    kind: str = "lowrank",
    scale: float = 1.0,
    eps: float = 0.0,
    rank: int | None = None,
    strict: bool = True,
    map_location: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load a prior file and match it to ``model`` by parameter name.

    Returns the (backbone) prior ``N(mu, scale * Sigma_SWAG + eps I)``; see :meth:`SourcePosterior.to_prior`.
    With ``strict=False`` parameters absent from the model or of another shape are skipped and listed in
    ``prior.skipped`` (a warning is issued); with ``strict=True`` they raise :class:`ParameterMismatchError`.
    ``map_location`` defaults to the model's device.
    """
    if map_location is None:
        map_location = next(model.parameters()).device
    posterior = load_posterior(path, map_location=map_location).matched_to(model, strict=strict)
    prior = posterior.to_prior(kind=kind, scale=scale, eps=eps, rank=rank, dtype=_dtype(dtype))
    prior.skipped = tuple(posterior.metadata.get("skipped", ()))
    if prior.skipped:
        warnings.warn(f"prior {path}: skipped {len(prior.skipped)} parameter(s) not in the model: {prior.skipped[:5]}")
    return prior


def _existing(path: str | Path, what: str = "prior") -> Path:
    path = Path(path)
    if not path.is_file():
        raise PriorFileError(f"{what} file not found: {path}")
    return path
