"""Reading and writing prior files (safetensors + JSON metadata) and importing the reference layout."""

from ptyl.io.prior_file import (
    FORMAT_VERSION,
    atomic_write,
    load_posterior,
    load_prior,
    read_metadata,
    save_posterior,
)
from ptyl.io.reference import import_reference

__all__ = [
    "FORMAT_VERSION",
    "atomic_write",
    "import_reference",
    "load_posterior",
    "load_prior",
    "read_metadata",
    "save_posterior",
]
