"""Priors over a model sharded with FSDP2 (``fully_shard``): each rank holds only its rows of mu, d and U.

Every Gaussian prior here is exact shard by shard because its only cross-coordinate quantities are a few numbers
(Shwartz-Ziv et al. 2022, arXiv 2205.10279; Woodbury form in :mod:`ptyl.priors.lowrank`). With r = theta - mu,
w = r / d and rank s holding rows R_s:

    r^T Sigma^-1 r = sum_s r_s^T w_s - |L^-1 sum_s U_s^T w_s|^2           (k + 1 numbers summed over ranks)
    grad_s        = w_s - U_s C^-1 (sum_s U_s^T w_s) / d_s                 (local once the k-vector is summed)
    C = I + sum_s U_s^T D_s^-1 U_s,     log det Sigma = sum_s sum log d_s + log det C     (summed once, at build)

so a call is the unsharded kernel on the local rows plus ONE all-reduce of the partial sums of every leaf prior
(low-rank: k + 1 numbers when the value is asked for, k otherwise; diagonal and isotropic: 1 number, only for the
value). The gradient is this rank's slice of the exact gradient: FSDP2's reduce-scatter averages the *data*
gradients over ranks, and the prior's gradient is added once, locally, after it (``loss.backward();
prior.add_grad_(model, 1 / N); optimizer.step()``), or through autograd on the local shards (``penalty``).

Build one with :func:`ptyl.priors.make_prior` on a sharded model (automatic), :func:`ptyl.io.load_prior` on a
sharded model, :func:`ptyl.priors.learned_prior` of a :class:`~ptyl.posterior.ShardedPosterior`, or
:func:`shard_prior` (each rank keeps its rows of a full prior it already has).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ptyl.errors import ConfigError, InvalidValueError, ParameterMismatchError
from ptyl.priors.base import Params, Prior, _check_curvature, _zero_like
from ptyl.sharding import ShardLayout, is_dtensor, local_tensor

__all__ = ["ShardedPrior", "shard_prior"]


class ShardedPrior(Prior):
    """A prior over a row-sharded model: :attr:`local` holds this rank's rows (every leaf with the GLOBAL
    normaliser and capacitance), :attr:`layout` says which rows and over which process group to sum.

    ``names``, ``shapes`` and ``num_parameters`` describe the whole distribution (global shapes, as the DTensors of
    a ``fully_shard`` model report them). ``penalty`` / ``log_prob`` / ``add_grad_`` take the sharded model (or a
    name -> DTensor mapping) and return the global value on every rank; they are collectives: call them on every rank
    of the group. :meth:`precision_diagonal` and :meth:`mean_flat` return this rank's rows (flat, ``names`` order);
    :meth:`posterior_log_det` takes this rank's rows of the curvature and returns the global value.

    Args:
        local: the prior over this rank's rows (local shapes, global constants), e.g. from :func:`shard_prior`.
        layout: the rows, matching ``local.names`` in order.
    """

    def __init__(self, local: Prior, layout: ShardLayout):
        if list(local.names) != layout.names:
            raise ParameterMismatchError("a sharded prior's local part and its layout name different parameters")
        if [tuple(s) for s in local.shapes] != list(layout.local_shapes.values()):
            raise InvalidValueError("a sharded prior's local part does not have the layout's row-block shapes")
        super().__init__(layout.names, list(layout.shapes.values()))
        self.local = local
        self.layout = layout
        local.reduce_stats = layout.reduce_sum if layout.sharded else None
        self.skipped = local.skipped

    @classmethod
    def from_shards(cls, local: Prior, layout: ShardLayout) -> ShardedPrior:
        """Wrap a prior built on this rank's rows ALONE (its normalisers and capacitance are those of the rows):
        one all-reduce of every leaf's (C - I) and sum of log-variances makes them global. A collective.

        Args:
            local: e.g. ``make_prior`` / ``learned_prior`` applied to this rank's rows of the parameters and of the
                posterior.
            layout: which rows ``local`` covers.

        Returns:
            The :class:`ShardedPrior`.
        """
        _globalize(local, layout)
        return cls(local, layout)

    # --- evaluation ----------------------------------------------------------------------------------------------
    def _local_tensors(self, params: Params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the covered parameters -- DTensors under FSDP2 -- and their local shards), checked."""
        tensors = self.gather(params)
        if self.layout.sharded and not all(is_dtensor(t) for t in tensors):
            raise ConfigError("the model holds unsharded parameters: FSDP2 keeps them between the forward and the "
                              "backward pass. Evaluate the prior before the forward pass (penalty) or after "
                              "backward (add_grad_)")
        local = [local_tensor(t) for t in tensors]
        for t, shape, name in zip(local, self.local.shapes, self.names, strict=False):
            if tuple(t.shape) != shape:
                raise ParameterMismatchError(f"{name!r}: this rank holds a shard of shape {tuple(t.shape)}, the "
                                             f"prior's rows have shape {shape} (another sharding?)")
        return tensors, local

    def penalty(self, params: Params) -> torch.Tensor:
        """``-log p(theta)`` of the whole model on every rank (differentiable through the local shards: backward
        adds this rank's rows of the gradient once). A collective.

        Args:
            params: the sharded model, or a name -> DTensor mapping covering :attr:`names`.

        Returns:
            A 0-dim tensor.
        """
        _, local = self._local_tensors(params)
        return self.local._penalty_of(local, params) if local else _zero_like(local, params)

    def log_prob(self, params: Params) -> torch.Tensor:
        """``-penalty(params)`` (a collective).

        Args:
            params: the sharded model, or a name -> DTensor mapping.

        Returns:
            A 0-dim tensor.
        """
        return -self.penalty(params)

    @torch.no_grad()
    def add_grad_(self, params: Params, weight: float | torch.Tensor = 1.0, *, return_value: bool = False):
        """Add ``weight * grad(penalty)`` into this rank's rows of each parameter's ``.grad`` (a DTensor under
        FSDP2, created where None): the same update as the unsharded prior's. A collective.

        Args:
            params: the sharded model, or a name -> DTensor mapping.
            weight: e.g. ``1 / N`` with N the GLOBAL number of training examples.
            return_value: also return the (global) penalty.

        Returns:
            The detached penalty when ``return_value``, else None.
        """
        tensors, local = self._local_tensors(params)
        value, _, grads = self.local._flat_grads(local, weight, return_value)
        existing, updates = [], []
        for t, g in zip(tensors, grads, strict=False):
            if not t.requires_grad:
                continue
            g = g.to(t.dtype)
            if t.grad is None:
                t.grad = _like_param(t, g)
            else:
                existing.append(local_tensor(t.grad))
                updates.append(g)
        if existing:
            torch._foreach_add_(existing, updates)
        return value

    # --- curvature interface: this rank's rows ---------------------------------------------------------------------
    def precision_diagonal(self) -> torch.Tensor:
        """This rank's rows of diag(Sigma^-1).

        Returns:
            A flat float64 tensor of ``layout.local_numel`` values in ``names`` order.
        """
        return self.local.precision_diagonal()

    def mean_flat(self) -> torch.Tensor:
        """This rank's rows of the centre.

        Returns:
            A flat tensor of ``layout.local_numel`` values in ``names`` order.
        """
        return self.local.mean_flat()

    def posterior_log_det(self, h: torch.Tensor) -> torch.Tensor:
        """``log det(diag(h) + Sigma^-1)`` of the whole model from this rank's rows of ``h``. A collective.

        Args:
            h: this rank's rows of the curvature diagonal, flat (``layout.local_numel`` values, ``names`` order).

        Returns:
            A float64 0-dim tensor, the same on every rank.
        """
        return self.local.posterior_log_det(_check_curvature(h, self.layout.local_numel))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank {self.layout.rank} of {self.layout.world_size}, " \
               f"local={self.layout.local_numel:,}"


