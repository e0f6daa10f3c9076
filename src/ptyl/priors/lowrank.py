"""Learned low-rank plus diagonal Gaussian prior, evaluated with the Woodbury identity.

    p(theta) = N(mu, Sigma),   Sigma = diag(d) + U U^T,   U in R^{P x k}

From a SWAG posterior (mean mu, diagonal sigma^2, deviations D with K columns) the paper's prior is
``N(mu, lam * 1/2 (diag sigma^2 + D_k D_k^T / (k - 1)) + eps I)``: ``d = lam sigma^2 / 2 + eps`` and
``U = sqrt(lam / (2 (k - 1))) D_k`` — lam scales the *whole* covariance, so the factor is scaled by sqrt(lam)
(Shwartz-Ziv et al. 2022, arXiv 2205.10279, Sec. 3; the public reference code scaled the factor by lam, i.e. the
low-rank covariance by lam^2). See :func:`ptyl.priors.learned_prior`.

With ``r = theta - mu``, ``w = r / d``, ``C = I_k + U^T diag(d)^-1 U = L L^T`` (the capacitance, factorised once):

    r^T Sigma^-1 r = r^T w - |L^-1 U^T w|^2
    log det Sigma  = sum log d + log det C
    grad_theta (-log p) = Sigma^-1 r = w - U C^-1 U^T w / d

so one call is a handful of O(P k) kernels on flat buffers (mu [P], d [P], U^T as [k, P]) and two k x k triangular
solves; it never forms a P x P matrix. The only cross-coordinate quantities are r^T w and U^T w (k + 1 numbers):
sharded, they are summed over ranks between the kernel's two phases (:mod:`ptyl.priors.sharded`).

For the Laplace evidence (matrix determinant lemma and Woodbury):

    diag(Sigma^-1)                  = 1/d - colsum((L^-1 U^T D^-1)^2)
    log det(diag(h) + Sigma^-1)     = sum log(h + 1/d) - log det C + log det(I_k + U^T diag(h / (1 + d h)) U)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ptyl.errors import InvalidValueError
from ptyl.priors.base import LOG_2PI, Prior, rows_by_name
from ptyl.priors.checks import check_flat
from ptyl.sharding import ShardLayout

CHUNK = 1 << 22  # float64 numbers (32 MB) of a k x columns temporary when building / analysing (bounded memory)
CAST_CHUNK = 1 << 24  # factor entries converted at once when the factor is stored in another dtype than computed


def _columns(rank: int) -> int:
    """Columns per chunk so that a float64 [rank, columns] temporary holds about CHUNK numbers."""
    return max(1, CHUNK // max(rank, 1))


def _chunks(size: int, step: int):
    for start in range(0, size, step):
        yield slice(start, min(start + step, size))


def operand(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A buffer for an elementwise op in ``dtype``: narrower storage (bf16/fp16) promotes inside the kernel, wider
    storage is cast (else the result would be promoted to it)."""
    return buffer.to(dtype) if buffer.dtype.itemsize > dtype.itemsize else buffer


