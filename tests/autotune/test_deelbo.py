"""DE-ELBO: on Bayesian linear regression with orthogonal features (so the exact posterior is diagonal) and
kappa = 1, the ELBO at the exact posterior equals the exact log marginal likelihood, and it is stationary there in q
and in the prior's hyper-parameter at the evidence maximiser (the training strategy landing at both:
tests/tuning/test_deelbo.py)."""

import math

import pytest
import torch
from torch import nn

from ptyl.autotune import VariationalPosterior, build_family
from ptyl.autotune.deelbo import resolve_kappa
from ptyl.posterior import SourcePosterior
from tests.autotune.problems import F64, dense_log_marginal, maximise_log, regression_data

N, P, NOISE = 200, 8, 0.5


def diag_posterior():
    gen = torch.Generator().manual_seed(4)
    shape = (1, P)
    return SourcePosterior({"weight": 0.3 * torch.randn(shape, generator=gen, dtype=F64)},
                           {"weight": 0.2 + torch.rand(shape, generator=gen, dtype=F64)},
                           {"weight": torch.zeros((0, *shape), dtype=F64)})


def setup(kind):
    x, y = regression_data(N, P, NOISE, orthogonal=True)
    model = nn.Linear(P, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    family = build_family(model, kind, posterior=diag_posterior(), head=None, scale=1.0, eps=0.0, variance=1.0)
    leaf = family.leaves()[0]
    base = leaf.base_diag if kind == "diag" else torch.ones(P, dtype=F64)
    center = leaf.center() if leaf.center() is not None else torch.zeros(P, dtype=F64)
    return x, y, model, family, leaf, base.detach(), center.detach()


def exact_maximiser(x, y, base, center):
    """argmax_s log p(y | s) for the prior N(center, s diag(base)) (dense, exact)."""
    return math.exp(maximise_log(lambda t: dense_log_marginal(x, y, center, t.exp() * torch.diag(base), NOISE)))


def exact_posterior(x, y, var, center):
    """Orthogonal columns: the posterior is diagonal. (mean, variance) per coordinate."""
    prec = (x * x).sum(0) / NOISE + 1.0 / var
    return (x.T @ y / NOISE + center / var) / prec, 1.0 / prec


def expected_log_likelihood(x, y, m, s2):
    """E_{N(m, diag s2)} sum_n log N(y_n; x_n theta, s2_noise), closed form."""
    sq = (y - x @ m).pow(2).sum() + ((x * x).sum(0) * s2).sum()
    return -0.5 * sq / NOISE - 0.5 * len(y) * math.log(2 * math.pi * NOISE)


@pytest.mark.parametrize("kind", ["standard", "diag"])
def test_elbo_at_exact_posterior_is_the_log_marginal_likelihood(kind):
    x, y, model, family, leaf, base, center = setup(kind)
    scale = 0.37
    with torch.no_grad():
        (leaf.log_scale if kind == "diag" else leaf.log_variance).fill_(math.log(scale))
    m, s2 = exact_posterior(x, y, scale * base, center)
    q = VariationalPosterior(model, family.names, init_std={"weight": s2.sqrt()})
    with torch.no_grad():
        model.weight.copy_(m[None])
    elbo = expected_log_likelihood(x, y, m, s2) - q.kl(model, family)
    log_z = dense_log_marginal(x, y, center, scale * torch.diag(base), NOISE)
    assert float(elbo.detach()) == pytest.approx(float(log_z), abs=1e-9)
    with torch.no_grad():
        q.log_std[0].add_(0.3)  # any other q is strictly worse
    worse = expected_log_likelihood(x, y, m, s2 * math.exp(0.6)) - q.kl(model, family)
    assert float(worse.detach()) < float(log_z) - 1e-3


@pytest.mark.parametrize("kind", ["standard", "diag"])
def test_elbo_is_stationary_at_the_optimum(kind):
    """At (q = exact posterior, h = evidence maximiser) the ELBO's gradient in m, log s and log h vanishes."""
    x, y, model, family, leaf, base, center = setup(kind)
    best = exact_maximiser(x, y, base, center)
    hyper = leaf.log_scale if kind == "diag" else leaf.log_variance
    with torch.no_grad():
        hyper.fill_(math.log(best))
    m, s2 = exact_posterior(x, y, best * base, center)
    q = VariationalPosterior(model, family.names)
    with torch.no_grad():
        model.weight.copy_(m[None])
        q.log_std[0].copy_(0.5 * s2.log()[None])
    s2_q = (2 * q.log_std[0][0]).exp()
    elbo = expected_log_likelihood(x, y, model.weight[0], s2_q) - q.kl(model, family)
    elbo.backward()
    for g in (model.weight.grad, q.log_std[0].grad, hyper.grad):
        assert g.abs().max() < 1e-8


def test_kappa_default_never_below_one():
    assert resolve_kappa(None, 10, 100) == 1.0
    assert resolve_kappa(None, 1000, 100) == 10.0
    assert resolve_kappa(2.5, 1000, 100) == 2.5
