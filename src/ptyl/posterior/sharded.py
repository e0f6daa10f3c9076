"""A source posterior split by rows over ranks: each rank holds its rows of mu, sigma^2 and the deviation columns.

What :meth:`ptyl.posterior.SWAGCollector.posterior` returns for a model wrapped with FSDP2's ``fully_shard`` and what
:func:`ptyl.io.load_posterior` reads for one (``shards=model``): the rows of every tensor this rank's parameter shards
hold (:class:`ptyl.sharding.ShardLayout`). Nothing here gathers the full model unless :meth:`gather` is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptyl.errors import InvalidValueError, ParameterMismatchError
from ptyl.params import named_parameters
from ptyl.posterior.gaussian import SourcePosterior, matching_names
from ptyl.sharding import ShardLayout, local_tensor

__all__ = ["ShardedPosterior"]


@dataclass
class ShardedPosterior:
    """This rank's rows of a :class:`SourcePosterior`.

    Attributes:
        local: the rows held here, as a :class:`SourcePosterior` over the same names (row-block shapes; deviations
            ``(K, rows, ...)``).
        layout: which rows of which global shapes, and the process group they are split over.
    """

    local: SourcePosterior
    layout: ShardLayout

    def __post_init__(self) -> None:
        if list(self.local.mean) != self.layout.names:
            raise ParameterMismatchError("a sharded posterior's tensors and its layout name different parameters")
        for name, shape in self.layout.local_shapes.items():
            if tuple(self.local.mean[name].shape) != shape:
                raise InvalidValueError(f"rows of {name!r} have shape {tuple(self.local.mean[name].shape)}; the "
                                        f"layout says {shape}")

    @property
    def names(self) -> list[str]:
        return self.layout.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Global shapes."""
        return self.layout.shapes

    @property
    def rank(self) -> int:
        return self.local.rank

    @property
    def num_parameters(self) -> int:
        """Global number of values."""
        return self.layout.num_parameters

    @property
    def metadata(self) -> dict[str, Any]:
        return self.local.metadata

    @classmethod
    def from_full(cls, posterior: SourcePosterior, layout: ShardLayout) -> ShardedPosterior:
        """This rank's rows of a full posterior.

        Args:
            posterior: the full :class:`SourcePosterior`.
            layout: which rows (restricted to the posterior's names).

        Returns:
            A :class:`ShardedPosterior` of copies (the full one can be freed).
        """
        layout = layout.restrict(posterior.names)
        for name, shape in posterior.shapes.items():
            if layout.shards[name].shape != shape:
                raise ParameterMismatchError(f"{name!r}: posterior shape {shape} vs layout {layout.shards[name].shape}")
        take = lambda d, dim=0: {n: t.clone() for n, t in layout.take(d, dim).items()}  # noqa: E731
        local = SourcePosterior(take(posterior.mean), take(posterior.variance), take(posterior.deviations, 1),
                                dict(posterior.metadata))
        return cls(local, layout)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ShardedPosterior:
        """The same rows on another device / in another dtype.

        Args:
            device, dtype: as in :meth:`torch.Tensor.to`.

        Returns:
            A new :class:`ShardedPosterior`.
        """
        return ShardedPosterior(self.local.to(device, dtype), self.layout)

    def restrict(self, names: list[str]) -> ShardedPosterior:
        """The marginal over the parameters ``names``.

        Returns:
            A new :class:`ShardedPosterior`.
        """
        return ShardedPosterior(self.local.restrict(names), self.layout.restrict(names))

    def matched_to(self, model: nn.Module | Mapping[str, torch.Tensor], strict: bool = True) -> ShardedPosterior:
        """:meth:`SourcePosterior.matched_to` on the global shapes (a sharded model's DTensors report them).

        Args:
            model: the model or a name -> tensor mapping.
            strict: raise on any mismatch instead of dropping (and listing) those parameters.

        Returns:
            ``self``, or the matching part.
        """
        kept = matching_names(self.shapes, model, strict, self.metadata.get("architecture"))
        if len(kept) == len(self.names):
            return self
        out = self.restrict(kept)
        out.local.metadata["skipped"] = sorted(n for n in self.names if n not in kept)
        return out

    def load_mean_into(self, model: nn.Module) -> None:
        """Copy this rank's rows of the SWA mean into the matching parameter shards of a sharded ``model`` (BatchNorm
        statistics must then be recomputed)."""
        params = named_parameters(model)
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ParameterMismatchError(f"model lacks posterior parameters: {missing[:5]}")
        with torch.no_grad():
            for name, mean in self.local.mean.items():
                target = local_tensor(params[name])
                if tuple(target.shape) != tuple(mean.shape):
                    raise ParameterMismatchError(f"{name!r}: this rank holds rows of shape {tuple(target.shape)}, the "
                                                 f"posterior {tuple(mean.shape)} (another sharding?)")
                target.copy_(mean)

    def gather(self) -> SourcePosterior:
        """The full posterior on every rank (all-gathers every tensor: tests and small models only)."""
        full = lambda d, dim=0: {n: self.layout.gather_rows(t, n, dim) for n, t in d.items()}  # noqa: E731
        return SourcePosterior(full(self.local.mean), full(self.local.variance), full(self.local.deviations, 1),
                               dict(self.metadata))
