"""Build the full downstream prior of a model: a backbone prior (learned or isotropic) plus an isotropic head prior.

The methods compared in the paper, all through one function:

=============  ==============================================================  =================================
method         backbone prior                                                  reference
=============  ==============================================================  =================================
``lowrank``    N(mu, lam 1/2 (diag sigma^2 + D D^T/(k-1)) + eps I) from SWAG    Shwartz-Ziv et al. 2022
``diag``       N(mu, lam sigma^2 + eps) from SWAG                              Shwartz-Ziv et al. 2022
``l2sp``       N(theta_pretrained, variance I)                                 Li et al. 2018 (L2-SP)
``standard``   N(0, variance I)  (= weight decay 1/(N variance))               standard fine-tuning
``none``       no backbone prior                                               maximum likelihood
=============  ==============================================================  =================================

The new head always gets N(0, head_variance I), or nothing if ``head_variance`` is None.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ptyl.errors import ConfigError, ParameterMismatchError
from ptyl.params import as_name_list, name_matches, named_parameters
from ptyl.priors.base import CompositePrior, Prior
from ptyl.priors.isotropic import IsotropicGaussianPrior

if TYPE_CHECKING:  # runtime import would be circular (the posterior builds priors)
    from ptyl.posterior.gaussian import SourcePosterior

METHODS = ("lowrank", "diag", "l2sp", "standard", "none")


def make_prior(
    model: nn.Module,
    method: str,
    *,
    posterior: SourcePosterior | None = None,
    scale: float = 1.0,
    eps: float = 0.0,
    rank: int | None = None,
    variance: float | None = None,
    head: str | Sequence[str] | None = "head",
    head_variance: float | None = 1.0,
    unregularized: Sequence[str] = (),
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> CompositePrior:
    """The prior over every trainable parameter of ``model``.

    Args:
        method: one of :data:`METHODS`.
        posterior: the source posterior (``lowrank`` / ``diag``), e.g. from :func:`ptyl.io.load_posterior`.
        scale, eps, rank: rescaling of the learned prior (lambda, epsilon, k).
        variance: backbone variance for ``l2sp`` / ``standard``.
        head: module name(s) of the new task head. ``head_variance``: its isotropic prior variance (None: no prior).
        unregularized: names/prefixes/globs of parameters deliberately left without a prior.
        strict: a learned prior must cover every backbone parameter (else :class:`ParameterMismatchError`) and match
            the model's shapes; with ``strict=False`` uncovered parameters are left unregularised with a warning.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown prior method {method!r}; choose one of {METHODS}")
    params = {n: p for n, p in named_parameters(model).items() if p.requires_grad}
    heads = as_name_list(head)
    free = [n for n in params if any(name_matches(n, u) for u in unregularized)]
    head_names = [n for n in params if n not in free and any(name_matches(n, h) for h in heads)]
    if heads and not head_names and head_variance is not None:
        raise ConfigError(f"no parameter belongs to the head {head!r}; name the model's head module (e.g. 'fc')")
    backbone = {n: p for n, p in params.items() if n not in head_names and n not in free}
    parts: dict[str, Prior] = {}
    if method in ("lowrank", "diag"):
        if posterior is None:
            raise ConfigError(f"method {method!r} needs a learned posterior (a prior file)")
        matched = posterior.matched_to(backbone, strict=strict)
        uncovered = [n for n in backbone if n not in matched.mean]
        if uncovered and strict:
            raise ParameterMismatchError(
                f"{len(uncovered)} backbone parameter(s) have no learned prior: {uncovered[:6]}; pass them in "
                "`unregularized`, or strict=False"
            )
        if uncovered:
            warnings.warn(f"{len(uncovered)} backbone parameter(s) left without a prior: {uncovered[:6]}")
            free += uncovered
        parts["backbone"] = matched.to_prior(kind=method, scale=scale, eps=eps, rank=rank, dtype=dtype)
        parts["backbone"].skipped = tuple(matched.metadata.get("skipped", ()))
    elif method in ("l2sp", "standard"):
        if variance is None:
            raise ConfigError(f"method {method!r} needs a backbone prior variance")
        parts["backbone"] = IsotropicGaussianPrior.from_model(backbone, variance, centered=(method == "l2sp"))
    else:
        free += list(backbone)
    if head_names and head_variance is not None:
        parts["head"] = IsotropicGaussianPrior.from_model(
            {n: params[n] for n in head_names}, head_variance, centered=False
        )
    elif head_names:
        free += head_names
    return CompositePrior(parts, unregularized=free)
