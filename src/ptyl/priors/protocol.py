"""The public extension protocol of :class:`ptyl.priors.Prior`: what a new distribution implements for itself (the
table in :mod:`ptyl.priors.base`), with the defaults that follow from its Gaussian parts (``flat_parts``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ptyl.errors import ConfigError
from ptyl.sharding import ShardLayout

if TYPE_CHECKING:  # base.py imports this module (and re-exports its names)
    from ptyl.priors.base import Prior

__all__ = ["ExtensionProtocol", "SeparablePart", "rows_by_name"]


@dataclass
class SeparablePart:
    """``1/2 sum_i a_i (theta_i - mu_i)^2`` over one leaf's parameters, flat in ``names`` order (see
    :mod:`ptyl.priors.separable`).

    Attributes:
        names, shapes: the leaf's parameters.
        center: ``mu`` [P] (zeros for a zero-centred prior).
        precision: ``a`` [P] (float64).
        exact: ``True`` when the leaf *is* this quadratic (``C = 0``), so no gradient remains for it.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    center: torch.Tensor
    precision: torch.Tensor
    exact: bool

    def split(self, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, slice of flat reshaped to the parameter)`` in order.

        Args:
            flat: a [P] tensor in ``names`` order.

        Returns:
            An iterator of pairs.
        """
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=False):
            size = math.prod(shape)
            yield name, flat[offset:offset + size].reshape(shape)
            offset += size


def rows_by_name(flat: torch.Tensor, layout: ShardLayout, shapes: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """name -> this rank's rows of a flat ``[..., P]`` buffer laid out in ``layout.names`` order (views).

    Args:
        flat: a buffer over the global shapes ``shapes`` (leading dimensions kept, e.g. the rank of a factor).
        layout: which rows of each parameter this rank keeps.
        shapes: the parameters' global shapes, in ``layout.names`` order.

    Returns:
        The row blocks by name, each of this rank's local shape.
    """
    out, start = {}, 0
    lead = tuple(flat.shape[:-1])
    for name, shape in zip(layout.names, shapes, strict=False):
        size = math.prod(shape)
        full = flat[..., start:start + size].reshape(*lead, *shape)
        out[name] = layout.shards[name].take(full, len(lead))
        start += size
    return out


class ExtensionProtocol:
    """The methods a leaf prior implements (see :mod:`ptyl.priors.base`); mixed into :class:`ptyl.priors.Prior`."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    # --- the extension protocol: the flat kernel ---------------------------------------------------------------
    def penalty_partials(self, xs: Iterable[torch.Tensor], need_value: bool, need_grad: bool):
        """Phase 1 of the leaf kernel: this shard's float64 partial sums.

        Args:
            xs: fresh flat parameter vectors, consecutive groups covering [0, P) in ``names`` order (iterate once;
                they may be overwritten).
            need_value, need_grad: what the caller asks for.

        Returns:
            ``(quad or None, vec or None, state)``: the partial sums to add up over shards (the quadratic term when
            ``need_value``; any vector the gradient needs, e.g. ``U^T D^-1 r``) and whatever phase 2 reuses.
        """
        raise NotImplementedError(f"{type(self).__name__} has no flat kernel (penalty_partials)")

    def penalty_finish(self, quad, vec, state, need_value: bool, need_grad: bool):
        """Phase 2 of the leaf kernel, from the summed partial sums.

        Args:
            quad, vec: :meth:`penalty_partials`' sums, added up over shards.
            state: what phase 1 kept.
            need_value, need_grad: as in phase 1.

        Returns:
            ``(penalty or None, [d penalty / d x per group] or None)``; the penalty is a float64 0-dim tensor
            including the normaliser.
        """
        raise NotImplementedError(f"{type(self).__name__} has no flat kernel (penalty_finish)")

    def flat_parts(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The Gaussian of a leaf as flat tensors: ``Sigma = diag(d) + U^T U``.

        Args:
            dtype: of the returned copies.

        Returns:
            ``(mu [P], d [P], U [k, P] or None)`` in ``names`` order (copies; ``mu`` zeros for a zero-centred prior).
        """
        raise NotImplementedError(f"{type(self).__name__} does not describe itself as a Gaussian (flat_parts)")

    def log_det_partials(self, h: torch.Tensor) -> torch.Tensor:
        """Phase 1 of a leaf's ``log det(diag(h) + Sigma^-1)``: float64 numbers summed over shards.

        Args:
            h: this leaf's (local) rows of the curvature diagonal, float64.

        Returns:
            A flat float64 tensor (default, for a diagonal Gaussian: ``[sum log(h + 1/d)]``).
        """
        _, d, _ = self._diagonal_parts("log_det_partials")
        return torch.log(h.to(d.device) + d.reciprocal()).sum().reshape(1)

    def log_det_finish(self, sums: torch.Tensor) -> torch.Tensor:
        """Phase 2: the leaf's log-determinant from its summed :meth:`log_det_partials`.

        Args:
            sums: the summed partials.

        Returns:
            A float64 0-dim tensor (default: ``sums[0]``).
        """
        return sums[0]

    # --- separable part and marginal variances (the proximal step, the strength diagnostic) -------------------
    def separable_part(self) -> SeparablePart:
        """The diagonal part ``diag(a)`` of the precision ``Sigma^-1 = diag(a) - C`` (``C`` PSD, ``C <= diag(a)``),
        for the proximal step (:class:`ptyl.priors.ProximalPrior`).

        Returns:
            A :class:`SeparablePart` (default, from :meth:`flat_parts`: ``a = 1/d``, exact when there is no ``U``).

        Raises:
            ConfigError: the prior does not describe itself (train it with ``prior_step="gradient"``).
        """
        try:
            mean, d, factor = self.flat_parts(torch.float64)
        except NotImplementedError:
            raise ConfigError(f"no separable part known for prior type {type(self).__name__}: implement "
                              "separable_part or flat_parts, or train with prior_step='gradient'") from None
        return SeparablePart(list(self.names), [tuple(s) for s in self.shapes], mean.cpu(), d.cpu().reciprocal(),
                             exact=factor is None)

    def marginal_variance(self) -> torch.Tensor:
        """``diag(Sigma)``, flat float64 in ``names`` order (default from :meth:`flat_parts`: ``d + sum_j U_j^2``).

        Returns:
            The per-parameter prior variances (on the CPU).
        """
        try:
            _, d, factor = self.flat_parts(torch.float64)
        except NotImplementedError:
            raise ConfigError(f"no marginal variance known for prior type {type(self).__name__}: implement "
                              "marginal_variance or flat_parts") from None
        return (d if factor is None else d + factor.pow(2).sum(0)).cpu()

    # --- sharding (ptyl.priors.sharded) ---------------------------------------------------------------------------
    def local_rows(self, layout: ShardLayout) -> Prior:
        """The same distribution over this rank's rows of its parameters, keeping its global constants
        (normaliser, capacitance): :func:`ptyl.priors.shard_prior`.

        Args:
            layout: the rows of each of :attr:`names` (in order).

        Returns:
            A prior over the row blocks (local shapes).
        """
        raise NotImplementedError(f"no sharded form of {type(self).__name__} (local_rows)")

    def normalizer_partials(self) -> torch.Tensor:
        """The numbers of the normaliser (and of anything else global) that a prior built on one rank's rows alone
        sums over ranks, e.g. ``sum log d`` and ``U^T D^-1 U``.

        Returns:
            A flat float64 tensor (may be empty).
        """
        raise NotImplementedError(f"no sharded form of {type(self).__name__} (normalizer_partials)")

    def set_global_normalizer(self, sums: torch.Tensor, numel: int) -> None:
        """Replace the row-local constants by the global ones.

        Args:
            sums: :meth:`normalizer_partials` summed over ranks.
            numel: the leaf's global number of parameters.
        """
        raise NotImplementedError(f"no sharded form of {type(self).__name__} (set_global_normalizer)")

    def _diagonal_parts(self, what: str):
        """:meth:`flat_parts` of a leaf with no low-rank part (the defaults above cover only that case)."""
        try:
            parts = self.flat_parts(torch.float64)
        except NotImplementedError:
            raise NotImplementedError(f"{type(self).__name__} implements neither {what} nor flat_parts") from None
        if parts[2] is not None:
            raise NotImplementedError(f"{type(self).__name__} has a low-rank part: implement {what}")
        return parts
