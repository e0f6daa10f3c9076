"""Laplace evidence: log-determinants against dense algebra, curvature against autograd, exactness on a conjugate
linear-Gaussian model, and the selected scale against the closed-form evidence maximiser."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.tuning import (
    curvature,
    laplace_log_evidence,
    posterior_log_det,
    prior_precision_diagonal,
    select_prior_scale,
)
from ptyl.training import TrainConfig
from ptyl.models import MLP
from ptyl.posterior import SourcePosterior
from ptyl.priors import make_prior

N, P, NOISE = 40, 6, 0.25


def linear_posterior(rank: int = 3) -> SourcePosterior:
    gen = torch.Generator().manual_seed(2)
    return SourcePosterior(
        {"weight": torch.randn(1, P, dtype=torch.float64, generator=gen)},
        {"weight": torch.rand(1, P, dtype=torch.float64, generator=gen) + 0.5},
        {"weight": 0.5 * torch.randn(rank, 1, P, dtype=torch.float64, generator=gen)},
    )


def conjugate_problem(true_scale: float = 3.0):
    """y = X theta + noise with orthogonal columns of X (so the likelihood Hessian X^T X / s2 is diagonal) and
    theta drawn from the low-rank prior at ``true_scale``."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, P, dtype=torch.float64, generator=gen))
    x = q * math.sqrt(N) * torch.linspace(0.5, 2.0, P, dtype=torch.float64)
    post = linear_posterior()
    chol = torch.linalg.cholesky(post.dense_covariance(scale=true_scale))
    theta = post.mean["weight"].flatten() + chol @ torch.randn(P, dtype=torch.float64, generator=gen)
    y = x @ theta + math.sqrt(NOISE) * torch.randn(N, dtype=torch.float64, generator=gen)
    return x, y, post


def closed_form_log_evidence(x, y, post, scale: float) -> float:
    """log N(y; X mu, X Sigma X^T + s2 I)."""
    cov = x @ post.dense_covariance(scale=scale) @ x.T + NOISE * torch.eye(N, dtype=torch.float64)
    r = y - x @ post.mean["weight"].flatten()
    return float(-0.5 * (r @ torch.linalg.solve(cov, r) + torch.linalg.slogdet(cov)[1] + N * math.log(2 * math.pi)))


def linear_model() -> nn.Module:
    return nn.Linear(P, 1, bias=False).double()


@pytest.mark.parametrize("kind", ["lowrank", "diag"])
def test_log_det_and_precision_diagonal_match_dense_algebra(kind):
    post = linear_posterior()
    prior = make_prior(linear_model(), kind, posterior=post, scale=2.0, eps=0.01, head=None)
    cov = post.dense_covariance(scale=2.0, eps=0.01) if kind == "lowrank" else torch.diag(
        2.0 * post.variance["weight"].flatten() + 0.01)
    precision = torch.linalg.inv(cov)
    h = torch.rand(P, dtype=torch.float64)
    exact = torch.linalg.slogdet(torch.diag(h) + precision)[1]
    diag_only = torch.log(h + precision.diagonal()).sum()
    curv = {"weight": h.reshape(1, P)}
    assert posterior_log_det(prior, curv, "exact") == pytest.approx(float(exact), rel=1e-10)
    assert posterior_log_det(prior, curv, "diag") == pytest.approx(float(diag_only), rel=1e-10)
    torch.testing.assert_close(prior_precision_diagonal(prior)["weight"].flatten(), precision.diagonal())


