"""The prior interface shared by every prior in ptyl.

A prior is an ``nn.Module`` (its tensors are buffers, so ``prior.to(device)`` and ``state_dict()`` work as usual) over a
fixed set of *named* parameters. ``log_prob`` returns the full, normalised log-density; ``penalty`` is the loss-ready
``-log p(theta)``. The downstream objective (Shwartz-Ziv et al. 2022, eq. 2) is

    U(theta) = -(1/N) sum_i log p(y_i | x_i, theta) - (1/N) log p(theta)

so a training step adds ``prior.penalty(model) / N`` to the mean cross-entropy of a batch, or, without autograd,
calls ``prior.add_grad_(model, weight=1 / N)`` after ``loss.backward()`` (the same update).

Every prior here keeps its tensors as flat buffers in ``names`` order. One call flattens the parameters with one
``cat`` per *leaf* prior, runs a few vector kernels and returns per-tensor views of the flat gradient, so its cost
does not grow with the number of parameter tensors. Value and gradient come out of the same kernels; the autograd
path only scales the saved gradient in backward. (On the CPU the vectors are processed in groups of >= 2M numbers,
see :data:`ptyl.flat.GROUP_NUMEL`; elsewhere in one piece.)

**The extension protocol.** A new distribution is a subclass of :class:`Prior` implementing, for itself:

=================================================  ===============================================================
method                                             what it gives
=================================================  ===============================================================
``penalty_partials`` / ``penalty_finish``           the flat kernel, in two phases around one reduction over shards
                                                   (``penalty``, ``log_prob``, ``add_grad_``, training)
``flat_parts``                                     ``(mu, d, U or None)`` with ``Sigma = diag(d) + U^T U``: the
                                                   defaults of the four rows below, and the generic differentiable
                                                   family of the automatic strategies (``SCALED_FAMILY``)
``precision_diagonal``, ``mean_flat``,             the curvature interface (Laplace evidence, DE-ELBO, the trainer's
``log_det_partials`` / ``log_det_finish``          stability check); default from ``flat_parts`` (diagonal ``d``)
``separable_part``, ``marginal_variance``          the proximal step (:mod:`ptyl.priors.separable`) and the strength
                                                   diagnostic; default from ``flat_parts``
``local_rows``, ``normalizer_partials`` /          sharding (:mod:`ptyl.priors.sharded`): this rank's rows with the
``set_global_normalizer``                          global constants; constants made global by one all-reduce
=================================================  ===============================================================

Only the kernel is required; a missing piece raises a clear error where it is needed. Composite priors (``parts``)
are evaluated through their leaves and get all of the above from them. A subclass may instead implement only
``_log_prob(tensors)`` (autograd, slower, nothing else).

Sharding hook: between the kernel's two phases the partial sums (the quadratic term and, for the low-rank prior, the
k-vector ``U^T D^-1 r``) go through ``reduce_stats``: when the prior being evaluated has one, the partial sums of
*all* its leaves are summed in one call (one collective of a few numbers per evaluation, see
:mod:`ptyl.priors.sharded`); otherwise each leaf uses its own (the identity unsharded). ``log_det_partials`` are
reduced the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ptyl.errors import InvalidValueError
from ptyl.flat import ParamBinder, plan_groups, unflatten
from ptyl.params import named_parameters
from ptyl.priors.checks import check_finite
from ptyl.priors.fused import FusedPenalty, evaluate
from ptyl.priors.protocol import ExtensionProtocol, SeparablePart, rows_by_name  # noqa: F401 - re-exported
from ptyl.sharding import ShardLayout

LOG_2PI = math.log(2.0 * math.pi)

Params = nn.Module | Mapping[str, torch.Tensor]


class Prior(ExtensionProtocol, nn.Module):
    """Base class: a distribution over the parameters listed in ``names`` with the given ``shapes``.

    Leaf priors implement the extension protocol of the module docstring (at least the flat kernel,
    :meth:`penalty_partials` and :meth:`penalty_finish`); priors with ``parts`` (composite, per-block) are evaluated
    through their leaves. A subclass may instead implement only ``_log_prob(tensors)`` (autograd, slower).
    """

    reduce_stats: Callable[[torch.Tensor], torch.Tensor] | None = None  # sum over shards (None: unsharded)

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        super().__init__()
        if len(names) != len(set(names)):
            raise InvalidValueError("a prior lists the same parameter name twice")
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(tuple(int(d) for d in s) for s in shapes)
        self.skipped: tuple[str, ...] = ()  # parameters dropped when matched with strict=False
        self._numel = sum(math.prod(s) for s in self.shapes)
        self._binder = ParamBinder(self.names, self.shapes)
        self.cpu_groups = plan_groups(self.shapes)  # how the CPU kernels split the flat vector (ptyl.flat)
        self._plan: list[Prior] | None | bool = False  # flat leaves, resolved on first use

    @property
    def num_parameters(self) -> int:
        return self._numel

    def gather(self, params: Params) -> list[torch.Tensor]:
        """The tensors this prior covers, in ``self.names`` order, checked for names and shapes (once per model).

        Args:
            params: a model or a name -> tensor mapping (``module.`` / ``_orig_mod.`` prefixes are ignored).

        Returns:
            The covered tensors themselves (not copies).
        """
        return self._binder.tensors(params)

    # --- evaluation --------------------------------------------------------------------------------------------
    def penalty(self, params: Params) -> torch.Tensor:
        """``-log p(theta)`` (differentiable): add ``penalty / N`` to a mean per-example loss.

        Args:
            params: a model or a name -> tensor mapping covering :attr:`names`.

        Returns:
            A 0-dim tensor in the parameters' dtype; its backward adds the fused gradient.
        """
        leaves = self.flat_leaves()
        if leaves is None:
            return -self.log_prob(params)
        return self._penalty_of(self.gather(params), params)

    def _penalty_of(self, tensors: list[torch.Tensor], params: Params | None = None) -> torch.Tensor:
        """:meth:`penalty` of the covered tensors themselves (in ``names`` order, already checked)."""
        leaves = self.flat_leaves()
        if not leaves:
            return _zero_like(tensors, params)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return FusedPenalty.apply(self, *tensors)
        with torch.no_grad():
            return evaluate(self, tensors, need_value=True, need_grad=False)[0]

    def log_prob(self, params: Params) -> torch.Tensor:
        """Normalised log-density of the named parameters (differentiable).

        Args:
            params: a model or a name -> tensor mapping covering :attr:`names`.

        Returns:
            ``-penalty(params)``, a 0-dim tensor.
        """
        if self.flat_leaves() is not None:
            return -self.penalty(params)
        parts = self._modules.get("parts")
        if parts is None:
            return self._log_prob(self.gather(params))
        named = named_parameters(params)  # some part has no flat kernel: sum the parts' own log-densities
        total = sum_log_probs(parts.values() if isinstance(parts, nn.ModuleDict) else parts, named)
        return total if total is not None else _zero_like(self.gather(params), params)

    @torch.no_grad()
    def add_grad_(self, params: Params, weight: float | torch.Tensor = 1.0, *, return_value: bool = False):
        """Add ``weight * grad(penalty)`` into each covered parameter's ``.grad`` (created where None), without
        autograd: the same update as ``(weight * prior.penalty(params)).backward()`` in a few fused kernels (bit for
        bit with float32/float64 parameters). Parameters with ``requires_grad=False`` are left alone.

        Typical use: ``loss.backward(); prior.add_grad_(model, weight=1 / N); optimizer.step()``.

        Args:
            params: a model or a name -> tensor mapping covering :attr:`names`.
            weight: scale of the gradient (a number or a 0-dim tensor), e.g. ``1 / N``.
            return_value: also return the penalty (one extra reduction, no host synchronisation).

        Returns:
            The detached penalty (unweighted) when ``return_value``, else None.
        """
        leaves = self.flat_leaves()
        if leaves is None:
            return _add_grad_autograd(self, params, weight, return_value)
        tensors = self.gather(params)
        if not leaves:
            return _zero_like(tensors, params) if return_value else None
        value, like, grads = self._flat_grads(tensors, weight, return_value)
        _accumulate(like, grads)
        return value

    @torch.no_grad()
    def _flat_grads(self, tensors: list[torch.Tensor], weight: float | torch.Tensor = 1.0, need_value: bool = False):
        """``(penalty or None, tensors, weight * d penalty / d tensor)`` for the covered tensors (in ``names`` order),
        the gradients as views of a few flat buffers in the tensors' dtype; nothing is accumulated."""
        value, pieces = evaluate(self, tensors, need_value=need_value, need_grad=True)
        scale = not (isinstance(weight, (int, float)) and weight == 1)
        like, grads = [], []
        for h, group in pieces:
            if scale:
                h.mul_(weight)
            like.extend(group)
            grads.extend(unflatten(h.to(group[0].dtype), group))
        return value, like, grads

    def _log_prob(self, tensors: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} implements neither the flat kernel (penalty_partials) nor "
                                  "_log_prob")

    # --- curvature interface (Laplace evidence, autotune) ---------------------------------------------------------
    def precision_diagonal(self) -> torch.Tensor:
        """diag(Sigma^-1) (Woodbury for the low-rank prior).

        Returns:
            A flat float64 [P] tensor in ``names`` order, on the prior's device.
        """
        leaves = self._leaves_or_raise()
        if leaves == [self]:  # a leaf without its own: from its Gaussian parts
            _, d, factor = self._diagonal_parts("precision_diagonal")
            return d.reciprocal()
        return _concat([leaf.precision_diagonal() for leaf in leaves], torch.float64)

    def mean_flat(self) -> torch.Tensor:
        """The centre (a copy).

        Returns:
            A flat [P] tensor in ``names`` order in the stored dtype (zeros for a zero-centred prior).
        """
        leaves = self._leaves_or_raise()
        if leaves == [self]:
            return self.flat_parts(torch.float64)[0]
        return _concat([leaf.mean_flat() for leaf in leaves], None)

    def posterior_log_det(self, h: torch.Tensor) -> torch.Tensor:
        """``log det(diag(h) + Sigma^-1)`` (matrix determinant lemma for the low-rank prior).

        Args:
            h: flat non-negative curvature diagonal [P] in ``names`` order (e.g. a GGN diagonal); sharded: this
                rank's rows.

        Returns:
            A float64 0-dim tensor (sharded: of the whole model, the same on every rank).
        """
        h = _check_curvature(h, self.num_parameters)
        leaves, start, partials = self._leaves_or_raise(), 0, []
        for leaf in leaves:
            partials.append(leaf.log_det_partials(h[start:start + leaf.num_parameters]).reshape(-1))
            start += leaf.num_parameters
        if not partials:
            return torch.zeros((), dtype=torch.float64)
        device = partials[0].device
        flat = torch.cat([p.to(device) for p in partials])
        if self.reduce_stats is not None:
            flat = self.reduce_stats(flat)
        total, at = None, 0
        for leaf, part in zip(leaves, partials, strict=False):
            term = leaf.log_det_finish(flat[at:at + part.numel()])
            at += part.numel()
            total = term if total is None else total + term.to(total.device)
        return total

    # --- structure ---------------------------------------------------------------------------------------------
    def flat_leaves(self) -> list[Prior] | None:
        """The leaf priors (those with a flat kernel) in ``names`` order: ``[self]`` for a leaf, a composite's leaves,
        or ``None`` if some part can only be evaluated through ``_log_prob``."""
        if self._plan is False:
            self._plan = self._find_leaves()
        return self._plan

    @property
    def is_leaf(self) -> bool:
        """Whether this prior implements the flat kernel itself (:meth:`penalty_partials`)."""
        return type(self).penalty_partials is not Prior.penalty_partials

    def _find_leaves(self) -> list[Prior] | None:
        if self.is_leaf:
            return [self] if self.names else []
        parts = self._modules.get("parts")
        if parts is None:
            return None
        leaves: list[Prior] = []
        for part in parts.values() if isinstance(parts, nn.ModuleDict) else parts:
            sub = part.flat_leaves() if isinstance(part, Prior) else None
            if sub is None:
                return None
            leaves.extend(leaf for leaf in sub if leaf.names)
        return leaves if tuple(n for leaf in leaves for n in leaf.names) == self.names else None

    def _leaves_or_raise(self) -> list[Prior]:
        leaves = self.flat_leaves()
        if leaves is None:
            raise NotImplementedError(f"{type(self).__name__} has no flat implementation of this method")
        return leaves

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
    All parts are evaluated together: one flatten of the covered parameters per call.
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

    def local_rows(self, layout: ShardLayout) -> CompositePrior:
        """Each part over this rank's rows (see :meth:`Prior.local_rows`).

        Args:
            layout: the rows of every parameter of the composite.

        Returns:
            A composite of the same parts (and the same ``unregularized``) over the rows.
        """
        return CompositePrior({key: part.local_rows(layout.restrict(list(part.names)))
                               for key, part in self.parts.items()}, unregularized=self.unregularized)


