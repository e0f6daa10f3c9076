"""The Laplace posterior's precision under a learned low-rank prior, without a P x P matrix.

Around the MAP ``theta*`` the Laplace approximation (MacKay 1992; Daxberger et al., "Laplace Redux", NeurIPS 2021,
https://arxiv.org/abs/2106.14806) is ``N(theta*, A^-1)`` with the posterior precision

    A = H + tau Sigma^-1

``H`` the GGN of the summed negative log-likelihood (:func:`ptyl.autotune.compute_curvature`: dense, K-FAC or
diagonal blocks) and ``tau`` a multiplier on the prior's precision (1: the prior as trained under). Every ptyl prior
is a sum of independent leaves whose precision is ``Sigma^-1 = diag(a) - G^T G`` (:mod:`ptyl.priors.separable`):
``G = 0`` for isotropic and diagonal leaves, and for a low-rank leaf ``Sigma = diag(d) + F^T F`` (F: k x P),
``a = 1 / d`` and ``G = L^-1 F diag(1/d)`` with ``L L^T = I_k + F diag(1/d) F^T`` (Woodbury). So

    A = B - W^T W,      B = H + tau diag(a)  (block-diagonal, like H),      W = sqrt(tau) G  (k x P)

and with ``Y = B^-1 W^T`` (P x k, k solves with B) and ``M = I_k - W Y`` (positive definite because W^T W <= B):

    A^-1 v     = B^-1 v + Y M^-1 Y^T v                                  (Woodbury)
    log det A  = log det B + log det M                                   (matrix determinant lemma)
    A^-1       = S S^T + (Y L_M^-T)(Y L_M^-T)^T,  S S^T = B^-1,  L_M L_M^T = M     (exact samples)

Blocks of ``B``: a diagonal block ``h + tau a``; a dense block (the last layer) by Cholesky; a K-FAC block
``H_l ~= Bf (x) Af`` over the layer's ``[out, in']`` matrix plus ``tau diag(a_l)``, which is Kronecker-invertible only
when ``a_l`` is a product ``rho_o kappa_i``: the block's separable precision is replaced by its Kronecker fit
(the shape by least squares in log space, :func:`ptyl.autotune.kron.kronecker_shape`, scaled so that it is nowhere
below ``a_l``: then ``B >= W^T W`` still holds and the approximate ``A`` is never wider than the exact one in any
direction; exact for the isotropic head and L2-SP priors; the worst log-ratio of the fit is kept in
``info["kron_fit_max_log_error"]``), the low-rank part stays exact. ``curvature="diag"`` keeps the prior exact.
With ``R = diag(rho)``, ``K = diag(kappa)`` and the eigendecompositions ``R^-1/2 Bf R^-1/2 = Q_B diag(l) Q_B^T``,
``K^-1/2 Af K^-1/2 = Q_A diag(m) Q_A^T``:

    B_l^-1 X = R^-1/2 Q_B [(Q_B^T R^-1/2 X K^-1/2 Q_A) / (1 + l m^T)] Q_A^T K^-1/2,
    log det B_l = in' sum log rho + out sum log kappa + sum log(1 + l_i m_j).

Everything is float64. Cost: O(P k^2) for Y and M plus the blocks' factorisations (O(out^3 + in'^3) per K-FAC layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ptyl.autotune.blocks import DenseBlock, DiagBlock, KronBlock
from ptyl.autotune.curvature import Curvature
from ptyl.autotune.kron import kronecker_shape
from ptyl.errors import ConfigError, InvalidValueError
from ptyl.priors.base import Prior
from ptyl.priors.lowrank import LowRankGaussianPrior
from ptyl.priors.separable import leaves, separable_parts

__all__ = ["PosteriorPrecision", "prior_leaves_within"]


def prior_leaves_within(prior: Prior, names: Sequence[str] | None) -> list[Prior]:
    """The leaves of ``prior`` that lie wholly inside ``names`` (all leaves for ``None``).

    A leaf is never split: conditioning part of a low-rank leaf on the rest would change its distribution, while
    independent leaves can be held fixed at the MAP exactly.

    Raises:
        ConfigError: no leaf lies inside ``names``.
    """
    chosen = [leaf for leaf in leaves(prior) if names is None or set(leaf.names) <= set(names)]
    if not chosen:
        raise ConfigError(f"no prior leaf lies wholly within the parameters {list(names or [])[:4]}: the Laplace "
                          "subset needs a prior over each of its parameters (e.g. the head prior for the last layer)")
    return chosen


@dataclass
class _Block:
    """One block of B over the flat positions ``index`` ([n], or [out, in'] for a K-FAC block)."""

    kind: str  # "diagonal" | "dense" | "kron"
    index: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """B_block^-1 applied to the rows of ``x`` [R, n]."""
        v = self.values
        if self.kind == "diagonal":
            return x / v["b"]
        if self.kind == "dense":
            return torch.cholesky_solve(x.T, v["chol"]).T
        z = self._into(x) * v["ir"][:, None] * v["ik"][None, :]
        z = v["qb"].T @ z @ v["qa"] / (1.0 + v["lm"])
        return (v["qb"] @ z @ v["qa"].T * v["ir"][:, None] * v["ik"][None, :]).flatten(1)

    def root(self, eps: torch.Tensor) -> torch.Tensor:
        """S eps with S S^T = B_block^-1, for the rows of ``eps`` [R, n]."""
        v = self.values
        if self.kind == "diagonal":
            return eps / v["b"].sqrt()
        if self.kind == "dense":
            return torch.linalg.solve_triangular(v["chol"].T, eps.T, upper=True).T
        z = self._into(eps) / (1.0 + v["lm"]).sqrt()
        return (v["qb"] @ z @ v["qa"].T * v["ir"][:, None] * v["ik"][None, :]).flatten(1)

    def log_det(self) -> torch.Tensor:
        v = self.values
        if self.kind == "diagonal":
            return v["b"].log().sum()
        if self.kind == "dense":
            return 2.0 * v["chol"].diagonal().log().sum()
        out, cols = self.index.shape
        return -2.0 * (cols * v["ir"].log().sum() + out * v["ik"].log().sum()) + torch.log1p(v["lm"]).sum()

    def _into(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` [R, n] (n = out * in', in the block's flat order) as [R, out, in']."""
        return x.reshape(x.shape[0], *self.index.shape)


class PosteriorPrecision:
    """``A = H + tau Sigma^-1`` over the parameters ``names`` (see the module docstring).

    Args:
        curvature: GGN blocks over (at least) ``names`` (:func:`ptyl.autotune.compute_curvature`, summed over the
            training set); blocks over other parameters are ignored, parameters without a block get ``H = 0``.
        prior: the prior the MAP was trained under; only its leaves inside ``names`` are used (all of ``names`` must
            be covered by them).
        names: the parameters of the posterior (default: every parameter of the prior), flat in this order.
        prior_precision: ``tau`` > 0.

    Its attributes ``names``, ``shapes``, ``num_parameters``, ``prior_precision`` and ``info`` describe the posterior.
    """

    def __init__(self, curvature: Curvature, prior: Prior, names: Sequence[str] | None = None,
                 prior_precision: float = 1.0) -> None:
        tau = float(prior_precision)
        if not (math.isfinite(tau) and tau > 0):
            raise InvalidValueError(f"prior_precision must be a finite number > 0, got {prior_precision!r}")
        chosen = prior_leaves_within(prior, names)
        self.names = [n for leaf in chosen for n in leaf.names]
        if names is not None and set(self.names) != set(names):
            missing = sorted(set(names) - set(self.names))
            raise ConfigError(f"parameters {missing[:4]} of the Laplace subset have no prior leaf of their own")
        self.shapes = [tuple(s) for leaf in chosen for s in leaf.shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = dict(zip(self.names, [sum(sizes[:i]) for i in range(len(sizes))], strict=False))
        self.sizes = dict(zip(self.names, sizes, strict=False))
        self.num_parameters = sum(sizes)
        self.prior_precision = tau
        self.info: dict[str, float] = {}
        a = torch.cat([part.precision for part in separable_parts_of(chosen)]).double()
        self.blocks = self._blocks(curvature, tau * a)
        self.w = self._low_rank(chosen, tau)
        self._finish()

    # --- construction -------------------------------------------------------------------------------------------
    def _positions(self, names: Sequence[str]) -> torch.Tensor:
        return torch.cat([torch.arange(self.offsets[n], self.offsets[n] + self.sizes[n]) for n in names])

    def _blocks(self, curvature: Curvature, prior_diag: torch.Tensor) -> list[_Block]:
        blocks, covered, worst = [], set(), 0.0
        for block in curvature.blocks:
            block = block.restrict(self.names)
            if block is None:
                continue
            covered.update(block.names)
            index = self._positions(block.names)
            if isinstance(block, DiagBlock):
                blocks.append(_Block("diagonal", index, {"b": block.h.double().cpu() + prior_diag[index]}))
            elif isinstance(block, DenseBlock):
                h = block.h.double().cpu() + torch.diag(prior_diag[index])
                blocks.append(_Block("dense", index, {"chol": torch.linalg.cholesky(h)}))
            elif isinstance(block, KronBlock):
                kron, error = _kron_block(block, index, prior_diag)
                blocks.append(kron)
                worst = max(worst, error)
            else:  # pragma: no cover - the curvature module defines no other block
                raise ConfigError(f"unknown curvature block {type(block).__name__}")
        rest = [n for n in self.names if n not in covered]
        if rest:  # no curvature: the prior alone
            index = self._positions(rest)
            blocks.append(_Block("diagonal", index, {"b": prior_diag[index].clone()}))
        self.info["kron_fit_max_log_error"] = worst
        return blocks

    def _low_rank(self, chosen: list[Prior], tau: float) -> torch.Tensor | None:
        rows, start = [], 0
        for leaf in chosen:
            if isinstance(leaf, LowRankGaussianPrior):
                _, d, f = (t.cpu() for t in leaf.flat_parts(torch.float64))
                chol = torch.linalg.cholesky(torch.eye(f.shape[0], dtype=f.dtype) + (f / d) @ f.T)
                g = torch.linalg.solve_triangular(chol, f / d, upper=False)
                row = torch.zeros(f.shape[0], self.num_parameters, dtype=torch.float64)
                row[:, start:start + leaf.num_parameters] = math.sqrt(tau) * g
                rows.append(row)
            start += leaf.num_parameters
        return torch.cat(rows) if rows else None

    def _finish(self) -> None:
        if self.w is None:
            self.y, self.m_chol = None, None
            return
        self.y = self.solve_blocks(self.w).T  # B^-1 W^T [P, k]
        m = torch.eye(self.w.shape[0], dtype=torch.float64) - self.w @ self.y
        self.m_chol = torch.linalg.cholesky(0.5 * (m + m.T))

    # --- algebra ------------------------------------------------------------------------------------------------
    def solve_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """B^-1 applied to the rows of ``x`` [R, P] (float64)."""
        out = torch.empty_like(x, dtype=torch.float64)
        x = x.double()
        for block in self.blocks:
            idx = block.index.reshape(-1)
            out[:, idx] = block.solve(x[:, idx])
        return out

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """A^-1 applied to the rows of ``x`` [R, P] (or a vector [P]).

        Returns:
            float64, the shape of ``x``.
        """
        vector = x.dim() == 1
        rows = x.reshape(1, -1) if vector else x
        out = self.solve_blocks(rows)
        if self.y is not None:
            out = out + torch.cholesky_solve((rows.double() @ self.y).T, self.m_chol).T @ self.y.T
        return out.reshape(-1) if vector else out

    def log_det(self) -> torch.Tensor:
        """log det A (float64, 0-dim)."""
        total = sum(block.log_det() for block in self.blocks)
        if self.m_chol is not None:
            total = total + 2.0 * self.m_chol.diagonal().log().sum()
        return total

    def covariance_blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """``J_i A^-1 J_i^T`` for each example's Jacobian ``J_i`` [C, P] of ``rows`` [B, C, P]: the covariance of its
        linearised outputs.

        Returns:
            [B, C, C] float64.
        """
        b, c, p = rows.shape
        flat = rows.double().reshape(b * c, p)
        inner = torch.einsum("bip,bjp->bij", rows.double(), self.solve_blocks(flat).reshape(b, c, p))
        if self.y is not None:
            jy = (flat @ self.y).reshape(b, c, -1)
            inner = inner + torch.einsum("bik,bjk->bij", jy, torch.cholesky_solve(
                jy.reshape(b * c, -1).T, self.m_chol).T.reshape(b, c, -1))
        return inner

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws from N(0, A^-1) (add the MAP to get posterior samples).

        Args:
            num_samples: how many.
            generator: seeds the draws.

        Returns:
            [num_samples, P] float64.
        """
        eps = torch.randn(num_samples, self.num_parameters, dtype=torch.float64, generator=generator)
        out = torch.empty_like(eps)
        for block in self.blocks:
            idx = block.index.reshape(-1)
            out[:, idx] = block.root(eps[:, idx])
        if self.y is not None:
            eta = torch.randn(num_samples, self.w.shape[0], dtype=torch.float64, generator=generator)
            out = out + torch.linalg.solve_triangular(self.m_chol.T, eta.T, upper=True).T @ self.y.T
        return out

    def dense(self) -> torch.Tensor:
        """A as a dense [P, P] matrix (tests and tiny models only; K-FAC blocks with their Kronecker-fit prior)."""
        eye = torch.eye(self.num_parameters, dtype=torch.float64)
        b = torch.linalg.inv(self.solve_blocks(eye))
        return b - self.w.T @ self.w if self.w is not None else b


def separable_parts_of(chosen: list[Prior]):
    """The separable parts of the chosen leaves, in order."""
    return [part for leaf in chosen for part in separable_parts(leaf)]


def _kron_block(block: KronBlock, index: torch.Tensor, prior_diag: torch.Tensor) -> tuple[_Block, float]:
    """A K-FAC block of B with the Kronecker fit of its separable prior precision; returns the block and the fit's
    worst |log a - log fit|."""
    pieces = {n: index[i:j] for n, i, j in _ranges(block)}
    matrix_index = block.gather({n: pieces[n].double() for n in block.names}).long()  # [out, in']
    a = prior_diag[matrix_index]
    r, c = kronecker_shape(a)
    fit = r[:, None] * c[None, :]
    scale = (a / fit).max()  # the fit from above: fit >= a keeps A >= the exact posterior precision (and B >= W^T W)
    rho, kappa = scale * r, c
    error = float((a.log() - (rho[:, None] * kappa[None, :]).log()).abs().max())
    ir, ik = rho.rsqrt(), kappa.rsqrt()
    lam, qb = torch.linalg.eigh(ir[:, None] * block.b.double().cpu() * ir[None, :])
    mu, qa = torch.linalg.eigh(ik[:, None] * block.a.double().cpu() * ik[None, :])
    lm = (lam[:, None] * mu[None, :]).clamp(min=0.0)
    return _Block("kron", matrix_index, {"ir": ir, "ik": ik, "qb": qb, "qa": qa, "lm": lm}), error


def _ranges(block: KronBlock):
    start = 0
    for name, shape in zip(block.names, block.shapes, strict=False):
        size = math.prod(shape)
        yield name, start, start + size
        start += size
