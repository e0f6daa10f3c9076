"""Build the differentiable prior family of a model -- the same parameter split and convention as
:func:`ptyl.priors.make_prior` (backbone prior + isotropic head prior), so that at equal hyper-parameters
``build_family(model, kind, ...).log_prob(model) == make_prior(model, kind, ...).log_prob(model)``.

The backbone's family is the one its kind declares in the registry (:attr:`ptyl.priors.PriorRecipe.family`); a kind
that declares none is refused, so the automatic strategies never learn another prior than ``make_prior`` builds.
The families of the built-in kinds, from the existing pieces (the :class:`~ptyl.posterior.SourcePosterior` dicts
keyed by parameter name and the model's named parameters):

- ``lowrank`` (:func:`lowrank_family`): a = s2 / 2, V = D_k / sqrt(2 max(k - 1, 1)); k = 0 falls back to ``diag``;
- ``diag`` (:func:`diagonal_family`): a = s2;
- ``block`` (:func:`block_family`): one ``lowrank`` family per block of :func:`ptyl.priors.block.assign_blocks`, one
  shared eps;
- ``l2sp`` / ``standard`` (:func:`l2sp_family` / :func:`standard_family`): v I centred on the current (pretrained)
  weights / on zero;
- a kind whose covariance is linear in its axis, ``Sigma(h) = h Sigma_1 + eps I`` (:data:`ptyl.priors.SCALED_FAMILY`,
  :func:`scaled_family`): read from the kind's own prior at ``h = 1`` through its ``flat_parts`` and checked against
  its prior at the starting value.

The head gets N(0, v_h I). Every value left out is the kind's registry default (:attr:`PriorRecipe.defaults`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ptyl.autotune.families import BlockFamily, CompositeFamily, IsotropicFamily, LeafFamily, LearnedFamily, check_hyper
from ptyl.errors import ConfigError, ParameterMismatchError
from ptyl.params import as_name_list, name_matches, named_parameters
from ptyl.priors.block import assign_blocks
from ptyl.priors.lowrank import check_rank
from ptyl.priors.registry import HEAD_VARIANCE, PriorKind, PriorOptions, PriorRecipe

KINDS = tuple(kind for kind in PriorKind if kind.recipe.family is not None)  # the kinds with a family to learn
HYPERS = ("scale", "eps", "variance", "head_variance")


def split_parameters(model: nn.Module, head, unregularized: Sequence[str], need_head: bool):
    """(trainable params, head names, backbone names, unregularised names) exactly as ``make_prior`` splits them."""
    params = {n: p for n, p in named_parameters(model).items() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters")
    heads = as_name_list(head)
    free = [n for n in params if any(name_matches(n, u) for u in unregularized)]
    head_names = [n for n in params if n not in free and any(name_matches(n, h) for h in heads)]
    if heads and not head_names and need_head:
        raise ConfigError(f"no parameter belongs to the head {head!r}; name the model's head module (e.g. 'fc'); "
                          f"the model's parameters include {list(params)[:6]}")
    backbone = [n for n in params if n not in head_names and n not in free]
    return params, head_names, backbone, free


def _check_learn(kind: PriorKind, learn: Sequence[str], eps: float, head_variance: float | None) -> set[str]:
    learn = set(learn)
    unknown = learn - set(HYPERS)
    if unknown:
        raise ConfigError(f"unknown hyper-parameter(s) {sorted(unknown)} to learn; choose from {HYPERS}")
    usable = set(kind.recipe.learnable) | ({"head_variance"} if head_variance is not None else set())
    if not learn & usable:
        raise ConfigError(f"prior kind {str(kind)!r} has no usable scale among learn={sorted(learn)}: learnable "
                          f"here are {sorted(usable)}")
    if "eps" in learn and kind.recipe.needs_posterior and eps <= 0:
        raise ConfigError("eps is learned in log space: give it a positive initial value (e.g. eps=1e-8)")
    return learn & usable


def _learned_parts(posterior, names: list[str], rank: int | None, diagonal: bool):
    """(mean, base diag a, base factor V or None) dicts of the posterior restricted to ``names``."""
    post = posterior.restrict(names)
    k = check_rank(post.rank if rank is None else rank, post.rank)
    if diagonal or k == 0:
        return post.mean, post.variance, None
    half = {n: 0.5 * v for n, v in post.variance.items()}
    div = math.sqrt(2.0 * max(k - 1, 1))
    return post.mean, half, {n: d[:k] / div for n, d in post.deviations.items()}


def lowrank_family(recipe: PriorRecipe, backbone, posterior, options: PriorOptions, learn: set[str],
                   dtype: torch.dtype) -> LearnedFamily:
    """The learned low-rank family ``lam * 1/2 (diag s2 + D D^T / max(k-1, 1)) + eps I`` (``lowrank``'s).

    Args:
        recipe: the kind's recipe.
        backbone: name -> tensor of the covered backbone parameters.
        posterior: the source posterior matched to them.
        options: the resolved options (initial lam and eps, rank).
        learn: which of ``scale`` / ``eps`` are parameters.
        dtype: the family's dtype.

    Returns:
        A :class:`~ptyl.autotune.families.LearnedFamily`.
    """
    mean, a, v = _learned_parts(posterior, list(backbone), options.rank, diagonal=False)
    return LearnedFamily(mean, a, v, scale=options.scale, eps=options.eps, learn_scale="scale" in learn,
                         learn_eps="eps" in learn, dtype=dtype)


def diagonal_family(recipe: PriorRecipe, backbone, posterior, options: PriorOptions, learn: set[str],
                    dtype: torch.dtype) -> LearnedFamily:
    """The learned diagonal family ``lam * s2 + eps`` (``diag``'s; arguments as :func:`lowrank_family`).

    Returns:
        A :class:`~ptyl.autotune.families.LearnedFamily` without a factor.
    """
    mean, a, v = _learned_parts(posterior, list(backbone), options.rank, diagonal=True)
    return LearnedFamily(mean, a, v, scale=options.scale, eps=options.eps, learn_scale="scale" in learn,
                         learn_eps="eps" in learn, dtype=dtype)


def block_family(recipe: PriorRecipe, backbone, posterior, options: PriorOptions, learn: set[str],
                 dtype: torch.dtype) -> BlockFamily:
    """One low-rank family per block, a lam_b each and one shared eps (``block``'s; arguments as
    :func:`lowrank_family`, ``options.blocks`` the partition).

    Returns:
        A :class:`~ptyl.autotune.families.BlockFamily`.
    """
    learn_eps = "eps" in learn
    shared = nn.Parameter(torch.tensor(math.log(check_hyper(options.eps, "eps")), dtype=dtype)) if learn_eps else None
    parts = {}
    for b, block_names in assign_blocks(list(backbone), options.blocks).items():
        mean, a, v = _learned_parts(posterior, block_names, options.rank, diagonal=False)
        scale = options.scale[b] if isinstance(options.scale, dict) else options.scale
        parts[b] = LearnedFamily(mean, a, v, scale=scale, eps=options.eps, learn_scale="scale" in learn,
                                 log_eps=shared, label=b, dtype=dtype)
    return BlockFamily(parts)


def l2sp_family(recipe: PriorRecipe, backbone, posterior, options: PriorOptions, learn: set[str],
                dtype: torch.dtype) -> IsotropicFamily:
    """``N(theta_0, v I)`` centred on the current (pretrained) weights (``l2sp``'s; arguments as
    :func:`lowrank_family`).

    Returns:
        An :class:`~ptyl.autotune.families.IsotropicFamily`.
    """
    shapes = {n: tuple(p.shape) for n, p in backbone.items()}
    return IsotropicFamily(shapes, options.variance, dict(backbone), learn="variance" in learn, dtype=dtype)


def standard_family(recipe: PriorRecipe, backbone, posterior, options: PriorOptions, learn: set[str],
                    dtype: torch.dtype) -> IsotropicFamily:
    """``N(0, v I)`` (``standard``'s; arguments as :func:`lowrank_family`).

    Returns:
        An :class:`~ptyl.autotune.families.IsotropicFamily`.
    """
    shapes = {n: tuple(p.shape) for n, p in backbone.items()}
    return IsotropicFamily(shapes, options.variance, None, learn="variance" in learn, dtype=dtype)


def scaled_family(recipe: PriorRecipe, backbone, posterior, options: PriorOptions, learn: set[str],
                  dtype: torch.dtype) -> LearnedFamily:
    """The family ``Sigma(h) = h Sigma_1 + eps I`` of a kind whose covariance is linear in its axis ``h``
    (:data:`ptyl.priors.SCALED_FAMILY`): ``Sigma_1`` is the kind's own prior at ``h = 1``, ``eps = 0``, read through
    its :meth:`~ptyl.priors.Prior.flat_parts` (``d = h d_1 + eps``, ``U = sqrt(h) U_1``), so it is the prior the
    builder makes. Checked against the builder's prior at the starting values (a kind that is not linear in its
    axis is refused rather than learned wrongly). Arguments as :func:`lowrank_family`.

    Returns:
        A :class:`~ptyl.autotune.families.LearnedFamily` whose strength is named after the axis.

    Raises:
        ConfigError: the kind's prior has several leaves, does not describe itself (``flat_parts``), or is not
            ``h Sigma_1 + eps I``.
    """
    axis = recipe.axis
    unit = _one_leaf(recipe.build(backbone, posterior, replace(options, **{axis: 1.0, "eps": 0.0})), recipe)
    mean, d1, u1 = unit.flat_parts(torch.float64)
    sizes = [math.prod(s) for s in unit.shapes]
    split = lambda flat: dict(zip(unit.names, (t.reshape(s) for t, s in  # noqa: E731
                                               zip(flat.split(sizes, -1), unit.shapes, strict=True)), strict=True))
    factor = None if u1 is None else {n: t.reshape(u1.shape[0], *s) for n, t, s in
                                      zip(unit.names, u1.split(sizes, 1), unit.shapes, strict=True)}
    family = LearnedFamily(split(mean), split(d1), factor, scale=getattr(options, axis), eps=options.eps,
                           learn_scale=axis in learn, learn_eps="eps" in learn, scale_name=axis, dtype=dtype)
    _check_same_prior(family, _one_leaf(recipe.build(backbone, posterior, options), recipe), recipe)
    return family


def _one_leaf(prior, recipe: PriorRecipe):
    leaves = prior.flat_leaves() if prior is not None else None
    if not leaves or len(leaves) != 1:
        raise ConfigError(f"the prior of {recipe.builder!r} is not one distribution with a flat kernel: "
                          "SCALED_FAMILY cannot describe it; give its recipe a family of its own")
    return leaves[0]


def _check_same_prior(family: LearnedFamily, built, recipe: PriorRecipe, rtol: float = 1e-4) -> None:
    """The family at its starting values has the mean, diagonal and factor of the builder's prior there."""
    with torch.no_grad():
        want = built.flat_parts(torch.float64)
        d, u = family.covariance_parts()
        got = (family.mean, d, u)
        same = (u is None) == (want[2] is None) and all(
            a is None or (a.shape == b.shape and torch.allclose(a.cpu(), b.cpu(), rtol=rtol, atol=1e-12))
            for a, b in zip(got, want, strict=False))
    if not same:
        raise ConfigError(f"the prior of {recipe.builder!r} is not h Sigma_1 + eps I in its axis {recipe.axis!r}: "
                          "SCALED_FAMILY would learn another prior than it builds; give its recipe a family of its "
                          "own")


def build_family(
    model: nn.Module,
    kind: str | PriorKind,
    *,
    posterior=None,
    scale: float | dict[str, float] | None = None,
    eps: float | None = None,
    rank: int | None = None,
    variance: float | None = None,
    head: str | Sequence[str] | None = "head",
    head_variance: float | None = HEAD_VARIANCE,
    unregularized: Sequence[str] = (),
    blocks: Sequence[str] | str | None = None,
    learn: Sequence[str] = ("scale", "variance", "head_variance"),
    strict: bool = True,
    dtype: torch.dtype = torch.float64,
) -> CompositeFamily:
    """The prior family over every trainable parameter of ``model`` (parts ``"backbone"`` and ``"head"``).

    Args:
        model: the downstream model (build the family before training: ``l2sp`` centres on the current weights).
        kind: one of :data:`KINDS` (a kind whose recipe declares a family). ``posterior``: the source posterior of a
            learned kind.
        scale, eps, rank, variance, head_variance: initial values / fixed settings, as in ``make_prior``; ``None``:
            the kind's registry default (``head_variance=None``: no head prior, the head is left unregularised).
        learn: which of :data:`HYPERS` become parameters; the others stay fixed. At least one must apply.
        blocks: ``"auto"`` or module prefixes (``block`` only).
        head, unregularized, strict: as in ``make_prior``.
        dtype: of the family's tensors.

    Returns:
        A :class:`~ptyl.autotune.families.CompositeFamily`.

    Raises:
        ConfigError: the kind declares no family (tune it on a grid), nothing to learn, a missing posterior or head.
    """
    kind = PriorKind.parse(kind)
    recipe = kind.recipe
    if recipe.family is None:
        raise ConfigError(f"prior kind {str(kind)!r} declares no differentiable family (PriorRecipe.family), so the "
                          f"automatic strategies cannot learn its hyper-parameters; tune it with strategy 'grid', or "
                          f"use one of {tuple(str(k) for k in KINDS)}")
    options = recipe.options(scale=scale, eps=eps, rank=rank, variance=variance, blocks=blocks)
    learn = _check_learn(kind, learn, options.eps, head_variance)
    params, head_names, backbone, free = split_parameters(model, head, unregularized, head_variance is not None)
    parts: dict[str, LeafFamily | CompositeFamily] = {}
    matched = None
    if recipe.needs_posterior:
        if posterior is None:
            raise ConfigError(f"prior kind {str(kind)!r} needs the source posterior (a prior file)")
        matched = posterior.matched_to({n: params[n] for n in backbone}, strict=strict)
        uncovered = [n for n in backbone if n not in matched.mean]
        if uncovered and strict:
            raise ParameterMismatchError(f"{len(uncovered)} backbone parameter(s) have no learned prior: "
                                         f"{uncovered[:6]}; pass them in `unregularized`, or strict=False")
        if uncovered:
            warnings.warn(f"{len(uncovered)} backbone parameter(s) left without a prior: {uncovered[:6]}", stacklevel=2)
            free += uncovered
        backbone = [n for n in backbone if n in matched.mean]
    if backbone:
        parts["backbone"] = recipe.build_family({n: params[n] for n in backbone}, matched, options, learn, dtype)
    if head_names and head_variance is not None:
        shapes = {n: tuple(params[n].shape) for n in head_names}
        parts["head"] = IsotropicFamily(shapes, head_variance, None, learn="head_variance" in learn,
                                        hyper_name="head_variance", dtype=dtype)
    elif head_names:
        free += head_names
    if not parts:
        raise ConfigError("no parameter is left for the prior family to cover")
    return CompositeFamily(parts, unregularized=free)


__all__ = ["HYPERS", "KINDS", "block_family", "build_family", "diagonal_family", "l2sp_family", "lowrank_family",
           "scaled_family", "split_parameters", "standard_family"]
