"""Prior families: at fixed hyper-parameters they are the existing priors (to 1e-10 in float64), their closed forms
match dense algebra, and their gradients in the hyper-parameters match dense autograd."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from ptyl.autotune import build_family
from ptyl.autotune.woodbury import Woodbury
from ptyl.priors import block_prior, make_prior
from tests.autotune.problems import F64, dense_center, dense_covariance, random_posterior
from tests.helpers import TinyNet

SETTINGS = [("lowrank", None), ("lowrank", 1), ("lowrank", 0), ("diag", None), ("l2sp", None), ("standard", None)]


@pytest.fixture
def net():
    return TinyNet().double()


def perturbed(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.2 * torch.randn(p.shape, generator=gen, dtype=F64) for n, p in model.named_parameters()}


def prior_args(kind, rank):
    return dict(scale=3.7, eps=0.01, rank=rank) if kind in ("lowrank", "diag") else dict(variance=0.3)


@pytest.mark.parametrize("kind,rank", SETTINGS)
def test_log_prob_equals_make_prior(net, kind, rank):
    post = random_posterior(net, skip="head")
    family = build_family(net, kind, posterior=post, head_variance=2.0, **prior_args(kind, rank))
    prior = make_prior(net, kind, posterior=post, head_variance=2.0, **prior_args(kind, rank))
    theta = perturbed(net)
    expected = float(prior.log_prob(theta))
    assert float(family.log_prob(theta).detach()) == pytest.approx(expected, abs=1e-10)
    assert float(family.to_prior().log_prob(theta)) == pytest.approx(expected, abs=1e-10)
    rebuilt = make_prior(net, kind, posterior=post, rank=rank, **family.prior_kwargs())  # the phase-B path
    assert float(rebuilt.log_prob(theta)) == pytest.approx(expected, abs=1e-10)


def test_block_family_equals_block_prior(net):
    post = random_posterior(net, skip="head")
    family = build_family(net, "block", posterior=post, eps=0.02, head_variance=None)
    backbone = family.part("backbone")
    with torch.no_grad():
        for i, leaf in enumerate(backbone.leaves()):
            leaf.log_scale.fill_(math.log(0.5 + 2 * i))
    kwargs = backbone.prior_kwargs()
    assert set(kwargs["scale"]) == {"features.0", "features.2"}
    prior = block_prior(post, scale=kwargs["scale"], eps=kwargs["eps"])
    theta = perturbed(net)
    assert float(backbone.log_prob(theta).detach()) == pytest.approx(float(prior.log_prob(theta)), abs=1e-10)
    assert float(backbone.to_prior().log_prob(theta)) == pytest.approx(float(prior.log_prob(theta)), abs=1e-10)


@pytest.mark.parametrize("kind", ["lowrank", "diag", "block", "l2sp", "standard"])
def test_expected_log_prob_matches_dense(net, kind):
    """E_{N(m, diag s2)} log p = log N(m; mu, Sigma) - 1/2 tr(Sigma^-1 diag s2), against a dense MultivariateNormal."""
    family = build_family(net, kind, posterior=random_posterior(net, skip="head"), scale=2.0, eps=0.01,
                          variance=0.4, head_variance=1.5)
    mean = perturbed(net)
    gen = torch.Generator().manual_seed(1)
    var = {n: 0.01 + torch.rand(t.shape, generator=gen, dtype=F64) for n, t in mean.items()}
    cov, center = dense_covariance(family), dense_center(family)
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in family.names])  # noqa: E731
    dense = MultivariateNormal(center, cov).log_prob(flat(mean)) - 0.5 * torch.trace(
        torch.linalg.solve(cov, torch.diag(flat(var))))
    assert float(family.expected_log_prob(mean, var).detach()) == pytest.approx(float(dense), abs=1e-9)


def test_woodbury_against_dense():
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(30, generator=gen, dtype=F64) + 0.1
    u = torch.randn(4, 30, generator=gen, dtype=F64)
    r, s2 = torch.randn(30, generator=gen, dtype=F64), torch.rand(30, generator=gen, dtype=F64)
    cov = torch.diag(d) + u.T @ u
    wb = Woodbury.build(d, u)
    inv = torch.linalg.inv(cov)
    assert float(wb.mahalanobis(r)) == pytest.approx(float(r @ inv @ r), rel=1e-12)
    assert float(wb.log_det()) == pytest.approx(float(torch.linalg.slogdet(cov)[1]), rel=1e-12)
    assert float(wb.trace_with_diag(s2)) == pytest.approx(float((inv.diagonal() * s2).sum()), rel=1e-12)
    torch.testing.assert_close(wb.precision_diagonal(), inv.diagonal(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lowrank", "diag"])
def test_hyper_gradients_match_dense_autograd(net, kind):
    """d log p / d(log lam, log eps) through Woodbury equals autograd through the dense covariance."""
    post = random_posterior(net, skip="head")
    family = build_family(net, kind, posterior=post, scale=2.0, eps=0.05, head_variance=None,
                          learn=("scale", "eps"))
    leaf = family.leaves()[0]
    theta = perturbed(net)
    family.log_prob(theta).backward()
    got = torch.stack([leaf.log_scale.grad, leaf.log_eps.grad])
    log_lam = torch.tensor(math.log(2.0), dtype=F64, requires_grad=True)
    log_eps = torch.tensor(math.log(0.05), dtype=F64, requires_grad=True)
    lam, eps = log_lam.exp(), log_eps.exp()
    cov = torch.diag(lam * leaf.base_diag + eps)
    if leaf.base_factor is not None:
        cov = cov + lam * leaf.base_factor.T @ leaf.base_factor
    x = torch.cat([theta[n].reshape(-1) for n in leaf.names])
    MultivariateNormal(leaf.mean, cov).log_prob(x).backward()
    torch.testing.assert_close(got, torch.stack([log_lam.grad, log_eps.grad]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["lowrank", "diag"])
def test_eps_zero_fast_path_matches_dense(net, kind):
    """eps = 0: Sigma = lam Sigma_0 with Sigma_0 factorised once; value, E_q and d/d log lam against dense."""
    family = build_family(net, kind, posterior=random_posterior(net, skip="head"), scale=2.5, eps=0.0,
                          head_variance=None)
    leaf = family.leaves()[0]
    assert leaf.scaled_only
    theta = perturbed(net)
    var = {n: 0.01 + 0.1 * t.abs() for n, t in theta.items()}
    for _ in range(2):  # the second call uses the cached factorisation
        leaf.log_scale.grad = None
        family.expected_log_prob(theta, var).backward()
    log_lam = torch.tensor(math.log(2.5), dtype=F64, requires_grad=True)
    cov = log_lam.exp() * (torch.diag(leaf.base_diag) + (leaf.base_factor.T @ leaf.base_factor
                                                         if leaf.base_factor is not None else 0))
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in leaf.names])  # noqa: E731
    dense = MultivariateNormal(leaf.mean, cov).log_prob(flat(theta)) - 0.5 * torch.trace(
        torch.linalg.solve(cov, torch.diag(flat(var))))
    dense.backward()
    assert float(family.expected_log_prob(theta, var).detach()) == pytest.approx(float(dense.detach()), abs=1e-9)
    assert float(leaf.log_scale.grad) == pytest.approx(float(log_lam.grad), rel=1e-10)


def test_hyper_values_and_learnable_parameters(net):
    family = build_family(net, "lowrank", posterior=random_posterior(net, skip="head"), scale=10.0, eps=1e-3,
                          learn=("scale", "eps", "head_variance"))
    assert family.hyper_values() == pytest.approx({"scale": 10.0, "eps": 1e-3, "head_variance": 1.0})
    assert len(list(family.parameters())) == 3
    fixed = build_family(net, "standard", variance=0.5, learn=("variance",))
    assert len(list(fixed.parameters())) == 1  # the head variance stays fixed
    assert fixed.prior_kwargs() == pytest.approx({"variance": 0.5, "head_variance": 1.0})
