"""The prior kinds ptyl knows, each declared once with its recipe -- and every default of every kind.

Everything that depends on the kind of a prior reads this registry: :func:`ptyl.priors.make_prior` (the builder),
:func:`ptyl.io.load_prior`, :func:`ptyl.priors.learned_prior`, the tuning grids (:func:`ptyl.tuning.default_grid`:
the strength axis and its default range), the tuner's :class:`~ptyl.tuning.PriorSpec`, the automatic tuning
strategies (:func:`ptyl.tuning.tune` with ``strategy="de-elbo"`` / ``"marglik"``: the differentiable family, which
hyper-parameters they may learn and where they start), method parsing (:func:`ptyl.pipeline.parse_method`) and the
command line's choices and defaults. A value left out anywhere (``scale=None``, ``eps=None``, ...) is the recipe's
(:attr:`PriorRecipe.defaults`, resolved by :meth:`PriorRecipe.options`); the new head's variance is
:data:`HEAD_VARIANCE` for every kind. Adding a kind is one new file plus one member line below (see
``docs/architecture.md``).

>>> PriorKind.parse("lowrank").recipe.axis
'scale'
>>> ", ".join(str(kind) for kind in PriorKind if not kind.recipe.needs_posterior)
'l2sp, standard, none'
>>> PriorKind.parse("lowrank").recipe.learnable
('scale', 'eps')
>>> PriorKind.parse("lowrank").recipe.defaults
{'scale': 100.0, 'eps': 0.001, 'rank': None, 'variance': None, 'head_variance': 1.0}
>>> PriorKind.parse("l2sp").recipe.options().variance
0.001
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ptyl.errors import ConfigError
from ptyl.named_enum import NamedEnum

if TYPE_CHECKING:
    import torch

    from ptyl.posterior.gaussian import SourcePosterior
    from ptyl.priors.base import Prior

__all__ = ["HEAD_VARIANCE", "SCALED_FAMILY", "PriorKind", "PriorOptions", "PriorRecipe"]


HEAD_VARIANCE = 1.0
"""The variance of the new head's prior ``N(0, v_h I)``, the same for every kind (``head_variance``'s default)."""

SCALED_FAMILY = "ptyl.autotune.build:scaled_family"
"""The generic differentiable family ``Sigma(h) = h Sigma_1 (+ eps I)`` (:func:`ptyl.autotune.build.scaled_family`):
for a kind whose covariance is linear in its axis, built from the kind's own builder (so it is the same prior)."""


@dataclass(frozen=True)
class PriorOptions:
    """The values a builder reads, every one resolved (:meth:`PriorRecipe.options` fills what was not given from the
    kind's defaults; ``None`` only where it means something: ``rank=None`` = all K columns, ``variance=None`` for a
    kind that has none).

    Attributes:
        scale, eps, rank: rescaling of a learned prior (lambda, jitter, number of deviation columns); ``block`` also
            takes a mapping block -> lambda.
        variance: variance of an isotropic prior.
        dtype: storage dtype of a learned prior's tensors (``None``: the posterior's).
        blocks: how a per-block prior partitions the parameters.
    """

    scale: float | Mapping[str, float] | None = None
    eps: float | None = None
    rank: int | None = None
    variance: float | None = None
    dtype: torch.dtype | None = None
    blocks: str | Sequence[str] = "auto"


Builder = Callable[[dict[str, "torch.Tensor"], "SourcePosterior | None", PriorOptions], "Prior | None"]


