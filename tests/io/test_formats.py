"""Weights and sample files: one layout each, shared by every writer; damaged or foreign files are named."""

import pytest
import torch
from torch import nn

from ptyl.errors import ParameterMismatchError, PriorFileError
from ptyl.inference import SampleBank
from ptyl.io import (
    load_samples, load_state_checked, read_samples_metadata, read_weights, read_weights_metadata, save_samples,
    save_weights,
)


def states(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((2, 3), float(i)), "b": torch.arange(3) + i} for i in range(n)]


def test_samples_round_trip_with_metadata(tmp_path):
    path = save_samples(states(3), tmp_path / "s.safetensors", {"model": "mlp"})
    meta = read_samples_metadata(path)
    assert meta["num_samples"] == 3 and meta["model"] == "mlp" and meta["format"] == "ptyl-samples"
    for got, want in zip(load_samples(path), states(3)):
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
    with pytest.raises(ParameterMismatchError, match="w.safetensors.*shape mismatch"):
        load_state_checked(nn.Linear(2, 4), state, path)
