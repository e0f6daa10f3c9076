"""Per-block low-rank prior: one independent low-rank Gaussian per module block (e.g. per transformer layer).

From one SWAG posterior (mean mu, diagonal sigma^2, deviations D with K columns; Shwartz-Ziv et al. 2022, arXiv
2205.10279) and a partition of the parameters into blocks b = 1..B:

    p(theta) = prod_b N(theta_b | mu_b, lam_b * 1/2 (diag sigma_b^2 + D_b D_b^T / (k - 1)) + eps I)

where D_b are the rows of the SAME deviation columns restricted to block b. Each factor is exactly the *marginal* of
block b under the global low-rank prior (a Gaussian's marginal keeps its covariance block); the product drops the
cross-block covariances D_b D_c^T, b != c, so the blocks become independent. What that buys:

- a separate scale ``lam_b`` (and rank) per block, e.g. a tighter prior on lower layers;
- each block's k x k capacitance is conditioned on its own block only, so a block with tiny deviations is not
  dominated by the others' directions;
- memory and cost stay O(P k) (same factor entries, B small k x k matrices instead of one).

It is *not* the global low-rank prior: the log-densities differ whenever blocks are correlated under SWAG.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.params import name_matches
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.priors.base import CompositePrior, Prior
from ptyl.priors.diagonal import DiagonalGaussianPrior
from ptyl.priors.learned import learned_prior
from ptyl.priors.lowrank import LowRankGaussianPrior
from ptyl.priors.registry import PriorKind, PriorOptions
from ptyl.sharding import ShardLayout

OTHER_BLOCK = "<other>"

__all__ = ["OTHER_BLOCK", "BlockLowRankPrior", "assign_blocks", "auto_block", "block_prior", "build_block"]


class BlockLowRankPrior(CompositePrior):
    """Independent priors over disjoint parameter blocks: ``log p = sum_b log p_b(theta_b)``.

    A :class:`~ptyl.priors.base.CompositePrior` whose parts are the blocks (so everything a composite prior offers,
    the evidence included, works per block).

    Args:
        blocks: block name (a module prefix such as ``encoder.layer.3``) -> a prior over that block's parameters
            (:class:`LowRankGaussianPrior`, or :class:`DiagonalGaussianPrior` for rank 0).
    """

    def __init__(self, blocks: Mapping[str, LowRankGaussianPrior | DiagonalGaussianPrior]):
        if not blocks:
            raise InvalidValueError("a block prior needs at least one block")
        for prior in blocks.values():
            if not isinstance(prior, Prior):
                raise InvalidValueError(f"block priors must be ptyl Priors, got {type(prior).__name__}")
        # module names may not contain '.', block names do: the parts are keyed by a '/'-spelling of the name
        super().__init__({_key(name): prior for name, prior in blocks.items()})
        self.blocks: tuple[str, ...] = tuple(blocks)

    def block(self, name: str) -> Prior:
        """The prior of one block.

        Args:
            name: the block's name (as in ``blocks``).

        Returns:
            Its :class:`~ptyl.priors.Prior`.
        """
        if name not in self.blocks:
            raise KeyError(f"no block {name!r}; blocks are {list(self.blocks)}")
        return self.parts[_key(name)]

    def local_rows(self, layout: ShardLayout) -> BlockLowRankPrior:
        """Each block over this rank's rows (see :meth:`ptyl.priors.Prior.local_rows`).

        Args:
            layout: the rows of every parameter.

        Returns:
            The block prior over the rows.
        """
        return BlockLowRankPrior({name: self.block(name).local_rows(layout.restrict(list(self.block(name).names)))
                                  for name in self.blocks})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={len(self.blocks)}"


def _key(block: str) -> str:
    return block.replace(".", "/")


_INDEX = re.compile(r"^\d+$")


def auto_block(name: str) -> str:
    """The block of a parameter name: its prefix up to the first numeric index (``encoder.layer.3``,
    ``features.0``, ``layer1.2``), or else its module (``head.weight`` -> ``head``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def assign_blocks(names: Sequence[str], blocks: Sequence[str] | str = "auto") -> dict[str, list[str]]:
    """Partition parameter names into blocks, in first-appearance order.

    ``blocks="auto"`` uses :func:`auto_block`. A list of module prefixes (or globs) assigns every name to the
    longest prefix that matches it; names matching none go to one extra block, :data:`OTHER_BLOCK`.
    """
    out: dict[str, list[str]] = {}
    if isinstance(blocks, str):
        if blocks != "auto":
            raise ConfigError(f"blocks must be 'auto' or a list of module prefixes, got {blocks!r}")
        for n in names:
            out.setdefault(auto_block(n), []).append(n)
        return out
    prefixes = list(blocks)
    if not prefixes:
        raise ConfigError("blocks is an empty list")
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"a block is listed twice in {prefixes}")
    out = {prefix: [] for prefix in prefixes}
    for n in names:
        matches = [p for p in prefixes if name_matches(n, p)]
        out.setdefault(max(matches, key=len) if matches else OTHER_BLOCK, []).append(n)
    unused = [p for p in prefixes if not out[p]]
    if unused:
        raise ConfigError(f"blocks {unused} match no parameter of the posterior")
    return out


