import pytest
import torch

from ptyl.errors import InvalidValueError
from ptyl.memory import available_memory, check_fits, estimate_memory, estimate_report, format_bytes
from ptyl.posterior import SWAGCollector
from ptyl.priors.learned import learned_prior
from tests.helpers import TinyNet


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swag_estimate_equals_collector_tensors(dtype):
    model = TinyNet()
    swag = SWAGCollector(model, rank=5, head="head", deviation_dtype=dtype)
    est = estimate_memory(model, 5, head="head", storage_dtype=dtype)
    assert est["num_parameters"] == swag.num_parameters
    state = swag.state_dict()  # the collector's flat buffers
    assert est["swag_mean"] == _nbytes([state["mean"]])
    assert est["swag_m2"] == _nbytes([state["m2"]])
    assert est["swag_deviations"] == _nbytes([state["deviations"]])
    assert est["swag_total"] == est["swag_mean"] + est["swag_m2"] + est["swag_deviations"]


@pytest.mark.parametrize("dtype,k", [(torch.float32, 3), (torch.bfloat16, 2), (torch.float16, 0)])
def test_posterior_and_prior_estimates_equal_their_tensors(dtype, k):
    model = TinyNet()
    swag = SWAGCollector(model, rank=4, include="features.2")
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        swag.collect(model)
    post = swag.posterior()
    prior = learned_prior(post, "lowrank", rank=k, dtype=dtype)
    est = estimate_memory(model, 4, "features.2", storage_dtype=dtype, prior_rank=k)
    assert est["posterior_total"] == _nbytes([*post.mean.values(), *post.variance.values(), *post.deviations.values()])
    assert est["prior_total"] == _nbytes(prior.buffers())
    assert est["prior_factor"] == (k * est["num_parameters"] * torch.empty((), dtype=dtype).element_size())


def test_estimate_from_a_count_and_bad_input():
    est = estimate_memory(22_713_216, rank=20, storage_dtype=torch.bfloat16)
    assert est["swag_total"] == 16 * 22_713_216 + 20 * 2 * 22_713_216
    with pytest.raises(InvalidValueError, match="prior_rank"):
        estimate_memory(10, rank=2, prior_rank=3)
    with pytest.raises(InvalidValueError, match="rank"):
        estimate_memory(10, rank=-1)
    with pytest.raises(InvalidValueError, match="pass a model"):
        estimate_memory(10, rank=2, include="features")


def test_check_fits():
    assert available_memory("cpu") > 0
    free = check_fits(1024, "cpu")
    assert free is None or free > 1024
    with pytest.raises(InvalidValueError, match=r"needs 1024\.00 PiB .* free on cpu"):
        check_fits(2**60, "cpu", what="SWAG collection")
    with pytest.raises(InvalidValueError):
        check_fits(-1)


def test_format_bytes_and_report():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    report = estimate_report(TinyNet(), 4, torch.bfloat16, head="head")
    assert "SWAG deviations (K=4, bfloat16)" in report and "prior total" in report
    assert f"{estimate_memory(TinyNet(), 4, head='head')['num_parameters']:,}" in report


@pytest.mark.parametrize("world", [2, 3])
def test_per_rank_estimate_equals_the_shard_tensors(world):
    """world_size=W: the largest rank's rows (torch.chunk along dim 0), as a sharded collector and prior hold them."""
    from ptyl.priors import shard_prior
    from ptyl.sharding import ShardLayout

    model = TinyNet()
    swag = SWAGCollector(model, rank=4, head="head")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("head")}
    layouts = [ShardLayout.even(shapes, r, world) for r in range(world)]
    est = estimate_memory(model, 4, head="head", world_size=world)
    assert est["parameters_per_rank"] == max(layout.local_numel for layout in layouts) == layouts[0].local_numel
    assert est["num_parameters"] == swag.num_parameters and est["world_size"] == world
    assert est["swag_total"] == layouts[0].local_numel * (16 + 4 * 4)
    for _ in range(5):
        swag.collect(model)
    prior = shard_prior(learned_prior(swag.posterior(), "lowrank"), layouts[0])
    assert est["prior_total"] == _nbytes(prior.buffers())
    assert estimate_memory(1000, 4, world_size=world)["parameters_per_rank"] == -(-1000 // world)
    with pytest.raises(InvalidValueError, match="world_size"):
        estimate_memory(model, 4, world_size=0)
