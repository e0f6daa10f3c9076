"""precision_diagonal / posterior_log_det / mean_flat against dense float64 references (torch.linalg)."""

import math

import pytest
import torch

from ptyl.errors import InvalidValueError
from ptyl.priors import BlockLowRankPrior, CompositePrior, IsotropicGaussianPrior, block_prior, make_prior
from tests.helpers import TinyNet, random_posterior

HEAD_VARIANCE = 2.0


def _dense(prior_kind, post, model, scale=0.7, eps=0.05, rank=3, variance=0.3):
    """(prior, dense covariance, centre) over the prior's names: backbone block + isotropic head block."""
    kw = dict(head="head", head_variance=HEAD_VARIANCE)
    if prior_kind in ("lowrank", "diag"):
        prior = make_prior(model, prior_kind, posterior=post, scale=scale, eps=eps, rank=rank, **kw)
        if prior_kind == "lowrank":
            cov = post.dense_covariance(scale, eps, rank)
        else:
            cov = torch.diag(torch.cat([(scale * post.variance[n] + eps).reshape(-1) for n in post.names]))
        centre = torch.cat([post.mean[n].reshape(-1) for n in post.names])
    else:
        prior = make_prior(model, prior_kind, variance=variance, **kw)
        backbone = prior.parts["backbone"]
        cov = variance * torch.eye(backbone.num_parameters, dtype=torch.float64)
        params = dict(model.named_parameters())
        centre = torch.cat([params[n].detach().reshape(-1) for n in backbone.names]).double()
        if prior_kind == "standard":
            centre = torch.zeros_like(centre)
    head = prior.parts["head"].num_parameters
    cov = torch.block_diag(cov, HEAD_VARIANCE * torch.eye(head, dtype=torch.float64))
    return prior, cov, torch.cat([centre, torch.zeros(head, dtype=torch.float64)])


@pytest.mark.parametrize("kind", ["lowrank", "diag", "l2sp", "standard"])
def test_curvature_interface_matches_dense(kind):
    model = TinyNet().double()
    post = random_posterior(model, rank=3)
    prior, cov, centre = _dense(kind, post, model)
    assert tuple(prior.names[: len(prior.parts["backbone"].names)]) == tuple(prior.parts["backbone"].names)
    precision = torch.linalg.inv(cov)
    got = prior.precision_diagonal()
    assert got.dtype == torch.float64 and got.shape == (prior.num_parameters,)
    torch.testing.assert_close(got, precision.diagonal(), rtol=1e-10, atol=1e-12)
    for h in (torch.zeros(prior.num_parameters), torch.rand(prior.num_parameters, dtype=torch.float64) * 5):
        expected = torch.linalg.slogdet(torch.diag(h.double()) + precision)[1]
        torch.testing.assert_close(prior.posterior_log_det(h), expected, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(prior.mean_flat().double(), centre)
    # the log-density uses the same covariance
    theta = centre + torch.randn(prior.num_parameters, dtype=torch.float64)
    named, start = {}, 0
    for name, shape in zip(prior.names, prior.shapes, strict=False):
        named[name] = theta[start:start + math.prod(shape)].reshape(shape)
        start += math.prod(shape)
    ref = torch.distributions.MultivariateNormal(centre, covariance_matrix=cov).log_prob(theta)
    torch.testing.assert_close(prior.log_prob(named), ref, rtol=1e-10, atol=1e-8)


def test_block_prior_interface_is_the_product_of_blocks():
    post = random_posterior(TinyNet().double(), rank=3)
    prior = block_prior(post, "auto", scale=0.5, eps=0.01)
    assert isinstance(prior, BlockLowRankPrior)
    covs = [post.restrict(list(b.names)).dense_covariance(0.5, 0.01) for b in prior.parts.values()]
    precision = torch.linalg.inv(torch.block_diag(*covs))
    h = torch.rand(prior.num_parameters, dtype=torch.float64)
    torch.testing.assert_close(prior.precision_diagonal(), precision.diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prior.posterior_log_det(h), torch.linalg.slogdet(torch.diag(h) + precision)[1],
                               rtol=1e-10, atol=1e-9)


def test_bad_curvature_is_rejected_and_empty_composite_is_empty():
    model = TinyNet().double()
    prior = make_prior(model, "standard", variance=1.0, head="head")
    n = prior.num_parameters
    for bad, match in [(torch.ones(n + 1), "flat tensor"), (torch.ones(2, n), "flat tensor"),
                       (-torch.ones(n), "negative"), (torch.full((n,), float("nan")), "NaN"), ([1.0] * n, "flat")]:
        with pytest.raises(InvalidValueError, match=match):
            prior.posterior_log_det(bad)
    empty = CompositePrior({}, unregularized=[n for n, _ in model.named_parameters()])
    assert empty.precision_diagonal().shape == (0,) and float(empty.posterior_log_det(torch.zeros(0))) == 0.0


def test_isotropic_interface_follows_device_moves():
    prior = IsotropicGaussianPrior({"w": (3,)}, variance=4.0)
    torch.testing.assert_close(prior.precision_diagonal(), torch.full((3,), 0.25, dtype=torch.float64))
    prior.to("meta")  # any device: the empty anchor buffer tracks it
    assert prior.precision_diagonal().device.type == "meta" and prior.mean_flat().device.type == "meta"