@dataclass(frozen=True)
class PriorRecipe:
    """How to build, tune and describe one kind of backbone prior, with every default of the kind.

    Attributes:
        needs_posterior: built from a learned :class:`~ptyl.posterior.SourcePosterior` (a prior file).
        axis: the option a tuner varies to make the prior weaker or stronger (``"scale"`` = lambda of a learned
            prior, ``"variance"`` of an isotropic one); ``None``: nothing to tune.
        log10_range: default search interval of ``axis`` in log10 units.
        default: value of ``axis`` when it is not given (:func:`ptyl.priors.make_prior`, the command line, the
            tuner's :class:`~ptyl.tuning.PriorSpec`), and where the automatic tuning strategies start learning it
            (the midpoint of ``log10_range`` in log space for the built-in kinds).
        builder: ``"module:function"`` with signature ``(backbone, posterior, options) -> Prior | None``: the
            backbone parameters (name -> tensor), the posterior matched to them (or ``None``) and the resolved
            :class:`PriorOptions`; ``None`` leaves the backbone unregularised. Imported on first use, so this file
            imports no prior code.
        hard_log10_bounds: how far a tuner may extend ``axis`` beyond ``log10_range`` when the best value sits on an
            edge (:func:`ptyl.tuning.tune`); ``None``: ``log10_range`` widened by 4 decades on each side.
        eps: default isotropic jitter of a learned prior, ``N(mu, lam Sigma + eps I)`` (ignored by other kinds).
        learnable: the backbone hyper-parameters the automatic strategies may learn by gradient (the head's
            ``head_variance`` is learnable for every kind). Empty: only grid tuning applies to the kind.
        family: ``"module:function"`` building the kind's differentiable prior family for the automatic strategies
            (:func:`ptyl.autotune.build_family`), signature ``(recipe, backbone, posterior, options, learn, dtype) ->
            family``
            (a :class:`~ptyl.autotune.families.LeafFamily` or ``CompositeFamily`` whose ``to_prior()`` is the
            builder's prior at the same values); :data:`SCALED_FAMILY` for a kind linear in its axis. Required when
            ``learnable`` is not empty: a kind without one is refused by the automatic strategies.
        rank: default number of deviation columns of a learned kind (``None``: all K of the file).
    """

    needs_posterior: bool
    axis: str | None
    log10_range: tuple[float, float] | None
    default: float | None
    builder: str
    hard_log10_bounds: tuple[float, float] | None = None
    eps: float = 0.0
    learnable: tuple[str, ...] = ()
    family: str | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.learnable and self.family is None:
            raise ConfigError(f"the prior recipe of {self.builder!r} declares learnable hyper-parameters "
                              f"{self.learnable} but no family: give it family=SCALED_FAMILY (a covariance linear in "
                              "its axis) or a family builder of its own, else the automatic strategies would learn "
                              "another prior than it builds")
        if self.axis is not None and self.axis not in ("scale", "variance"):
            raise ConfigError(f"the prior recipe of {self.builder!r} has axis {self.axis!r}; choose 'scale' or "
                              "'variance' (a PriorOptions field)")

    @property
    def bounds(self) -> tuple[float, float] | None:
        """The hard log10 bounds of ``axis`` (see ``hard_log10_bounds``); ``None`` without an axis."""
        if self.hard_log10_bounds is not None:
            return self.hard_log10_bounds
        if self.log10_range is None:
            return None
        return self.log10_range[0] - 4.0, self.log10_range[1] + 4.0

    @property
    def defaults(self) -> dict[str, Any]:
        """The kind's default of every option a user may leave out: ``scale``, ``eps``, ``rank``, ``variance`` and
        ``head_variance`` (``scale`` 1 where it is not the axis: it is a plain factor; ``variance`` ``None`` where
        the kind has none)."""
        values: dict[str, Any] = {"scale": 1.0, "eps": self.eps, "rank": self.rank, "variance": None,
                                  "head_variance": HEAD_VARIANCE}
        if self.axis is not None:
            values[self.axis] = self.default
        return values

    def options(self, *, scale: float | Mapping[str, float] | None = None, eps: float | None = None,
                rank: int | None = None, variance: float | None = None, dtype: torch.dtype | None = None,
                blocks: str | Sequence[str] | None = None) -> PriorOptions:
        """The :class:`PriorOptions` of the given values, each one left out (``None``) taken from :attr:`defaults`.

        Args:
            scale, eps, rank, variance, dtype, blocks: as in :func:`ptyl.priors.make_prior`.

        Returns:
            The resolved options.
        """
        given = {"scale": scale, "eps": eps, "rank": rank, "variance": variance}
        values = {k: self.defaults[k] if v is None else v for k, v in given.items()}
        return PriorOptions(**values, dtype=dtype, blocks="auto" if blocks is None else blocks)

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
        return _resolve(self.builder)(backbone, posterior, options)

    def build_family(self, backbone: dict[str, Any], posterior: Any, options: PriorOptions, learn: set[str],
                     dtype: Any) -> Any:
        """Call the family builder (see ``family``).

        Args:
            backbone, posterior, options: as in :meth:`build`.
            learn: the hyper-parameters to learn (a subset of ``learnable``).
            dtype: the family's dtype.

        Returns:
            The backbone's differentiable family.

        Raises:
            ConfigError: the kind declares no family.
        """
        if self.family is None:
            raise ConfigError(f"prior kind with builder {self.builder!r} has no differentiable family")
        return _resolve(self.family)(self, backbone, posterior, options, learn, dtype)


