"""Learned priors from a source posterior (Shwartz-Ziv et al. 2022, arXiv 2205.10279, Sec. 3.2):

    p(theta) = N(mu, lam * 1/2 (diag sigma^2 + D_k D_k^T / (k - 1)) + eps I)       (low-rank)
    p(theta) = N(mu, lam * sigma^2 + eps I)                                        (diagonal)

where ``mu, sigma^2, D`` are SWAG's mean, diagonal variance and deviation columns (a
:class:`~ptyl.posterior.SourcePosterior`), ``D_k`` the first k <= K columns and ``lam`` the scale of the *whole*
covariance. This used to be ``SourcePosterior.to_prior``; it lives next to the priors so that the posterior package
stays plain data.

>>> import torch
>>> from ptyl.posterior import SourcePosterior
>>> post = SourcePosterior({"w": torch.zeros(3)}, {"w": torch.ones(3)}, {"w": torch.eye(3)[:2]})
>>> prior = learned_prior(post, "lowrank", scale=2.0)  # eps: the registry's default, 1e-3
>>> prior.rank, prior.num_parameters
(2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from ptyl.errors import InvalidValueError
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.sharded import ShardedPosterior
from ptyl.priors.diagonal import DiagonalGaussianPrior
from ptyl.priors.lowrank import LowRankGaussianPrior, check_rank
from ptyl.priors.registry import PriorKind, PriorOptions
from ptyl.priors.sharded import ShardedPrior
from ptyl.validation import check_nonnegative_number, check_positive_number

__all__ = ["build_diagonal", "build_lowrank", "learned_prior"]


class _LazyMap(Mapping):
    """Read-only mapping that applies ``fn`` to ``source[key]`` on every access (nothing is kept)."""

    def __init__(self, source: Mapping[str, torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]):
        self._source, self._fn = source, fn

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._fn(self._source[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def learned_prior(
    posterior: SourcePosterior | ShardedPosterior,
    kind: str | PriorKind = PriorKind.LOWRANK,
    scale: float | None = None,
    eps: float | None = None,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> LowRankGaussianPrior | DiagonalGaussianPrior:
    """The rescaled prior N(mu, scale * 1/2 (diag sigma^2 + D_k D_k^T/(k-1)) + eps I) over the posterior's parameters.

    Args:
        posterior: the source posterior (match it to a model first: :meth:`SourcePosterior.matched_to`).
        kind: ``PriorKind.LOWRANK`` (diagonal + rank k) or ``PriorKind.DIAG`` (``scale * sigma^2 + eps``, no
            factor 1/2 since there is no low-rank half to share the variance with).
        scale: lambda > 0, multiplies the whole covariance (``None``: the kind's registry default, 100).
        eps: >= 0, isotropic jitter added to the diagonal, caps the precision (``None``: the kind's default, 1e-3).
        rank: k <= K columns to use (default: all K); k = 1 uses D D^T (no division by k - 1 = 0); k = 0 gives the
            diagonal prior ``scale * sigma^2 + eps``.
        dtype: storage dtype of the prior's tensors (e.g. ``torch.bfloat16``); computation is in the params' dtype.

    Returns:
        A :class:`LowRankGaussianPrior` (or :class:`DiagonalGaussianPrior` for the diagonal kind or k = 0); for a
        :class:`~ptyl.posterior.ShardedPosterior`, a :class:`~ptyl.priors.sharded.ShardedPrior` over its rows (a
        collective: one all-reduce of the capacitance).
    """
    if isinstance(posterior, ShardedPosterior):
        local = learned_prior(posterior.local, kind, scale, eps, rank, dtype)
        return ShardedPrior.from_shards(local, posterior.layout)
    kind = PriorKind.parse(kind)
    if kind not in _LEARNED:
        raise InvalidValueError(f"prior kind {str(kind)!r} is not a learned prior of one posterior; choose one of "
                                f"{tuple(str(k) for k in _LEARNED)}")
    options = kind.recipe.options(scale=scale, eps=eps, rank=rank)
    scale = check_positive_number(options.scale, "prior scale lambda")
    eps = check_nonnegative_number(options.eps, "eps")
    rank = options.rank
    k = check_rank(posterior.rank if rank is None else rank, posterior.rank)
    store = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    mean = _LazyMap(posterior.mean, store)
    if kind is PriorKind.DIAG or k == 0:
        return DiagonalGaussianPrior(mean, _LazyMap(posterior.variance, lambda v: store(scale * v + eps)))
    factor_scale = math.sqrt(scale / (2.0 * max(k - 1, 1)))
    # lazy: each rescaled tensor exists only while the prior packs it, so peak memory is posterior + prior
    diag = _LazyMap(posterior.variance, lambda v: store(0.5 * scale * v + eps))
    factor = _LazyMap(posterior.deviations, lambda dev: store(factor_scale * dev[:k]))
    return LowRankGaussianPrior(mean, diag, factor)


_LEARNED = (PriorKind.LOWRANK, PriorKind.DIAG)


def build_lowrank(backbone, posterior: SourcePosterior, options: PriorOptions) -> LowRankGaussianPrior:
    """Registry builder of the low-rank learned prior (see :func:`learned_prior`)."""
    return learned_prior(posterior, PriorKind.LOWRANK, options.scale, options.eps, options.rank, options.dtype)


def build_diagonal(backbone, posterior: SourcePosterior, options: PriorOptions) -> DiagonalGaussianPrior:
    """Registry builder of the diagonal learned prior (see :func:`learned_prior`)."""
    return learned_prior(posterior, PriorKind.DIAG, options.scale, options.eps, options.rank, options.dtype)
