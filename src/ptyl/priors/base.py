"""The prior interface shared by every prior in ptyl.

A prior is an ``nn.Module`` (its tensors are buffers, so ``prior.to(device)`` and ``state_dict()`` work as usual) over a
fixed set of *named* parameters. ``log_prob`` returns the full, normalised log-density; ``penalty`` is the loss-ready
``-log p(theta)``. The downstream objective (Shwartz-Ziv et al. 2022, eq. 2) is

    U(theta) = -(1/N) sum_i log p(y_i | x_i, theta) - (1/N) log p(theta)

so a training step adds ``prior.penalty(model) / N`` to the mean cross-entropy of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ptyl.errors import InvalidValueError
from ptyl.params import check_names_and_shapes, named_parameters

LOG_2PI = math.log(2.0 * math.pi)


class Prior(nn.Module):
    """Base class: a distribution over the parameters listed in ``names`` with the given ``shapes``."""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        super().__init__()
        if len(names) != len(set(names)):
            raise InvalidValueError("a prior lists the same parameter name twice")
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(tuple(int(d) for d in s) for s in shapes)
        self.skipped: tuple[str, ...] = ()  # parameters dropped when matched with strict=False

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def gather(self, params: nn.Module | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The tensors this prior covers, in ``self.names`` order, checked for names and shapes."""
        named = named_parameters(params)
        check_names_and_shapes(dict(zip(self.names, self.shapes)), named)
        return [named[n] for n in self.names]

    def log_prob(self, params: nn.Module | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalised log-density of the named parameters (differentiable)."""
        return self._log_prob(self.gather(params))

    def penalty(self, params: nn.Module | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``-log p(theta)``: add ``penalty / N`` to a mean per-example loss."""
        return -self.log_prob(params)

    def _log_prob(self, tensors: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"tensors={len(self.names)}, parameters={self.num_parameters:,}"


def sum_log_probs(priors: Iterable[Prior], named: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``sum_b log p_b`` of independent priors over disjoint groups (``None`` when there are none)."""
    total = None
    for prior in priors:
        term = prior.log_prob(named)
        total = term if total is None else total + term
    return total


class CompositePrior(Prior):
    """Independent priors over disjoint parameter groups (e.g. learned backbone prior + isotropic head prior).

    ``unregularized`` lists parameter names that are deliberately left without a prior; ``penalty`` ignores them.
    """

    def __init__(self, priors: Mapping[str, Prior], unregularized: Sequence[str] = ()):
        names, shapes = [], []
        for prior in priors.values():
            names.extend(prior.names)
            shapes.extend(prior.shapes)
        overlap = set(names) & set(unregularized)
        if overlap:
            raise InvalidValueError(f"parameters both regularised and unregularised: {sorted(overlap)[:5]}")
        super().__init__(names, shapes)  # raises on overlapping groups
        self.parts = nn.ModuleDict(dict(priors))
        self.unregularized: tuple[str, ...] = tuple(unregularized)
        self.skipped = tuple(s for p in priors.values() for s in p.skipped)

    def log_prob(self, params: nn.Module | Mapping[str, torch.Tensor]) -> torch.Tensor:
        named = named_parameters(params)
        total = sum_log_probs(self.parts.values(), named)
        if total is None:  # everything unregularised
            device = next(iter(named.values())).device if named else None
            return torch.zeros((), device=device)
        return total
