"""Weights and sample files: one layout each, shared by every writer; damaged or foreign files are named."""

import pytest
import torch
from torch import nn

from ptyl.errors import ParameterMismatchError, PriorFileError
from ptyl.inference import SampleBank
from ptyl.io import (
    load_samples,
    load_state_checked,
    read_samples_metadata,
    read_weights,
    read_weights_metadata,
    save_samples,
    save_weights,
)


def states(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((2, 3), float(i)), "b": torch.arange(3) + i} for i in range(n)]


def test_samples_round_trip_with_metadata(tmp_path):
    path = save_samples(states(3), tmp_path / "s.safetensors", {"model": "mlp"})
    meta = read_samples_metadata(path)
    assert meta["num_samples"] == 3 and meta["model"] == "mlp" and meta["format"] == "ptyl-samples"
    for got, want in zip(load_samples(path), states(3), strict=False):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_disk_bank_writes_the_same_layout(tmp_path):
    bank = SampleBank(directory=tmp_path / "bank")
    for state in states(2):
        bank.add(state)
    files = sorted((tmp_path / "bank").iterdir())
    assert len(files) == 2
    assert [read_samples_metadata(f)["num_samples"] for f in files] == [1, 1]
    assert torch.equal(load_samples(files[1])[0]["w"], states(2)[1]["w"])
    # and one file holding the whole bank reads back the same samples
    whole = load_samples(save_samples(bank, tmp_path / "all.safetensors"))
    assert [s["b"].tolist() for s in whole] == [s["b"].tolist() for s in states(2)]


def test_foreign_and_damaged_files_are_named(tmp_path):
    weights = save_weights(nn.Linear(2, 2), tmp_path / "w.safetensors", {"model": "linear"})
    with pytest.raises(PriorFileError, match="w.safetensors.*ptyl-weights"):
        load_samples(weights)  # a weights file is not a sample file
    samples = save_samples(states(1), tmp_path / "s.safetensors")
    with pytest.raises(PriorFileError, match="s.safetensors"):
        read_weights_metadata(samples)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(samples.read_bytes()[:-16])
    with pytest.raises(PriorFileError, match="damaged.safetensors"):
        load_samples(damaged)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_samples(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    path = save_weights(nn.Linear(2, 3), tmp_path / "w.safetensors", {})
    state, meta = read_weights(path)
    assert meta["format"] == "ptyl-weights" and set(state) == {"weight", "bias"}
    with pytest.raises(ParameterMismatchError, match=r"w.safetensors: weights cannot be loaded into Linear: 2 tensor"
                                                     r"\(s\) of another shape: weight \(expected \(4, 2\), "
                                                     r"found \(3, 2\)\), bias"):
        load_state_checked(nn.Linear(2, 4), state, path)
    model = nn.Linear(2, 3)
    before = model.weight.detach().clone()
    with pytest.raises(ParameterMismatchError, match=r"missing 1: bias; 1 the model does not have: extra"):
        load_state_checked(model, {"weight": state["weight"], "extra": state["bias"]}, path)
    assert torch.equal(model.weight, before)  # left unchanged
    assert torch.equal(load_state_checked(model, state, path).weight, state["weight"])


def _flip_last_data_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the last byte belongs to the last tensor's data, never to the JSON header
    path.write_bytes(bytes(raw))


def test_weights_and_samples_carry_checksums_that_catch_flipped_data(tmp_path, monkeypatch):
    weights = save_weights({"w": torch.linspace(1, 2, 16)}, tmp_path / "w.safetensors", {"model": "x"})
    samples = save_samples(states(2), tmp_path / "s.safetensors")
    assert "tensors" not in read_weights_metadata(weights)  # records are format data, not user metadata
    for path in (weights, samples):
        _flip_last_data_byte(path)
    with pytest.raises(PriorFileError, match="w.safetensors.*'w' fails its SHA-256 checksum"):
        read_weights(weights)
    with pytest.raises(PriorFileError, match="s.safetensors.*checksum"):
        load_samples(samples)
    monkeypatch.setenv("PTYL_VERIFY_CHECKSUMS", "0")  # the documented opt-out still reads the (damaged) data
    state, _ = read_weights(weights)
    assert state["w"].shape == (16,)


def test_weights_tensor_dtype_is_checked_against_its_record(tmp_path):
    path = save_weights({"w": torch.ones(4)}, tmp_path / "w.safetensors", {})
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))  # safetensors' own header, same length
    with pytest.raises(PriorFileError, match="'w' has dtype int32 but the metadata records float32"):
        read_weights(path)


def test_weights_written_before_integrity_records_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(3)}, str(path), metadata={"ptyl_weights": json.dumps({"format": "ptyl-weights"})})
    state, meta = read_weights(path)
    assert torch.equal(state["w"], torch.ones(3)) and meta == {"format": "ptyl-weights"}


def test_malformed_weights_header_is_named(tmp_path):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    header = {"format": "ptyl-weights", "tensors": {"w": {"dtype": "float32", "shape": "3"}}}
    save_file({"w": torch.ones(3)}, str(path), metadata={"ptyl_weights": json.dumps(header)})
    with pytest.raises(PriorFileError, match=r"bad.safetensors: metadata field 'tensors.w.shape'"):
        read_weights(path)
