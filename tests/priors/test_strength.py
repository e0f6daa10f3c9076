"""The effective-strength diagnostic: median prior std / median |theta0| over the backbone, against dense references,
(whether a prior is off is the N-aware curvature share's call: tests/autotune/test_share.py)."""

import math

import torch
from torch import nn

from ptyl.posterior import SourcePosterior
from ptyl.priors import make_prior, marginal_variance, prior_strength


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("body", nn.Linear(5, 4))
    net.add_module("head", nn.Linear(4, 2))
    return net


def posterior(net: nn.Module) -> SourcePosterior:
    gen = torch.Generator().manual_seed(0)
    body = {n: p.detach() for n, p in net.named_parameters() if n.startswith("body.")}
    return SourcePosterior({n: p.clone() for n, p in body.items()},
                           {n: 1e-4 * (0.5 + torch.rand(p.shape, generator=gen)) for n, p in body.items()},
                           {n: 1e-2 * torch.randn((3, *p.shape), generator=gen) for n, p in body.items()})


def test_lowrank_marginal_std_matches_the_dense_covariance():
    net = model()
    post = posterior(net)
    lam, eps = 30.0, 1e-4
    prior = make_prior(net, "lowrank", posterior=post, scale=lam, eps=eps)
    var = torch.cat([post.variance[n].reshape(-1) for n in post.names]).double()
    dev = torch.cat([post.deviations[n].reshape(3, -1) for n in post.names], dim=1).double()
    dense = lam * 0.5 * (torch.diag(var) + dev.T @ dev / 2) + eps * torch.eye(var.numel(), dtype=torch.float64)
    torch.testing.assert_close(marginal_variance(prior.parts["backbone"]), dense.diagonal(), rtol=1e-5, atol=0)
    weights = torch.cat([p.detach().reshape(-1) for n, p in net.named_parameters() if n.startswith("body.")])
    strength = prior_strength(prior, net)
    assert math.isclose(strength.median_std, float(dense.diagonal().median().sqrt()), rel_tol=1e-5)
    assert math.isclose(strength.median_weight, float(weights.abs().median()), rel_tol=1e-6)
    assert math.isclose(strength.std_ratio, strength.median_std / strength.median_weight)


def test_ratio_of_isotropic_and_missing_priors():
    net = model()
    weight = float(torch.cat([p.detach().reshape(-1) for n, p in net.named_parameters()
                              if n.startswith("body.")]).abs().median())
    tight = prior_strength(make_prior(net, "l2sp", variance=(0.1 * weight) ** 2), net)
    assert math.isclose(tight.std_ratio, 0.1, rel_tol=1e-6)
    assert set(tight.to_dict()) == {"median_std", "median_weight", "std_ratio"}  # no N-blind "off" verdict
    none = prior_strength(make_prior(net, "none"), net)  # no backbone prior at all
    assert none.std_ratio == math.inf
    post = posterior(net)  # lambda spans the scale
    assert prior_strength(make_prior(net, "lowrank", posterior=post, scale=1e8), net).std_ratio > 100
    assert prior_strength(make_prior(net, "lowrank", posterior=post, scale=1.0, eps=1e-6), net).std_ratio < 1
