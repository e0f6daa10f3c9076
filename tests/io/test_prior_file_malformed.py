"""Malformed prior files: every class of damage found by fuzzing (issue 15) gets a PriorFileError naming the file and
the field, never a raw AttributeError / TypeError / ValueError / KeyError, and never a silent wrong load."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ptyl.errors import PriorFileError, PtylError
from ptyl.io import load_posterior, load_prior, read_metadata, save_posterior
from tests.helpers import TinyNet, random_posterior
from tests.io.malformed import (
    BAD_FIELD_IDS,
    BAD_FIELDS,
    RAW_HEADERS,
    replace_in_header,
    tensors_and_meta,
    write_edited,
    write_raw_header,
)


@pytest.fixture
def prior_path(tmp_path):
    return save_posterior(random_posterior(TinyNet(), rank=2, dtype=torch.float32), tmp_path / "p.safetensors")


@pytest.mark.parametrize("field,value,named", BAD_FIELDS, ids=BAD_FIELD_IDS)
def test_badly_formed_metadata_field_is_a_prior_file_error_naming_file_and_field(tmp_path, prior_path, field, value,
                                                                                  named):
    bad = write_edited(prior_path, tmp_path / "bad.safetensors", field, value)
    for reader in (read_metadata, load_posterior, lambda p: load_prior(p, TinyNet())):
        with pytest.raises(PriorFileError) as info:
            reader(bad)
        assert str(bad) in str(info.value)
        assert named in str(info.value), str(info.value)


@pytest.mark.parametrize("raw", RAW_HEADERS.values(), ids=RAW_HEADERS.keys())
def test_ptyl_entry_that_is_not_a_json_object(tmp_path, prior_path, raw):
    bad = write_raw_header(prior_path, tmp_path / "bad.safetensors", raw)
    with pytest.raises(PriorFileError, match="ptyl") as info:
        load_posterior(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("new", [b'"dtype":"I32"', b'"dtype":"U32"'])
def test_integer_dtype_in_the_safetensors_header_is_refused(tmp_path, prior_path, new):
    bad = replace_in_header(prior_path, tmp_path / "bad.safetensors", b'"dtype":"F32"', new)
    with pytest.raises(PriorFileError, match="dtype") as info:
        load_posterior(bad)
    assert str(bad) in str(info.value)


def test_half_precision_kind_swapped_in_the_header_is_refused(tmp_path):
    """bfloat16 <-> float16 keeps every byte offset valid: only the dtype recorded in the metadata can tell."""
    path = save_posterior(random_posterior(TinyNet(), rank=2, dtype=torch.float32), tmp_path / "p.safetensors",
                          dtype="bfloat16")
    bad = replace_in_header(path, tmp_path / "bad.safetensors", b'"dtype":"BF16"', b'"dtype":"F16" ', count=1)
    with pytest.raises(PriorFileError, match="dtype"):
        load_posterior(bad)


def test_metadata_dtype_disagreeing_with_the_tensors_is_refused(tmp_path, prior_path):
    tensors, meta = tensors_and_meta(prior_path)
    meta["dtype"] = "float64"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"ptyl": json.dumps(meta)})
    with pytest.raises(PriorFileError, match="float64"):
        load_posterior(bad)


def test_integer_tensors_with_consistent_metadata_are_refused(tmp_path, prior_path):
    tensors, meta = tensors_and_meta(prior_path)
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
    bad = write_raw_header(prior_path, tmp_path / "bad.safetensors", "[]")
    with pytest.raises(PtylError):
        load_posterior(bad)
    with pytest.raises(ValueError):
        load_posterior(bad)
