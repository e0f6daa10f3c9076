"""Every file format ptyl reads or writes, one layout each: prior files (safetensors + JSON metadata), weights,
posterior sample files, training checkpoints, shared prior directories with a model card (local or on the Hugging
Face Hub), and the reference implementation's importer.

Shared by every ptyl file format: :func:`read_json_header` (the JSON header, optionally schema-checked with
:mod:`ptyl.io.schema`), :mod:`ptyl.io.integrity` (per-tensor dtype/shape/SHA-256 records) and :mod:`ptyl.io.atomic`
(atomic single- and multi-file writes).
"""

from ptyl.io.atomic import atomic_files, atomic_write, atomic_write_bytes, atomic_write_text, remove_stale_temp_files
from ptyl.io.checkpoint import load_checkpoint, save_checkpoint
from ptyl.io.header import read_json_header
from ptyl.io.pretrained import (
    PretrainedPrior,
    PriorCard,
    from_pretrained,
    prior_file_path,
    push_to_hub,
    save_pretrained,
)
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
from ptyl.io.samples import load_samples, read_samples_metadata, save_samples
from ptyl.io.weights import load_state_checked, read_weights, read_weights_metadata, save_weights

__all__ = [
    "FORMAT_VERSION",
    "PretrainedPrior",
    "PriorCard",
    "PriorFile",
    "atomic_files",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "from_pretrained",
    "import_reference",
    "load_checkpoint",
    "load_posterior",
    "load_prior",
    "load_prior_file",
    "load_samples",
    "load_state_checked",
    "prior_file_path",
    "push_to_hub",
    "read_json_header",
    "read_metadata",
    "read_samples_metadata",
    "read_weights",
    "read_weights_metadata",
    "remove_stale_temp_files",
    "save_checkpoint",
    "save_posterior",
    "save_pretrained",
    "save_samples",
    "save_weights",
]
