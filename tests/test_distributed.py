"""DDP (gloo, 2 CPU processes) against one process on a tiny deterministic problem (an MLP on sklearn digits).

The same ``_scenarios`` function runs in the test process (no process group) and in 2 spawned ranks that join a
gloo group on 127.0.0.1 through torchrun's environment variables. One process reads its data through
``distributed_loader(ds, 32)`` (world size 1); the ranks get the Dataset itself and ``fit`` builds
``distributed_loader(ds, 16)`` per rank: the global batches are the same examples, so every number must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from ptyl import distributed as ddp
from tests.ranks import init_rank, run_ranks, write_digits

WORLD = 2
TIMEOUT_S = 90.0  # generous for a loaded CI machine; an idle 2-core one needs ~15 s
NUM_TRAIN = 128  # divisible by WORLD * batch: no padded examples
BATCH = 32  # global batch
LR, VARIANCE = 1.0, 0.01  # zero-data-gradient step: theta1 = theta0 (1 - LR / (VARIANCE N))


def _model(seed: int):
    from ptyl.models import MLP

    torch.manual_seed(seed)
    return MLP(64, 10, hidden=(16,))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _scenarios(out: Path, data_file: Path) -> dict[str, torch.Tensor]:
    """Source SWAG -> prior file -> MAP and SGLD fine-tuning -> zero-data-gradient step. Returns numbers to compare."""
    from ptyl.io import save_posterior
    from ptyl.pipeline import learn_prior, pretrain
    from ptyl.priors import make_prior
    from ptyl.training import TrainConfig, fit

    tensors = load_file(str(data_file))
    ds = TensorDataset(tensors["x"], tensors["y"])

    def data(batch: int):  # see the module docstring: same global batches in 1 and in 2 processes
        return ds if ddp.is_distributed() else ddp.distributed_loader(ds, batch, seed=0)

    res: dict[str, torch.Tensor] = {}
    source = _model(0)
    # pretrain + learn_prior on the same module: fit wraps it in DDP twice
    pretrain(source, data(BATCH), epochs=1, lr=0.1, batch_size=BATCH, progress=False)
    post = learn_prior(source, data(BATCH), epochs=3, lr=0.05, rank=3, collect_every=2, batch_size=BATCH,
                       progress=False, checkpoint=out / "source.pt")
    ddp.run_on_main(save_posterior, post, out / "prior.safetensors")
    for name in post.mean:
        res[f"post.mean.{name}"] = post.mean[name]
        res[f"post.var.{name}"] = post.variance[name]
        res[f"post.dev.{name}"] = post.deviations[name]

    model = _model(1)
    prior = make_prior(model, "lowrank", posterior=post, scale=100.0, eps=0.1, head_variance=1.0)
    fitted = fit(model, data(BATCH), prior, TrainConfig(epochs=4, batch_size=BATCH, lr=0.3, progress=False),
                 checkpoint=out / "fit.pt")
    res["map.params"] = _flat(model)
    res["map.loss"] = torch.tensor([h["loss"] for h in fitted.history], dtype=torch.float64)
    res["map.prior"] = torch.tensor([h["prior"] for h in fitted.history], dtype=torch.float64)

    model = _model(2)
    prior = make_prior(model, "standard", variance=1.0, head_variance=1.0)
    fit(model, data(BATCH), prior, TrainConfig(inference="sgld", epochs=2, batch_size=BATCH, lr=1e-3, num_samples=2,
                                               progress=False))
    res["sgld.params"] = _flat(model)

    # zero data gradient, one full-batch plain SGD step: only the prior moves the weights
    model = _model(3)
    prior = make_prior(model, "standard", variance=VARIANCE, head_variance=VARIANCE)
    res["zero.before"] = _flat(model)
    zero = fit(model, data(NUM_TRAIN), prior,
               TrainConfig(epochs=1, batch_size=NUM_TRAIN, lr=LR, momentum=0.0, schedule="constant",
                           prior_step="gradient", progress=False),
               objective=lambda net, batch: 0.0 * net(batch[0]).sum())
    res["zero.after"] = _flat(model)
    res["zero.prior"] = torch.tensor([zero.history[0]["prior"]], dtype=torch.float64)
    # the same step as a proximal step (the default): theta1 = theta0 / (1 + LR / (VARIANCE N))
    model = _model(3)
    prior = make_prior(model, "standard", variance=VARIANCE, head_variance=VARIANCE)
    fit(model, data(NUM_TRAIN), prior,
        TrainConfig(epochs=1, batch_size=NUM_TRAIN, lr=LR, momentum=0.0, schedule="constant", progress=False),
        objective=lambda net, batch: 0.0 * net(batch[0]).sum())
    res["zero.prox_after"] = _flat(model)

    # collectives: rank r contributes r + 1 rows / the value r
    res["gather"] = ddp.gather_tensor(torch.full((ddp.rank() + 1, 2), float(ddp.rank())))
    res["sum"] = torch.tensor([ddp.all_reduce_sum(float(ddp.rank()))])
    res["mean"] = ddp.all_reduce_mean(torch.tensor([float(ddp.rank())]))
    return res


def _worker(rank: int, port: int, root: str) -> None:
    """One spawned rank: torchrun's environment, then the scenarios; results to a file of its own."""
    device = init_rank(rank, port, WORLD, TIMEOUT_S)
    assert device.type == "cpu" and ddp.world_size() == WORLD and ddp.rank() == rank
    try:
        # a rank-private path: a stray write would show
        res = _scenarios(Path(root) / "out" / f"rank{rank}", Path(root) / "digits.safetensors")
        res = {k: v.contiguous() for k, v in res.items()}
        save_file(res, str(Path(root) / f"result{rank}.safetensors"))
    finally:
        ddp.cleanup()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_digits(root / "digits.safetensors", NUM_TRAIN)
    single = _scenarios(root / "single", root / "digits.safetensors")
    run_ranks(_worker, root, WORLD, TIMEOUT_S, "DDP")
    ranks = [load_file(str(root / f"result{r}.safetensors")) for r in range(WORLD)]
    return single, ranks, root


