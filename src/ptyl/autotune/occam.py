"""The Laplace evidence of a prior family, differentiable in its hyper-parameters, without a P x P matrix.

Laplace approximation around theta* (MacKay 1992; Immer et al. 2021, https://arxiv.org/abs/2104.04975), with the
GGN ``H`` of the summed negative log-likelihood and the prior N(mu, Sigma):

    log p(D | h) ~= log p(D | theta*) + log p(theta* | h) + P/2 log 2 pi - 1/2 log det(H + Sigma^-1)
                 =  log p(D | theta*) - 1/2 (theta* - mu)^T Sigma^-1 (theta* - mu) - 1/2 log det(I + Sigma H)

The Occam term ``log det(I + Sigma H)`` for Sigma = diag(d) + U^T U, with ``H' = D^1/2 H D^1/2`` (D = diag d) and the
whitened factor ``W = U D^-1/2`` (matrix determinant lemma; ``H (I + D H)^-1 = D^-1/2 H' (I + H')^-1 D^-1/2``):

    log det(I + Sigma H) = log det(I + H') + log det(I_k + W H' (I + H')^-1 W^T)

``H`` is block-diagonal (curvature blocks), so the first term is a sum over blocks and the k x k matrix a sum of
per-block terms; the low-rank prior's coupling across blocks is kept exactly. Per block:

- diagonal GGN: exact, O(n);  dense GGN (last layer): exact, O(n^3).
- K-FAC ``H = B (x) A``: ``D^1/2 (B (x) A) D^1/2`` is Kronecker only if the block's variances ``d`` (as the ``[out,
  in']`` matrix of the layer) are a product ``r_o c_i``. We fit that product in log space (two-way additive fit of
  ``log d``, exact for a constant — isotropic, L2-SP, head — or per-row/per-column variance) and use
  ``H' ~= (R^1/2 B R^1/2) (x) (C^1/2 A C^1/2)``: eigenvalues of the two small factors give ``log det(I + H')`` and
  Kronecker solves give ``(I + H')^-1 W^T``. This equals replacing the block's ``H`` by the PSD matrix
  ``S H S`` with ``S = diag(sqrt(d_fit / d))``: always a valid (positive) determinant, exact when the fit is exact and
  in the limit H -> 0. (laplace-torch only allows a scalar or per-layer prior precision with K-FAC, the exact case.)
"""

from __future__ import annotations

import torch

from ptyl.autotune.curvature import Curvature, DenseBlock, DiagBlock
from ptyl.autotune.families import Family, LeafFamily
from ptyl.errors import ConfigError


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


def kronecker_fit(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [out], c [in']) with r_o c_i ~= d_oi: least squares of log d on row + column effects."""
    log_d = d.log()
    half = 0.5 * log_d.mean()
    return (log_d.mean(1) - half).exp(), (log_d.mean(0) - half).exp()


def _block_terms(block, d: torch.Tensor, w: torch.Tensor | None):
    """(log det(I + H'_b), W_b H'_b (I + H'_b)^-1 W_b^T or None) for one curvature block."""
    if isinstance(block, DiagBlock):
        hp = d * block.h.to(d)
        gain = None if w is None else (w * (hp / (1.0 + hp))) @ w.T
        return torch.log1p(hp).sum(), gain
    if isinstance(block, DenseBlock):
        s = d.sqrt()
        hp = s[:, None] * block.h.to(d) * s[None, :]
        chol = torch.linalg.cholesky(torch.eye(len(s), dtype=d.dtype, device=d.device) + hp)
        gain = None if w is None else w @ w.T - w @ torch.cholesky_solve(w.T, chol)
        return 2.0 * chol.diagonal().log().sum(), gain
    r, c = kronecker_fit(d)
    b_hat = r.sqrt()[:, None] * block.b.to(d) * r.sqrt()[None, :]
    a_hat = c.sqrt()[:, None] * block.a.to(d) * c.sqrt()[None, :]
    lam = torch.linalg.eigvalsh(b_hat)  # PSD factors: round-off negatives of ~1e-16 leave 1 + lam mu > 0
    mu = torch.linalg.eigvalsh(a_hat)
    log_det = torch.log1p(lam[:, None] * mu[None, :]).sum()
    if w is None:
        return log_det, None
    y = kron_solve(b_hat, a_hat, w)
    return log_det, w.flatten(1) @ (w - y).flatten(1).T


def assign_blocks(curvature: Curvature, leaves: list[LeafFamily]) -> list[list]:
    """The curvature blocks of each leaf family, restricted to its parameters; blocks over parameters without a
    prior are dropped (those parameters are held fixed, i.e. conditioned on)."""
    owner = {n: i for i, leaf in enumerate(leaves) for n in leaf.names}
    out: list[list] = [[] for _ in leaves]
    for block in curvature.blocks:
        owners = sorted({owner[n] for n in block.names if n in owner})
        if len(owners) > 1 and not isinstance(block, DiagBlock):  # a diagonal splits exactly, the others do not
            raise ConfigError(f"the curvature block over {list(block.names)} spans two prior families; put the "
                              "layer's weight and bias in the same block")
        for i in owners:
            part = block.restrict(leaves[i].names)
            if part is not None:
                out[i].append(part)
    return out


def occam_log_det(leaf: LeafFamily, blocks: list) -> torch.Tensor:
    """log det(I + Sigma H) over one leaf family's parameters (see the module docstring)."""
    d, u = leaf.covariance_parts()
    d_pieces = dict(zip(leaf.names, d.split(leaf.numels)))
    w_pieces = None if u is None else dict(zip(leaf.names, (u / d.sqrt()).split(leaf.numels, dim=1)))
    total = torch.zeros((), dtype=d.dtype, device=d.device)
    gain = None if u is None else torch.zeros(u.shape[0], u.shape[0], dtype=d.dtype, device=d.device)
    for block in blocks:
        w = None if w_pieces is None else block.gather(w_pieces)
        log_det, g = _block_terms(block, block.gather(d_pieces), w)
        total = total + log_det
        if g is not None:
            gain = gain + g
    if gain is not None:
        eye = torch.eye(gain.shape[0], dtype=d.dtype, device=d.device)
        total = total + 2.0 * torch.linalg.cholesky(eye + 0.5 * (gain + gain.T)).diagonal().log().sum()
    return total


def laplace_log_evidence(family: Family, params, curvature: Curvature) -> torch.Tensor:
    """log p(D | h) ~= log p(D | theta*) - 1/2 Mahalanobis(theta*) - 1/2 log det(I + Sigma H) (0-dim tensor,
    differentiable in the family's hyper-parameters). ``params``: the model (or a mapping) at theta*."""
    leaves = family.leaves()
    total = torch.zeros((), dtype=leaves[0].dtype)
    for leaf, blocks in zip(leaves, assign_blocks(curvature, leaves)):
        total = total - 0.5 * (leaf.mahalanobis(params) + occam_log_det(leaf, blocks))
    return total + curvature.log_likelihood


__all__ = ["assign_blocks", "kron_solve", "kronecker_fit", "laplace_log_evidence", "occam_log_det"]
