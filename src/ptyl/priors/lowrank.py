"""Learned low-rank plus diagonal Gaussian prior, evaluated with the Woodbury identity.

    p(theta) = N(mu, Sigma),   Sigma = diag(d) + U U^T,   U in R^{P x k}

From a SWAG posterior (mean mu, diagonal sigma^2, deviations D with K columns) the paper's prior is
``N(mu, lam * 1/2 (diag sigma^2 + D_k D_k^T / (k - 1)) + eps I)``: ``d = lam sigma^2 / 2 + eps`` and
``U = sqrt(lam / (2 (k - 1))) D_k`` — lam scales the *whole* covariance, so the factor is scaled by sqrt(lam)
(Shwartz-Ziv et al. 2022, arXiv 2205.10279, Sec. 3; the public reference code scaled the factor by lam, i.e. the
low-rank covariance by lam^2). See :func:`ptyl.priors.learned_prior`.

With ``r = theta - mu``, ``w = r / d``, ``C = I_k + U^T diag(d)^-1 U`` (the capacitance, fixed, factorised once):

    r^T Sigma^-1 r = r^T w - (U^T w)^T C^-1 (U^T w)
    log det Sigma  = sum log d + log det C
    grad_theta log p = -(w - (U C^-1 U^T w) / d)

so one call costs O(P k + k^2) and never forms a P x P (or P x k temporary beyond the stored factor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ptyl.errors import InvalidValueError
from ptyl.priors.base import LOG_2PI, Prior
from ptyl.priors.checks import check_finite, check_positive


GROUP_NUMEL = 1 << 21  # pack small tensors into groups of >= 2M numbers: per-call cost is a few ops per group


class LowRankGaussianPrior(Prior):
    """N(mean, diag(diag) + factor factor^T) over named parameters.

    Args:
        mean: name -> tensor of the parameter's shape.
        diag: name -> positive tensor of the parameter's shape (``d`` above, already scaled and with eps added).
        factor: name -> tensor of shape ``(k, *param_shape)`` (column j of ``U`` is ``factor[name][j]`` flattened).
    Stored tensors may be fp16/bf16 to save memory (at some speed cost on CPU: they are upcast on every call); every
    call computes in the parameters' dtype and the capacitance matrix is factorised once in float64.

    Internally consecutive parameters are packed into flat groups of at least ``GROUP_NUMEL`` numbers, so a ResNet's
    60+ small tensors cost a handful of vector ops per call instead of dozens each.
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
        ranks = {int(f.shape[0]) for f in factor.values()}
        if len(ranks) != 1:
            raise InvalidValueError(f"all factors need the same rank, got {sorted(ranks)}")
        self.rank = ranks.pop()
        if self.rank < 1:
            raise InvalidValueError("a low-rank prior needs rank >= 1 (use DiagonalGaussianPrior for rank 0)")
        for i, name in enumerate(self.names):
            m, d, u = mean[name], diag[name], factor[name]
            if tuple(d.shape) != self.shapes[i] or tuple(u.shape[1:]) != self.shapes[i]:
                raise InvalidValueError(
                    f"{name!r}: diag {tuple(d.shape)} / factor {tuple(u.shape)} do not fit mean {self.shapes[i]}"
                )
            check_finite(m, f"mean of {name!r}")
            check_positive(d, f"diagonal variance of {name!r}")
            check_finite(u, f"low-rank factor of {name!r}")
        self.groups = self._plan_groups()
        shape_of = dict(zip(self.names, self.shapes))
        self.group_shapes = [[shape_of[n] for n in names] for names in self.groups]
        capacitance = log_det_d = None
        for j, names in enumerate(self.groups):
            m = torch.cat([mean[n].detach().reshape(-1) for n in names])
            d = torch.cat([diag[n].detach().reshape(-1) for n in names])
            u = torch.cat([factor[n].detach().reshape(self.rank, -1) for n in names], dim=1)
            self.register_buffer(f"mean_g{j}", m)
            self.register_buffer(f"diag_g{j}", d)
            self.register_buffer(f"factor_g{j}", u)
            if capacitance is None:  # on the tensors' device: a CPU accumulator cannot take CUDA terms in place
                capacitance = torch.eye(self.rank, dtype=torch.float64, device=u.device)
                log_det_d = torch.zeros((), dtype=torch.float64, device=u.device)
            d64 = d.double()
            for start in range(0, d.numel(), 1 << 20):  # bounded float64 temporaries (slices: no index tensor)
                chunk = slice(start, start + (1 << 20))
                u64 = u[:, chunk].double()
                capacitance += (u64 / d64[chunk]) @ u64.T
            log_det_d += d64.log().sum()
        chol = torch.linalg.cholesky(capacitance)
        self.register_buffer("capacitance_chol", chol)
        log_det = log_det_d + 2.0 * chol.diagonal().log().sum()
        self.register_buffer("log_norm", log_det + self.num_parameters * LOG_2PI)

    def _plan_groups(self) -> list[list[str]]:
        groups, current, size = [], [], 0
        for name, shape in zip(self.names, self.shapes):
            current.append(name)
            size += math.prod(shape)
            if size >= GROUP_NUMEL:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)
        return groups

    def _group(self, j: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (getattr(self, f"mean_g{j}").to(dtype), getattr(self, f"diag_g{j}").to(dtype),
                getattr(self, f"factor_g{j}").to(dtype))

    def flat_parts(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean [P], diag [P] and factor [k, P] over all parameters in ``names`` order (copies; for analysis)."""
        parts = [self._group(j, dtype) for j in range(len(self.groups))]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts], dim=1))

    def _quad_and_grad(self, tensors: list[torch.Tensor], need_grad: bool):
        """Mahalanobis term r^T Sigma^-1 r and, if asked, grad log p = -Sigma^-1 r for every tensor."""
        dtype, device = tensors[0].dtype, tensors[0].device
        quad = torch.zeros((), dtype=torch.float64, device=device)
        v = torch.zeros(self.rank, dtype=dtype, device=device)
        ws, start = [], 0
        for j, names in enumerate(self.groups):
            group = tensors[start:start + len(names)]
            start += len(names)
            m, d, u = self._group(j, dtype)
            if len(group) > 1:  # the concatenation is a fresh copy: centre it in place
                w = torch.cat([t.detach().reshape(-1) for t in group]).sub_(m)
            else:
                w = group[0].detach().reshape(-1) - m
            w_over = w / d
            quad += torch.dot(w, w_over).double()  # float64 accumulation across groups: P can be 1e7+
            v += u @ w_over
            ws.append(w_over)
        chol = self.capacitance_chol.to(device)
        z = torch.cholesky_solve(v.double().unsqueeze(1), chol).squeeze(1)
        quad = quad - torch.dot(v.double(), z)
        if not need_grad:
            return quad, None
        z = z.to(dtype)
        grads = []
        for j, w_over in enumerate(ws):
            _, d, u = self._group(j, dtype)
            g = w_over.sub_((z @ u).div_(d)).neg_()  # -(w/d - U z / d), reusing w/d's memory
            shapes = self.group_shapes[j]
            grads.extend(part.view(shape) for part, shape in zip(g.split([math.prod(s) for s in shapes]), shapes))
        return quad, grads

    def _log_prob(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if need_grad:
            return _LowRankLogProb.apply(self, *tensors)
        quad, _ = self._quad_and_grad(tensors, need_grad=False)
        return (-0.5 * (quad + self.log_norm.to(quad.device))).to(tensors[0].dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, groups={len(self.groups)}"


class _LowRankLogProb(torch.autograd.Function):
    """Fused value and gradient: the gradient is computed in the forward pass (it shares all intermediates), so the
    backward pass only scales it. Saves one P-sized tensor instead of autograd's chain of temporaries."""

    @staticmethod
    def forward(ctx, prior: LowRankGaussianPrior, *tensors: torch.Tensor) -> torch.Tensor:
        quad, grads = prior._quad_and_grad(list(tensors), need_grad=True)
        ctx.save_for_backward(*grads)
        return (-0.5 * (quad + prior.log_norm.to(quad.device))).to(tensors[0].dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        return (None, *(g * grad_output.to(g.dtype) for g in ctx.saved_tensors))


def check_rank(rank: int, available: int) -> int:
    """Validate a requested rank k against the K deviation columns available."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise InvalidValueError(f"rank must be a non-negative integer, got {rank!r}")
    if rank > available:
        raise InvalidValueError(f"rank k={rank} exceeds the K={available} deviation columns stored in the posterior")
    return rank


__all__ = ["LowRankGaussianPrior", "check_rank"]
