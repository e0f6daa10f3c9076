"""Reading sharded prior files (:mod:`ptyl.io.sharded_prior` describes the layout) and single-file priors by rows.

Any number of ranks can read a prior written by any number: each reads only the pieces overlapping its rows (with
checksums on, the whole of each such piece: a SHA-256 covers a piece, not a row range). Every failure is a
:class:`~ptyl.errors.PriorFileError` naming the file: a malformed index, a missing shard file, a piece the index
names but its file lacks, pieces that leave a gap or overlap, a wrong shape, dtype or checksum.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ptyl.errors import InvalidValueError, PriorFileError, PtylError
from ptyl.io.header import existing_file
from ptyl.io.integrity import TENSOR_RECORD, check_tensor, checksums_enabled
from ptyl.io.prior_format import FLOAT_DTYPES, PRIOR_METADATA, read_single_metadata
from ptyl.io.schema import Integer, ListOf, MapOf, Object, String, validate_header
from ptyl.io.sharded_prior import KINDS, index_path
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.sharded import ShardedPosterior
from ptyl.sharding import RowShard, ShardLayout

__all__ = ["layout_for", "load_sharded_posterior", "read_index"]

_PIECE = re.compile(r"(?P<kind>mean|variance|deviations)::(?P<name>.+?)(\[(?P<start>\d+):(?P<stop>\d+)\])?")


def _rows_pair(record: dict) -> tuple[str, str] | None:
    rows = record.get("rows")
    if rows is not None and (len(rows) != 2 or rows[0] > rows[1]):
        return "rows", f"must be [start, stop] with start <= stop, got {rows}"
    return None


_PIECE_RECORD = TENSOR_RECORD.extended(optional={"rows": ListOf(Integer(minimum=0))}, checks=(_rows_pair,))


@dataclass
class _Piece:
    key: str
    file: Path
    start: int
    stop: int
    record: dict | None


_INDEX = Object(required={"metadata": Object(required={"total_size": Integer(minimum=0), "ptyl": Object()}),
                          "weight_map": MapOf(String(nonempty=True))})


def read_index(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The validated prior header and weight map of a sharded prior's index.

    Args:
        path: the ``.index.json`` file.

    Returns:
        ``(header, weight_map)``: the ``ptyl`` header (checked against the prior schema) and piece key -> file name.

    Raises:
        PriorFileError: naming the index, for anything malformed or a shard file that is missing.
    """
    path = existing_file(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise PriorFileError(f"{path}: not a readable JSON index of a sharded prior: {err}") from None
    validate_header(body, _INDEX, path, entry="index")
    meta = validate_header(body["metadata"]["ptyl"], PRIOR_METADATA, path)
    weight_map = body["weight_map"]
    for key, record in meta["tensors"].items():
        try:
            _PIECE_RECORD.check(record, f"tensors.{key}")
        except Exception as err:
            raise PriorFileError(f"{path}: metadata field {err}") from None
    for key in sorted(set(weight_map) ^ set(meta["tensors"])):
        where = "the weight map" if key in weight_map else "the tensor records"
        raise PriorFileError(f"{path}: piece {key!r} appears only in {where}")
    for file in sorted(set(weight_map.values())):
        if Path(file).name != file:
            raise PriorFileError(f"{path}: weight map names {file!r}: shard files must sit next to the index")
        if not (path.parent / file).is_file():
            raise PriorFileError(f"{path}: shard file {path.parent / file} is missing")
    return meta, weight_map


def _plan_index(path: Path, meta: dict, weight_map: dict) -> dict[tuple[str, str], list[_Piece]]:
    """(kind, name) -> its pieces in row order, checked to cover every row exactly once."""
    shapes = {p["name"]: tuple(p["shape"]) for p in meta["parameters"]}
    plan: dict[tuple[str, str], list[_Piece]] = {}
    for key, file in weight_map.items():
        match = _PIECE.fullmatch(key)
        if match is None or match["name"] not in shapes:
            raise PriorFileError(f"{path}: piece {key!r} names no parameter of the metadata")
        kind, name = match["kind"], match["name"]
        rows = shapes[name][0] if shapes[name] else 1
        start, stop = (int(match["start"]), int(match["stop"])) if match["start"] is not None else (0, rows)
        record = meta["tensors"][key]
        if record.get("rows", [start, stop]) != [start, stop]:
            raise PriorFileError(f"{path}: piece {key!r} records rows {record['rows']}")
        plan.setdefault((kind, name), []).append(_Piece(key, path.parent / file, start, stop, record))
    for name, shape in shapes.items():
        for kind in KINDS:
            if kind == "deviations" and meta["rank"] == 0:
                continue
            _check_cover(path, f"{kind}::{name}", plan.setdefault((kind, name), []), shape[0] if shape else 1)
    return plan


def _check_cover(path: Path, what: str, pieces: list[_Piece], rows: int) -> None:
    pieces.sort(key=lambda p: p.start)
    at = 0
    for piece in pieces:
        if piece.start != at:
            raise PriorFileError(f"{path}: the pieces of {what!r} {'overlap' if piece.start < at else 'leave a gap'} "
                                 f"at row {at}")
        at = piece.stop
    if at != rows:
        raise PriorFileError(f"{path}: the pieces of {what!r} cover rows 0:{at} of {rows}")


def _plan_single(path: Path, meta: dict) -> dict[tuple[str, str], list[_Piece]]:
    """A single-file prior as pieces: every tensor whole, in ``path``."""
    records = meta.get("tensors")
    plan = {}
    for entry in meta["parameters"]:
        name, shape = entry["name"], tuple(entry["shape"])
        for kind in KINDS:
            if kind == "deviations" and meta["rank"] == 0:
                continue
            key = f"{kind}::{name}"
            if records is not None and key not in records:
                raise PriorFileError(f"{path}: metadata field 'tensors' has no record for {key!r}")
            plan[(kind, name)] = [_Piece(key, path, 0, shape[0] if shape else 1,
                                         records[key] if records is not None else {"dtype": meta["dtype"]})]
    return plan


class _Reader:
    """Reads row ranges of a prior's tensors from its pieces, one open handle per file."""

    def __init__(self, plan, meta: dict, verify: bool):
        self.plan, self.meta, self.verify = plan, meta, verify
        self.handles: dict[Path, Any] = {}
        self.keys: dict[Path, set[str]] = {}

    def _open(self, file: Path):
        if file not in self.handles:
            self.handles[file] = _call(lambda: safe_open(str(file), framework="pt", device="cpu"), file)
            self.keys[file] = set(_call(self.handles[file].keys, file))
        return self.handles[file]

    def rows(self, kind: str, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of one tensor (dim 1 for the deviations), from every piece overlapping them."""
        dim = 1 if kind == "deviations" else 0
        parts = []
        for piece in self.plan[(kind, name)]:
            a, b = max(start, piece.start), min(stop, piece.stop)
            if a >= b:
                continue
            handle = self._open(piece.file)
            if piece.key not in self.keys[piece.file]:
                raise PriorFileError(f"{piece.file}: tensor {piece.key!r} named by the index is missing")
            lead = (self.meta["rank"],) if dim else ()
            want = (*lead, piece.stop - piece.start, *shape[1:]) if shape else ()
            whole = a == piece.start and b == piece.stop
            if self.verify or whole or not shape:  # a checksum needs the whole piece
                t = _call(functools.partial(handle.get_tensor, piece.key), piece.file)
                if tuple(t.shape) != want:
                    raise PriorFileError(f"{piece.file}: {piece.key!r} has shape {tuple(t.shape)}, the index says "
                                         f"{want}")
                check_tensor(piece.file, piece.key, t, piece.record, dtypes=FLOAT_DTYPES, verify=self.verify)
                t = t.narrow(dim, a - piece.start, b - a) if shape and not whole else t
            else:
                sl = _call(functools.partial(handle.get_slice, piece.key), piece.file)
                if tuple(sl.get_shape()) != want:
                    raise PriorFileError(f"{piece.file}: {piece.key!r} has shape {tuple(sl.get_shape())}, the index "
                                         f"says {want}")
                span = slice(a - piece.start, b - piece.start)
                t = _call(functools.partial(sl.__getitem__, (slice(None), span) if dim else span), piece.file)
                check_tensor(piece.file, piece.key, t, {"dtype": piece.record.get("dtype")} if piece.record else None,
                             dtypes=FLOAT_DTYPES, verify=False)
            parts.append(t)
        if not shape:
            return parts[0]
        if not parts:
            lead = (self.meta["rank"],) if dim else ()
            return torch.empty((*lead, 0, *shape[1:]), dtype=FLOAT_DTYPES[self.meta["dtype"]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _call(fn, path: Path):
    try:
        return fn()
    except PtylError:
        raise
    except Exception as err:
        raise PriorFileError(f"{path}: could not read tensors (truncated or corrupt?): {err}") from err


def load_sharded_posterior(
    path: str | Path,
    layout: ShardLayout | None = None,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    verify: bool | None = None,
) -> tuple[SourcePosterior | ShardedPosterior, dict[str, Any], bool, list[Path]]:
    """Read the rows ``layout`` holds (all rows without one) of a sharded prior (its index) or a single-file prior.

    Args:
        path: ``prior.safetensors.index.json`` (or ``prior.safetensors`` when only the index exists), or a
            single-file prior.
        layout: which rows to read (e.g. ``ShardLayout.from_params(model)`` of a sharded model); None: everything.
        map_location, dtype: where and in which dtype the tensors go.
        verify: check each piece's SHA-256 (reads whole pieces; default on unless ``PTYL_VERIFY_CHECKSUMS=0``).

    Returns:
        ``(posterior, header, checksums verified, files read)``: a :class:`ShardedPosterior` with ``layout``, else a
        :class:`SourcePosterior`.
    """
    index = index_path(path)
    if index is not None:
        meta, weight_map = read_index(index)
        plan = _plan_index(index, meta, weight_map)
        files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
        where = index
    else:
        where = existing_file(path)
        meta = read_single_metadata(where)
        plan = _plan_single(where, meta)
        files = [where]
    verify = "tensors" in meta and checksums_enabled(verify)
    shapes = {p["name"]: tuple(p["shape"]) for p in meta["parameters"]}
    if layout is not None:
        layout = layout.restrict([n for n in layout.names if n in shapes])
    rows = layout.shards if layout is not None else {n: RowShard(s, 0, s[0] if s else 1) for n, s in shapes.items()}
    reader = _Reader(plan, meta, verify)
    stores: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
    for name, shard in rows.items():
        if shard.shape != shapes[name]:
            raise PriorFileError(f"{where}: {name!r} has shape {shapes[name]} in the prior, {shard.shape} in the model")
        for kind in KINDS:
            if kind == "deviations" and meta["rank"] == 0:
                t = stores["mean"][name].new_zeros((0, *shard.local_shape))
            else:
                t = reader.rows(kind, name, shard.shape, shard.start, shard.stop).to(map_location, dtype=dtype)
            stores[kind][name] = t.reshape(t.shape[0], *shard.local_shape) if kind == "deviations" else \
                t.reshape(shard.local_shape)
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "parameters", "tensors",
                                                          "num_shards")}
    try:
        posterior = SourcePosterior(stores["mean"], stores["variance"], stores["deviations"], extra)
    except PtylError as err:
        raise type(err)(f"{where}: {err}") from err
    if layout is not None:
        posterior = ShardedPosterior(posterior, layout)
    return posterior, meta, verify, files


def layout_for(shards: Any) -> ShardLayout:
    """The rows to read for ``shards``: a sharded model, a name -> DTensor mapping, or a layout.

    Returns:
        A :class:`ShardLayout`.
    """
    if isinstance(shards, ShardLayout):
        return shards
    if isinstance(shards, (torch.nn.Module, Mapping)):
        return ShardLayout.from_params(shards)
    raise InvalidValueError(f"shards must be a sharded model or a ShardLayout, got {type(shards).__name__}")
