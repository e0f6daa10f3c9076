"""Sharded prior files in one process: the layout, all-or-nothing writes, reading by rows (tests/test_fsdp.py writes
them from 2 real ranks)."""

import json
from pathlib import Path

import pytest
import torch

from ptyl.errors import InvalidValueError, PriorFileError
from ptyl.io import load_posterior, load_prior_file, read_metadata, save_posterior
from ptyl.io.atomic import atomic_files, write_temp
from ptyl.posterior import ShardedPosterior
from ptyl.sharding import ShardLayout
from tests.helpers import TinyNet, random_posterior


@pytest.fixture
def posterior():
    return random_posterior(TinyNet(), rank=3, dtype=torch.float32)


def _one_shard(post):
    return ShardedPosterior.from_full(post, ShardLayout.even(post.shapes, 0, 1))


def test_layout_and_round_trip(tmp_path, posterior):
    index = save_posterior(_one_shard(posterior), tmp_path / "prior.safetensors", metadata={"source": "test"})
    assert index == tmp_path / "prior.safetensors.index.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior-00001-of-00001.safetensors",
                                                          "prior.safetensors.index.json"]
    body = json.loads(index.read_text())
    assert set(body) == {"metadata", "weight_map"} and body["metadata"]["total_size"] > 0
    assert set(body["weight_map"].values()) == {"prior-00001-of-00001.safetensors"}
    assert read_metadata(index)["source"] == "test" and read_metadata(tmp_path / "prior.safetensors")["rank"] == 3
    loaded = load_prior_file(index)
    assert loaded.checksums_verified and [f.name for f in loaded.files] == ["prior-00001-of-00001.safetensors"]
    for name in posterior.names:
        assert torch.equal(loaded.posterior.mean[name], posterior.mean[name])
        assert torch.equal(loaded.posterior.deviations[name], posterior.deviations[name])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("verify", [True, False])
def test_rows_of_a_single_file_and_of_an_index(tmp_path, posterior, world, verify):
    single = save_posterior(posterior, tmp_path / "single.safetensors")
    index = save_posterior(_one_shard(posterior), tmp_path / "sharded.safetensors", dtype=torch.bfloat16)
    for path, dtype in ((single, torch.float32), (index, torch.bfloat16)):
        for r in range(world):
            layout = ShardLayout.even(posterior.shapes, r, world)
            part = load_posterior(path, shards=layout, verify=verify)
            assert isinstance(part, ShardedPosterior) and part.layout.same_rows(layout)
            for name in posterior.names:
                want = layout.shards[name].take(posterior.variance[name].to(dtype))
                assert torch.equal(part.local.variance[name], want)
                want = layout.shards[name].take(posterior.deviations[name].to(dtype), 1)
                assert torch.equal(part.local.deviations[name], want)


def test_a_failed_write_leaves_nothing(tmp_path, posterior, monkeypatch):
    import ptyl.io.sharded_prior as sharded

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sharded, "save_file", fail)
    with pytest.raises(PriorFileError, match="cannot write .*prior.safetensors.index.json: rank 0: OSError: disk full"):
        save_posterior(_one_shard(posterior), tmp_path / "prior.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_header_leaves_an_existing_prior_alone(tmp_path, posterior):
    index = save_posterior(_one_shard(posterior), tmp_path / "prior.safetensors")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(PriorFileError, match="'rank' must be|metadata field"):
        save_posterior(_one_shard(posterior), tmp_path / "prior.safetensors", metadata={"num_snapshots": 1})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_posterior(index).names == posterior.names


def test_half_precision_underflow_is_refused(tmp_path, posterior):
    posterior.variance[posterior.names[0]][...] = 1e-30
    with pytest.raises(InvalidValueError, match="underflows"):
        save_posterior(_one_shard(posterior), tmp_path / "prior.safetensors", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


def test_adopted_temp_files_commit_with_the_group(tmp_path):
    tmp = write_temp(tmp_path / "a.txt", lambda p: Path(p).write_text("written elsewhere"))
    with atomic_files() as group:
        group.adopt(tmp_path / "a.txt", tmp)
        group.write_text(tmp_path / "b.txt", "index")
        assert not (tmp_path / "a.txt").exists()
    assert (tmp_path / "a.txt").read_text() == "written elsewhere" and (tmp_path / "b.txt").read_text() == "index"
    tmp = write_temp(tmp_path / "c.txt", lambda p: Path(p).write_text("lost"))
    with pytest.raises(RuntimeError), atomic_files() as group:
        group.adopt(tmp_path / "c.txt", tmp)
        raise RuntimeError("a rank failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
