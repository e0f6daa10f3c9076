"""Build the full downstream prior of a model: a backbone prior (learned or isotropic) plus an isotropic head prior.

Every kind of :class:`~ptyl.priors.registry.PriorKind` goes through this one function:

=============  ==============================================================  =================================
kind           backbone prior                                                  reference
=============  ==============================================================  =================================
``lowrank``    N(mu, lam 1/2 (diag sigma^2 + D D^T/(k-1)) + eps I) from SWAG    Shwartz-Ziv et al. 2022
``diag``       N(mu, lam sigma^2 + eps) from SWAG                              Shwartz-Ziv et al. 2022
``block``      one low-rank factor per block (layer), blocks independent       :mod:`ptyl.priors.block`
``l2sp``       N(theta_pretrained, variance I)                                 Li et al. 2018 (L2-SP)
``standard``   N(0, variance I)  (= weight decay 1/(N variance))               standard fine-tuning
``none``       no backbone prior                                               maximum likelihood
=============  ==============================================================  =================================

The new head always gets N(0, head_variance I), or nothing if ``head_variance`` is None. Every value left out is the
kind's registry default (:attr:`~ptyl.priors.PriorRecipe.defaults`: lambda 100 and eps 1e-3 for the learned kinds,
variance 1e-3 for ``l2sp`` and 10 for ``standard``, head variance :data:`~ptyl.priors.registry.HEAD_VARIANCE`).

>>> from torch import nn
>>> model = nn.Sequential()
>>> model.add_module("body", nn.Linear(3, 4)); model.add_module("head", nn.Linear(4, 2))
>>> prior = make_prior(model, "standard", variance=1.0)
>>> sorted(prior.parts), prior.num_parameters
(['backbone', 'head'], 26)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ptyl.errors import ConfigError, ParameterMismatchError
from ptyl.params import as_name_list, head_like_names, name_matches, named_parameters
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.sharded import ShardedPosterior
from ptyl.priors.base import CompositePrior, Prior
from ptyl.priors.isotropic import IsotropicGaussianPrior
from ptyl.priors.registry import HEAD_VARIANCE, PriorKind, PriorOptions
from ptyl.priors.sharded import ShardedPrior
from ptyl.sharding import ShardLayout, local_tensor

__all__ = ["make_prior"]


def make_prior(
    model: nn.Module,
    kind: str | PriorKind,
    *,
    posterior: SourcePosterior | ShardedPosterior | None = None,
    scale: float | Mapping[str, float] | None = None,
    eps: float | None = None,
    rank: int | None = None,
    variance: float | None = None,
    blocks: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = "head",
    head_variance: float | None = HEAD_VARIANCE,
    unregularized: Sequence[str] = (),
    strict: bool = True,
    dtype: torch.dtype | None = None,
    sharded: bool | None = None,
) -> CompositePrior | ShardedPrior:
    """The prior over every trainable parameter of ``model``.

    Args:
        model: the downstream model (build the prior before training: ``l2sp`` centres on the current weights).
        kind: a :class:`PriorKind` or its name (``"lowrank"``, ``"diag"``, ``"block"``, ``"l2sp"``,
            ``"standard"``, ``"none"``).
        posterior: the source posterior of a learned kind, e.g. from :func:`ptyl.io.load_posterior`.
        scale, eps, rank: rescaling of a learned prior (lambda, epsilon, k); ``block`` also takes a mapping
            block -> lambda. ``None``: the kind's registry default (lambda 100, eps 1e-3, which caps the prior's
            precision at 1/eps, all K columns).
        variance: backbone variance of ``l2sp`` / ``standard`` (``None``: the kind's default).
        blocks: ``block`` only: ``"auto"`` (the default) or module prefixes (see :func:`ptyl.priors.block.block_prior`).
        head: module name(s) of the new task head. ``head_variance``: its isotropic prior variance (None: no prior).
        unregularized: names/prefixes/globs of parameters deliberately left without a prior.
        strict: a learned prior must cover every backbone parameter (else :class:`ParameterMismatchError`) and match
            the model's shapes; with ``strict=False`` uncovered parameters are left unregularised with a warning.
        dtype: storage dtype of a learned prior's tensors.
        sharded: build a :class:`~ptyl.priors.sharded.ShardedPrior` holding only this rank's rows (a collective: call
            it on every rank). Default: when the model is sharded (FSDP2's ``fully_shard``, DTensor parameters). The
            posterior may then be a :class:`~ptyl.posterior.ShardedPosterior` with the model's rows (e.g.
            ``load_posterior(path, shards=model)``, or a sharded SWAG collector's), or a full one (each rank keeps
            its rows).

    Returns:
        A :class:`CompositePrior` with parts ``"backbone"`` and ``"head"`` (each present when it has a prior) and the
        unregularised parameter names in ``unregularized``; sharded, a :class:`~ptyl.priors.sharded.ShardedPrior`
        around that composite over this rank's rows.
    """
    kind = PriorKind.parse(kind)
    params = {n: p for n, p in named_parameters(model).items() if p.requires_grad}
    layout = ShardLayout.from_params(params)
    if sharded is None:
        sharded = layout.sharded or isinstance(posterior, ShardedPosterior)
    options = kind.recipe.options(scale=scale, eps=eps, rank=rank, variance=variance, dtype=dtype, blocks=blocks)
    if not sharded:
        if isinstance(posterior, ShardedPosterior):
            raise ConfigError("a sharded posterior builds a sharded prior: leave sharded=None (or True)")
        return _build(params, kind, posterior, options, head, head_variance, unregularized, strict)
    local = {n: local_tensor(p) for n, p in params.items()}
    prior = _build(local, kind, posterior, options, head, head_variance, unregularized, strict, layout)
    return ShardedPrior.from_shards(prior, layout.restrict(list(prior.names)))


def _build(params: dict[str, torch.Tensor], kind: PriorKind, posterior, options: PriorOptions, head, head_variance,
           unregularized: Sequence[str], strict: bool, layout: ShardLayout | None = None) -> CompositePrior:
    """The composite prior over ``params``; sharded (``layout`` given), over this rank's rows of them, with the
    posterior matched on the global shapes and then cut to the same rows."""
    recipe = kind.recipe
    heads = as_name_list(head)
    free = [n for n in params if any(name_matches(n, u) for u in unregularized)]
    head_names = [n for n in params if n not in free and any(name_matches(n, h) for h in heads)]
    if heads and not head_names and head_variance is not None:
        raise ConfigError(f"no parameter belongs to the head {head!r}; name the model's head module (e.g. 'fc')")
    backbone = {n: p for n, p in params.items() if n not in head_names and n not in free}
    if recipe.axis is not None and getattr(options, recipe.axis) is None:
        raise ConfigError(f"prior kind {str(kind)!r} needs a backbone prior {recipe.axis}")
    matched = None
    if recipe.needs_posterior:
        if posterior is None:
            raise ConfigError(f"prior kind {str(kind)!r} needs a learned posterior (a prior file)")
        posterior = _without_head(posterior, head_names)
        against = backbone if layout is None else {n: torch.empty(layout.shards[n].shape, device="meta")
                                                   for n in backbone}
        matched = posterior.matched_to(against, strict=strict)
        suspicious = head_like_names(matched.names, heads)
        if suspicious:
            warnings.warn(f"the learned prior covers {suspicious[:4]}, named like a task head; if that is the new "
                          f"head, pass head=<its module name> (now {head!r})", stacklevel=3)
        uncovered = [n for n in backbone if n not in matched.names]
        if uncovered and strict:
            raise ParameterMismatchError(
                f"{len(uncovered)} backbone parameter(s) have no learned prior: {uncovered[:6]}; pass them in "
                "`unregularized`, or strict=False"
            )
        if uncovered:
            warnings.warn(f"{len(uncovered)} backbone parameter(s) left without a prior: {uncovered[:6]}", stacklevel=2)
            free += uncovered
        if layout is not None:
            matched = _rows_of(matched, layout)
    parts: dict[str, Prior] = {}
    backbone_prior = recipe.build(backbone, matched, options)
    if backbone_prior is None:
        free += list(backbone)
    else:
        parts["backbone"] = backbone_prior
        if matched is not None:
            backbone_prior.skipped = tuple(matched.metadata.get("skipped", ()))
    if head_names and head_variance is not None:
        parts["head"] = IsotropicGaussianPrior.from_model(
            {n: params[n] for n in head_names}, head_variance, centered=False
        )
    elif head_names:
        free += head_names
    return CompositePrior(parts, unregularized=free)


def _without_head(posterior: SourcePosterior | ShardedPosterior, head_names: Sequence[str]):
    """The posterior without entries for this model's new head (a prior learned without leaving that head out)."""
    covered = [n for n in head_names if n in posterior.names]
    if not covered:
        return posterior
    warnings.warn(f"the prior covers {covered[:4]}, the head here: those entries are ignored (learn the prior with "
                  "the same head name to leave them out)", stacklevel=4)
    return posterior.restrict([n for n in posterior.names if n not in covered])


def _rows_of(posterior: SourcePosterior | ShardedPosterior, layout: ShardLayout) -> SourcePosterior:
    """This rank's rows of a (matched) posterior, as a plain :class:`SourcePosterior` over the row blocks."""
    if isinstance(posterior, ShardedPosterior):
        if not posterior.layout.same_rows(layout.restrict(posterior.names)):
            raise ParameterMismatchError("the sharded posterior holds other rows than this rank's parameter shards "
                                         "(load it with shards=model)")
        return posterior.local
    return ShardedPosterior.from_full(posterior, layout).local
