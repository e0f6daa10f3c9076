"""Kronecker algebra for K-FAC blocks: the Kronecker fit of a layer's prior variances and a differentiable solve.

For a layer's ``[out, in']`` matrix of variances ``d`` the fit ``d ~= r c^T`` (geometric mean 1) is the least-squares
fit of ``log d`` by row + column effects; it is exact when ``d`` is constant or a product of per-row and per-column
values.
"""

from __future__ import annotations

import torch


def kronecker_shape(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [out], c [in']) with r_o c_i ~= d_oi / geomean(d) (differentiable)."""
    log_d = d.log()
    mean = log_d.mean()
    return (log_d.mean(1) - mean).exp(), (log_d.mean(0) - mean).exp()


class _KronSolve(torch.autograd.Function):
    """Y = (I + B (x) A)^-1 X for symmetric PSD B [o, o], A [i, i] and X [k, o, i] (row-major vec), by the
    eigendecompositions of B and A. The backward pass is the derivative of the inverse, d(K^-1) = -K^-1 dK K^-1:
    grad_B = -sum_k Z_k A Y_k^T, grad_A = -sum_k Z_k^T B Y_k with Z = K^-1 grad_Y (no eigenvector derivatives, so
    repeated eigenvalues are harmless)."""

    @staticmethod
    def _solve(qb, lam, qa, mu, x):
        z = qb.T @ x @ qa
        return qb @ (z / (1.0 + lam[:, None] * mu[None, :])) @ qa.T

    @staticmethod
    def forward(ctx, b, a, x):
        lam, qb = torch.linalg.eigh(b)
        mu, qa = torch.linalg.eigh(a)
        y = _KronSolve._solve(qb, lam, qa, mu, x)
        ctx.save_for_backward(b, a, qb, lam, qa, mu, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        b, a, qb, lam, qa, mu, y = ctx.saved_tensors
        z = _KronSolve._solve(qb, lam, qa, mu, grad_y)
        grad_b = -(z @ a @ y.transpose(-1, -2)).sum(0)
        grad_a = -(z.transpose(-1, -2) @ b @ y).sum(0)
        return grad_b, grad_a, z


def kron_solve(b: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(I + B (x) A)^-1 applied to each ``[out, in]`` matrix of ``x`` [k, out, in] (differentiable)."""
    return _KronSolve.apply(b, a, x)


def kron_log_det(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """log det(I + B (x) A) = sum_ij log(1 + l_i m_j) for PSD B, A (eigenvalue gradients only: stable)."""
    lam, mu = torch.linalg.eigvalsh(b), torch.linalg.eigvalsh(a)
    return torch.log1p((lam[:, None] * mu[None, :]).clamp(min=0)).sum()


__all__ = ["kron_log_det", "kron_solve", "kronecker_shape"]
