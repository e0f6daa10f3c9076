"""The separable (diagonal) part of a Gaussian prior, for a proximal training step and for strength diagnostics.

Every prior ptyl builds is a sum over independent leaves whose precision splits as

    Sigma^-1 = diag(a) - C,      C PSD, C <= diag(a)

with ``C = 0`` for isotropic and diagonal priors and, for the low-rank prior ``Sigma = diag(d) + U U^T``,
``a = 1 / d`` and ``C = D^-1 U (I + U^T D^-1 U)^-1 U^T D^-1`` (Woodbury). The proximal step of
:class:`ProximalPrior` handles ``diag(a)`` in closed form and leaves ``-C`` to the gradient: with step ``eta`` the
prior part of one iteration is ``theta <- (I + eta A)^-1 (I + eta C) theta``, whose eigenvalues lie in [0, 1] for
every ``eta`` (it is similar to ``(I + eta A)^-1/2 (I + eta C) (I + eta A)^-1/2 <= I`` because ``C <= A``), so no
prior strength can make the prior diverge (Parikh & Boyd, "Proximal Algorithms", 2014, Sec. 6.1:
``prox_{eta f}(v) = (v + eta a mu) / (1 + eta a)`` for ``f = a/2 (theta - mu)^2``).

:func:`separable_parts` asks each leaf for its part (:meth:`ptyl.priors.Prior.separable_part`, by default from the
leaf's ``flat_parts``: ``a = 1/d``); :func:`marginal_variance` gives ``diag(Sigma)`` (the prior's standard deviation
per parameter, used by :mod:`ptyl.priors.strength`; :meth:`ptyl.priors.Prior.marginal_variance`). A prior class of
your own takes part by implementing those methods (or ``flat_parts``), with no list of types here.
"""

from __future__ import annotations

import torch
from torch import nn

from ptyl.params import named_parameters
from ptyl.priors.base import CompositePrior, Prior, SeparablePart

__all__ = ["ProximalPrior", "SeparablePart", "leaves", "marginal_variance", "separable_parts"]


def leaves(prior: Prior) -> list[Prior]:
    """The non-composite priors of ``prior`` (block priors are composite too)."""
    if isinstance(prior, CompositePrior):
        return [leaf for part in prior.parts.values() for leaf in leaves(part)]
    return [prior]


def separable_parts(prior: Prior) -> list[SeparablePart]:
    """One :class:`SeparablePart` per leaf of ``prior``.

    Args:
        prior: a prior of the kinds :func:`ptyl.priors.make_prior` builds (low-rank, diagonal, isotropic, composite).

    Returns:
        The parts, in the leaves' order.

    Raises:
        ConfigError: a leaf that describes no separable part (a prior of your own without ``separable_part`` or
            ``flat_parts``): train it with ``prior_step="gradient"``.
    """
    return [leaf.separable_part() for leaf in leaves(prior)]


def marginal_variance(leaf: Prior) -> torch.Tensor:
    """``diag(Sigma)`` of one leaf, flat float64 in ``leaf.names`` order (low-rank: ``d + sum_j U_j^2``).

    Args:
        leaf: a leaf prior (:meth:`ptyl.priors.Prior.marginal_variance`).

    Returns:
        The per-parameter prior variances.
    """
    return leaf.marginal_variance()


class ProximalPrior:
    """Train under a prior with its separable part handled by a closed-form proximal step.

    The loop adds the gradient of the whole penalty (``prior.add_grad_``), then :meth:`remove_separable_grad_`
    takes the separable part's ``a (theta - mu) / N`` back out, so the optimizer steps on ``data loss + rest / N``;
    after every ``optimizer.step()``, :meth:`step` applies

        theta_i <- (theta_i + c_i mu_i) / (1 + c_i),    c_i = lr_group * a_i / (N (1 - momentum))

    (the momentum factor makes the fixed point the exact MAP: heavy-ball SGD moves ``lr / (1 - momentum)`` times the
    gradient per step at stationarity). For isotropic and diagonal priors the rest is zero.

    Args:
        prior: the training prior.
        model: the model being trained (parameters are matched by name).
        num_data: N.
        momentum: the SGD momentum of the optimizer.
    """

    def __init__(self, prior: Prior, model: nn.Module, num_data: int, momentum: float) -> None:
        params = named_parameters(model)
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, a / N, mu)
        self.momentum_scale = 1.0 / (1.0 - momentum)
        for part in separable_parts(prior):
            for (name, a), (_, mu) in zip(part.split(part.precision), part.split(part.center), strict=False):
                p = params[name]
                self.entries.append((p, (a / num_data).to(device=p.device, dtype=p.dtype),
                                     mu.to(device=p.device, dtype=p.dtype)))

    @torch.no_grad()
    def remove_separable_grad_(self) -> None:
        """Subtract ``a (theta - mu) / N`` from each covered parameter's ``.grad`` (after the penalty's gradient was
        added)."""
        for p, a, mu in self.entries:
            if p.grad is not None:
                p.grad.sub_(a * (p - mu))

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the proximal map with each parameter's current group learning rate (call after ``step()``).

        Args:
            optimizer: the optimizer that just stepped (its groups' ``lr``).
        """
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        for p, a, mu in self.entries:
            lr = lr_of.get(id(p))
            if lr is None:  # frozen or not optimised
                continue
            c = a * (lr * self.momentum_scale)
            p.add_(c * mu).div_(1.0 + c)
