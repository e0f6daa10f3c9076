"""Prior files: one ``.safetensors`` file, tensors keyed by parameter name, JSON metadata.

Layout (format version 2; version 1 is the same without ``tensors``)::

    mean::<param name>         parameter shape
    variance::<param name>     parameter shape, > 0
    deviations::<param name>   (K, *parameter shape)   (present for every parameter, K may be 0 -> omitted)

    metadata["ptyl"] = JSON {"format": "ptyl-prior", "format_version": 2, "rank": K, "num_snapshots": n,
                             "parameters": [{"name", "shape"}...], "dtype",
                             "tensors": {"<kind>::<param name>": {"dtype", "shape", "sha256"}...},
                             "source", "architecture", "objective", ...}

No pickle anywhere: safetensors holds raw tensors and a JSON header, so a prior file can be shared like pretrained
weights and opened safely. Reading checks the header against :data:`PRIOR_METADATA` (every field's type and range),
each tensor's dtype (a float type, the one recorded) and shape, and in version 2 the SHA-256 of each tensor's bytes
(``verify=False`` or ``PTYL_VERIFY_CHECKSUMS=0`` skip the hashing for very large files). Every failure is a
:class:`PriorFileError` naming the file. Writes go to a temporary file in the same folder and are renamed into place,
so a crash never leaves a half-written prior behind.

Large priors of sharded models are written by their ranks as several shard files plus a JSON index (the Hugging Face
layout, :mod:`ptyl.io.sharded_prior`); every function here accepts the index (or the ``prior.safetensors`` name when
only ``prior.safetensors.index.json`` exists) as well.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ptyl.errors import InvalidValueError, PriorFileError, PtylError
from ptyl.io.atomic import atomic_write
from ptyl.io.header import existing_file, read_json_header
from ptyl.io.integrity import check_tensor, checksums_enabled, dtype_name, tensor_records
from ptyl.io.prior_format import FLOAT_DTYPES, FORMAT, FORMAT_VERSION, PRIOR_METADATA, read_single_metadata
from ptyl.io.schema import validate_header
from ptyl.io.sharded_prior import index_path, save_sharded_posterior
from ptyl.io.sharded_read import layout_for, load_sharded_posterior, read_index
from ptyl.params import normalize_name
from ptyl.posterior.gaussian import SourcePosterior, matching_names
from ptyl.posterior.sharded import ShardedPosterior
from ptyl.priors.factory import make_prior
from ptyl.priors.registry import PriorKind
from ptyl.sharding import ShardLayout, is_dtensor

__all__ = ["FORMAT", "FORMAT_VERSION", "PRIOR_METADATA", "PriorFile", "load_posterior", "load_prior",
           "load_prior_file", "read_json_header", "read_metadata", "save_posterior"]

_KINDS = ("mean", "variance", "deviations")
# entries that describe the file itself; the posterior's free-form metadata is everything else
_FORMAT_KEYS = ("format", "format_version", "parameters", "tensors")


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in FLOAT_DTYPES:
        raise InvalidValueError(f"unknown dtype {value!r}; choose one of {sorted(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[value]


def save_posterior(
    posterior: SourcePosterior | ShardedPosterior,
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a posterior (the learned prior) to ``path`` atomically, in format version 2 (with checksums).

    A :class:`~ptyl.posterior.ShardedPosterior` (FSDP2) is written by all its ranks together: one shard file each and
    a JSON index ``<path>.index.json`` (see :mod:`ptyl.io.sharded_prior`); call it on every rank.

    Args:
        dtype: storage dtype (``float16``/``bfloat16`` halve the file); default keeps the posterior's dtype.
        metadata: extra JSON-able entries merged over ``posterior.metadata``; checked against
            :data:`PRIOR_METADATA` before anything is written (a file that could not be read back is never written).

    Returns:
        The path written (the index for a sharded posterior).
    """
    dtype = _dtype(dtype)
    if isinstance(posterior, ShardedPosterior):
        return save_sharded_posterior(posterior, path, dtype, metadata)
    posterior.validate()
    tensors: dict[str, torch.Tensor] = {}
    stores = (("mean", posterior.mean), ("variance", posterior.variance), ("deviations", posterior.deviations))
    for kind, store in stores:
        for name, t in store.items():
            if kind == "deviations" and t.shape[0] == 0:
                continue
            t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous().clone()
            tensors[f"{kind}::{name}"] = t
    found = sorted({dtype_name(t.dtype) for t in tensors.values()})
    if not set(found) <= set(FLOAT_DTYPES) or len(found) > 1:
        raise InvalidValueError(f"cannot write {path}: a prior file holds tensors of one dtype among "
                                f"{', '.join(FLOAT_DTYPES)}; got {', '.join(found)} (pass dtype=...)")
    if dtype is not None and dtype in (torch.float16, torch.bfloat16):
        for name in posterior.variance:  # a tiny variance may underflow to 0 in half precision
            if (tensors[f"variance::{name}"] <= 0).any():
                raise InvalidValueError(f"variance of {name!r} underflows in {dtype}; save in float32 instead")
    meta = {
        **posterior.metadata,
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rank": posterior.rank,
        "parameters": [{"name": n, "shape": list(s)} for n, s in posterior.shapes.items()],
        "dtype": found[0],
        "tensors": tensor_records(tensors),
    }
    meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    validate_header(meta, PRIOR_METADATA, f"cannot write {path}", error=InvalidValueError)
    try:
        header = {"ptyl": json.dumps(meta, allow_nan=False)}
    except (TypeError, ValueError) as err:
        raise InvalidValueError(f"cannot write {path}: metadata is not JSON-serialisable: {err}") from err
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a prior file (version 1 or 2), validated field by field against its version's schema
    (tensors are not read). Any malformed header raises :class:`PriorFileError` naming the file and the field."""
    index = index_path(path)
    if index is not None:
        return read_index(index)[0]
    return read_single_metadata(path)


@dataclass
class PriorFile:
    """What :func:`load_prior_file` read: the posterior, the whole validated header, whether checksums were
    verified (``False`` for version-1 files, which have none, and when verification was switched off) and the files
    (the shard files of a sharded prior, else the file itself)."""

    posterior: SourcePosterior | ShardedPosterior
    metadata: dict[str, Any]
    format_version: int
    checksums_verified: bool
    files: tuple[Path, ...] = ()


def load_prior_file(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    verify: bool | None = None,
    shards: nn.Module | ShardLayout | None = None,
) -> PriorFile:
    """Read and validate a prior file; see :func:`load_posterior`."""
    if shards is not None or index_path(path) is not None:
        layout = layout_for(shards) if shards is not None else None
        posterior, meta, verified, files = load_sharded_posterior(path, layout, map_location, _dtype(dtype),
                                                                  verify=verify)
        return PriorFile(posterior, meta, meta["format_version"], verified, tuple(files))
    path = existing_file(path)
    dtype = _dtype(dtype)
    meta = read_metadata(path)
    records = meta["tensors"] if meta["format_version"] >= 2 else None
    verify = records is not None and checksums_enabled(verify)
    rank = meta["rank"]
    stores: dict[str, dict[str, torch.Tensor]] = {k: {} for k in _KINDS}
    expected = set()
    with _open(path, "cpu" if verify else map_location) as f:  # checksums are taken on the host
        keys = set(_call(f.keys, path))
        for entry in meta["parameters"]:
            name, shape = entry["name"], tuple(entry["shape"])
            for kind in _KINDS:
                key = f"{kind}::{name}"
                if kind == "deviations" and rank == 0:  # same device and dtype as the mean read just before
                    stores[kind][name] = stores["mean"][name].new_zeros((0, *shape))
                    continue
                if key not in keys:
                    raise PriorFileError(f"{path}: tensor {key!r} listed in the metadata is missing")
                if records is not None and key not in records:
                    raise PriorFileError(f"{path}: metadata field 'tensors' has no record for {key!r}")
                expected.add(key)
                record = records[key] if records is not None else {"dtype": meta["dtype"]}  # v1: one dtype per file
                want = (rank, *shape) if kind == "deviations" else shape
                t = _read_tensor(f, path, key, want, record, verify)
                stores[kind][name] = t.to(map_location if verify else t.device, dtype=dtype or t.dtype)
    extra = keys - expected
    if extra:
        raise PriorFileError(f"{path}: tensors not listed in the metadata: {sorted(extra)[:5]}")
    if records is not None and set(records) != expected:
        raise PriorFileError(f"{path}: metadata field 'tensors' records tensors the file does not hold: "
                             f"{sorted(set(records) - expected)[:5]}")
    try:
        posterior = SourcePosterior(stores["mean"], stores["variance"], stores["deviations"],
                                    {k: v for k, v in meta.items() if k not in _FORMAT_KEYS})
    except PtylError as err:
        raise type(err)(f"{path}: {err}") from err
    return PriorFile(posterior, meta, meta["format_version"], verify, (path,))


def _read_tensor(f, path: Path, key: str, shape: tuple[int, ...], record: dict[str, Any], verify: bool) -> torch.Tensor:
    """One tensor, checked: the shape the metadata implies, a float dtype as recorded, and (``verify``) its checksum."""
    t = _call(lambda: f.get_tensor(key), path)
    if tuple(t.shape) != shape:
        raise PriorFileError(f"{path}: {key!r} has shape {tuple(t.shape)}, metadata says {shape}")
    check_tensor(path, key, t, record, dtypes=FLOAT_DTYPES, verify=verify)
    return t


def _open(path: Path, device: str | torch.device):
    return _call(lambda: safe_open(str(path), framework="pt", device=str(device)), path)


def _call(fn, path: Path):
    """Run a safetensors call; whatever it raises on a damaged file becomes a :class:`PriorFileError`."""
    try:
        return fn()
    except PtylError:
        raise
    except Exception as err:  # SafetensorError, OSError, and torch errors for dtypes it cannot build
        raise PriorFileError(f"{path}: could not read tensors (truncated or corrupt?): {err}") from err


def load_posterior(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    verify: bool | None = None,
    shards: nn.Module | ShardLayout | None = None,
) -> SourcePosterior | ShardedPosterior:
    """Read and validate a prior file (format version 1 or 2), single-file or sharded (its index).

    Raises :class:`PriorFileError` for unreadable/foreign files, a malformed header (naming the field), missing or
    extra tensors, shape or dtype disagreements, and (version 2) a failed checksum; :class:`InvalidValueError` for
    NaN/Inf or non-positive variance. ``verify=False`` skips the checksums (default: on unless the environment sets
    ``PTYL_VERIFY_CHECKSUMS=0``).

    ``shards``: a sharded model (FSDP2) or a :class:`~ptyl.sharding.ShardLayout`: read only the rows this rank
    holds, from any file (single or sharded, written by any number of ranks), and return a
    :class:`~ptyl.posterior.ShardedPosterior` of its parameters (those the model has).
    """
    return load_prior_file(path, map_location, dtype, verify=verify, shards=shards).posterior


def load_prior(
    path: str | Path,
    model: nn.Module,
    *,
    kind: str = PriorKind.LOWRANK,
    scale: float | None = None,
    eps: float | None = None,
    rank: int | None = None,
    strict: bool = True,
    map_location: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    verify: bool | None = None,
):
    """Load a prior file and build its prior over the parameters of ``model`` it covers: a thin convenience around
    :func:`load_posterior` and :func:`ptyl.priors.make_prior` (which builds it; no head prior, every parameter the
    file does not cover left out).

    Args:
        path: the prior file (single or sharded).
        model: the model; parameters are matched by name.
        kind: a learned kind (``lowrank``, ``diag``, ``block``, ...).
        scale, eps, rank: as in :func:`ptyl.priors.make_prior` (``None``: the kind's registry default).
        strict: parameters of the file absent from the model or of another shape raise
            :class:`ParameterMismatchError`; with ``strict=False`` they are skipped and listed in ``prior.skipped``
            (with a warning).
        map_location: where the tensors go (default: the model's device).
        dtype: storage dtype of the prior's tensors.
        verify: as in :func:`load_posterior`.

    Returns:
        The (backbone) prior ``N(mu, scale * Sigma_SWAG + eps I)`` over the covered parameters (see
        :func:`ptyl.priors.learned_prior`); for a sharded model (FSDP2) each rank reads only its rows and gets a
        :class:`~ptyl.priors.sharded.ShardedPrior` (a collective).
    """
    if map_location is None:
        map_location = next(model.parameters()).device
    sharded = any(is_dtensor(p) for p in model.parameters())
    if sharded:  # matched on the global shapes, then each rank reads its rows of what matched
        meta = read_metadata(path)
        shapes = {p["name"]: tuple(p["shape"]) for p in meta["parameters"]}
        kept = matching_names(shapes, model, strict, meta.get("architecture"))
        posterior = load_posterior(path, map_location=map_location, verify=verify,
                                   shards=ShardLayout.from_params(model).restrict(kept))
        if len(kept) < len(shapes):
            posterior.metadata["skipped"] = sorted(set(shapes) - set(kept))
    else:
        posterior = load_posterior(path, map_location=map_location, verify=verify).matched_to(model, strict=strict)
    covered = set(posterior.names)
    others = [n for n, p in model.named_parameters() if p.requires_grad and normalize_name(n) not in covered]
    prior = make_prior(model, kind, posterior=posterior, scale=scale, eps=eps, rank=rank, dtype=_dtype(dtype),
                       head=None, head_variance=None, unregularized=others)
    if not sharded:  # the backbone prior itself, as learned_prior builds it
        prior = prior.parts["backbone"]
    prior.skipped = tuple(posterior.metadata.get("skipped", ()))
    if prior.skipped:
        warnings.warn(f"prior {path}: skipped {len(prior.skipped)} parameter(s) not in the model: {prior.skipped[:5]}",
                      stacklevel=2)
    return prior