def _resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class PriorKind(NamedEnum):
    """A kind of backbone prior; ``PriorKind("lowrank") is PriorKind.LOWRANK`` and members compare equal to their
    names, so plain strings work wherever a kind is expected. ``kind.recipe`` is its :class:`PriorRecipe`."""

    recipe: PriorRecipe

    def __new__(cls, value: str, recipe: PriorRecipe) -> PriorKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.recipe = recipe
        return member

    # name = "value", PriorRecipe(needs_posterior, axis, log10_range, default, builder[, hard_log10_bounds, eps,
    #                              learnable, family, rank])
    # Learned kinds: lambda in 10^[0, 4] with eps = 1e-3 holds the weights at the scale they have (median prior
    # std / median |mu| ~ 0.6-3 on the benchmarks' CNNs). Hard bounds: below 10^-3 the prior is N(mu, eps I) whatever
    # lambda is; the upper ones (10^12 for lambda, 10^8 for a variance) lie beyond where the N-aware diagnostic calls
    # the priors off at 10 examples per class on the benchmarks (lambda ~1e9, v ~1e4-1e6). Past them every search
    # has its exact off limit (no backbone prior) as a point anyway.
    LOWRANK = "lowrank", PriorRecipe(True, "scale", (0.0, 4.0), 100.0, "ptyl.priors.learned:build_lowrank",
                                     (-3.0, 12.0), 1e-3, ("scale", "eps"), "ptyl.autotune.build:lowrank_family")
    DIAG = "diag", PriorRecipe(True, "scale", (0.0, 4.0), 100.0, "ptyl.priors.learned:build_diagonal",
                               (-3.0, 12.0), 1e-3, ("scale", "eps"), "ptyl.autotune.build:diagonal_family")
    BLOCK = "block", PriorRecipe(True, "scale", (0.0, 4.0), 100.0, "ptyl.priors.block:build_block",
                                 (-3.0, 12.0), 1e-3, ("scale", "eps"), "ptyl.autotune.build:block_family")
    L2SP = "l2sp", PriorRecipe(False, "variance", (-5.0, -1.0), 1e-3, "ptyl.priors.isotropic_builders:build_l2sp",
                               (-9.0, 8.0), learnable=("variance",), family="ptyl.autotune.build:l2sp_family")
    STANDARD = "standard", PriorRecipe(False, "variance", (-1.0, 3.0), 10.0,
                                       "ptyl.priors.isotropic_builders:build_standard", (-5.0, 8.0),
                                       learnable=("variance",), family="ptyl.autotune.build:standard_family")
    NONE = "none", PriorRecipe(False, None, None, None, "ptyl.priors.isotropic_builders:build_none")

