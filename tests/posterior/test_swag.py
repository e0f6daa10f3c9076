"""SWAG moments against numpy on a known trajectory."""

import math

import numpy as np
import pytest
import torch

from ptyl.errors import InvalidValueError, ParameterMismatchError
from ptyl.posterior import SWAGCollector
from tests.helpers import TinyNet


def _trajectory(model, steps, gen):
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    traj = []
    for t in range(steps):
        snap = {n: b + 1e3 + 0.01 * torch.randn(b.shape, generator=gen) * (1 + t % 3) for n, b in base.items()}
        traj.append(snap)
    return traj


@pytest.mark.parametrize("rank,steps", [(5, 12), (20, 7), (0, 4)])
def test_moments_match_numpy(rank, steps):
    model = TinyNet()
    swag = SWAGCollector(model, rank=rank, head="head")
    traj = _trajectory(model, steps, torch.Generator().manual_seed(3))
    for snap in traj:
        swag.collect(snap)
    name = "features.0.weight"
    arr = np.stack([s[name].double().numpy() for s in traj])  # offset 1e3 stresses cancellation in float32
    np.testing.assert_allclose(swag.mean()[name].numpy(), arr.mean(0), rtol=1e-12)
    np.testing.assert_allclose(swag.variance()[name].numpy(), arr.var(0), rtol=1e-7, atol=1e-12)
    dev = swag.deviations()[name].double().numpy()
    kept = min(rank, steps)
    assert dev.shape == (kept, *arr.shape[1:])
    # column j = theta_t - running mean after including theta_t, for the last K snapshots, oldest first
    expected = [arr[t] - arr[: t + 1].mean(0) for t in range(steps - kept, steps)]
    if kept:
        np.testing.assert_allclose(dev, np.stack(expected), rtol=1e-5, atol=1e-6)
    assert "head.weight" not in swag.names


def test_state_dict_resume_gives_same_result():
    model = TinyNet()
    traj = _trajectory(model, 9, torch.Generator().manual_seed(4))
    full = SWAGCollector(model, rank=4)
    for s in traj:
        full.collect(s)
    first = SWAGCollector(model, rank=4)
    for s in traj[:5]:
        first.collect(s)
    state = first.state_dict()
    resumed = SWAGCollector(model, rank=4)
    resumed.load_state_dict(state)
    for s in traj[5:]:
        resumed.collect(s)
    a, b = full.posterior(), resumed.posterior()
    for n in a.names:
        assert torch.equal(a.mean[n], b.mean[n]) and torch.equal(a.deviations[n], b.deviations[n])


def test_posterior_and_sampling():
    model = TinyNet()
    swag = SWAGCollector(model, rank=3)
    with pytest.raises(InvalidValueError):
        swag.posterior()
    for s in _trajectory(model, 6, torch.Generator().manual_seed(5)):
        swag.collect(s)
    post = swag.posterior(metadata={"source": "synthetic"})
    assert post.rank == 3 and post.metadata["num_snapshots"] == 6 and post.metadata["source"] == "synthetic"
    swag.sample_into(model, generator=torch.Generator().manual_seed(0))
    p = dict(model.named_parameters())["features.0.weight"]
    assert torch.isfinite(p).all() and (p - post.mean["features.0.weight"]).abs().max() < 1.0


@pytest.mark.parametrize("rank", [3, 1])
def test_sample_statistics_match_swag_covariance(rank):
    """Samples of the collector follow N(mu, 1/2(diag s2 + D D^T/max(K-1, 1))), the prior's covariance."""
    torch.manual_seed(0)
    w = torch.nn.Linear(3, 1, bias=False)
    swag = SWAGCollector(w, rank=rank)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        swag.collect({"weight": torch.randn(1, 3, generator=gen)})
    post = swag.posterior(dtype=torch.float64)
    cov = post.dense_covariance()
    samples = []
    for _ in range(20000):
        swag.sample_into(w, generator=gen)
        samples.append(w.weight.detach().reshape(-1).double().clone())
    s = torch.stack(samples)
    assert torch.allclose(s.mean(0), post.mean["weight"].reshape(-1), atol=0.03)
    assert torch.allclose(torch.cov(s.T), cov, atol=0.04)


def test_half_precision_deviation_storage():
    model = TinyNet()
    traj = _trajectory(model, 6, torch.Generator().manual_seed(6))
    full, half = SWAGCollector(model, rank=4), SWAGCollector(model, rank=4, deviation_dtype=torch.bfloat16)
    for s in traj:
        full.collect(s)
        half.collect(s)
    assert half.state_dict()["deviations"].dtype == torch.bfloat16
    for n in full.names:
        assert torch.equal(full.mean()[n], half.mean()[n]) and torch.equal(full.variance()[n], half.variance()[n])
        torch.testing.assert_close(half.deviations()[n].float(), full.deviations()[n], rtol=1e-2, atol=1e-4)


def test_state_dict_mismatches_are_rejected_and_legacy_layout_loads():
    model = TinyNet()
    swag = SWAGCollector(model, rank=3)
    for s in _trajectory(model, 5, torch.Generator().manual_seed(7)):
        swag.collect(s)
    state = swag.state_dict()
    before = SWAGCollector(model, rank=3).state_dict()
    for other, match in [(SWAGCollector(model, rank=2), "another rank"),
                         (SWAGCollector(model, rank=3, head="head"), "other parameters")]:
        with pytest.raises(ParameterMismatchError, match=match):
            other.load_state_dict(state)
    target = SWAGCollector(model, rank=3)
    for key, value, match in [("mean", state["mean"][:-1], "mean has shape"), ("deviations", "x", "deviations"),
                              ("shapes", [[1]] * len(state["shapes"]), "other shapes"), ("format", 9, "format 9")]:
        with pytest.raises(ParameterMismatchError, match=match):
            target.load_state_dict({**state, key: value})
    with pytest.raises(ParameterMismatchError, match="lacks"):
        target.load_state_dict({"rank": 3})
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), before.values(), strict=False)
               if isinstance(a, torch.Tensor))  # a rejected state changes nothing
    # the per-name layout of earlier versions (format 1)
    legacy = {"rank": 3, "num_snapshots": 5, "names": swag.names, "mean": swag.mean(), "m2": {
        n: v * 5 for n, v in swag.variance().items()}, "deviations": dict(zip(swag.names, _ring(swag), strict=False))}
    target.load_state_dict(legacy)
    for key in ("mean", "m2", "deviations"):
        torch.testing.assert_close(target.state_dict()[key], state[key])


def _ring(swag):
    """Deviation rows per name in ring-slot order (what format 1 stored)."""
    flat = swag.state_dict()["deviations"]
    out, start = [], 0
    for n in swag.names:
        size = math.prod(swag.shapes[n])
        out.append(flat[:, start:start + size].reshape(swag.rank, *swag.shapes[n]))
        start += size
    return out
