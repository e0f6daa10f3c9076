"""Build the differentiable prior family of a model — the same parameter split and convention as
:func:`ptyl.priors.make_prior` (backbone prior + isotropic head prior), so that at equal hyper-parameters
``build_family(model, kind, ...).log_prob(model) == make_prior(model, kind, ...).log_prob(model)``.

Per kind, from the existing pieces (the :class:`~ptyl.posterior.SourcePosterior` dicts keyed by parameter name and the
model's named parameters):

- ``lowrank``: a = s2 / 2, V = D_k / sqrt(2 max(k - 1, 1)); k = 0 falls back to ``diag`` (as ``to_prior`` does);
- ``diag``:    a = s2;
- ``block``:   one ``lowrank`` family per block of :func:`ptyl.priors.block.assign_blocks`, one shared eps;
- ``l2sp`` / ``standard``: v I centred on the current (pretrained) weights / on zero.
The head gets N(0, v_h I).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ptyl.autotune.families import (
    BlockFamily,
    CompositeFamily,
    IsotropicFamily,
    LeafFamily,
    LearnedFamily,
    check_hyper,
)
from ptyl.errors import ConfigError, ParameterMismatchError
from ptyl.params import as_name_list, name_matches, named_parameters
from ptyl.priors.block import assign_blocks
from ptyl.priors.lowrank import check_rank
from ptyl.priors.registry import PriorKind

KINDS = tuple(kind for kind in PriorKind if kind.recipe.learnable)  # the kinds with a hyper-parameter to learn
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


def _check_learn(kind: str, learn: Sequence[str], eps: float, head_variance: float | None) -> set[str]:
    learn = set(learn)
    unknown = learn - set(HYPERS)
    if unknown:
        raise ConfigError(f"unknown hyper-parameter(s) {sorted(unknown)} to learn; choose from {HYPERS}")
    usable = set(kind.recipe.learnable) | ({"head_variance"} if head_variance is not None else set())
    if not learn & usable:
        raise ConfigError(f"prior kind {str(kind)!r} has no usable scale among learn={sorted(learn)}: learnable here are "
                          f"{sorted(usable)}")
    if "eps" in learn and kind.recipe.needs_posterior and eps <= 0:
        raise ConfigError("eps is learned in log space: give it a positive initial value (e.g. eps=1e-8)")
    return learn & usable


def _learned_parts(posterior, names: list[str], kind: str, rank: int | None):
    """(mean, base diag a, base factor V or None) dicts of the posterior restricted to ``names``."""
    post = posterior.restrict(names)
    k = check_rank(post.rank if rank is None else rank, post.rank)
    if kind is PriorKind.DIAG or k == 0:
        return post.mean, post.variance, None
    half = {n: 0.5 * v for n, v in post.variance.items()}
    div = math.sqrt(2.0 * max(k - 1, 1))
    return post.mean, half, {n: d[:k] / div for n, d in post.deviations.items()}


def _learned_family(posterior, names, kind, rank, scale, eps, learn, blocks, dtype) -> LeafFamily | BlockFamily:
    learn_eps = "eps" in learn
    if kind is not PriorKind.BLOCK:
        mean, a, v = _learned_parts(posterior, names, kind, rank)
        return LearnedFamily(mean, a, v, scale=scale, eps=eps, learn_scale="scale" in learn, learn_eps=learn_eps,
                             dtype=dtype)
    shared = nn.Parameter(torch.tensor(math.log(check_hyper(eps, "eps")), dtype=dtype)) if learn_eps else None
    parts = {}
    for b, block_names in assign_blocks(names, blocks).items():
        mean, a, v = _learned_parts(posterior, block_names, PriorKind.LOWRANK, rank)
        parts[b] = LearnedFamily(mean, a, v, scale=scale, eps=eps, learn_scale="scale" in learn, log_eps=shared,
                                 label=b, dtype=dtype)
    return BlockFamily(parts)


def build_family(
    model: nn.Module,
    kind: str,
    *,
    posterior=None,
    scale: float = 1.0,
    eps: float = 0.0,
    rank: int | None = None,
    variance: float = 1.0,
    head: str | Sequence[str] | None = "head",
    head_variance: float | None = 1.0,
    unregularized: Sequence[str] = (),
    blocks: Sequence[str] | str = "auto",
    learn: Sequence[str] = ("scale", "variance", "head_variance"),
    strict: bool = True,
    dtype: torch.dtype = torch.float64,
) -> CompositeFamily:
    """The prior family over every trainable parameter of ``model`` (parts ``"backbone"`` and ``"head"``).

    Args:
        kind: one of :data:`KINDS`. ``posterior``: the source posterior (``lowrank`` / ``diag`` / ``block``).
        scale, eps, rank, variance, head_variance: initial values / fixed settings, as in ``make_prior``
            (``head_variance=None``: no head prior, the head is left unregularised).
        learn: which of :data:`HYPERS` become parameters; the others stay fixed. At least one must apply.
        blocks: ``"auto"`` or module prefixes (``block`` only).
    """
    if kind not in KINDS:  # members compare equal to their names
        raise ConfigError(f"prior kind {str(kind)!r} has no scale to learn (its registry recipe declares no learnable "
                          f"hyper-parameter); choose one of {tuple(str(k) for k in KINDS)}")
    kind = PriorKind.parse(kind)
    learn = _check_learn(kind, learn, eps, head_variance)
    params, head_names, backbone, free = split_parameters(model, head, unregularized, head_variance is not None)
    parts: dict[str, LeafFamily | CompositeFamily] = {}
    if kind.recipe.needs_posterior:
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
        covered = [n for n in backbone if n in matched.mean]
        parts["backbone"] = _learned_family(matched, covered, kind, rank, scale, eps, learn, blocks, dtype)
    elif backbone:
        shapes = {n: tuple(params[n].shape) for n in backbone}
        center = {n: params[n] for n in backbone} if kind is PriorKind.L2SP else None
        parts["backbone"] = IsotropicFamily(shapes, variance, center, learn="variance" in learn, dtype=dtype)
    if head_names and head_variance is not None:
        shapes = {n: tuple(params[n].shape) for n in head_names}
        parts["head"] = IsotropicFamily(shapes, head_variance, None, learn="head_variance" in learn,
                                        hyper_name="head_variance", dtype=dtype)
    elif head_names:
        free += head_names
    if not parts:
        raise ConfigError("no parameter is left for the prior family to cover")
    return CompositeFamily(parts, unregularized=free)


__all__ = ["HYPERS", "KINDS", "build_family", "split_parameters"]
