"""Reading and writing prior files (safetensors + JSON metadata) and importing the reference layout."""

from ptyl.io.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from ptyl.io.prior_file import (
    FORMAT_VERSION,
    load_posterior,
    load_prior,
    read_metadata,
    save_posterior,
)
from ptyl.io.reference import import_reference

__all__ = [
    "FORMAT_VERSION",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "import_reference",
    "load_posterior",
    "load_prior",
    "read_metadata",
    "save_posterior",
]
