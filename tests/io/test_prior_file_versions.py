"""Format version 2 (per-tensor dtype/shape/SHA-256 records) and reading version-1 files written by ptyl 0.1.0."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.io import FORMAT_VERSION, load_posterior, load_prior, load_prior_file, read_metadata, save_posterior
from ptyl.io.integrity import VERIFY_ENV
from ptyl.posterior import SourcePosterior
from tests.helpers import TinyNet, random_posterior

FIXTURES = Path(__file__).parent / "fixtures"
V1_FILE = FIXTURES / "prior_v1.safetensors"  # written by save_posterior of ptyl 0.1.0 (format version 1)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def test_version_1_file_still_loads_exactly():
    loaded = load_prior_file(V1_FILE)
    assert loaded.format_version == 1 and not loaded.checksums_verified  # version 1 has no checksums
    assert read_metadata(V1_FILE)["format_version"] == 1
    post = loaded.posterior
    assert post.rank == 2 and post.names == ["features.0.weight", "features.0.bias", "features.2.weight",
                                             "features.2.bias"]
    # the digests were taken from the tensors as ptyl 0.1.0 read them back when the fixture was made
    expected = json.loads((FIXTURES / "prior_v1.sha256.json").read_text())
    got = {f"{kind}::{n}": _digest(t) for kind in ("mean", "variance", "deviations")
           for n, t in getattr(post, kind).items()}
    assert got == expected
    prior = load_prior(V1_FILE, TinyNet(), rank=2)
    assert torch.isfinite(prior.log_prob(TinyNet()))


def test_version_1_file_resaved_as_version_2(tmp_path):
    post = load_posterior(V1_FILE)
    path = save_posterior(post, tmp_path / "v2.safetensors")
    loaded = load_prior_file(path)
    assert loaded.format_version == FORMAT_VERSION == 2 and loaded.checksums_verified
    assert loaded.metadata["source"] == post.metadata["source"]
    for kind in ("mean", "variance", "deviations"):
        for n in post.names:
            assert torch.equal(getattr(loaded.posterior, kind)[n], getattr(post, kind)[n])


def test_version_2_header_records_every_tensor(tmp_path):
    post = random_posterior(TinyNet(), rank=3, dtype=torch.float32)
    path = save_posterior(post, tmp_path / "p.safetensors", dtype="bfloat16")
    meta = read_metadata(path)
    assert meta["format_version"] == 2 and meta["dtype"] == "bfloat16"
    assert set(meta["tensors"]) == {f"{k}::{n}" for k in ("mean", "variance", "deviations") for n in post.names}
    record = meta["tensors"][f"deviations::{post.names[0]}"]
    stored = post.deviations[post.names[0]].to(torch.bfloat16)
    assert record == {"dtype": "bfloat16", "shape": [3, *post.shapes[post.names[0]]], "sha256": _digest(stored)}
    assert "tensors" not in load_posterior(path).metadata  # format internals stay out of the posterior


def test_rank_zero_version_2_has_no_deviation_records(tmp_path):
    post = random_posterior(TinyNet(), rank=0, dtype=torch.float32)
    path = save_posterior(post, tmp_path / "diag.safetensors")
    assert not any(k.startswith("deviations::") for k in read_metadata(path)["tensors"])
    assert load_prior_file(path).checksums_verified


def test_checksum_opt_out_by_argument_and_environment(tmp_path, monkeypatch):
    path = save_posterior(random_posterior(TinyNet(), rank=2, dtype=torch.float32), tmp_path / "p.safetensors")
    assert load_prior_file(path).checksums_verified
    assert not load_prior_file(path, verify=False).checksums_verified
    monkeypatch.setenv(VERIFY_ENV, "0")
    assert not load_prior_file(path).checksums_verified
    assert load_prior_file(path, verify=True).checksums_verified  # the argument wins
    monkeypatch.setenv(VERIFY_ENV, "maybe")
    with pytest.raises(ConfigError, match=VERIFY_ENV):
        load_prior_file(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("verify", [True, False])
def test_loading_onto_a_gpu_with_and_without_checksums(tmp_path, verify):
    post = random_posterior(TinyNet(), rank=2, dtype=torch.float32)
    path = save_posterior(post, tmp_path / "p.safetensors")
    loaded = load_prior_file(path, map_location="cuda", verify=verify)
    assert loaded.checksums_verified == verify
    for kind in ("mean", "variance", "deviations"):
        for n in post.names:
            t = getattr(loaded.posterior, kind)[n]
            assert t.device.type == "cuda" and torch.equal(t.cpu(), getattr(post, kind)[n])


def test_metadata_that_could_not_be_read_back_is_never_written(tmp_path):
    post = random_posterior(TinyNet(), rank=2, dtype=torch.float32)
    target = tmp_path / "p.safetensors"
    for metadata, named in (({"num_classes": "10"}, "num_classes"), ({"swag_lr": float("nan")}, "swag_lr"),
                            ({"skipped": [1]}, "skipped[0]"), ({"model_kwargs": [4]}, "model_kwargs")):
        with pytest.raises(InvalidValueError, match=re.escape(named)):
            save_posterior(post, target, metadata=metadata)
    with pytest.raises(InvalidValueError, match="JSON"):
        save_posterior(post, target, metadata={"note": object()})
    assert list(tmp_path.iterdir()) == []


def test_mixed_dtype_posterior_needs_a_storage_dtype(tmp_path):
    post = random_posterior(TinyNet(), rank=2, dtype=torch.float32)
    mixed = SourcePosterior({n: t.double() for n, t in post.mean.items()}, post.variance, post.deviations)
    with pytest.raises(InvalidValueError, match="one dtype"):
        save_posterior(mixed, tmp_path / "p.safetensors")
    back = load_posterior(save_posterior(mixed, tmp_path / "p.safetensors", dtype="float32"))
    assert all(t.dtype == torch.float32 for t in back.mean.values())
