"""The learned source posterior: SWAG's mean, diagonal variance and deviation matrix, keyed by parameter name.

This is what a prior file stores: plain data, no prior code (so ``ptyl.priors`` depends on this package, never the
other way round). :func:`ptyl.priors.learned_prior` turns it into a downstream prior by the paper's rescaling
(Shwartz-Ziv et al. 2022, arXiv 2205.10279):

    p(theta) = N(mu, lam * 1/2 (diag sigma^2 + D_k D_k^T / (k - 1)) + eps I)

where D_k holds the first k stored deviation columns (k <= K). ``lam`` multiplies the whole covariance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptyl.errors import InvalidValueError, ParameterMismatchError
from ptyl.params import named_parameters
from ptyl.validation import check_finite, check_positive


@dataclass
class SourcePosterior:
    """SWAG posterior over named parameters.

    Attributes:
        mean: name -> SWA mean (parameter shape).
        variance: name -> diagonal variance sigma^2 (parameter shape, > 0).
        deviations: name -> (K, *shape) deviation columns, oldest first (K may be 0).
        metadata: free-form JSON-able description (source data, architecture, objective, num_snapshots...).
    """

    mean: dict[str, torch.Tensor]
    variance: dict[str, torch.Tensor]
    deviations: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def names(self) -> list[str]:
        return list(self.mean)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.mean.items()}

    @property
    def rank(self) -> int:
        return int(next(iter(self.deviations.values())).shape[0]) if self.deviations else 0

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.mean.values())

    def validate(self) -> None:
        """Names agree, shapes agree, values finite, variances positive, one rank for all."""
        if not self.mean:
            raise InvalidValueError("a posterior needs at least one parameter")
        for other, what in ((self.variance, "variance"), (self.deviations, "deviations")):
            if set(other) != set(self.mean):
                diff = sorted(set(other) ^ set(self.mean))
                raise ParameterMismatchError(f"mean and {what} name different parameters: {diff[:5]}")
        ranks = set()
        for name, m in self.mean.items():
            v, dev = self.variance[name], self.deviations[name]
            if v.shape != m.shape:
                raise InvalidValueError(f"variance of {name!r} has shape {tuple(v.shape)}, mean {tuple(m.shape)}")
            if tuple(dev.shape[1:]) != tuple(m.shape):
                raise InvalidValueError(f"deviations of {name!r} have shape {tuple(dev.shape)}, "
                                        f"need (K, *{tuple(m.shape)})")
            ranks.add(int(dev.shape[0]))
            check_finite(m, f"mean of {name!r}")
            check_positive(v, f"variance of {name!r}")
            check_finite(dev, f"deviations of {name!r}")
        if len(ranks) > 1:
            raise InvalidValueError(f"deviation matrices disagree on K: {sorted(ranks)}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SourcePosterior:
        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: t.to(device=device, dtype=dtype) for n, t in d.items()}

        return SourcePosterior(move(self.mean), move(self.variance), move(self.deviations), dict(self.metadata))

    def restrict(self, names: list[str]) -> SourcePosterior:
        """The marginal over a subset of parameters (marginals of a Gaussian keep the same blocks)."""
        missing = [n for n in names if n not in self.mean]
        if missing:
            raise ParameterMismatchError(f"not in the posterior: {missing[:5]}")
        pick = lambda d: {n: d[n] for n in names}  # noqa: E731
        return SourcePosterior(pick(self.mean), pick(self.variance), pick(self.deviations), dict(self.metadata))

    def dense_covariance(self, scale: float = 1.0, eps: float = 0.0, rank: int | None = None) -> torch.Tensor:
        """The P x P covariance in float64 (tests and tiny models only)."""
        k = self.rank if rank is None else rank
        var = torch.cat([v.reshape(-1) for v in self.variance.values()]).double()
        cov = torch.diag(0.5 * scale * var + eps)
        if k > 0:
            d = torch.cat([dev[:k].reshape(k, -1) for dev in self.deviations.values()], dim=1).double()
            cov += scale / (2.0 * max(k - 1, 1)) * d.T @ d
        return cov

    def load_mean_into(self, model: nn.Module) -> None:
        """Copy the SWA mean into a model's matching parameters (BN statistics must then be recomputed)."""
        params = named_parameters(model)
        missing = [n for n in self.mean if n not in params]
        if missing:
            raise ParameterMismatchError(f"model lacks posterior parameters: {missing[:5]}")
        with torch.no_grad():
            for n, m in self.mean.items():
                params[n].copy_(m)

    def matched_to(self, model: nn.Module | Mapping[str, torch.Tensor], strict: bool = True) -> SourcePosterior:
        """Check (and with ``strict=False``, restrict) the posterior against a model's named parameters.

        Strict: any posterior parameter missing from the model, or of a different shape, raises
        :class:`ParameterMismatchError` naming them. Non-strict: those are dropped and listed in
        ``metadata["skipped"]``.
        """
        kept = matching_names(self.shapes, model, strict, self.metadata.get("architecture"))
        if len(kept) == len(self.mean):
            return self
        out = self.restrict(kept)
        out.metadata["skipped"] = sorted(n for n in self.mean if n not in kept)
        return out


def matching_names(shapes: Mapping[str, tuple[int, ...]], model: nn.Module | Mapping[str, torch.Tensor],
                   strict: bool = True, architecture: str | None = None) -> list[str]:
    """The names of ``shapes`` that a model has with the same shape (see :meth:`SourcePosterior.matched_to`).

    Args:
        shapes: name -> shape of the posterior's tensors.
        model: the model (or name -> tensor mapping) to match.
        strict: raise :class:`ParameterMismatchError` naming every mismatch instead of leaving it out.
        architecture: what the prior was learned on, for the message.

    Returns:
        The matching names, in ``shapes`` order.
    """
    params = named_parameters(model)
    bad = {}
    for n, shape in shapes.items():
        if n not in params:
            bad[n] = "missing from the model"
        elif tuple(params[n].shape) != tuple(shape):
            bad[n] = f"shape {tuple(shape)} in the prior vs {tuple(params[n].shape)} in the model"
    if bad and strict:
        lines = [f"{n}: {why}" for n, why in list(bad.items())[:6]]
        more = f" ... and {len(bad) - 6} more" if len(bad) > 6 else ""
        hint = f" (the prior was learned on {architecture!r})" if architecture else ""
        raise ParameterMismatchError(
            f"prior does not fit the model{hint}: {len(bad)} parameter(s) differ: " + "; ".join(lines) + more
        )
    kept = [n for n in shapes if n not in bad]
    if not kept:
        raise ParameterMismatchError("no parameter of the prior matches the model")
    return kept
