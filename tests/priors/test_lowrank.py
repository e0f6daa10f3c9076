"""Learned priors against a dense torch.distributions.MultivariateNormal in float64."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from ptyl.errors import InvalidValueError
from ptyl.priors import DiagonalGaussianPrior, LowRankGaussianPrior
from ptyl.priors.learned import learned_prior
from tests.helpers import TinyNet, random_posterior


def _flat(params, names):
    return torch.cat([params[n].reshape(-1) for n in names])


@pytest.mark.parametrize("scale,eps,rank", [(1.0, 0.0, 3), (0.3, 1e-2, 3), (7.0, 0.1, 2), (2.0, 0.0, 1)])
def test_lowrank_log_prob_and_grad_match_dense_mvn(scale, eps, rank):
    model = TinyNet().double()
    post = random_posterior(model, rank=3)
    assert 150 <= post.num_parameters <= 300
    prior = learned_prior(post, "lowrank", scale=scale, eps=eps, rank=rank)
    params = {n: p for n, p in model.named_parameters() if n in post.mean}
    for p in params.values():
        p.data.normal_()
    lp = prior.log_prob(params)
    lp.backward()
    mvn = MultivariateNormal(_flat(post.mean, post.names), post.dense_covariance(scale, eps, rank))
    theta = _flat(params, post.names).detach().requires_grad_(True)
    ref = mvn.log_prob(theta)
    ref.backward()
    assert torch.allclose(lp, ref, rtol=1e-10, atol=0)
    grad = torch.cat([params[n].grad.reshape(-1) for n in post.names])
    assert torch.allclose(grad, theta.grad, rtol=1e-8, atol=1e-12)


def test_lambda_scales_whole_covariance_not_lambda_squared():
    """Sigma(lam) == lam * Sigma(1): the low-rank factor is scaled by sqrt(lam) (reference code used lam -> lam^2)."""
    model = TinyNet().double()
    post = random_posterior(model, rank=3)
    lam = 4.0
    p1, p4 = learned_prior(post, "lowrank", scale=1.0, eps=0.0), learned_prior(post, "lowrank", scale=lam, eps=0.0)
    (_, d1, u1), (_, d4, u4) = p1.flat_parts(), p4.flat_parts()
    assert torch.allclose(u4, math.sqrt(lam) * u1)
    assert torch.allclose(d4, lam * d1)
    # explicit formula: 1/2 (diag s2 + D D^T / (k-1))
    d = torch.cat([post.deviations[n].reshape(3, -1) for n in post.names], 1)
    v = torch.cat([post.variance[n].reshape(-1) for n in post.names])
    expected = lam * 0.5 * (torch.diag(v) + d.T @ d / 2)
    assert torch.allclose(post.dense_covariance(lam), expected)


def test_diag_prior_matches_independent_normals():
    model = TinyNet().double()
    post = random_posterior(model)
    prior = learned_prior(post, "diag", scale=2.0, eps=0.05)
    assert isinstance(prior, DiagonalGaussianPrior)
    params = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in post.shapes.items()}
    lp = prior.log_prob(params)
    ref = sum(
        torch.distributions.Normal(post.mean[n], (2.0 * post.variance[n] + 0.05).sqrt()).log_prob(params[n]).sum()
        for n in post.names
    )
    assert torch.allclose(lp, ref, rtol=1e-12)
    lp.backward()
    n0 = post.names[0]
    assert torch.allclose(params[n0].grad, -(params[n0] - post.mean[n0]) / (2.0 * post.variance[n0] + 0.05))


def test_rank_zero_gives_diagonal_and_rank_above_K_raises():
    post = random_posterior(TinyNet().double(), rank=3)
    assert isinstance(learned_prior(post, "lowrank", rank=0), DiagonalGaussianPrior)
    with pytest.raises(InvalidValueError, match="exceeds"):
        learned_prior(post, "lowrank", rank=4)


@pytest.mark.parametrize("bad", [dict(scale=0.0), dict(scale=-1.0), dict(eps=-1e-3), dict(scale=float("nan"))])
def test_bad_hyperparameters_raise(bad):
    post = random_posterior(TinyNet().double())
    with pytest.raises(InvalidValueError):
        learned_prior(post, "lowrank", **bad)


def test_float32_params_with_bf16_storage_close_to_fp64():
    model = TinyNet().double()
    post = random_posterior(model)
    theta = {n: post.mean[n] + 0.1 * torch.randn(s, dtype=torch.float64) for n, s in post.shapes.items()}
    exact = learned_prior(post, "lowrank", scale=1.0, eps=0.01).log_prob(theta)
    lean = learned_prior(post, "lowrank", scale=1.0, eps=0.01, dtype=torch.bfloat16)
    assert lean.mean.dtype == lean.factor.dtype == torch.bfloat16
    approx = lean.log_prob({n: t.float() for n, t in theta.items()})
    assert approx.dtype == torch.float32
    assert abs(float(approx) - float(exact)) / abs(float(exact)) < 0.05


def test_no_grad_path_equals_grad_path():
    model = TinyNet().double()
    post = random_posterior(model)
    prior = learned_prior(post, "lowrank", scale=0.5, eps=0.01)
    params = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in post.shapes.items()}
    with torch.no_grad():
        a = prior.log_prob(params)
    b = prior.log_prob(params)
    assert torch.allclose(a, b, rtol=1e-12)


def test_nonpositive_diag_rejected():
    mean = {"w": torch.zeros(3)}
    with pytest.raises(InvalidValueError, match="non-positive"):
        LowRankGaussianPrior(mean, {"w": torch.tensor([1.0, 0.0, 1.0])}, {"w": torch.ones(1, 3)})


def test_chunked_paths_match_unchunked(monkeypatch):
    """Tiny chunks force the bounded-memory paths (capacitance build, factor casts, precision, log det)."""
    import ptyl.priors.lowrank as lowrank

    model = TinyNet().double()
    post = random_posterior(model, rank=3)
    stored32 = post.to(dtype=torch.float32)  # float32 storage, float64 parameters: the factor is cast per call
    params = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in post.shapes.items()}
    h = torch.rand(post.num_parameters, dtype=torch.float64)
    whole = learned_prior(stored32, "lowrank", scale=0.7, eps=0.01)
    monkeypatch.setattr(lowrank, "CHUNK", 21)  # 7 columns of rank 3
    monkeypatch.setattr(lowrank, "CAST_CHUNK", 10)
    chunked = learned_prior(stored32, "lowrank", scale=0.7, eps=0.01)
    torch.testing.assert_close(chunked.capacitance_chol, whole.capacitance_chol, rtol=1e-12, atol=1e-12)
    a = whole.log_prob(params)
    ga = torch.autograd.grad(a, list(params.values()))
    b = chunked.log_prob(params)
    gb = torch.autograd.grad(b, list(params.values()))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for x, y in zip(ga, gb, strict=False):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.precision_diagonal(), whole.precision_diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked.posterior_log_det(h), whole.posterior_log_det(h), rtol=1e-12, atol=0)


def test_flat_buffers_and_lazy_packing():
    post = random_posterior(TinyNet().double(), rank=3)
    prior = learned_prior(post, "lowrank", scale=2.0, eps=0.1, rank=2, dtype=torch.float32)
    mean, diag, factor = prior.flat_parts()
    assert prior.mean.shape == (post.num_parameters,) and prior.factor.shape == (2, post.num_parameters)
    torch.testing.assert_close(mean, _flat(post.mean, post.names).float().double())
    torch.testing.assert_close(diag, (0.5 * 2.0 * _flat(post.variance, post.names) + 0.1).float().double())
    dev = torch.cat([post.deviations[n][:2].reshape(2, -1) for n in post.names], dim=1)
    torch.testing.assert_close(factor, (math.sqrt(2.0 / 2.0) * dev).float().double())
    with pytest.raises(InvalidValueError, match="same rank"):
        LowRankGaussianPrior({"a": torch.zeros(2), "b": torch.zeros(1)}, {"a": torch.ones(2), "b": torch.ones(1)},
                             {"a": torch.ones(2, 2), "b": torch.ones(1, 1)})
    with pytest.raises(InvalidValueError, match="low-rank factor of 'b'"):
        LowRankGaussianPrior({"a": torch.zeros(2), "b": torch.zeros(1)}, {"a": torch.ones(2), "b": torch.ones(1)},
                             {"a": torch.ones(1, 2), "b": torch.full((1, 1), float("nan"))})