def block_prior(
    posterior: SourcePosterior,
    blocks: Sequence[str] | str = "auto",
    scale: float | Mapping[str, float] | None = None,
    eps: float | None = None,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> BlockLowRankPrior:
    """A :class:`BlockLowRankPrior` from a :class:`~ptyl.posterior.SourcePosterior`.

    Each block's prior is ``learned_prior(posterior.restrict(block_names), "lowrank", scale_b, eps, rank, dtype)``:
    the same rescaling as the global prior, with the deviations restricted to the block (its marginal; see the
    module docstring for what is dropped).

    Args:
        blocks: ``"auto"`` (one block per indexed module, e.g. each transformer layer) or module prefixes.
        scale: lambda for every block, or block name -> lambda for each block (including :data:`OTHER_BLOCK` if
            some parameters fall outside the listed prefixes); ``None``: the ``block`` kind's registry default.
        eps: isotropic jitter of every block (``None``: the kind's default).
        rank: k <= K deviation columns (default all; 0 gives a diagonal prior per block).
        dtype: storage dtype of the prior's tensors.

    Returns:
        The :class:`BlockLowRankPrior`, blocks in first-appearance order.
    """
    options = PriorKind.BLOCK.recipe.options(scale=scale, eps=eps, rank=rank)
    scale, eps, rank = options.scale, options.eps, options.rank
    groups = assign_blocks(posterior.names, blocks)
    if isinstance(scale, Mapping):
        unknown = sorted(set(scale) - set(groups))
        if unknown:
            raise ConfigError(f"scale names unknown blocks {unknown}; blocks are {list(groups)}")
        missing = sorted(set(groups) - set(scale))
        if missing:
            raise ConfigError(f"scale gives no value for blocks {missing}")
        scales = {b: float(scale[b]) for b in groups}
    else:
        scales = {b: float(scale) for b in groups}
    for b, value in scales.items():
        if not (math.isfinite(value) and value > 0):
            raise InvalidValueError(f"scale of block {b!r} must be positive and finite, got {value!r}")
    parts = {
        b: learned_prior(posterior.restrict(names), PriorKind.LOWRANK, scale=scales[b], eps=eps, rank=rank, dtype=dtype)
        for b, names in groups.items()
    }
    return BlockLowRankPrior(parts)


def build_block(backbone, posterior: SourcePosterior, options: PriorOptions) -> BlockLowRankPrior:
    """Registry builder of the per-block prior: :func:`block_prior` with ``options.blocks`` (default ``"auto"``)."""
    return block_prior(posterior, options.blocks, options.scale, options.eps, options.rank, options.dtype)
