"""Damaged prior files for the tests: the header edits found by fuzzing (issue 15) and byte-level header swaps."""

import json

from safetensors import safe_open
from safetensors.torch import save_file

DELETE = object()  # as a value in BAD_FIELDS: remove the field


def tensors_and_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["ptyl"])


def write_raw_header(path, out, raw: str):
    tensors, _ = tensors_and_meta(path)
    save_file(tensors, str(out), metadata={"ptyl": raw})
    return out


def write_edited(path, out, dotted, value):
    """``path`` rewritten to ``out`` with one metadata field set (or deleted)."""
    tensors, meta = tensors_and_meta(path)
    edit(meta, dotted, value)
    save_file(tensors, str(out), metadata={"ptyl": json.dumps(meta)})
    return out


def edit(meta, dotted, value):
    """Set (or with ``value is DELETE`` delete) ``meta[a][b]...`` for a dotted path with list indices."""
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    target = meta
    for p in parents:
        target = target[p]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value


# (field path, new value, the field name the error must mention)
BAD_FIELDS = [
    ("rank", "2", "rank"),
    ("rank", None, "rank"),
    ("rank", -1, "rank"),
    ("rank", True, "rank"),
    ("rank", 2.5, "rank"),
    ("rank", DELETE, "rank"),
    ("format_version", "1", "format_version"),
    ("format", ["ptyl-prior"], "format"),
    ("parameters", {"name": "x"}, "parameters"),
    ("parameters", [], "parameters"),
    ("parameters", None, "parameters"),
    ("parameters.0", "features.0.weight", "parameters[0]"),
    ("parameters.0.name", DELETE, "parameters[0].name"),
    ("parameters.0.name", 5, "parameters[0].name"),
    ("parameters.0.name", "", "parameters[0].name"),
    ("parameters.1.shape", None, "parameters[1].shape"),
    ("parameters.1.shape", "2", "parameters[1].shape"),
    ("parameters.1.shape", 2, "parameters[1].shape"),
    ("parameters.1.shape", [-2], "parameters[1].shape[0]"),
    ("parameters.1.shape", [True], "parameters[1].shape[0]"),
    ("parameters.1.shape", [2.0], "parameters[1].shape[0]"),
    ("parameters.1.shape", ["2"], "parameters[1].shape[0]"),
    ("parameters.1.shape", [2**70], "parameters[1].shape[0]"),
    ("parameters.1.shape", DELETE, "parameters[1].shape"),
    ("parameters.1.name", "features.0.weight", "parameters[1].name"),  # duplicate name
    ("dtype", "int32", "dtype"),
    ("dtype", 32, "dtype"),
    ("dtype", DELETE, "dtype"),
    ("num_snapshots", "ten", "num_snapshots"),
    ("num_snapshots", -3, "num_snapshots"),
    ("num_snapshots", 1, "num_snapshots"),  # fewer snapshots than the rank K=2
    ("model_kwargs", [4], "model_kwargs"),
    ("num_classes", "10", "num_classes"),
    ("num_classes", 0, "num_classes"),
    ("image_size", -28, "image_size"),
    ("architecture", {"name": "TinyNet"}, "architecture"),
    ("skipped", "features.0.weight", "skipped"),
    ("skipped", [1, 2], "skipped[0]"),
]
BAD_FIELD_IDS = [f"{f}={'<deleted>' if v is DELETE else repr(v)}"[:40] for f, v, _ in BAD_FIELDS]

# "ptyl" header entries that are valid JSON but not an object
RAW_HEADERS = {"list": "[1, 2]", "string": '"a string"', "number": "3", "null": "null", "bool": "true",
               "deeply-nested": "[" * 100_000 + "]" * 100_000}


def replace_in_header(path, out, old: bytes, new: bytes, count: int = 1):
    """``path`` copied to ``out`` with bytes of the safetensors header replaced (same length: offsets stay valid)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    assert old in header and len(old) == len(new)
    out.write_bytes(data[:8] + header.replace(old, new, count) + data[8 + n:])
    return out