def _accumulate(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``.grad += g`` (one foreach kernel), or ``.grad = g`` where it is None, as autograd's accumulation does."""
    existing, updates = [], []
    for t, g in zip(tensors, grads, strict=False):
        if not t.requires_grad:
            continue
        if g.dtype != t.dtype:
            g = g.to(t.dtype)
        if t.grad is None:
            t.grad = g
        else:
            existing.append(t.grad)
            updates.append(g)
    if existing:
        torch._foreach_add_(existing, updates)


def _add_grad_autograd(prior: Prior, params: Params, weight, return_value: bool):
    """add_grad_ for priors without a flat kernel: autograd on a detached graph."""
    tensors = [t for t in prior.gather(params) if t.requires_grad]
    with torch.enable_grad():
        value = prior.penalty(params)
        grads = torch.autograd.grad(value * weight, tensors, allow_unused=True) if tensors else []
    _accumulate(tensors, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors, strict=False)])
    return value.detach() if return_value else None


def _zero_like(tensors: list[torch.Tensor], params: Params) -> torch.Tensor:
    if tensors:
        return torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
    named = named_parameters(params)
    device = next(iter(named.values())).device if named else None
    return torch.zeros((), device=device)


def _concat(parts: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=dtype or torch.get_default_dtype())
    if len(parts) == 1:
        return parts[0]
    device = parts[0].device
    return torch.cat([p.to(device) for p in parts])


def _check_curvature(h: torch.Tensor, size: int) -> torch.Tensor:
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (size,):
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise InvalidValueError(f"curvature diagonal must be a flat tensor of {size} values, got {shape}")
    h = h.detach().double()
    check_finite(h, "curvature diagonal")
    if (h < 0).any():
        raise InvalidValueError(f"curvature diagonal holds {int((h < 0).sum())} negative value(s)")
    return h
