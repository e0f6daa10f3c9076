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
from ptyl.priors.base import LOG_2PI, CompositePrior, Params, Prior, _check_curvature, _zero_like
from ptyl.priors.block import BlockLowRankPrior
from ptyl.priors.diagonal import DiagonalGaussianPrior
from ptyl.priors.isotropic import IsotropicGaussianPrior
from ptyl.priors.lowrank import LowRankGaussianPrior, _chunks, _columns, capacitance_terms
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
        for t, shape, name in zip(local, self.local.shapes, self.names):
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
        for t, g in zip(tensors, grads):
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
        h = _check_curvature(h, self.layout.local_numel)
        leaves, start, sums, inners = self.local._leaves_or_raise(), 0, [], []
        for leaf in leaves:
            part = h[start:start + leaf.num_parameters]
            start += leaf.num_parameters
            total, inner = _log_det_partials(leaf, part)
            sums.append(total.reshape(1))
            if inner is not None:
                inners.append(inner.reshape(-1))
        if not sums:
            return torch.zeros((), dtype=torch.float64)
        device = sums[0].device
        flat = self.layout.reduce_sum(torch.cat([t.to(device) for t in sums + inners]))
        out, at = flat[: len(sums)].sum(), len(sums)
        for leaf in leaves:
            if isinstance(leaf, LowRankGaussianPrior):
                k = leaf.rank
                inner = flat[at:at + k * k].reshape(k, k) + torch.eye(k, dtype=torch.float64, device=device)
                at += k * k
                out = out - 2.0 * leaf.capacitance_chol.diagonal().log().sum().to(device) + torch.linalg.slogdet(inner)[1]
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank {self.layout.rank} of {self.layout.world_size}, " \
               f"local={self.layout.local_numel:,}"


def _like_param(param: torch.Tensor, local_grad: torch.Tensor) -> torch.Tensor:
    """A gradient for ``param`` from its local rows (a DTensor with the parameter's placements under FSDP2)."""
    if not is_dtensor(param):
        return local_grad
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_grad, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _log_det_partials(leaf: Prior, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A leaf's local terms of log det(diag(h) + Sigma^-1): sum log(h + 1/d) and, low-rank, U^T diag(h/(1+dh)) U."""
    if isinstance(leaf, LowRankGaussianPrior):
        device = leaf.diag.device
        h = h.to(device)
        inner = torch.zeros(leaf.rank, leaf.rank, dtype=torch.float64, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for part in _chunks(leaf.num_parameters, _columns(leaf.rank)):
            d, hp, u = leaf.diag[part].double(), h[part], leaf.factor[:, part].double()
            inner += (u * (hp / (1.0 + d * hp))) @ u.T
            total += torch.log(hp + 1.0 / d).sum()
        return total, inner
    if isinstance(leaf, (DiagonalGaussianPrior, IsotropicGaussianPrior)):
        return leaf._posterior_log_det(h), None
    raise NotImplementedError(f"{type(leaf).__name__} has no sharded posterior_log_det")


# --- building --------------------------------------------------------------------------------------------------------
def _globalize(local: Prior, layout: ShardLayout) -> None:
    """Replace every leaf's row-local normaliser and capacitance by the global ones: one all-reduce."""
    leaves = local._leaves_or_raise()
    partial = []
    for leaf in leaves:
        if isinstance(leaf, LowRankGaussianPrior):
            capacitance, log_det_d = capacitance_terms(leaf.diag, leaf.factor)
            eye = torch.eye(leaf.rank, dtype=torch.float64, device=capacitance.device)
            partial += [(capacitance - eye).reshape(-1), log_det_d.reshape(1)]
        elif isinstance(leaf, DiagonalGaussianPrior):
            partial.append(leaf.variance.double().log().sum().reshape(1))
        elif not isinstance(leaf, IsotropicGaussianPrior):
            raise NotImplementedError(f"no sharded form of {type(leaf).__name__}")
    flat = layout.reduce_sum(torch.cat([p.to(partial[0].device) for p in partial])) if partial else None
    at = 0
    for leaf in leaves:
        size = sum(math.prod(layout.shards[n].shape) for n in leaf.names)  # global P of the leaf
        if isinstance(leaf, LowRankGaussianPrior):
            k = leaf.rank
            capacitance = flat[at:at + k * k].reshape(k, k) + torch.eye(k, dtype=torch.float64, device=flat.device)
            log_det_d = flat[at + k * k]
            at += k * k + 1
            chol = torch.linalg.cholesky(capacitance)
            leaf.capacitance_chol.copy_(chol)
            leaf.log_norm.copy_(log_det_d + 2.0 * chol.diagonal().log().sum() + size * LOG_2PI)
        elif isinstance(leaf, DiagonalGaussianPrior):
            leaf.log_norm.copy_(flat[at] + size * LOG_2PI)
            at += 1
        else:
            leaf._log_norm = 0.5 * size * (LOG_2PI + math.log(leaf.variance))


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
    for name, shape in zip(prior.names, prior.shapes):
        if layout.shards[name].shape != tuple(shape):
            raise ParameterMismatchError(f"{name!r}: prior shape {tuple(shape)} vs model {layout.shards[name].shape}")
    return ShardedPrior(_slice(prior, layout), layout)


def _slice(prior: Prior, layout: ShardLayout) -> Prior:
    """The same prior over ``layout``'s rows, keeping its global constants."""
    if isinstance(prior, ShardedPrior):
        raise InvalidValueError("the prior is already sharded")
    parts = prior._modules.get("parts")
    if parts is not None:
        sliced = {key: _slice(part, layout) for key, part in parts.items()}
        if isinstance(prior, BlockLowRankPrior):
            out = BlockLowRankPrior(dict(zip(prior.blocks, sliced.values())))
        else:
            out = CompositePrior(sliced, unregularized=prior.unregularized)
    else:
        out = _slice_leaf(prior, layout.restrict(list(prior.names)))
    out.skipped = prior.skipped
    return out


def _rows(flat: torch.Tensor, layout: ShardLayout, shapes) -> dict[str, torch.Tensor]:
    """name -> this rank's rows, from a flat [..., P] buffer in ``names`` order (views)."""
    out, start = {}, 0
    lead = tuple(flat.shape[:-1])
    for name, shape in zip(layout.names, shapes):
        size = math.prod(shape)
        full = flat[..., start:start + size].reshape(*lead, *shape)
        out[name] = layout.shards[name].take(full, len(lead))
        start += size
    return out


def _slice_leaf(leaf: Prior, layout: ShardLayout) -> Prior:
    if isinstance(leaf, LowRankGaussianPrior):
        local = LowRankGaussianPrior(_rows(leaf.mean, layout, leaf.shapes), _rows(leaf.diag, layout, leaf.shapes),
                                     _rows(leaf.factor, layout, leaf.shapes))
        local.capacitance_chol.copy_(leaf.capacitance_chol)
        local.log_norm.copy_(leaf.log_norm)
    elif isinstance(leaf, DiagonalGaussianPrior):
        local = DiagonalGaussianPrior(_rows(leaf.mean, layout, leaf.shapes), _rows(leaf.variance, layout, leaf.shapes))
        local.log_norm.copy_(leaf.log_norm)
    elif isinstance(leaf, IsotropicGaussianPrior):
        center = _rows(leaf.center, layout, leaf.shapes) if leaf.centered else None
        local = IsotropicGaussianPrior(layout.local_shapes, leaf.variance, center)
        local._log_norm = leaf._log_norm
    else:
        raise NotImplementedError(f"no sharded form of {type(leaf).__name__}")
    return local