def test_every_rank_ends_with_the_same_numbers(runs):
    _, ranks, _ = runs
    for key in ranks[0]:  # DDP keeps replicas bit-identical; reduced metrics and the SWAG broadcast too
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, msg=key)


def test_ddp_matches_single_process(runs):
    single, ranks, _ = runs
    for key in single:
        if key.startswith(("post.", "map.", "sgld.", "zero.")):
            atol = 1e-8 if key.startswith("post.var") else 1e-5  # float64 moments of float32 weights
            torch.testing.assert_close(ranks[0][key].to(single[key].dtype), single[key], rtol=1e-4, atol=atol,
                                       msg=key)


def test_prior_counted_once_with_global_n(runs):
    single, ranks, _ = runs
    before, after = ranks[0]["zero.before"], ranks[0]["zero.after"]
    # one SGD step on U = 0 + |theta|^2 / (2 v N): theta1 = theta0 (1 - lr / (v N)), N = 128 (not 64 per rank);
    # counting the prior twice, or using the shard size, would double the step
    expected = before * (1 - LR / (VARIANCE * NUM_TRAIN))
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single["zero.after"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, before * (1 - 2 * LR / (VARIANCE * NUM_TRAIN)), atol=1e-3)
    proximal = before / (1 + LR / (VARIANCE * NUM_TRAIN))
    torch.testing.assert_close(ranks[0]["zero.prox_after"], proximal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single["zero.prox_after"], proximal, rtol=1e-5, atol=1e-6)
    # the logged prior term is penalty / N, reduced over ranks
    torch.testing.assert_close(ranks[0]["zero.prior"], single["zero.prior"], rtol=1e-6, atol=0)


def test_metrics_and_collectives_are_reduced(runs):
    single, ranks, _ = runs
    torch.testing.assert_close(ranks[0]["map.loss"], single["map.loss"], rtol=1e-4, atol=1e-6)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["gather"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert ranks[r]["sum"].item() == 1.0 and ranks[r]["mean"].item() == 0.5


def test_only_rank0_writes_files(runs):
    _, _, root = runs
    assert sorted(p.name for p in (root / "out" / "rank0").iterdir()) == ["fit.pt", "prior.safetensors", "source.pt"]
    assert not (root / "out" / "rank1").exists()


def test_single_process_helpers_are_identities():
    assert not ddp.is_distributed() and ddp.is_main_process() and ddp.world_size() == 1 and ddp.rank() == 0
    x = torch.arange(3.0)
    assert ddp.all_reduce_mean(2.5) == 2.5 and ddp.gather_tensor(x) is x and ddp.broadcast_state({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    assert ddp.wrap_model(model) is model and ddp.unwrap_model(model) is model
    assert ddp.init_from_env(device="cpu") == torch.device("cpu")  # not under torchrun: no group is created
    assert not ddp.is_distributed()
    ddp.barrier()
    ddp.cleanup()