def test_composite_prior_log_det_sums_its_parts():
    model = MLP(3, 2, hidden=(4,))
    prior = make_prior(model, "standard", variance=0.5, head_variance=2.0)
    h = {n: torch.rand(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    expected = sum(torch.log(h[n] + (0.5 if n.startswith("head") else 2.0)).sum() for n in h)
    assert posterior_log_det(prior, h) == pytest.approx(float(expected), rel=1e-12)


def test_laplace_evidence_is_exact_for_the_conjugate_linear_gaussian_model():
    x, y, post = conjugate_problem()
    data = TensorDataset(x, y)
    model = linear_model()
    for scale in (0.1, 3.0, 50.0):
        prior = make_prior(model, "lowrank", posterior=post, scale=scale, eps=0.0, head=None)
        cov = post.dense_covariance(scale=scale)
        precision = torch.linalg.inv(cov)
        theta_map = torch.linalg.solve(x.T @ x / NOISE + precision,
                                       x.T @ y / NOISE + precision @ post.mean["weight"].flatten())
        with torch.no_grad():
            model.weight.copy_(theta_map.reshape(1, P))
        estimate = laplace_log_evidence(model, prior, data, likelihood="gaussian", noise_variance=NOISE)
        assert estimate == pytest.approx(closed_form_log_evidence(x, y, post, scale), rel=1e-10, abs=1e-8)


def golden_max(fn, lo: float, hi: float, steps: int = 45) -> float:
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(steps):
        c, d = b - r * (b - a), a + r * (b - a)
        a, b = (a, d) if fn(c) >= fn(d) else (c, b)
    return (a + b) / 2


def test_selected_scale_matches_the_closed_form_optimum():
    x, y, post = conjugate_problem(true_scale=3.0)
    best_log = golden_max(lambda t: closed_form_log_evidence(x, y, post, 10.0**t), -3.0, 4.0)
    config = TrainConfig(epochs=100, batch_size=N, lr=0.1, momentum=0.5, nesterov=False, schedule="constant",
                         progress=False)
    result = select_prior_scale(linear_model, TensorDataset(x, y), post, kind="lowrank", rounds=3, config=config,
                                likelihood="gaussian", noise_variance=NOISE, head=None, bounds=(1e-3, 1e4),
                                points_per_decade=4, progress=False)
    assert result.scale == pytest.approx(10.0**best_log, rel=1e-3)
    assert result.final_log_evidence == pytest.approx(closed_form_log_evidence(x, y, post, result.scale), abs=1e-6)
    assert not result.edge_warning and len(result.rounds) == 3
    curve = result.log_evidence_curve
    assert curve["scale"] == sorted(curve["scale"]) and max(curve["log_evidence"]) == pytest.approx(
        result.rounds[-1]["log_evidence"])


def test_categorical_curvature_matches_autograd():
    # softmax regression is linear in its weights, so its GGN equals the exact Hessian of the summed NLL
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, dtype=torch.float64, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    model = nn.Linear(3, 4).double()
    names = ["weight", "bias"]
    curv = curvature(model, TensorDataset(x, y), likelihood="categorical", hessian="ggn", batch_size=5)
    params = tuple(model.get_parameter(n).detach() for n in names)

    def nll(w, b):
        return F.cross_entropy(x @ w.T + b, y, reduction="sum")

    hess = torch.autograd.functional.hessian(nll, params)
    for i, n in enumerate(names):
        full = hess[i][i].reshape(params[i].numel(), params[i].numel())
        torch.testing.assert_close(curv.hessian_diag[n].flatten(), full.diagonal())
    assert curv.log_likelihood == pytest.approx(-float(nll(*params)))
    ef = curvature(model, TensorDataset(x, y), hessian="ef")
    grads = [torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), model.weight)[0] for i in range(12)]
    torch.testing.assert_close(ef.hessian_diag["weight"], sum(g.pow(2) for g in grads))


def test_select_prior_scale_on_a_classifier_gives_a_smooth_curve():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(15)
    x = 2.0 * torch.randn(3, 4, generator=gen)[y] + torch.randn(45, 4, generator=gen)

    def model_fn():
        torch.manual_seed(5)
        return MLP(4, 3, hidden=(6,))

    config = TrainConfig(epochs=5, batch_size=15, lr=0.05, progress=False)
    result = select_prior_scale(model_fn, TensorDataset(x, y), kind="standard", rounds=1, config=config,
                                bounds=(1e-3, 1e3), points_per_decade=4, progress=False)
    curve = result.log_evidence_curve
    values = torch.tensor(curve["log_evidence"])
    assert torch.isfinite(values).all() and 1e-3 <= result.scale <= 1e3
    # the dense-grid part (4 points per decade): second differences small against the range
    on_grid = [abs(4 * math.log10(s) - round(4 * math.log10(s))) < 1e-9 for s in curve["scale"]]
    grid = values[torch.tensor(on_grid)]
    assert len(grid) == 6 * 4 + 1
    assert (grid[2:] - 2 * grid[1:-1] + grid[:-2]).abs().max() < 0.2 * (grid.max() - grid.min())
    assert result.final is not None and result.final_log_evidence is not None


def test_bad_input_is_named():
    data = TensorDataset(torch.randn(4, P, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="posterior"):
        select_prior_scale(linear_model, data, None, kind="lowrank", head=None)
    with pytest.raises(InvalidValueError, match="bounds"):
        select_prior_scale(linear_model, data, linear_posterior(), head=None, bounds=(10.0, 1.0))
    with pytest.raises(ConfigError, match="likelihood"):
        curvature(linear_model(), data, likelihood="poisson")
    with pytest.raises(InvalidValueError, match="noise_variance"):
        curvature(linear_model(), data, likelihood="gaussian", noise_variance=0.0)


def test_block_prior_from_make_prior_log_det_sums_its_dense_blocks():
    from ptyl.priors.block import assign_blocks
    from tests.helpers import TinyNet, random_posterior

    model = TinyNet().double()
    post = random_posterior(model, rank=3)
    prior = make_prior(model, "block", posterior=post, scale=0.5, eps=0.01, head_variance=None)
    h = {n: torch.rand(t.shape, dtype=torch.float64) for n, t in post.mean.items()}
    expected = 0.0
    for names in assign_blocks(post.names, "auto").values():
        precision = torch.linalg.inv(post.restrict(names).dense_covariance(scale=0.5, eps=0.01))
        hb = torch.cat([h[n].reshape(-1) for n in names])
        expected += float(torch.linalg.slogdet(torch.diag(hb) + precision)[1])
    assert posterior_log_det(prior, h, "exact") == pytest.approx(expected, rel=1e-10)
