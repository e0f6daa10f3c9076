"""The implicit validation hypergradient against references: on ridge regression (a Gaussian likelihood and one Linear
layer: K-FAC is the exact Hessian, the trained optimum is closed form) it equals the finite-difference derivative of
the validation loss in every log hyper-parameter; on a small MLP the matrix-free solves agree with dense solves
(the exact Hessian by double back-propagation, K-FAC and the diagonal against their dense matrices); the prior
families' precision products against dense inverses."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptyl.autotune import Gaussian, build_family, compute_curvature
from ptyl.autotune.hypergradient import (
    CurvatureOperator,
    HessianOperator,
    conjugate_gradient,
    hypergradient,
    neumann,
    precision_diagonal,
    precision_matvec,
    prior_gradient,
    solve_direction,
    validation_gradient,
)
from ptyl.errors import ConfigError
from tests.autotune.problems import F64, dense_center, dense_covariance, random_posterior

N, M, P, NOISE = 40, 60, 5, 0.5
# (kind, build_family options): every Gaussian family, with eps fixed (the O(P k) scaled path) and learned
FAMILIES = {
    "lowrank": ("lowrank", dict(scale=0.7, eps=0.0, learn=("scale",))),
    "lowrank-eps": ("lowrank", dict(scale=0.7, eps=0.05, learn=("scale", "eps"))),
    "diag": ("diag", dict(scale=2.0, eps=0.01, learn=("scale", "eps"))),
    "block": ("block", dict(scale=0.5, eps=0.02, learn=("scale",))),
    "l2sp": ("l2sp", dict(variance=0.3, learn=("variance",))),
    "standard": ("standard", dict(variance=0.8, learn=("variance",))),
}


def family_of(name, model):
    kind, options = FAMILIES[name]
    posterior = random_posterior(model) if kind in ("lowrank", "diag", "block") else None
    return build_family(model, kind, posterior=posterior, head=None, **options)


def ridge(seed=0):
    gen = torch.Generator().manual_seed(seed)
    truth = 0.3 * torch.randn(P + 1, generator=gen, dtype=F64)

    def draw(n):
        x = torch.randn(n, P, generator=gen, dtype=F64)
        return x, x @ truth[:P] + truth[P] + math.sqrt(NOISE) * torch.randn(n, generator=gen, dtype=F64)

    return draw(N), draw(M)


def design(x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)


def optimum(family, x, y):
    """argmin_theta of the summed NLL + 1/2 (theta - mu)^T Sigma^-1 (theta - mu): closed form."""
    sigma, mu = dense_covariance(family), dense_center(family)
    d = design(x)
    precision = d.T @ d / NOISE + torch.linalg.inv(sigma)
    return torch.linalg.solve(precision, d.T @ y / NOISE + torch.linalg.solve(sigma, mu))


def val_loss(theta, xv, yv):
    f = design(xv) @ theta
    return float(((yv - f) ** 2).mean() / (2 * NOISE))


def set_weights(model, theta):
    with torch.no_grad():
        model.weight.copy_(theta[:P].reshape(1, P))
        model.bias.copy_(theta[P:])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ridge_hypergradient_equals_finite_differences_at_the_optimum(name):
    (x, y), (xv, yv) = ridge()
    model = nn.Linear(P, 1).double()
    family = family_of(name, model)
    set_weights(model, optimum(family, x, y))
    likelihood = Gaussian(NOISE)
    names = list(family.names)
    train = DataLoader(TensorDataset(x, y[:, None]), batch_size=16)
    grad, _, count = validation_gradient(model, DataLoader(TensorDataset(xv, yv[:, None]), batch_size=16),
                                         likelihood, names)
    assert count == M
    curvature = compute_curvature(model, train, likelihood, names, method="kfac", fisher="exact")
    operator = CurvatureOperator(curvature, names, family.shapes)
    direction, info = solve_direction(operator, family, grad, solver="cg", steps=3 * (P + 1))
    assert info.residual < 1e-10
    analytic = [float(g) for g in hypergradient(family, model, direction)]
    assert len(analytic) == len(list(family.parameters())) >= len(FAMILIES[name][1]["learn"])  # block: one lam_b each
    delta = 1e-5
    for i, h in enumerate(family.parameters()):
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                h.add_(sign * delta)
            values.append(val_loss(optimum(family, x, y), xv, yv))
            with torch.no_grad():
                h.sub_(sign * delta)
        finite_difference = (values[0] - values[1]) / (2 * delta)
        assert abs(finite_difference) > 1e-6  # the check is not vacuous
        assert analytic[i] == pytest.approx(finite_difference, rel=1e-6, abs=1e-10), (name, i)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def dense_hessian(model, x, y, likelihood):
    """Hessian of the summed NLL over every parameter (named_parameters order), by torch.func."""
    from torch.func import functional_call, hessian

    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def loss(flat):
        pieces = dict(zip(params, (t.reshape(p.shape) for t, p in zip(flat.split(sizes), params.values(), strict=True)),
                          strict=True))
        return -likelihood.log_prob(functional_call(model, pieces, (x,)), y).sum()

    return hessian(loss)(torch.cat([p.reshape(-1) for p in params.values()]))


def mlp_problem():
    torch.manual_seed(0)
    model = MLP().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 3, generator=gen, dtype=F64), torch.randn(30, 2, generator=gen, dtype=F64)
    family = build_family(model, "l2sp", variance=0.2, head_variance=0.5)
    likelihood = Gaussian(NOISE)
    params = list(model.parameters())
    solver = torch.optim.LBFGS(params, lr=1.0, max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():  # the trained optimum of U (summed NLL + penalty): H is positive definite there
        solver.zero_grad()
        loss = -likelihood.log_prob(model(x), y).sum() - family.log_prob(model)
        loss.backward()
        return loss

    solver.step(closure)
    return model, family, x, y, likelihood


def test_mlp_implicit_solve_agrees_with_the_dense_hessian_solve():
    model, family, x, y, likelihood = mlp_problem()
    names = list(family.names)
    assert names == [n for n, _ in model.named_parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    hessian = dense_hessian(model, x, y, likelihood)
    precision = torch.linalg.inv(dense_covariance(family))
    system = hessian + precision
    assert torch.linalg.eigvalsh(system).min() > 0  # the check needs a positive-definite H (it is, here)
    rhs = torch.randn(len(system), generator=torch.Generator().manual_seed(2), dtype=F64)
    operator = HessianOperator(model, loader, likelihood, names)
    torch.testing.assert_close(operator.matvec(rhs), hessian @ rhs, rtol=1e-10, atol=1e-10)
    direction, info = solve_direction(operator, family, rhs, solver="cg", steps=200)
    torch.testing.assert_close(direction, torch.linalg.solve(system, rhs), rtol=1e-7, atol=1e-9)
    assert info.residual < 1e-8


@pytest.mark.parametrize("method", ["kfac", "diag"])
def test_mlp_curvature_solve_agrees_with_its_dense_matrix(method):
    model, family, x, y, likelihood = mlp_problem()
    names = list(family.names)
    curvature = compute_curvature(model, DataLoader(TensorDataset(x, y), batch_size=8), likelihood, names,
                                  method=method, fisher="exact")
    dense = curvature.dense(names, family.shapes)
    operator = CurvatureOperator(curvature, names, family.shapes)
    rhs = torch.randn(len(dense), generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(operator.matvec(rhs), dense @ rhs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(operator.diagonal(rhs), dense.diagonal(), rtol=1e-12, atol=0)
    system = dense + torch.linalg.inv(dense_covariance(family))
    for solver, steps, tolerance in (("cg", 100, 1e-8), ("neumann", 3000, 1e-5)):
        direction, _ = solve_direction(operator, family, rhs, solver=solver, steps=steps)
        torch.testing.assert_close(direction, torch.linalg.solve(system, rhs), rtol=tolerance, atol=tolerance)
    one_step, info = solve_direction(operator, family, rhs, solver="one-step", steps=1, step_size=0.01)
    torch.testing.assert_close(one_step, 0.01 * rhs)
    assert info.iterations == 0
    with pytest.raises(ConfigError, match="hypergradient solver"):
        solve_direction(operator, family, rhs, solver="lbfgs", steps=1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_precision_products_match_the_dense_inverse(name):
    model = nn.Linear(P, 2).double()
    family = family_of(name, model)
    precision = torch.linalg.inv(dense_covariance(family))
    x = torch.randn(family.num_parameters, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(precision_matvec(family, x), precision @ x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(precision_diagonal(family), precision.diagonal(), rtol=1e-9, atol=1e-12)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # weight, bias: the family's order
    torch.testing.assert_close(prior_gradient(family, model), precision @ (flat - dense_center(family)), rtol=1e-9,
                               atol=1e-12)


def test_conjugate_gradient_and_neumann_on_a_known_system():
    gen = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))[0]
    a = q @ torch.diag(torch.linspace(0.5, 4.0, 8, dtype=F64)) @ q.T
    b = torch.randn(8, generator=gen, dtype=F64)
    exact = torch.linalg.solve(a, b)
    w, info = conjugate_gradient(lambda v: a @ v, b, a.diagonal(), steps=50)
    torch.testing.assert_close(w, exact)
    assert info.iterations <= 9
    w, info = neumann(lambda v: a @ v, b, steps=400)
    torch.testing.assert_close(w, exact, rtol=1e-8, atol=1e-8)
    assert info.residual < 1e-8
