"""Shared reference problems for the autotune tests: Bayesian linear regression in closed form, exact GGN blocks by
``torch.func``, a random source posterior and dense covariances of prior families."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, jacrev

from ptyl.posterior import SourcePosterior

F64 = torch.float64


def random_posterior(model: nn.Module, rank: int = 3, skip: str | None = None, constant: bool = False,
                     seed: int = 3) -> SourcePosterior:
    """A SWAG-like posterior over ``model``'s parameters (those not starting with ``skip``)."""
    gen = torch.Generator().manual_seed(seed)
    mean, var, dev = {}, {}, {}
    for n, p in model.named_parameters():
        if skip and n.startswith(skip):
            continue
        mean[n] = 0.1 * torch.randn(p.shape, generator=gen, dtype=F64)
        spread = torch.rand(p.shape, generator=gen, dtype=F64) + 0.05
        var[n] = torch.full(p.shape, 0.3, dtype=F64) if constant else spread
        dev[n] = 0.3 * torch.randn((rank, *p.shape), generator=gen, dtype=F64)
    return SourcePosterior(mean, var, dev)


def dense_covariance(family) -> torch.Tensor:
    """Sigma of a (composite) family as a dense matrix in ``names`` order."""
    mats = []
    for leaf in family.leaves():
        d, u = leaf.covariance_parts()
        mats.append(torch.diag(d) + (u.T @ u if u is not None else 0))
    return torch.block_diag(*mats).detach()


def dense_center(family) -> torch.Tensor:
    parts = []
    for leaf in family.leaves():
        c = leaf.center()
        parts.append(torch.zeros(leaf.num_parameters, dtype=F64) if c is None else c)
    return torch.cat(parts)


def exact_ggn(model: nn.Module, x: torch.Tensor, likelihood) -> torch.Tensor:
    """sum_n J_n^T Lambda_n J_n over all parameters (named_parameters order), by jacrev."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def outputs(p, xi):
        return likelihood.outputs(functional_call(model, p, (xi.unsqueeze(0),))).reshape(-1)

    total = 0
    for xi in x:
        jac = jacrev(outputs)(params, xi)
        j = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], 1)
        root = likelihood.hessian_sqrt(functional_call(model, params, (xi.unsqueeze(0),)))[0]
        total = total + j.T @ (root @ root.T) @ j
    return total


def regression_data(n: int, p: int, noise: float, scale: float = 0.8, orthogonal: bool = False, seed: int = 0):
    """(X [n, p], y [n]) with y = X theta + noise, theta ~ N(0, scale I); orthogonal columns of norm^2 n."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen, dtype=F64)
    if orthogonal:
        x = torch.linalg.qr(x)[0] * math.sqrt(n)
    theta = math.sqrt(scale) * torch.randn(p, generator=gen, dtype=F64)
    return x, x @ theta + math.sqrt(noise) * torch.randn(n, generator=gen, dtype=F64)


def log_marginal(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, noise: float) -> float:
    """Exact log N(y; X mu, X Sigma X^T + s2 I)."""
    c = x @ cov @ x.T + noise * torch.eye(len(y), dtype=F64)
    r = y - x @ mean
    return float(-0.5 * (r @ torch.linalg.solve(c, r) + torch.linalg.slogdet(c)[1] + len(y) * math.log(2 * math.pi)))


def posterior(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, noise: float):
    """Exact Gaussian posterior (mean, covariance) of theta."""
    prec = x.T @ x / noise + torch.linalg.inv(cov)
    post_cov = torch.linalg.inv(prec)
    return post_cov @ (x.T @ y / noise + torch.linalg.solve(cov, mean)), post_cov


def maximise_log(fn, init: float = 0.0) -> float:
    """argmax over t of fn(t) for a smooth 1-D function of a float64 tensor t (LBFGS to machine precision)."""
    t = torch.tensor(init, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -fn(t)
        loss.backward()
        return loss

    opt.step(closure)
    # LBFGS stops where its line search can no longer tell values apart (the gradient then depends on the machine's
    # last digits); Newton steps on the exact 1-D derivatives polish the maximiser to machine precision
    for _ in range(5):
        grad, = torch.autograd.grad(fn(t), t, create_graph=True)
        curv, = torch.autograd.grad(grad, t)
        if not curv < 0:
            break
        with torch.no_grad():
            t -= grad.detach() / curv
    return float(t.detach())


def dense_log_marginal(x, y, mean, cov, noise):
    """Differentiable exact log N(y; X mu, X Sigma X^T + s2 I) (cov may depend on a tensor)."""
    c = x @ cov @ x.T + noise * torch.eye(len(y), dtype=F64)
    r = y - x @ mean
    return -0.5 * (r @ torch.linalg.solve(c, r) + torch.linalg.slogdet(c)[1] + len(y) * math.log(2 * math.pi))
