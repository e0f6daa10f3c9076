"""Differentiable prior families: a Gaussian prior whose hyper-parameters are ``nn.Parameter`` s (in log space).

Each family reproduces one prior kind of :func:`ptyl.priors.make_prior` exactly (same convention as
:meth:`ptyl.posterior.SourcePosterior.to_prior`, Shwartz-Ziv et al. 2022, https://arxiv.org/abs/2205.10279), but its
log-density is a differentiable function of the hyper-parameters, so an objective (DE-ELBO, Laplace evidence) can
learn them by gradient:

=====================  =====================================================================  ====================
family                 Sigma(h)                                                               hyper-parameters
=====================  =====================================================================  ====================
learned low-rank       lam * 1/2 (diag s2 + D D^T / max(k-1, 1)) + eps I                        log lam, log eps
learned diagonal       lam * s2 + eps                                                           log lam, log eps
block low-rank         one learned low-rank family per block, one lam_b each, shared eps       log lam_b, log eps
L2-SP / standard       v I, centred on theta_0 / on 0                                           log v
head                   v_h I, centred on 0                                                      log v_h
=====================  =====================================================================  ====================

Every leaf family is ``N(mu, diag(d) + U^T U)`` with ``d = lam a + eps`` and ``U = sqrt(lam) V`` (``a``, ``V`` fixed);
:class:`~ptyl.autotune.woodbury.Woodbury` evaluates it without a P x P matrix. Cost per call: with eps = 0 (a fixed eps
of 0) Sigma = lam Sigma_0 and Sigma_0 is factorised once, so a call is O(P k + k^3); with eps > 0 the capacitance
depends on eps / lam and is rebuilt, O(P k^2) per call.
``E_q[log p]`` under a diagonal Gaussian q = N(m, diag s^2) is closed form:

    E_q[log p(theta)] = log p(m) - 1/2 tr(Sigma^-1 diag s^2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ptyl.autotune.woodbury import FactorWoodbury, ScaledWoodbury, Woodbury
from ptyl.errors import ConfigError, InvalidValueError
from ptyl.params import check_names_and_shapes, named_parameters
from ptyl.priors.base import LOG_2PI, CompositePrior, Prior
from ptyl.priors.block import BlockLowRankPrior
from ptyl.priors.diagonal import DiagonalGaussianPrior
from ptyl.priors.isotropic import IsotropicGaussianPrior
from ptyl.priors.lowrank import LowRankGaussianPrior

Params = nn.Module | Mapping[str, torch.Tensor]


def check_hyper(value: float, what: str, allow_zero: bool = False) -> float:
    """A hyper-parameter's initial value must be finite and positive (>= 0 where ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


