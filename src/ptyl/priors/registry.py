"""The prior kinds ptyl knows, each declared once with its recipe.

Everything that depends on the kind of a prior reads this registry: :func:`ptyl.priors.make_prior` (the builder),
the tuning grids (:func:`ptyl.tuning.default_grid`: the strength axis and its default range), the automatic tuning
strategies (:func:`ptyl.tuning.tune` with ``strategy="de-elbo"`` / ``"marglik"``: which hyper-parameters they may learn
and where they start), method parsing (:func:`ptyl.pipeline.parse_method`) and the command line's choices. Adding a kind is one new builder file plus one member line below (see
``docs/architecture.md``).

>>> PriorKind.parse("lowrank").recipe.axis
'scale'
>>> [str(kind) for kind in PriorKind if not kind.recipe.needs_posterior]
['l2sp', 'standard', 'none']
>>> PriorKind.parse("lowrank").recipe.learnable
('scale', 'eps')
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from ptyl.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ptyl.posterior.gaussian import SourcePosterior
    from ptyl.priors.base import Prior

__all__ = ["PriorKind", "PriorOptions", "PriorRecipe"]


@dataclass(frozen=True)
class PriorOptions:
    """The values a builder may read.

    Attributes:
        scale, eps, rank: rescaling of a learned prior (lambda, jitter, number of deviation columns).
        variance: variance of an isotropic prior.
        dtype: storage dtype of a learned prior's tensors.
        blocks: how a per-block prior partitions the parameters.
    """

    scale: float | Mapping[str, float] = 1.0
    eps: float = 0.0
    rank: int | None = None
    variance: float | None = None
    dtype: torch.dtype | None = None
    blocks: str | Sequence[str] = "auto"


Builder = Callable[[dict[str, "torch.Tensor"], "SourcePosterior | None", PriorOptions], "Prior | None"]


@dataclass(frozen=True)
class PriorRecipe:
    """How to build, tune and describe one kind of backbone prior.

    Attributes:
        needs_posterior: built from a learned :class:`~ptyl.posterior.SourcePosterior` (a prior file).
        axis: the option a tuner varies to make the prior weaker or stronger (``"scale"`` = lambda of a learned
            prior, ``"variance"`` of an isotropic one); ``None``: nothing to tune.
        log10_range: default search interval of ``axis`` in log10 units.
        default: value of ``axis`` when it is not tuned (the command line's default), and where the automatic tuning
            strategies start learning it (the midpoint of ``log10_range`` in log space for the built-in kinds).
        builder: ``"module:function"`` with signature ``(backbone, posterior, options) -> Prior | None``: the
            backbone parameters (name -> tensor), the posterior matched to them (or ``None``) and the
            :class:`PriorOptions`; ``None`` leaves the backbone unregularised. Imported on first use, so this file
            imports no prior code.
        hard_log10_bounds: how far a tuner may extend ``axis`` beyond ``log10_range`` when the best value sits on an
            edge (:func:`ptyl.tuning.tune`); ``None``: ``log10_range`` widened by 4 decades on each side.
        eps: default isotropic jitter of a learned prior, ``N(mu, lam Sigma + eps I)`` (ignored by other kinds).
        learnable: the backbone hyper-parameters the automatic strategies may learn by gradient
            (:func:`ptyl.autotune.build_family`; the head's ``head_variance`` is learnable for every kind). Empty: the
            kind has no differentiable family and only grid tuning applies to it.
    """

    needs_posterior: bool
    axis: str | None
    log10_range: tuple[float, float] | None
    default: float | None
    builder: str
    hard_log10_bounds: tuple[float, float] | None = None
    eps: float = 0.0

    @property
    def bounds(self) -> tuple[float, float] | None:
        """The hard log10 bounds of ``axis`` (see ``hard_log10_bounds``); ``None`` without an axis."""
        if self.hard_log10_bounds is not None:
            return self.hard_log10_bounds
        if self.log10_range is None:
            return None
        return self.log10_range[0] - 4.0, self.log10_range[1] + 4.0
    learnable: tuple[str, ...] = ()

    def build(self, backbone: dict[str, Any], posterior: Any, options: PriorOptions) -> Any:
        """Call the builder.

        Args:
            backbone: name -> tensor of the backbone parameters the prior covers.
            posterior: the :class:`~ptyl.posterior.SourcePosterior` matched to them (``None`` unless
                ``needs_posterior``).
            options: the :class:`PriorOptions`.

        Returns:
            The backbone :class:`~ptyl.priors.Prior`, or ``None`` for no backbone prior.
        """
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)(backbone, posterior, options)


class PriorKind(str, Enum):
    """A kind of backbone prior; ``PriorKind("lowrank") is PriorKind.LOWRANK`` and members compare equal to their
    names, so plain strings work wherever a kind is expected. ``kind.recipe`` is its :class:`PriorRecipe`."""

    recipe: PriorRecipe

    def __new__(cls, value: str, recipe: PriorRecipe) -> PriorKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.recipe = recipe
        return member

    __str__ = str.__str__
    __format__ = str.__format__

    # name = "value", PriorRecipe(needs_posterior, axis, log10_range, default, builder[, hard_log10_bounds, eps,
    #                              learnable])
    # Learned kinds: lambda in 10^[0, 4] with eps = 1e-3 holds the weights at the scale they have (median prior
    # std / median |mu| ~ 0.6-3 on the benchmarks' CNNs). Hard bounds: below 10^-3 the prior is N(mu, eps I) whatever
    # lambda is; the upper ones (10^12 for lambda, 10^8 for a variance) lie beyond where the N-aware diagnostic calls
    # the priors off at 10 examples per class on the benchmarks (lambda ~1e9, v ~1e4-1e6). Past them every search
    # has its exact off limit (no backbone prior) as a point anyway.
    LOWRANK = "lowrank", PriorRecipe(True, "scale", (0.0, 4.0), 100.0, "ptyl.priors.learned:build_lowrank",
                                     (-3.0, 12.0), 1e-3, ("scale", "eps"))
    DIAG = "diag", PriorRecipe(True, "scale", (0.0, 4.0), 100.0, "ptyl.priors.learned:build_diagonal",
                               (-3.0, 12.0), 1e-3, ("scale", "eps"))
    BLOCK = "block", PriorRecipe(True, "scale", (0.0, 4.0), 100.0, "ptyl.priors.block:build_block",
                                 (-3.0, 12.0), 1e-3, ("scale", "eps"))
    L2SP = "l2sp", PriorRecipe(False, "variance", (-5.0, -1.0), 1e-3, "ptyl.priors.isotropic_builders:build_l2sp",
                               (-9.0, 8.0), learnable=("variance",))
    STANDARD = "standard", PriorRecipe(False, "variance", (-1.0, 3.0), 10.0,
                                       "ptyl.priors.isotropic_builders:build_standard", (-5.0, 8.0),
                                       learnable=("variance",))
    NONE = "none", PriorRecipe(False, None, None, None, "ptyl.priors.isotropic_builders:build_none")

    @classmethod
    def parse(cls, value: str | PriorKind, what: str = "prior kind") -> PriorKind:
        """The member named ``value``.

        Args:
            value: a member or its name (case-insensitive).
            what: how an error message names the value.

        Returns:
            The :class:`PriorKind` member.

        Raises:
            ConfigError: an unknown name, listing the kinds.
        """
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ConfigError(f"unknown {what} {value!r}; choose one of {tuple(str(k) for k in cls)}") from None