def _like_param(param: torch.Tensor, local_grad: torch.Tensor) -> torch.Tensor:
    """A gradient for ``param`` from its local rows (a DTensor with the parameter's placements under FSDP2)."""
    if not is_dtensor(param):
        return local_grad
    # only sharded (FSDP2) models need torch.distributed.tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_grad, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


# --- building --------------------------------------------------------------------------------------------------------
def _globalize(local: Prior, layout: ShardLayout) -> None:
    """Replace every leaf's row-local normaliser and capacitance by the global ones: one all-reduce of every leaf's
    :meth:`~ptyl.priors.Prior.normalizer_partials` (none when no leaf has any)."""
    leaves = local._leaves_or_raise()
    partials = [leaf.normalizer_partials().reshape(-1) for leaf in leaves]
    sizes = [p.numel() for p in partials]
    flat = None
    if sum(sizes):
        device = next(p.device for p in partials if p.numel())
        flat = layout.reduce_sum(torch.cat([p.to(device) for p in partials]))
    at = 0
    for leaf, size in zip(leaves, sizes, strict=False):
        numel = sum(math.prod(layout.shards[n].shape) for n in leaf.names)  # global P of the leaf
        leaf.set_global_normalizer(flat[at:at + size] if flat is not None else partials[0][:0], numel)
        at += size


def shard_prior(prior: Prior, model: nn.Module | Mapping[str, torch.Tensor] | ShardLayout) -> ShardedPrior:
    """Each rank keeps its rows of a full prior it holds (then the full one can be freed): no communication.

    For models whose full prior fits on every rank; larger ones build the shards directly (``make_prior`` on the
    sharded model with a sharded posterior, or ``load_prior`` on it), never holding the whole prior.

    Args:
        prior: any ptyl prior (low-rank, diagonal, isotropic, block, or the composite ``make_prior`` returns).
        model: the sharded model (its DTensor parameters give the rows), or a :class:`ShardLayout`.

    Returns:
        A :class:`ShardedPrior` over the same parameters.
    """
    layout = model if isinstance(model, ShardLayout) else ShardLayout.from_params(model)
    layout = layout.restrict(list(prior.names))
    for name, shape in zip(prior.names, prior.shapes, strict=False):
        if layout.shards[name].shape != tuple(shape):
            raise ParameterMismatchError(f"{name!r}: prior shape {tuple(shape)} vs model {layout.shards[name].shape}")
    return ShardedPrior(_slice(prior, layout), layout)


def _slice(prior: Prior, layout: ShardLayout) -> Prior:
    """The same prior over ``layout``'s rows, keeping its global constants (:meth:`~ptyl.priors.Prior.local_rows`)."""
    if isinstance(prior, ShardedPrior):
        raise InvalidValueError("the prior is already sharded")
    out = prior.local_rows(layout.restrict(list(prior.names)))
    out.skipped = prior.skipped
    return out
