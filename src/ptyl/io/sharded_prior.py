"""Sharded prior files: the Hugging Face layout of large safetensors checkpoints, written in parallel by the ranks.

A posterior split over W ranks (FSDP2, :class:`~ptyl.posterior.ShardedPosterior`) is written as W shard files plus
a JSON index naming which tensor lives where::

    prior.safetensors.index.json          {"metadata": {"total_size": bytes, "ptyl": <prior header>},
                                           "weight_map": {"mean::fc.weight[0:256]": "prior-00001-of-00002.safetensors",
                                                          ...}}
    prior-00001-of-00002.safetensors      rank 0's rows of every tensor
    prior-00002-of-00002.safetensors      rank 1's rows

Rank r's file holds, for every parameter, its rows ``[a, b)`` of the mean, the variance and the deviation columns
under the keys ``mean::<name>[a:b]``, ``variance::<name>[a:b]``, ``deviations::<name>[a:b]`` (rows of dim 1 for the
deviations ``(K, *shape)``; a tensor held whole keeps the single-file key ``mean::<name>``). The ``ptyl`` header is a
version-2 prior header (:data:`ptyl.io.prior_file.PRIOR_METADATA`: global shapes, rank, dtype, free-form metadata)
whose ``tensors`` records every piece's dtype, shape, SHA-256 and ``rows``; each shard file carries its own pieces'
records under ``ptyl_shard`` too, so opening a shard file by itself says what it is.

Writing is all-or-nothing across ranks: each rank writes its file under a temporary name, the ranks agree that every
write succeeded, and rank 0 renames the shard files and then the index into place (a shared file system is
assumed). Reading checks the index against the schema, that the pieces cover every row of every tensor exactly once,
each piece's dtype and shape and (by default) its checksum. Any number of ranks can read any file: each reads only
the pieces overlapping its rows (:func:`load_sharded_posterior`), so a prior written by 2 ranks loads on 1, 2 or 3.
A single-file prior loads the same way (its tensors are pieces holding every row).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ptyl.errors import ConfigError, InvalidValueError, PriorFileError, PtylError
from ptyl.io.atomic import atomic_files, write_temp
from ptyl.io.integrity import tensor_records
from ptyl.io.prior_format import FLOAT_DTYPES, FORMAT, FORMAT_VERSION, PRIOR_METADATA
from ptyl.io.schema import validate_header
from ptyl.posterior.sharded import ShardedPosterior
from ptyl.sharding import RowShard, ShardLayout

__all__ = ["INDEX_SUFFIX", "KINDS", "index_path", "save_sharded_posterior", "shard_file_name"]

INDEX_SUFFIX = ".index.json"
SHARD_HEADER = "ptyl_shard"
KINDS = ("mean", "variance", "deviations")


def index_path(path: str | Path) -> Path | None:
    """The index of a sharded prior named by ``path``.

    Returns:
        ``path`` if it is an index, ``<path>.index.json`` when only that exists, else None.
    """
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return path
    candidate = path.with_name(path.name + INDEX_SUFFIX)
    return candidate if not path.exists() and candidate.exists() else None


def shard_file_name(base: str | Path, shard: int, num_shards: int) -> str:
    """The shard file name of the Hugging Face layout: ``prior.safetensors`` -> ``prior-00001-of-00002.safetensors``.

    Args:
        base: the prior (or index) name.
        shard: this shard, counted from 0.
        num_shards: the number of shards.

    Returns:
        The file name (no folder).
    """
    name = Path(base).name.removesuffix(INDEX_SUFFIX).removesuffix(".safetensors")
    return f"{name}-{shard + 1:05d}-of-{num_shards:05d}.safetensors"


def _piece_key(kind: str, name: str, shard: RowShard) -> str:
    return f"{kind}::{name}" if shard.whole else f"{kind}::{name}[{shard.start}:{shard.stop}]"


# --- writing -------------------------------------------------------------------------------------------------------
def save_sharded_posterior(
    posterior: ShardedPosterior,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a sharded posterior: every rank its rows, rank 0 the index; all-or-nothing. A collective.

    Args:
        posterior: this rank's :class:`~ptyl.posterior.ShardedPosterior`.
        path: ``prior.safetensors`` (or the index name ``prior.safetensors.index.json``); the files go next to it.
        dtype: storage dtype (default: the posterior's).
        metadata: extra JSON-able entries for the header.

    Returns:
        The index path, on every rank.
    """
    layout = posterior.layout
    if layout.sharded and dist.get_world_size() != layout.world_size:
        raise ConfigError("writing the prior of a model replicated over several shard groups (HSDP) is not supported "
                          "yet: gather the posterior of one replica (ShardedPosterior.gather) and save that")
    base = Path(path)
    index = base if base.name.endswith(INDEX_SUFFIX) else base.with_name(base.name + INDEX_SUFFIX)
    target = index.with_name(shard_file_name(index, layout.rank, layout.world_size))
    tensors, rows = {}, {}
    local = posterior.local
    for kind, store in (("mean", local.mean), ("variance", local.variance), ("deviations", local.deviations)):
        for name, t in store.items():
            shard = layout.shards[name]
            if shard.local_numel == 0 or (kind == "deviations" and posterior.rank == 0):
                continue
            key = _piece_key(kind, name, shard)
            tensors[key] = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous().clone()
            rows[key] = [shard.start, shard.stop]
    if dtype in (torch.float16, torch.bfloat16) and any((t <= 0).any() for k, t in tensors.items()
                                                        if k.startswith("variance::")):
        raise InvalidValueError(f"cannot write {index}: a variance underflows in {dtype}; save in float32 instead")
    records = {key: {**record, "rows": rows[key]} for key, record in tensor_records(tensors).items()}
    shard_meta = {"format": "ptyl-prior-shard", "index": index.name, "shard": layout.rank + 1,
                  "num_shards": layout.world_size, "tensors": records}
    tmp, error = None, ""
    try:
        tmp = write_temp(target, lambda p: save_file(tensors, p, metadata={SHARD_HEADER: json.dumps(shard_meta)}))
    except Exception as err:  # every rank must reach the agreement below, or the others would wait forever
        error = f"rank {layout.rank}: {type(err).__name__}: {err}"
    written = _all_gather_json(layout, {"file": target.name, "tmp": str(tmp) if tmp else None, "error": error,
                                        "records": records, "size": sum(t.nbytes for t in tensors.values())})
    failures = [w["error"] for w in written if w["error"]]
    if failures:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise PriorFileError(f"cannot write {index}: " + "; ".join(failures))
    problem = ""
    if layout.rank == 0:
        dtypes = sorted({r["dtype"] for w in written for r in w["records"].values()})
        meta = {**posterior.metadata, **(metadata or {}), "format": FORMAT, "format_version": FORMAT_VERSION,
                "rank": posterior.rank, "parameters": [{"name": n, "shape": list(s)} for n, s in layout.shapes.items()],
                "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
                "tensors": {k: r for w in written for k, r in w["records"].items()},
                "num_shards": layout.world_size}
        meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        body = {"metadata": {"total_size": sum(w["size"] for w in written), "ptyl": meta},
                "weight_map": {k: w["file"] for w in written for k in w["records"]}}
        try:
            if not set(dtypes) <= set(FLOAT_DTYPES) or len(dtypes) != 1:
                raise InvalidValueError(f"a prior holds tensors of one dtype among {', '.join(FLOAT_DTYPES)}; got "
                                        f"{', '.join(dtypes)} (pass dtype=...)")
            validate_header(meta, PRIOR_METADATA, f"cannot write {index}", error=InvalidValueError)
            text = json.dumps(body, indent=2, allow_nan=False)
            with atomic_files() as group:
                for w in written:
                    group.adopt(index.with_name(w["file"]), w["tmp"])
                group.write_text(index, text)  # renamed last: a reader never sees an index without its shards
        except (PtylError, OSError, TypeError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
            for w in written:
                Path(w["tmp"]).unlink(missing_ok=True)
    outcome = _all_gather_json(layout, {"error": problem})[0]["error"]
    if outcome:
        raise PriorFileError(f"cannot write {index}: {outcome}")
    return index


def _all_gather_json(layout: ShardLayout, obj: Any) -> list[Any]:
    """``obj`` of every rank of the layout's group, in rank order (JSON through byte tensors: no pickle)."""
    return [json.loads(raw) for raw in layout.all_gather_bytes(json.dumps(obj).encode())]