def set_log_hyper(module: nn.Module, name: str, value: float | nn.Parameter, learn: bool, dtype: torch.dtype) -> None:
    """Register ``log value`` on ``module`` as a parameter (``learn``) or a buffer; a given Parameter is shared."""
    if isinstance(value, nn.Parameter):
        setattr(module, name, value)
        return
    t = torch.tensor(math.log(value), dtype=dtype)
    if learn:
        setattr(module, name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


class LeafFamily(nn.Module):
    """A Gaussian prior family over named parameters, stored flat in ``names`` order (float64 by default)."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], dtype: torch.dtype):
        super().__init__()
        if not shapes:
            raise ConfigError("a prior family needs at least one parameter")
        self.names: tuple[str, ...] = tuple(shapes)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(tuple(int(d) for d in s) for s in shapes.values())
        self.numels = [math.prod(s) for s in self.shapes]
        self.dtype = dtype

    @property
    def num_parameters(self) -> int:
        return sum(self.numels)

    def leaves(self) -> list[LeafFamily]:
        return [self]

    def flatten(self, params: Params) -> torch.Tensor:
        """The covered tensors of ``params`` as one flat vector [P] in ``names`` order, in the family's dtype."""
        named = named_parameters(params)
        check_names_and_shapes(dict(zip(self.names, self.shapes, strict=False)), named, what="prior family")
        return torch.cat([named[n].reshape(-1).to(self.dtype) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes, strict=False)}

    # --- what a subclass defines -----------------------------------------------------------------------------
    def center(self) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def variance_diag(self) -> torch.Tensor:  # pragma: no cover - abstract
        """d [P] (differentiable in the hyper-parameters)."""
        raise NotImplementedError

    def factor(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(f, V) with U = f V: a differentiable scalar and a fixed [k, P] matrix; None without a low-rank part."""
        return None

    @property
    def variance_shape_fixed(self) -> bool:
        """True when d(h) changes only by a common factor (then K-FAC blocks are prepared once per curvature)."""
        return False

    def covariance_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d [P], U [k, P] or None) with Sigma = diag(d) + U^T U, differentiable in the hyper-parameters."""
        f = self.factor()
        return self.variance_diag(), None if f is None else f[0] * f[1]

    def hyper_values(self) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_prior(self) -> Prior:  # pragma: no cover - abstract
        """The existing ptyl prior at the current hyper-parameters (what training then uses)."""
        raise NotImplementedError

    def prior_kwargs(self) -> dict:
        return self.hyper_values()

    # --- densities ----------------------------------------------------------------------------------------------
    def woodbury(self) -> Woodbury | ScaledWoodbury:
        return Woodbury.build(*self.covariance_parts())

    def residual(self, flat: torch.Tensor) -> torch.Tensor:
        c = self.center()
        return flat if c is None else flat - c

    def mahalanobis(self, params: Params) -> torch.Tensor:
        """(theta - mu)^T Sigma^-1 (theta - mu)."""
        return self.woodbury().mahalanobis(self.residual(self.flatten(params)))

    def log_prob(self, params: Params) -> torch.Tensor:
        """log N(theta; mu, Sigma(h)), differentiable in theta and the hyper-parameters."""
        wb = self.woodbury()
        quad = wb.mahalanobis(self.residual(self.flatten(params)))
        return -0.5 * (quad + wb.log_det() + self.num_parameters * LOG_2PI)

    def expected_log_prob(self, mean: Params, variance: Params) -> torch.Tensor:
        """E_{N(m, diag s2)}[log p(theta)] = log p(m) - 1/2 tr(Sigma^-1 diag s2)."""
        wb = self.woodbury()
        quad = wb.mahalanobis(self.residual(self.flatten(mean)))
        trace = wb.trace_with_diag(self.flatten(variance))
        return -0.5 * (quad + trace + wb.log_det() + self.num_parameters * LOG_2PI)

    def extra_repr(self) -> str:
        values = ", ".join(f"{k}={v:.4g}" for k, v in self.hyper_values().items())
        return f"parameters={self.num_parameters:,}, {values}"


class LearnedFamily(LeafFamily):
    """N(mu, diag(lam a + eps) + lam V^T V): the learned low-rank (``factor`` given) or diagonal prior.

    Args:
        mean, base_diag: name -> tensor (``a``: s2 / 2 for the low-rank prior, s2 for the diagonal one).
        base_factor: name -> (k, *shape) tensor (``V = D_k / sqrt(2 max(k - 1, 1))``), or None.
        scale, eps: initial lam > 0 and eps >= 0; ``learn_scale`` / ``learn_eps`` make them parameters
            (a learned eps must start > 0: it lives in log space). ``log_eps`` may be passed to share one eps.
        label: suffix of the hyper-parameter names in :meth:`hyper_values` (e.g. a block name).
        scale_name: how :meth:`hyper_values` names lam (``"variance"`` for a kind whose axis is a variance).
    """

    def __init__(self, mean, base_diag, base_factor=None, *, scale=1.0, eps=0.0, learn_scale=True, learn_eps=False,
                 log_eps: nn.Parameter | None = None, label: str = "", scale_name: str = "scale",
                 dtype=torch.float64):
        super().__init__({n: tuple(t.shape) for n, t in mean.items()}, dtype)
        flat = lambda d: torch.cat([d[n].detach().reshape(-1).to(dtype) for n in self.names])  # noqa: E731
        self.register_buffer("mean", flat(mean))
        self.register_buffer("base_diag", flat(base_diag))
        if base_factor is not None:
            k = int(next(iter(base_factor.values())).shape[0])
            v = torch.cat([base_factor[n].detach().reshape(k, -1).to(dtype) for n in self.names], dim=1)
            self.register_buffer("base_factor", v)
        else:
            self.register_buffer("base_factor", None)
        set_log_hyper(self, "log_scale", check_hyper(scale, "the prior scale lambda"), learn_scale, dtype)
        self.register_buffer("fixed_eps", None)
        if log_eps is not None:  # shared with other blocks
            set_log_hyper(self, "log_eps", log_eps, True, dtype)
        elif learn_eps:
            set_log_hyper(self, "log_eps", check_hyper(eps, "eps (learned in log space)"), True, dtype)
        else:
            self.register_buffer("log_eps", None)
            self.fixed_eps = torch.tensor(check_hyper(eps, "eps", allow_zero=True), dtype=dtype)
        self.label = label
        self.scale_name = scale_name
        self.scaled_only = self.log_eps is None and float(eps) == 0.0  # Sigma = lam Sigma_0: the O(P k) path

    @property
    def rank(self) -> int:
        return 0 if self.base_factor is None else int(self.base_factor.shape[0])

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def eps(self) -> torch.Tensor:
        return self.fixed_eps if self.log_eps is None else self.log_eps.exp()

    def center(self) -> torch.Tensor:
        return self.mean

    def variance_diag(self) -> torch.Tensor:
        return self.scale() * self.base_diag + self.eps()

    def factor(self):
        return None if self.base_factor is None else (self.scale().sqrt(), self.base_factor)

    @property
    def variance_shape_fixed(self) -> bool:
        return self.scaled_only

    def woodbury(self):
        if not self.scaled_only:
            if self.base_factor is None:
                return Woodbury.build(self.variance_diag(), None)
            return FactorWoodbury(self.variance_diag(), self.base_factor, self.scale())
        key = (self.base_diag.device, self.base_diag.dtype)
        if getattr(self, "_base_cache", (None,))[0] != key:  # Sigma_0 = diag(a) + V^T V, factorised once
            with torch.no_grad():
                base = Woodbury.build(self.base_diag, self.base_factor)
                self._base_cache = (key, base, base.precision_diagonal())
        return ScaledWoodbury(self._base_cache[1], self._base_cache[2], self.scale())

    def hyper_values(self) -> dict[str, float]:
        suffix = f"[{self.label}]" if self.label else ""
        return {f"{self.scale_name}{suffix}": float(self.scale().detach()), "eps": float(self.eps().detach())}

    def to_prior(self) -> Prior:
        with torch.no_grad():
            d, u = self.covariance_parts()
            mean, diag = self.unflatten(self.mean), self.unflatten(d)
            if u is None:
                return DiagonalGaussianPrior(mean, diag)
            factor = {n: t.reshape(self.rank, *s) for n, t, s in
                      zip(self.names, u.split(self.numels, dim=1), self.shapes, strict=False)}
            return LowRankGaussianPrior(mean, diag, factor)


class IsotropicFamily(LeafFamily):
    """N(center, v I): L2-SP (``center`` = pretrained weights), standard (``center=None``: zero) or the head prior.

    ``hyper_name`` names v in :meth:`hyper_values` (``"variance"`` for the backbone, ``"head_variance"``).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], variance: float, center: Mapping | None = None, *,
                 learn: bool = True, hyper_name: str = "variance", dtype=torch.float64):
        super().__init__(shapes, dtype)
        if center is not None:
            self.register_buffer("center_flat", torch.cat([center[n].detach().reshape(-1).to(dtype)
                                                           for n in self.names]))
        else:
            self.register_buffer("center_flat", None)
        set_log_hyper(self, "log_variance", check_hyper(variance, f"the prior {hyper_name}"), learn, dtype)
        self.hyper_name = hyper_name

    def variance(self) -> torch.Tensor:
        return self.log_variance.exp()

    def center(self) -> torch.Tensor | None:
        return self.center_flat

    def variance_diag(self) -> torch.Tensor:
        return self.variance().expand(self.num_parameters)

    variance_shape_fixed = True

    def woodbury(self):
        return ScaledWoodbury(_UnitCovariance(self.num_parameters), 1.0, self.variance())

    def hyper_values(self) -> dict[str, float]:
        return {self.hyper_name: float(self.variance().detach())}

    def to_prior(self) -> Prior:
        center = None if self.center_flat is None else self.unflatten(self.center_flat)
        return IsotropicGaussianPrior(dict(zip(self.names, self.shapes, strict=True)), float(self.variance().detach()),
                                      center)


class _UnitCovariance:
    """Sigma_0 = I (for :class:`ScaledWoodbury`): the isotropic families cost O(P)."""

    def __init__(self, size: int):
        self.diag = torch.empty(size, device="meta")  # only its numel is read

    def mahalanobis(self, r: torch.Tensor) -> torch.Tensor:
        return r.pow(2).sum()

    def log_det(self) -> float:
        return 0.0

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        return r


class CompositeFamily(nn.Module):
    """Independent families over disjoint parameter groups (e.g. backbone + head): log-densities add.

    ``unregularized`` lists trainable parameters deliberately left without a prior (point estimates everywhere).
    """

    def __init__(self, parts: Mapping[str, LeafFamily | CompositeFamily], unregularized: Sequence[str] = ()):
        super().__init__()
        if not parts:
            raise ConfigError("a composite prior family needs at least one part")
        self.part_names: tuple[str, ...] = tuple(parts)
        self.parts = nn.ModuleList(list(parts.values()))  # ModuleList: block names contain '.'
        names = [n for p in self.parts for n in p.names]
        if len(names) != len(set(names)):
            raise ConfigError("two parts of a prior family cover the same parameter")
        self.names: tuple[str, ...] = tuple(names)
        self.shapes = tuple(s for p in self.parts for s in p.shapes)
        self.unregularized: tuple[str, ...] = tuple(unregularized)

    @property
    def num_parameters(self) -> int:
        return sum(p.num_parameters for p in self.parts)

    def part(self, name: str):
        return self.parts[self.part_names.index(name)]

    def leaves(self) -> list[LeafFamily]:
        return [leaf for p in self.parts for leaf in p.leaves()]

    def _sum(self, fn) -> torch.Tensor:
        return sum((fn(leaf) for leaf in self.leaves()), start=torch.zeros((), dtype=self.leaves()[0].dtype))

    def log_prob(self, params: Params) -> torch.Tensor:
        named = named_parameters(params)
        return self._sum(lambda leaf: leaf.log_prob(named))

    def mahalanobis(self, params: Params) -> torch.Tensor:
        named = named_parameters(params)
        return self._sum(lambda leaf: leaf.mahalanobis(named))

    def expected_log_prob(self, mean: Params, variance: Params) -> torch.Tensor:
        m, v = named_parameters(mean), named_parameters(variance)
        return self._sum(lambda leaf: leaf.expected_log_prob(m, v))

    def hyper_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts:
            out.update(p.hyper_values())
        return out

    def prior_kwargs(self) -> dict:
        """The selected values as keyword arguments of :func:`ptyl.priors.make_prior` (block: ``scale`` per block)."""
        out: dict = {}
        for p in self.parts:
            out.update(p.prior_kwargs() if isinstance(p, CompositeFamily) else p.hyper_values())
        return out

    def to_prior(self) -> Prior:
        parts = dict(zip(self.part_names, (p.to_prior() for p in self.parts), strict=False))
        return CompositePrior(parts, unregularized=self.unregularized)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:.4g}" for k, v in self.hyper_values().items())


class BlockFamily(CompositeFamily):
    """One :class:`LearnedFamily` per block (own lam_b, one shared eps): the block low-rank prior
    (:func:`ptyl.priors.block_prior`; cross-block covariances dropped)."""

    def __init__(self, blocks: Mapping[str, LearnedFamily]):
        super().__init__(blocks)

    def prior_kwargs(self) -> dict:
        leaves = self.leaves()
        return {"scale": {b: float(leaf.scale().detach()) for b, leaf in zip(self.part_names, leaves, strict=False)},
                "eps": float(leaves[0].eps().detach())}

    def to_prior(self) -> Prior:
        return BlockLowRankPrior(dict(zip(self.part_names, (leaf.to_prior() for leaf in self.parts), strict=False)))


Family = LeafFamily | CompositeFamily

__all__ = ["BlockFamily", "CompositeFamily", "Family", "IsotropicFamily", "LeafFamily", "LearnedFamily"]
