"""FSDP2 (``fully_shard``, gloo, 2 CPU processes) against one process: sharded priors, sharded SWAG, sharded prior
files and a sharded MAP run (issue 16).

The same ``_scenarios`` function runs in the test process (a plain model) and in 2 spawned ranks (the model wrapped
with ``fully_shard``: every parameter a DTensor holding a row block). Sharded results are gathered on the ranks and
compared here with the single-process ones. One spawn serves every test in this file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from ptyl import distributed as ddp
from ptyl.errors import PriorFileError
from tests.ranks import init_rank, run_ranks, write_digits

WORLD = 2
TIMEOUT_S = 120.0
NUM_TRAIN = 128
BATCH = 32
KINDS = ("lowrank", "diag", "block", "l2sp", "standard")


def _model(seed: int, dtype: torch.dtype = torch.float32):
    """An MLP without BatchNorm (rows of 64x15 / 15 / 10x15 / 10 split unevenly over 2 ranks), sharded when
    distributed: each Linear and the root, as FSDP2 recommends."""
    from torch.distributed.fsdp import fully_shard

    from ptyl.models import MLP

    torch.manual_seed(seed)
    model = MLP(64, 10, hidden=(15,)).to(dtype)
    if ddp.is_distributed():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                fully_shard(module)
        fully_shard(model)
    return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _flat(model) -> torch.Tensor:
    return torch.cat([_full(p.detach()).reshape(-1) for p in model.parameters()])


def _grads(model) -> torch.Tensor:
    return torch.cat([_full(p.grad).reshape(-1) for p in model.parameters()])


def _gathered(post) -> dict[str, torch.Tensor]:
    from ptyl.posterior import ShardedPosterior

    full = post.gather() if isinstance(post, ShardedPosterior) else post
    out = {}
    for name in full.names:
        out[f"{name}.mean"], out[f"{name}.var"] = full.mean[name], full.variance[name]
        out[f"{name}.dev"] = full.deviations[name]
    return out


def _snapshots(model, count: int):
    """Write ``count`` deterministic parameter states into the (sharded) model, yielding after each: the same full
    values in every run, each rank writing its rows."""
    from ptyl.sharding import ShardLayout, local_tensor

    layout = ShardLayout.from_params(model)
    names = dict(model.named_parameters())
    for i in range(count):
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, shard in layout.shards.items():
                full = torch.randn(shard.shape, generator=generator) * (1 + i) + i
                local_tensor(names[name]).copy_(shard.take(full))
        yield i


def _scenarios(out: Path, data_file: Path, single_prior: Path | None) -> dict[str, torch.Tensor]:
    from ptyl.io import load_posterior, save_posterior
    from ptyl.pipeline import learn_prior
    from ptyl.posterior import SWAGCollector
    from ptyl.priors import make_prior
    from ptyl.training import TrainConfig, fit

    tensors = load_file(str(data_file))
    ds = TensorDataset(tensors["x"], tensors["y"])
    data = ds if ddp.is_distributed() else ddp.distributed_loader(ds, BATCH, seed=0)
    res: dict[str, torch.Tensor] = {}

    # SWAG on fixed states: every rank keeps the moments of its rows; exact against one process
    model = _model(0)
    collector = SWAGCollector(model, rank=3, head="head")
    for _ in _snapshots(model, 5):
        collector.collect(model)
    for key, value in _gathered(collector.posterior()).items():
        res[f"swag.{key}"] = value
    res["swag.local_numel"] = torch.tensor([collector.num_parameters])

    # the source stage end to end (SGD under FSDP2, SWAG callback), then the prior file
    source = _model(1)
    post = learn_prior(source, data, epochs=2, lr=0.05, rank=3, collect_every=2, batch_size=BATCH, progress=False)
    for key, value in _gathered(post).items():
        res[f"post.{key}"] = value
    index = save_posterior(post, out / "prior.safetensors")
    if ddp.is_distributed():  # read back by the same 2 ranks, and a one-process file read by 2 ranks
        back = load_posterior(index, shards=source)
        res["reload.same"] = torch.tensor([float(all(
            torch.equal(getattr(back.local, k)[n], getattr(post.local, k)[n])
            for k in ("mean", "variance", "deviations") for n in post.names))])
        from_single = load_posterior(single_prior, shards=source)
        for key, value in _gathered(from_single).items():
            res[f"single_file.{key}"] = value

    # every prior kind: value and gradient, through add_grad_ and through autograd, in float64
    post64 = post.to(dtype=torch.float64)
    for kind in KINDS:
        model = _model(2, torch.float64)
        options = {"variance": 0.5} if kind in ("l2sp", "standard") else {"posterior": post64, "scale": 3.0,
                                                                            "eps": 0.01}
        prior = make_prior(model, kind, head_variance=2.0, **options)
        with torch.no_grad():  # move away from the prior's centre
            for p in model.parameters():
                p.mul_(1.5).add_(0.1)
        value = prior.add_grad_(model, 0.25, return_value=True)
        res[f"prior.{kind}.value"] = value.reshape(1)
        res[f"prior.{kind}.grad"] = _grads(model)
        model.zero_grad(set_to_none=True)
        (0.25 * prior.penalty(model)).backward()
        res[f"prior.{kind}.autograd"] = _grads(model)
        if kind == "lowrank":
            res["prior.lowrank.logdet"] = prior.posterior_log_det(torch.full_like(prior.mean_flat(), 0.7,
                                                                                  dtype=torch.float64)).reshape(1)

    # a few MAP steps under the learned prior (the Trainer adds the prior's gradient once, after backward; the
    # clipping must see the global gradient norm)
    model = _model(3)
    prior = make_prior(model, "lowrank", posterior=post, scale=100.0, eps=0.1, head_variance=1.0)
    fitted = fit(model, data, prior, TrainConfig(epochs=2, batch_size=BATCH, lr=0.3, grad_clip=0.5,
                                                 prior_step="gradient", progress=False))  # FSDP2: no proximal step
    res["map.params"] = _flat(model)
    res["map.loss"] = torch.tensor([h["loss"] for h in fitted.history], dtype=torch.float64)
    return res


def _worker(rank: int, port: int, root: str) -> None:
    init_rank(rank, port, WORLD, TIMEOUT_S)
    try:
        out = Path(root) / "sharded"
        res = _scenarios(out, Path(root) / "digits.safetensors", Path(root) / "single" / "prior.safetensors")
        save_file({k: v.contiguous() for k, v in res.items()}, str(Path(root) / f"result{rank}.safetensors"))
    finally:
        ddp.cleanup()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    write_digits(root / "digits.safetensors", NUM_TRAIN)
    (root / "single").mkdir()
    (root / "sharded").mkdir()
    single = _scenarios(root / "single", root / "digits.safetensors", None)
    run_ranks(_worker, root, WORLD, TIMEOUT_S, "FSDP")
    ranks = [load_file(str(root / f"result{r}.safetensors")) for r in range(WORLD)]
    return single, ranks, root


def test_ranks_agree_and_hold_half(runs):
    single, ranks, _ = runs
    for key in ranks[0]:
        if key != "swag.local_numel":
            torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, msg=key)
    # rows of 15 / 10 split 8 + 7 and 5 + 5: each rank keeps about half of the moments
    total = int(single["swag.local_numel"])
    assert int(ranks[0]["swag.local_numel"]) + int(ranks[1]["swag.local_numel"]) == total
    assert max(int(r["swag.local_numel"]) for r in ranks) <= 0.55 * total


def test_sharded_swag_equals_single_process(runs):
    single, ranks, _ = runs
    for key in single:
        if key.startswith("swag.") and key != "swag.local_numel":
            torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-6, atol=1e-9, msg=key)
    for key in single:  # the source stage under FSDP2: SGD steps in another summation order, so DDP's tolerance
        if key.startswith("post."):
            atol = 1e-8 if key.endswith(".var") else 1e-5
            torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-4, atol=atol, msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_prior_value_and_gradient(runs, kind):
    single, ranks, _ = runs
    value, expected = ranks[0][f"prior.{kind}.value"], single[f"prior.{kind}.value"]
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    for path in ("grad", "autograd"):
        torch.testing.assert_close(ranks[0][f"prior.{kind}.{path}"], single[f"prior.{kind}.grad"], rtol=1e-6,
                                   atol=1e-6)
    if kind == "lowrank":
        torch.testing.assert_close(ranks[0]["prior.lowrank.logdet"], single["prior.lowrank.logdet"], rtol=1e-9, atol=0)


def test_map_steps_under_the_prior_match_one_process(runs):
    single, ranks, _ = runs
    torch.testing.assert_close(ranks[0]["map.params"], single["map.params"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[0]["map.loss"], single["map.loss"], rtol=1e-5, atol=1e-6)


def test_prior_written_by_two_ranks_loads_anywhere(runs):
    from ptyl.io import load_posterior
    from ptyl.sharding import ShardLayout

    _, ranks, root = runs
    index = root / "sharded" / "prior.safetensors.index.json"
    assert sorted(p.name for p in (root / "sharded").iterdir()) == [
        "prior-00001-of-00002.safetensors", "prior-00002-of-00002.safetensors", "prior.safetensors.index.json"]
    assert float(ranks[0]["reload.same"]) == 1.0  # read back by 2 ranks: each its own rows, identical
    full = load_posterior(index)  # one process: the whole posterior, identical to what the ranks held
    assert load_posterior(root / "sharded" / "prior.safetensors").names == full.names  # the base name finds the index
    for name in full.names:
        for key, store in (("mean", full.mean), ("var", full.variance), ("dev", full.deviations)):
            assert torch.equal(store[name], ranks[0][f"post.{name}.{key}"]), (name, key)
    layouts = [ShardLayout.even(full.shapes, r, 3) for r in range(3)]  # resharded onto 3 ranks
    for layout in layouts:
        part = load_posterior(index, shards=layout)
        for name in full.names:
            assert torch.equal(part.local.mean[name], layout.shards[name].take(full.mean[name]))
            assert torch.equal(part.local.deviations[name], layout.shards[name].take(full.deviations[name], 1))


def test_single_file_prior_loads_into_two_ranks(runs):
    from ptyl.io import load_posterior

    _, ranks, root = runs
    full = load_posterior(root / "single" / "prior.safetensors")
    for name in full.names:
        assert torch.equal(ranks[0][f"single_file.{name}.mean"], full.mean[name])
        assert torch.equal(ranks[0][f"single_file.{name}.dev"], full.deviations[name])


@pytest.fixture
def sharded_copy(runs, tmp_path):
    _, _, root = runs
    for f in (root / "sharded").iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def _edit_index(index: Path, fn) -> None:
    body = json.loads(index.read_text())
    fn(body)
    index.write_text(json.dumps(body))


def test_missing_shard_file_is_named(sharded_copy):
    from ptyl.io import load_posterior, read_metadata

    (sharded_copy / "prior-00002-of-00002.safetensors").unlink()
    for read in (load_posterior, read_metadata):
        with pytest.raises(PriorFileError, match="prior-00002-of-00002.safetensors is missing"):
            read(sharded_copy / "prior.safetensors.index.json")


def test_index_naming_a_missing_tensor_is_named(sharded_copy):
    from ptyl.io import load_posterior

    index = sharded_copy / "prior.safetensors.index.json"

    def rename(body):  # the index points a piece at the other shard file, which does not hold it
        key = next(k for k, f in body["weight_map"].items() if f.endswith("00001-of-00002.safetensors"))
        body["weight_map"][key] = "prior-00002-of-00002.safetensors"

    _edit_index(index, rename)
    with pytest.raises(PriorFileError, match=r"prior-00002-of-00002\.safetensors: tensor .* named by the index is "
                                             "missing"):
        load_posterior(index)


def test_malformed_indexes(sharded_copy):
    from ptyl.io import load_posterior

    index = sharded_copy / "prior.safetensors.index.json"
    original = index.read_text()

    def drop_piece(body):  # a gap in the rows of one tensor
        key = next(k for k in body["weight_map"] if k.startswith("mean::") and "[" in k)
        del body["weight_map"][key]
        del body["metadata"]["ptyl"]["tensors"][key]

    cases = [
        (drop_piece, "leave a gap|cover rows"),
        (lambda b: b["weight_map"].update({"mean::nope[0:1]": "x.safetensors"}), "appears only in the weight map"),
        (lambda b: b["weight_map"].update({k: "../evil.safetensors" for k in list(b["weight_map"])[:1]}),
         "must sit next to the index"),
        (lambda b: b["metadata"]["ptyl"].update(rank="3"), "'rank' must be an integer"),
        (lambda b: b.pop("weight_map"), "weight_map"),
    ]
    for edit, message in cases:
        index.write_text(original)
        _edit_index(index, edit)
        with pytest.raises(PriorFileError, match=message):
            load_posterior(index)
    index.write_text("{not json")
    with pytest.raises(PriorFileError, match="prior.safetensors.index.json: not a readable JSON index"):
        load_posterior(index)


def test_damaged_shard_and_shard_opened_alone(sharded_copy):
    from ptyl.io import load_posterior

    shard = sharded_copy / "prior-00001-of-00002.safetensors"
    with pytest.raises(PriorFileError, match="prior shard file.*open its .index.json"):
        load_posterior(shard)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a flipped data byte: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(PriorFileError, match="prior-00001-of-00002.safetensors: tensor .* fails its SHA-256"):
        load_posterior(sharded_copy / "prior.safetensors.index.json")


def test_inspect_reads_a_sharded_prior(runs, capsys):
    from ptyl.cli import main

    _, _, root = runs
    assert main(["inspect", str(root / "sharded" / "prior.safetensors.index.json")]) == 0
    out = capsys.readouterr().out
    assert "sharded: 2 shard files written by 2 ranks" in out and "checksums: verified" in out


def test_example_runs_in_one_process(tmp_path, monkeypatch, capsys):
    """examples/fsdp_transfer.py with tiny settings in this process (a process group of one): the source stage writes
    a one-shard prior, fine-tuning reads it back by rows."""
    import runpy
    import sys

    import torch.distributed as dist

    settings = ["--source_per_class=10", "--pretrain_epochs=1", "--swag_epochs=2", "--swag_rank=2", "--shots=3",
                "--epochs=2", "--width=4", "--progress=False", f"--out_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", ["fsdp_transfer.py", *settings])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "fsdp_transfer.py"), run_name="__main__")
    assert not dist.is_initialized()  # the example leaves no process group behind
    assert "world_size=1" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "prior-00001-of-00001.safetensors", "prior.safetensors.index.json", "results.json"]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["prior_state_bytes_per_rank"][0] > 0
