"""Each strategy recovers a known prior strength: data are generated from a model whose weights were drawn from the
prior at lam_true (learned low-rank prior) or v_h_true (the head's isotropic prior); the learned value must land
within a factor of 2 of the truth (seeded, float64, a few seconds in all)."""

import math

import pytest
import torch
from torch import nn

from ptyl.autotune import Gaussian, build_family
from tests.autotune.problems import F64, random_posterior
from tests.tuning.engines import run_deelbo, run_marglik

N, NOISE, LAM_TRUE, HEAD_TRUE = 300, 0.1, 4.0, 0.5


def lowrank_problem(seed=0):
    """Linear(20, 3) (63 weights) with theta ~ N(mu, lam_true Sigma_0); Sigma_0 from a random SWAG posterior."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(20, 3).double()
    post = random_posterior(model, rank=4, seed=seed + 10)
    family = build_family(model, "lowrank", posterior=post, head=None, scale=1.0)
    leaf = family.leaves()[0]
    noise = (leaf.base_diag.sqrt() * torch.randn(leaf.num_parameters, generator=gen, dtype=F64)
             + leaf.base_factor.T @ torch.randn(leaf.rank, generator=gen, dtype=F64))
    theta = leaf.unflatten(leaf.mean + math.sqrt(LAM_TRUE) * noise)
    x = torch.randn(N, 20, generator=gen, dtype=F64)
    y = x @ theta["weight"].T + theta["bias"] + math.sqrt(NOISE) * torch.randn(N, 3, generator=gen, dtype=F64)
    with torch.no_grad():  # fine-tuning starts at the prior mean (the source weights)
        model.weight.copy_(post.mean["weight"])
        model.bias.copy_(post.mean["bias"])
    return model, family, x, y


STRATEGIES = {
    "de-elbo": lambda m, f, x, y: run_deelbo(m, f, x, y, Gaussian(NOISE), epochs=300, lr=0.05, hyper_lr=0.05,
                                             num_samples=4, init_std=0.01),
    "marglik-kfac": lambda m, f, x, y: run_marglik(m, f, x, y, Gaussian(NOISE), epochs=150, lr=0.05, every=10,
                                                   steps=20),
    "marglik-diag": lambda m, f, x, y: run_marglik(m, f, x, y, Gaussian(NOISE), curvature="diag", epochs=150,
                                                   lr=0.05, every=10, steps=20),
    "marglik-last-layer": lambda m, f, x, y: run_marglik(m, f, x, y, Gaussian(NOISE), curvature="last-layer",
                                                         epochs=150, lr=0.05, every=10, steps=20),
}


@pytest.mark.parametrize("strategy", ["de-elbo", "marglik-kfac", "marglik-diag"])
def test_lowrank_scale_recovered_within_factor_two(strategy):
    model, family, x, y = lowrank_problem()
    STRATEGIES[strategy](model, family, x, y)
    hyper = family.hyper_values()
    assert 0.5 * LAM_TRUE <= hyper["scale"] <= 2.0 * LAM_TRUE, hyper


class RandomFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(10, 40)
        self.head = nn.Linear(40, 2, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("strategy", ["de-elbo", "marglik-kfac", "marglik-last-layer"])
def test_head_variance_recovered_within_factor_two(strategy):
    """A fixed random-feature body (tanh of N(0, 1) weights: 40 features of full rank) and a head drawn from
    N(0, v_h_true I) (80 weights)."""
    gen = torch.Generator().manual_seed(1)
    model = RandomFeatures().double()
    model.body.requires_grad_(False)
    with torch.no_grad():
        model.body.weight.copy_(torch.randn(40, 10, generator=gen, dtype=F64))
        model.head.weight.copy_(math.sqrt(HEAD_TRUE) * torch.randn(2, 40, generator=gen, dtype=F64))
        x = torch.randn(N, 10, generator=gen, dtype=F64)
        y = model(x) + math.sqrt(NOISE) * torch.randn(N, 2, generator=gen, dtype=F64)
        model.head.weight.zero_()
    family = build_family(model, "standard", head_variance=1.0)
    STRATEGIES[strategy](model, family, x, y)
    hyper = family.hyper_values()
    assert 0.5 * HEAD_TRUE <= hyper["head_variance"] <= 2.0 * HEAD_TRUE, hyper
