"""Reading and writing prior files (safetensors + JSON metadata) and importing the reference layout.

Shared by every ptyl file format: :func:`read_json_header` (the JSON header, optionally schema-checked with
:mod:`ptyl.io.schema`), :mod:`ptyl.io.integrity` (per-tensor dtype/shape/SHA-256 records) and :mod:`ptyl.io.atomic`
(atomic single- and multi-file writes).
"""

from ptyl.io.atomic import atomic_files, atomic_write, atomic_write_bytes, atomic_write_text, remove_stale_temp_files
from ptyl.io.header import read_json_header
from ptyl.io.prior_file import (
    FORMAT_VERSION,
    PriorFile,
    load_posterior,
    load_prior,
    load_prior_file,
    read_metadata,
    save_posterior,
)
from ptyl.io.reference import import_reference

__all__ = [
    "FORMAT_VERSION",
    "PriorFile",
    "atomic_files",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "import_reference",
    "load_posterior",
    "load_prior",
    "load_prior_file",
    "read_json_header",
    "read_metadata",
    "remove_stale_temp_files",
    "save_posterior",
]
