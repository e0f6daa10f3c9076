"""Malformed prior files: every class of damage found by fuzzing (issue 15) gets a PriorFileError naming the file and
the field, never a raw AttributeError / TypeError / ValueError / KeyError, and never a silent wrong load."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ptyl.errors import PriorFileError, PtylError
from ptyl.io import load_posterior, load_prior, read_metadata, save_posterior
from tests.helpers import TinyNet, random_posterior


@pytest.fixture
def prior_path(tmp_path):
    return save_posterior(random_posterior(TinyNet(), rank=2, dtype=torch.float32), tmp_path / "p.safetensors")


def _tensors_and_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["ptyl"])


def _write_raw_header(path, out, raw: str):
    tensors, _ = _tensors_and_meta(path)
    save_file(tensors, str(out), metadata={"ptyl": raw})
    return out


def _edit(meta, dotted, value):
    """Set (or with ``value is _DEL`` delete) ``meta[a][b]...`` for a dotted path with list indices."""
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    target = meta
    for p in parents:
        target = target[p]
    if value is _DEL:
        del target[last]
    else:
        target[last] = value


_DEL = object()

# (field path, new value, the field name the error must mention)
BAD_FIELDS = [
    ("rank", "2", "rank"),
    ("rank", None, "rank"),
    ("rank", -1, "rank"),
    ("rank", True, "rank"),
    ("rank", 2.5, "rank"),
    ("rank", _DEL, "rank"),
    ("format_version", "1", "format_version"),
    ("format", ["ptyl-prior"], "format"),
    ("parameters", {"name": "x"}, "parameters"),
    ("parameters", [], "parameters"),
    ("parameters", None, "parameters"),
    ("parameters.0", "features.0.weight", "parameters[0]"),
    ("parameters.0.name", _DEL, "parameters[0].name"),
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
    ("parameters.1.shape", _DEL, "parameters[1].shape"),
    ("parameters.1.name", "features.0.weight", "parameters[1].name"),  # duplicate name
    ("dtype", "int32", "dtype"),
    ("dtype", 32, "dtype"),
    ("dtype", _DEL, "dtype"),
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


@pytest.mark.parametrize("field,value,named", BAD_FIELDS, ids=[f"{f}={'<deleted>' if v is _DEL else repr(v)}"[:40] for f, v, _ in BAD_FIELDS])
def test_badly_formed_metadata_field_is_a_prior_file_error_naming_file_and_field(tmp_path, prior_path, field, value,
                                                                                  named):
    tensors, meta = _tensors_and_meta(prior_path)
    _edit(meta, field, value)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"ptyl": json.dumps(meta)})
    for reader in (read_metadata, load_posterior, lambda p: load_prior(p, TinyNet())):
        with pytest.raises(PriorFileError) as info:
            reader(bad)
        assert str(bad) in str(info.value)
        assert named in str(info.value), str(info.value)


@pytest.mark.parametrize("raw", ["[1, 2]", '"a string"', "3", "null", "true", "[" * 100_000 + "]" * 100_000],
                         ids=["list", "string", "number", "null", "bool", "deeply-nested"])
def test_ptyl_entry_that_is_not_a_json_object(tmp_path, prior_path, raw):
    bad = _write_raw_header(prior_path, tmp_path / "bad.safetensors", raw)
    with pytest.raises(PriorFileError, match="ptyl") as info:
        load_posterior(bad)
    assert str(bad) in str(info.value)


def _replace_in_header(path, out, old: bytes, new: bytes, count: int = 1):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    assert old in header and len(old) == len(new)
    out.write_bytes(data[:8] + header.replace(old, new, count) + data[8 + n:])
    return out


@pytest.mark.parametrize("new", [b'"dtype":"I32"', b'"dtype":"U32"'])
def test_integer_dtype_in_the_safetensors_header_is_refused(tmp_path, prior_path, new):
    bad = _replace_in_header(prior_path, tmp_path / "bad.safetensors", b'"dtype":"F32"', new)
    with pytest.raises(PriorFileError, match="dtype") as info:
        load_posterior(bad)
    assert str(bad) in str(info.value)


def test_half_precision_kind_swapped_in_the_header_is_refused(tmp_path):
    """bfloat16 <-> float16 keeps every byte offset valid: only the dtype recorded in the metadata can tell."""
    path = save_posterior(random_posterior(TinyNet(), rank=2, dtype=torch.float32), tmp_path / "p.safetensors",
                          dtype="bfloat16")
    bad = _replace_in_header(path, tmp_path / "bad.safetensors", b'"dtype":"BF16"', b'"dtype":"F16" ', count=1)
    with pytest.raises(PriorFileError, match="dtype"):
        load_posterior(bad)


def test_metadata_dtype_disagreeing_with_the_tensors_is_refused(tmp_path, prior_path):
    tensors, meta = _tensors_and_meta(prior_path)
    meta["dtype"] = "float64"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"ptyl": json.dumps(meta)})
    with pytest.raises(PriorFileError, match="float64"):
        load_posterior(bad)


def test_integer_tensors_with_consistent_metadata_are_refused(tmp_path, prior_path):
    tensors, meta = _tensors_and_meta(prior_path)
    tensors = {k: t.view(torch.int32) for k, t in tensors.items()}
    meta["dtype"] = "int32"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"ptyl": json.dumps(meta)})
    with pytest.raises(PriorFileError, match="dtype"):
        load_posterior(bad)


def _data_start(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_flipped_data_byte_that_stays_finite_and_positive_is_detected(tmp_path, prior_path):
    data = bytearray(prior_path.read_bytes())
    before = load_posterior(prior_path)
    # flip the lowest mantissa bit of the last float: still finite, still positive for any variance
    data[-4] ^= 0x01
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PriorFileError, match="checksum") as info:
        load_posterior(bad)
    assert str(bad) in str(info.value)
    # the opt-out loads it (and the value really differs: the damage was real)
    damaged = load_posterior(bad, verify=False)
    assert any(not torch.equal(getattr(damaged, k)[n], getattr(before, k)[n])
               for k in ("mean", "variance", "deviations") for n in before.names)


def test_every_error_is_a_ptyl_error(tmp_path, prior_path):
    """The base class callers catch; PriorFileError also stays a ValueError for old callers."""
    bad = _write_raw_header(prior_path, tmp_path / "bad.safetensors", "[]")
    with pytest.raises(PtylError):
        load_posterior(bad)
    with pytest.raises(ValueError):
        load_posterior(bad)
