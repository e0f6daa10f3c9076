"""The prior-file format itself, below the readers and writers of :mod:`ptyl.io.prior_file`,
:mod:`ptyl.io.sharded_prior` and :mod:`ptyl.io.sharded_read` (which all use it): the format name and versions, the
storage dtypes, the header schemas and the reader of one file's header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ptyl.errors import PriorFileError
from ptyl.io.header import read_json_header
from ptyl.io.integrity import TENSOR_RECORD
from ptyl.io.schema import Integer, ListOf, MapOf, Nullable, Number, Object, String, validate_header

__all__ = ["FLOAT_DTYPES", "FORMAT", "FORMAT_VERSION", "PRIOR_METADATA", "PRIOR_METADATA_V1", "READABLE_VERSIONS",
           "read_single_metadata"]


FORMAT = "ptyl-prior"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def _rank_within_snapshots(meta: dict) -> tuple[str, str] | None:
    if "num_snapshots" in meta and meta["num_snapshots"] < meta["rank"]:
        return "num_snapshots", f"= {meta['num_snapshots']} is below the rank {meta['rank']} (K <= snapshots)"
    return None


_PARAMETER = Object(required={"name": String(nonempty=True), "shape": ListOf(Integer(minimum=0))})
PRIOR_METADATA_V1 = Object(
    required={
        "format": String(choices=(FORMAT,)),
        "format_version": Integer(choices=READABLE_VERSIONS),
        "rank": Integer(minimum=0),
        "parameters": ListOf(_PARAMETER, min_length=1, unique_key="name"),
        "dtype": String(choices=tuple(FLOAT_DTYPES)),
    },
    optional={  # written by ptyl itself; read back by the CLI and experiments
        **dict.fromkeys(("model", "architecture", "source", "objective", "task", "init", "created",
                         "pretrained_weights"), String()),
        "model_kwargs": Object(),
        "num_classes": Integer(minimum=1),
        "image_size": Nullable(Integer(minimum=1)),
        **dict.fromkeys(("num_snapshots", "num_source_examples", "swag_epochs", "swag_rank"), Integer(minimum=0)),
        "pretrain_epochs": Nullable(Integer(minimum=0)),
        "seed": Integer(),
        "swag_lr": Number(minimum=0, exclusive=True),
        "skipped": ListOf(String()),
    },
    checks=(_rank_within_snapshots,),
)


def _records_match_dtype(meta: dict) -> tuple[str, str] | None:
    for key, record in meta["tensors"].items():
        if record["dtype"] != meta["dtype"]:
            return f"tensors.{key}.dtype", f"is {record['dtype']!r} but the file's 'dtype' is {meta['dtype']!r}"
    return None


PRIOR_METADATA = PRIOR_METADATA_V1.extended(required={"tensors": MapOf(TENSOR_RECORD)}, checks=(_records_match_dtype,))
"""The schema of a version-2 prior file's ``ptyl`` header (:mod:`ptyl.io.schema`)."""


def read_single_metadata(path: str | Path) -> dict[str, Any]:
    """The validated JSON metadata of one single-file prior (version 1 or 2; tensors are not read).

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The header, checked field by field against its version's schema.

    Raises:
        PriorFileError: naming the file and the field, for any malformed header.
    """
    meta = read_json_header(path, "ptyl")
    # format and version first: a foreign or newer file gets that message, not a complaint about some other field
    if meta.get("format") != FORMAT:
        raise PriorFileError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise PriorFileError(f"{path}: prior file format version {version!r} is not supported (metadata field "
                             f"'format_version'; this ptyl reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return validate_header(meta, PRIOR_METADATA_V1 if version == 1 else PRIOR_METADATA, path)
