"""Online Laplace marginal likelihood on Bayesian linear regression: with a Gaussian likelihood the Laplace evidence
is exact and K-FAC is exact for one Linear layer, so the learned hyper-parameter must land at the maximiser of the
exact log marginal likelihood, and the reported evidence must equal it."""

import math

import pytest
import torch
from torch import nn

from ptyl.autotune import Gaussian, build_family, marglik_tune
from tests.autotune.problems import (
    F64,
    dense_center,
    dense_covariance,
    dense_log_marginal,
    maximise_log,
    random_posterior,
    regression_data,
)
from tests.helpers import TinyNet

N, P, NOISE = 200, 8, 0.5


@pytest.mark.parametrize("curvature", ["kfac", "diag"])
def test_isotropic_variance_lands_at_closed_form_maximiser(curvature):
    """Orthogonal columns of norm^2 N: z = X^T y / sqrt(N) ~ N(0, s2 + v N), so v* = (mean z^2 - s2) / N."""
    x, y = regression_data(N, P, NOISE, orthogonal=True)
    z = x.T @ y / math.sqrt(N)
    best = float((z.pow(2).mean() - NOISE) / N)
    model = nn.Linear(P, 1, bias=False).double()
    family = build_family(model, "standard", head=None, variance=1.0)
    result = marglik_tune(model, family, [(x, y[:, None])], Gaussian(NOISE), curvature=curvature, epochs=300,
                          lr=0.05, hyper_every=10, hyper_steps=20)
    assert result.hyper["variance"] == pytest.approx(best, rel=1e-4)
    exact = float(dense_log_marginal(x, y, torch.zeros(P, dtype=F64), best * torch.eye(P, dtype=F64), NOISE))
    assert result.objective == pytest.approx(exact, abs=1e-6)
    updates = [h["epoch"] for h in result.history if "log_evidence" in h]
    assert updates == list(range(10, 301, 10))


def test_lowrank_scale_lands_at_exact_maximiser_with_kfac():
    """Correlated features, learned low-rank prior with bias: K-FAC (exact here) + Woodbury, against dense algebra."""
    x, y = regression_data(N, 5, NOISE, seed=1)
    y = y + 0.7
    model = nn.Linear(5, 1).double()
    family = build_family(model, "lowrank", posterior=random_posterior(model), head=None, scale=1.0, eps=0.01)
    design = torch.cat([x, torch.ones(N, 1, dtype=F64)], 1)
    leaf = family.leaves()[0]
    a, v, mu, eps = leaf.base_diag, leaf.base_factor, dense_center(family), 0.01

    def log_z(t):
        return dense_log_marginal(design, y, mu, torch.diag(t.exp() * a + eps) + t.exp() * v.T @ v, NOISE)

    best = math.exp(maximise_log(log_z))
    result = marglik_tune(model, family, [(x, y[:, None])], Gaussian(NOISE), epochs=120, lr=0.1, hyper_every=10,
                          hyper_steps=20)
    assert result.hyper["scale"] == pytest.approx(best, rel=1e-3)
    assert result.hyper["eps"] == 0.01  # not learned
    assert dense_covariance(family).shape == (6, 6)


class Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 6)
        self.head = nn.Linear(6, 1, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_last_layer_learns_the_head_variance_only():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, 3, generator=gen, dtype=F64)
    model = Features().double()
    with torch.no_grad():
        y = model(x)[:, 0] + math.sqrt(NOISE) * torch.randn(N, generator=gen, dtype=F64)
    family = build_family(model, "standard", variance=0.5, head_variance=1.0)
    result = marglik_tune(model, family, [(x, y[:, None])], Gaussian(NOISE), curvature="last-layer", epochs=60,
                          lr=0.02, hyper_every=5, hyper_steps=50)
    assert result.hyper["variance"] == 0.5  # the backbone prior has no curvature under last-layer Laplace
    with torch.no_grad():
        phi = torch.tanh(model.body(x))
    best = math.exp(maximise_log(lambda t: dense_log_marginal(phi, y, torch.zeros(6, dtype=F64),
                                                              t.exp() * torch.eye(6, dtype=F64), NOISE)))
    assert result.hyper["head_variance"] == pytest.approx(best, rel=0.02)


def test_classification_run_with_sampled_fisher():
    model = TinyNet()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 6, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    family = build_family(model, "standard", variance=0.1, head_variance=1.0)
    result = marglik_tune(model, family, loader, epochs=4, hyper_every=2, hyper_steps=5, fisher="mc",
                          restore_best=False)
    assert [h["epoch"] for h in result.history if "log_evidence" in h] == [2, 4]
    assert result.hyper["variance"] != pytest.approx(0.1)
    assert math.isfinite(result.objective) and result.info["curvature"] == "kfac"
    assert set(result.to_dict()) >= {"strategy", "hyper", "prior_kwargs", "objective", "wall_time_s", "history"}