class LowRankGaussianPrior(Prior):
    """N(mean, diag(diag) + factor factor^T) over named parameters.

    Args:
        mean: name -> tensor of the parameter's shape.
        diag: name -> positive tensor of the parameter's shape (``d`` above, already scaled and with eps added).
        factor: name -> tensor of shape ``(k, *param_shape)`` (column j of ``U`` is ``factor[name][j]`` flattened).
    Stored tensors may be fp16/bf16 to save memory; every call computes in the parameters' dtype (float32 for half
    parameters) and the capacitance matrix is factorised once in float64. Buffers: ``mean`` [P], ``diag`` [P],
    ``factor`` [k, P], ``capacitance_chol`` [k, k] and ``log_norm`` (float64).
    """

    def __init__(
        self,
        mean: Mapping[str, torch.Tensor],
        diag: Mapping[str, torch.Tensor],
        factor: Mapping[str, torch.Tensor],
    ):
        if not (set(mean) == set(diag) == set(factor)):
            raise InvalidValueError("mean, diag and factor must name the same parameters")
        super().__init__(list(mean), [tuple(t.shape) for t in mean.values()])
        self._pack(mean, diag, factor)
        check_flat(self.mean, "mean", self.names, self.shapes)
        check_flat(self.diag, "diagonal variance", self.names, self.shapes, positive=True)
        check_flat(self.factor, "low-rank factor", self.names, self.shapes)
        capacitance, log_det_d = capacitance_terms(self.diag, self.factor)
        chol = torch.linalg.cholesky(capacitance)
        self.register_buffer("capacitance_chol", chol)
        log_det = log_det_d + 2.0 * chol.diagonal().log().sum()
        self.register_buffer("log_norm", log_det + self.num_parameters * LOG_2PI)

    def _pack(self, mean, diag, factor) -> None:
        """Copy tensor by tensor into preallocated flat buffers: a lazily rescaled input exists one tensor at a time."""
        first = self.names[0]
        m0, d0, u0 = mean[first], diag[first], factor[first]
        self.rank = int(u0.shape[0]) if u0.dim() > 0 else 0
        if self.rank < 1:
            raise InvalidValueError("a low-rank prior needs rank >= 1 (use DiagonalGaussianPrior for rank 0)")
        size, device = self.num_parameters, m0.device
        self.register_buffer("mean", torch.empty(size, dtype=m0.dtype, device=device))
        self.register_buffer("diag", torch.empty(size, dtype=d0.dtype, device=device))
        self.register_buffer("factor", torch.empty(self.rank, size, dtype=u0.dtype, device=device))
        start = 0
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=False)):
            m, d, u = (m0, d0, u0) if i == 0 else (mean[name], diag[name], factor[name])
            if tuple(d.shape) != shape or tuple(u.shape[1:]) != shape:
                raise InvalidValueError(
                    f"{name!r}: diag {tuple(d.shape)} / factor {tuple(u.shape)} do not fit mean {shape}"
                )
            if int(u.shape[0]) != self.rank:
                raise InvalidValueError(f"all factors need the same rank, got {self.rank} and {int(u.shape[0])}")
            stop = start + math.prod(shape)
            self.mean[start:stop].copy_(m.detach().reshape(-1))
            self.diag[start:stop].copy_(d.detach().reshape(-1))
            self.factor[:, start:stop].copy_(u.detach().reshape(self.rank, -1))
            start = stop

    def flat_parts(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean [P], diag [P] and factor [k, P] over all parameters in ``names`` order (copies; for analysis).

        Args:
            dtype: of the copies.

        Returns:
            ``(mu, d, U)`` with ``Sigma = diag(d) + U^T U``.
        """
        return (self.mean.to(dtype, copy=True), self.diag.to(dtype, copy=True), self.factor.to(dtype, copy=True))

    # --- the per-call kernel -------------------------------------------------------------------------------------
    def penalty_partials(self, xs: Iterable[torch.Tensor], need_value: bool, need_grad: bool):
        quad = v = dtype = None
        kept, start = [], 0
        for x in xs:
            dtype = x.dtype
            mean, diag, factor = self._slice(start, x.numel())
            start += x.numel()
            r = x.sub_(operand(mean, dtype))
            d = operand(diag, dtype)
            w = r / d
            if need_value:  # float64 across groups
                q = torch.dot(r, w)
                quad = q.double() if quad is None else quad + q
            p = self._project(factor, w).double()
            v = p if v is None else v + p
            if need_grad:
                kept.append((w, d, factor))
        return quad, v, (kept, dtype)

    def penalty_finish(self, quad, v, state, need_value: bool, need_grad: bool):
        kept, dtype = state
        chol = self.capacitance_chol
        y = torch.linalg.solve_triangular(chol, v.unsqueeze(1), upper=False)  # L^-1 U^T w
        value = None
        if need_value:
            y1 = y.squeeze(1)
            value = (quad - torch.dot(y1, y1) + self.log_norm) * 0.5
        if not need_grad:
            return value, None
        z = torch.linalg.solve_triangular(chol.mT, y, upper=True).squeeze(1).to(dtype)  # C^-1 U^T w
        return value, [w.sub_(self._expand(factor, z).div_(d)) for w, d, factor in kept]

    def _slice(self, start: int, size: int):
        if size == self.num_parameters:
            return self.mean, self.diag, self.factor
        part = slice(start, start + size)
        return self.mean[part], self.diag[part], self.factor[:, part]

    def _project(self, factor: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """U^T w [k] (``factor @ w``), converting a differently stored factor in bounded chunks."""
        if factor.dtype == w.dtype:
            return factor @ w
        v = None
        for part in _chunks(w.numel(), max(1, CAST_CHUNK // self.rank)):
            term = factor[:, part].to(w.dtype) @ w[part]
            v = term if v is None else v + term
        return v

    def _expand(self, factor: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """U z [P] (``z @ factor``), chunked like :meth:`_project`."""
        if factor.dtype == z.dtype:
            return z @ factor
        out = torch.empty(factor.shape[1], dtype=z.dtype, device=z.device)
        for part in _chunks(out.numel(), max(1, CAST_CHUNK // self.rank)):
            torch.mm(z.unsqueeze(0), factor[:, part].to(z.dtype), out=out[part].unsqueeze(0))
        return out

    # --- curvature interface -------------------------------------------------------------------------------------
    def precision_diagonal(self) -> torch.Tensor:
        """diag(Sigma^-1) = 1/d - colsum((L^-1 U^T D^-1)^2), chunked.

        Returns:
            A flat float64 [P] tensor on the prior's device.
        """
        out = torch.empty(self.num_parameters, dtype=torch.float64, device=self.diag.device)
        for part in _chunks(self.num_parameters, _columns(self.rank)):
            d = self.diag[part].double()
            v = torch.linalg.solve_triangular(self.capacitance_chol, self.factor[:, part].double() / d, upper=False)
            out[part] = 1.0 / d - v.square().sum(0)
        return out

    def log_det_partials(self, h: torch.Tensor) -> torch.Tensor:
        """``[sum log(h + 1/d), U^T diag(h / (1 + d h)) U (k x k)]`` over these rows (:meth:`Prior.log_det_partials`).

        Args:
            h: the curvature diagonal of these rows, float64.

        Returns:
            ``1 + k^2`` float64 numbers.
        """
        device = self.diag.device
        inner = torch.zeros(self.rank, self.rank, dtype=torch.float64, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        h = h.to(device)
        for part in _chunks(self.num_parameters, _columns(self.rank)):
            d, hp, u = self.diag[part].double(), h[part], self.factor[:, part].double()
            inner += (u * (hp / (1.0 + d * hp))) @ u.T
            total += torch.log(hp + 1.0 / d).sum()
        return torch.cat([total.reshape(1), inner.reshape(-1)])

    def log_det_finish(self, sums: torch.Tensor) -> torch.Tensor:
        """``sum log(h + 1/d) - log det C + log det(I_k + U^T diag(h / (1 + d h)) U)`` from the summed partials.

        Args:
            sums: :meth:`log_det_partials` summed over shards.

        Returns:
            A float64 0-dim tensor.
        """
        k = self.rank
        inner = sums[1:1 + k * k].reshape(k, k) + torch.eye(k, dtype=torch.float64, device=sums.device)
        log_det_c = 2.0 * self.capacitance_chol.diagonal().log().sum().to(sums.device)
        return sums[0] - log_det_c + torch.linalg.slogdet(inner)[1]

    def mean_flat(self) -> torch.Tensor:
        """The centre mu (a copy in the stored dtype).

        Returns:
            A flat [P] tensor.
        """
        return self.mean.clone()

    # --- sharding ----------------------------------------------------------------------------------------------
    def local_rows(self, layout: ShardLayout) -> LowRankGaussianPrior:
        """This rank's rows of mu, d and U with the global capacitance and normaliser (see :meth:`Prior.local_rows`).

        Args:
            layout: the rows of every parameter.

        Returns:
            The low-rank prior over the rows.
        """
        local = LowRankGaussianPrior(rows_by_name(self.mean, layout, self.shapes),
                                     rows_by_name(self.diag, layout, self.shapes),
                                     rows_by_name(self.factor, layout, self.shapes))
        local.capacitance_chol.copy_(self.capacitance_chol)
        local.log_norm.copy_(self.log_norm)
        return local

    def normalizer_partials(self) -> torch.Tensor:
        """``C - I = U^T D^-1 U`` (k x k) and ``sum log d`` of these rows.

        Returns:
            ``k^2 + 1`` float64 numbers.
        """
        capacitance, log_det_d = capacitance_terms(self.diag, self.factor)
        eye = torch.eye(self.rank, dtype=torch.float64, device=capacitance.device)
        return torch.cat([(capacitance - eye).reshape(-1), log_det_d.reshape(1)])

    def set_global_normalizer(self, sums: torch.Tensor, numel: int) -> None:
        """Factorise the global capacitance and set the global normaliser (see :meth:`Prior.set_global_normalizer`).

        Args:
            sums: :meth:`normalizer_partials` summed over ranks.
            numel: the global P.
        """
        k = self.rank
        capacitance = sums[:k * k].reshape(k, k) + torch.eye(k, dtype=torch.float64, device=sums.device)
        chol = torch.linalg.cholesky(capacitance)
        self.capacitance_chol.copy_(chol)
        self.log_norm.copy_(sums[k * k] + 2.0 * chol.diagonal().log().sum() + numel * LOG_2PI)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def capacitance_terms(diag: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = I_k + U^T D^-1 U`` and ``sum log d`` in float64 (chunked). Sharded: sum ``C - I`` and the log term over
    ranks before the Cholesky factorisation."""
    rank = factor.shape[0]
    capacitance = torch.eye(rank, dtype=torch.float64, device=factor.device)
    log_det_d = torch.zeros((), dtype=torch.float64, device=factor.device)
    for part in _chunks(diag.numel(), _columns(rank)):
        d64 = diag[part].double()
        u64 = factor[:, part].double()
        capacitance += (u64 / d64) @ u64.T
        log_det_d += d64.log().sum()
    return capacitance, log_det_d


def check_rank(rank: int, available: int) -> int:
    """Validate a requested rank k against the K deviation columns available."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise InvalidValueError(f"rank must be a non-negative integer, got {rank!r}")
    if rank > available:
        raise InvalidValueError(f"rank k={rank} exceeds the K={available} deviation columns stored in the posterior")
    return rank


__all__ = ["LowRankGaussianPrior", "capacitance_terms", "check_rank"]
