"""Gaussian algebra for Sigma = diag(d) + U^T U (U: k x P) without ever forming a P x P matrix.

With the whitened factor ``W = U diag(d)^-1/2`` and the capacitance ``C = I_k + W W^T = L L^T``:

    r^T Sigma^-1 r           = sum r^2 / d - || L^-1 W (r / sqrt d) ||^2                      (Woodbury)
    log det Sigma            = sum log d + log det C                                           (determinant lemma)
    tr(Sigma^-1 diag(s2))    = sum s2 / d - || L^-1 W diag(sqrt(s2 / d)) ||_F^2                (Woodbury, traced)

Forming C costs O(P k^2); each quantity above then costs O(P k) + O(k^3). Everything is plain autograd, so it is
differentiable in ``d`` and ``U`` (and through them in the prior's hyper-parameters).

:class:`ScaledWoodbury` is Sigma = c Sigma_0 with Sigma_0 factorised once (no gradient) and a differentiable scalar c:
every quantity is then O(P k) (O(P) for the trace, with diag(Sigma_0^-1) cached) — the learned prior with eps = 0.
``solve(r)`` (Sigma^-1 r, differentiable like the rest) serves the validation hypergradient
(:mod:`ptyl.autotune.hypergradient`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Woodbury:
    """The factorised pieces of Sigma = diag(d) + U^T U. ``factor`` is None for a purely diagonal Sigma."""

    diag: torch.Tensor  # d [P], > 0
    factor: torch.Tensor | None  # U [k, P]
    whitened: torch.Tensor | None  # W = U / sqrt(d) [k, P]
    chol: torch.Tensor | None  # L with L L^T = I + W W^T [k, k]

    @classmethod
    def build(cls, diag: torch.Tensor, factor: torch.Tensor | None) -> Woodbury:
        if factor is None or factor.shape[0] == 0:
            return cls(diag, None, None, None)
        whitened = factor / diag.sqrt()
        eye = torch.eye(factor.shape[0], dtype=diag.dtype, device=diag.device)
        return cls(diag, factor, whitened, torch.linalg.cholesky(eye + whitened @ whitened.T))

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.chol, rhs, upper=False)

    def mahalanobis(self, r: torch.Tensor) -> torch.Tensor:
        """r^T Sigma^-1 r."""
        z = r / self.diag.sqrt()
        quad = z.pow(2).sum()
        if self.whitened is None:
            return quad
        return quad - self._solve((self.whitened @ z).unsqueeze(1)).pow(2).sum()

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """Sigma^-1 r = (z - W^T C^-1 W z) / sqrt(d), z = r / sqrt(d) (differentiable in d and U)."""
        root = self.diag.sqrt()
        z = r / root
        if self.whitened is None:
            return z / root
        t = torch.cholesky_solve((self.whitened @ z).unsqueeze(1), self.chol).squeeze(1)
        return (z - self.whitened.T @ t) / root

    def log_det(self) -> torch.Tensor:
        """log det Sigma."""
        value = self.diag.log().sum()
        if self.chol is None:
            return value
        return value + 2.0 * self.chol.diagonal().log().sum()

    def trace_with_diag(self, s2: torch.Tensor) -> torch.Tensor:
        """tr(Sigma^-1 diag(s2)) = sum s2 / d - <C^-1, W diag(s2 / d) W^T> (two k x P x k products: far cheaper to
        differentiate than a triangular solve over P columns)."""
        ratio = s2 / self.diag
        value = ratio.sum()
        if self.whitened is None:
            return value
        inner = (self.whitened * ratio) @ self.whitened.T
        return value - (torch.cholesky_inverse(self.chol) * inner).sum()

    def precision_diagonal(self) -> torch.Tensor:
        """diag(Sigma^-1) [P] (O(P k^2))."""
        value = 1.0 / self.diag
        if self.whitened is None:
            return value
        return value - (self._solve(self.whitened) / self.diag.sqrt()).pow(2).sum(0)


class FactorWoodbury:
    """Sigma = diag(d) + c V^T V with a fixed factor V [k, P] and a differentiable diagonal d [P] and scalar c (the
    learned prior with eps > 0: d = lam a + eps, c = lam). The same quantities as :class:`Woodbury`, written on the
    k x k matrix ``M = V diag(1/d) V^T`` so that no [k, P] tensor depends on the hyper-parameters: with
    ``C = I + c M = L L^T``,

        r^T Sigma^-1 r        = sum r^2 / d - c z^T C^-1 z,        z = V (r / d)
        log det Sigma         = sum log d + log det C
        tr(Sigma^-1 diag s2)  = sum s2 / d - c <C^-1, V diag(s2 / d^2) V^T>

    (a few k x P x k products; differentiating them costs about as much, not a graph of [k, P] temporaries).
    """

    def __init__(self, diag: torch.Tensor, factor: torch.Tensor, scale: torch.Tensor):
        self.diag, self.factor, self.scale = diag, factor, scale
        self.inverse = 1.0 / diag
        gram = (factor * self.inverse) @ factor.T
        eye = torch.eye(factor.shape[0], dtype=diag.dtype, device=diag.device)
        self.chol = torch.linalg.cholesky(eye + scale * gram)

    def mahalanobis(self, r: torch.Tensor) -> torch.Tensor:
        """r^T Sigma^-1 r."""
        weighted = r * self.inverse
        z = (self.factor @ weighted).unsqueeze(1)
        return (r * weighted).sum() - self.scale * torch.cholesky_solve(z, self.chol).mul(z).sum()

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """Sigma^-1 r = r / d - c diag(1/d) V^T C^-1 V (r / d)."""
        weighted = r * self.inverse
        t = torch.cholesky_solve((self.factor @ weighted).unsqueeze(1), self.chol).squeeze(1)
        return weighted - self.scale * self.inverse * (self.factor.T @ t)

    def precision_diagonal(self) -> torch.Tensor:
        """diag(Sigma^-1) = 1/d - c sum_k (L^-1 V diag(1/d))_k^2."""
        whitened = torch.linalg.solve_triangular(self.chol, self.factor * self.inverse, upper=False)
        return self.inverse - self.scale * whitened.pow(2).sum(0)

    def log_det(self) -> torch.Tensor:
        """log det Sigma."""
        return self.diag.log().sum() + 2.0 * self.chol.diagonal().log().sum()

    def trace_with_diag(self, s2: torch.Tensor) -> torch.Tensor:
        """tr(Sigma^-1 diag(s2))."""
        inner = (self.factor * (s2 * self.inverse.pow(2))) @ self.factor.T
        return (s2 * self.inverse).sum() - self.scale * (torch.cholesky_inverse(self.chol) * inner).sum()


class ScaledWoodbury:
    """Sigma = scale * Sigma_0: ``base`` factorises Sigma_0 (fixed), ``scale`` is a 0-dim (differentiable) tensor."""

    def __init__(self, base: Woodbury, base_precision: torch.Tensor, scale: torch.Tensor):
        self.base, self.base_precision, self.scale = base, base_precision, scale

    def mahalanobis(self, r: torch.Tensor) -> torch.Tensor:
        return self.base.mahalanobis(r) / self.scale

    def log_det(self) -> torch.Tensor:
        return self.base.log_det() + self.base.diag.numel() * self.scale.log()

    def trace_with_diag(self, s2: torch.Tensor) -> torch.Tensor:
        return (s2 * self.base_precision).sum() / self.scale

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """Sigma^-1 r = Sigma_0^-1 r / scale."""
        return self.base.solve(r) / self.scale

    def precision_diagonal(self) -> torch.Tensor:
        """diag(Sigma^-1) = diag(Sigma_0^-1) / scale."""
        return self.base_precision / self.scale


__all__ = ["FactorWoodbury", "ScaledWoodbury", "Woodbury"]
