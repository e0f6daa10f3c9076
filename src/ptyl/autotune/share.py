"""How much of the MAP objective's curvature the prior contributes: the N-aware strength diagnostic.

The downstream objective ``U(theta) = -(1/N) sum_n log p(y_n | x_n, theta) - (1/N) log p(theta)`` has the curvature
``(G + P) / N``: ``G`` the generalised Gauss-Newton matrix of the *summed* negative log-likelihood, ``P`` the prior's
precision. Per block ``b`` of the backbone (the parameters of one layer)

    share_b = tr(P_b) / (tr(P_b) + tr(G_b))

(the diagonals of both, ``P`` through :meth:`ptyl.priors.Prior.precision_diagonal`, ``G`` the exact diagonal GGN on
the training examples). ``G`` grows with N and ``P`` does not, so the same prior weighs less on more data: an
isotropic ``N(theta0, v I)`` is a weight decay of ``1 / (N v)`` toward ``theta0``, strong at N = 50 and v = 1 (a
std ratio of ~30, which a weight-magnitude rule would call "off") and negligible at N = 50,000.

A prior is **off** when every block's share is below :data:`OFF_SHARE` = 1%: it adds less than 1% to the curvature
of every layer, so it moves the solution by less than ~1% of the distance to its mean (to first order around the
MAP, ``delta = (G + P)^-1 P (mu - theta)``). Anything above is "on", however wide the prior looks next to the
weights. The curvature is taken at the model the diagnostic is given (a trial's trained model), on up to
``max_examples`` of its training examples (scaled to N).

>>> import torch
>>> from torch import nn
>>> from torch.utils.data import TensorDataset
>>> from ptyl.priors import IsotropicGaussianPrior
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(4, 3))
>>> data = TensorDataset(torch.randn(50, 4), torch.arange(50) % 3)
>>> strong = prior_share(IsotropicGaussianPrior({"0.weight": (3, 4)}, variance=1.0), model, data, part=None)
>>> weak = prior_share(IsotropicGaussianPrior({"0.weight": (3, 4)}, variance=1e6), model, data, part=None)
>>> strong.off, weak.off
(False, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ptyl.autotune.curvature import compute_curvature
from ptyl.autotune.data import checked_batches, model_outputs
from ptyl.autotune.likelihoods import Likelihood, get_likelihood
from ptyl.priors.base import CompositePrior, Prior
from ptyl.validation import check_int, check_positive_number

__all__ = ["OFF_SHARE", "PriorShare", "block_of", "prior_share"]

OFF_SHARE = 0.01
MC_SAMPLES = 8  # sampled targets per position for per-position (segmentation) outputs, where the exact GGN is too dear


@dataclass(frozen=True)
class PriorShare:
    """The N-aware strength diagnostic of one prior at one model.

    Attributes:
        share: the largest block share (what ``off`` is decided on); 0 without a prior.
        total: ``tr(P) / (tr(P) + tr(G))`` over the whole part.
        blocks: block name (a layer) -> its share.
        off: ``share < threshold``.
        threshold: :data:`OFF_SHARE` unless told otherwise.
        num_data: N, the examples ``G`` is scaled to.
        examples: the examples ``G`` was computed on.
    """

    share: float
    total: float
    blocks: dict[str, float] = field(default_factory=dict)
    off: bool = True
    threshold: float = OFF_SHARE
    num_data: int = 0
    examples: int = 0

    @property
    def label(self) -> str:
        """``"prior off"`` or ``"prior on"``."""
        return "prior off" if self.off else "prior on"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (and the label)."""
        return {**asdict(self), "label": self.label}


def block_of(name: str) -> str:
    """The block a parameter belongs to: its module (``layer1.0.conv.weight`` -> ``layer1.0.conv``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def prior_share(
    prior: Prior | None,
    model: nn.Module,
    data: Dataset,
    *,
    part: str | None = "backbone",
    num_data: int | None = None,
    likelihood: str | Likelihood = "categorical",
    max_examples: int = 512,
    batch_size: int = 128,
    collate_fn: Callable | None = None,
    threshold: float = OFF_SHARE,
    seed: int = 0,
) -> PriorShare:
    """The prior's share of the MAP objective's curvature, per block (see the module docstring).

    Args:
        prior: the prior (a :func:`ptyl.priors.make_prior` composite: its ``part`` is measured), or ``None``.
        model: where the curvature is taken (evaluation mode; e.g. the trained model).
        data: the training examples of the objective.
        part: which part of a composite prior to measure (``None``: all of the prior).
        num_data: N of the objective (default ``len(data)``).
        likelihood: the data term's likelihood (:func:`ptyl.autotune.get_likelihood`).
        max_examples: the GGN is computed on at most this many examples (a seeded subset), scaled to N.
        batch_size, collate_fn: how the examples are batched.
        threshold: the share below which the prior counts as off.
        seed: picks the subset.

    Returns:
        A :class:`PriorShare`; a missing prior or part is ``off`` with share 0.
    """
    check_positive_number(threshold, "threshold")
    max_examples = check_int(max_examples, "max_examples", minimum=1)
    if isinstance(prior, CompositePrior) and part is not None:
        prior = prior.parts[part] if part in prior.parts else None
    total = len(data)  # type: ignore[arg-type]
    n = int(num_data) if num_data is not None else total
    if prior is None or prior.num_parameters == 0:
        return PriorShare(0.0, 0.0, {}, True, threshold, n, 0)
    subset = _subset(data, max_examples, seed)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    fisher = _fisher_for(model, loader)
    curvature = compute_curvature(model, loader, get_likelihood(likelihood), list(prior.names), method="diag",
                                  fisher=fisher, mc_samples=1 if fisher == "exact" else MC_SAMPLES, seed=seed)
    ggn = _per_name(curvature.blocks)
    scale = n / len(subset)
    precision = _split(prior.precision_diagonal(), prior.names, prior.shapes)
    sums: dict[str, list[float]] = {}
    for name in prior.names:
        p_b, g_b = sums.setdefault(block_of(name), [0.0, 0.0])
        sums[block_of(name)] = [p_b + float(precision[name].sum()), g_b + scale * float(ggn[name].double().sum())]
    blocks = {b: _ratio(p, g) for b, (p, g) in sums.items()}
    whole = _ratio(sum(p for p, _ in sums.values()), sum(g for _, g in sums.values()))
    share = max(blocks.values())
    return PriorShare(share, whole, blocks, share < threshold, threshold, n, len(subset))


def _fisher_for(model: nn.Module, loader: DataLoader) -> str:
    """``"exact"`` for ``[B, C]`` outputs (one pass per class), ``"mc"`` for per-position outputs."""
    device = next(model.parameters()).device
    x, _ = next(iter(checked_batches(loader, device)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model_outputs(model, x)
    finally:
        model.train(was_training)
    return "exact" if out.dim() == 2 else "mc"


def _ratio(p: float, g: float) -> float:
    return p / (p + g) if p + g > 0 else 0.0


def _subset(data: Dataset, limit: int, seed: int) -> Dataset:
    size = len(data)  # type: ignore[arg-type]
    if size <= limit:
        return data
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(data, sorted(order.tolist()))


def _split(flat: torch.Tensor, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        size = math.prod(shape)
        out[name] = flat[offset:offset + size]
        offset += size
    return out


def _per_name(blocks) -> dict[str, torch.Tensor]:
    """name -> its diagonal GGN entries, from the curvature's diagonal blocks."""
    out = {}
    for block in blocks:
        out.update(_split(block.h, block.names, block.shapes))
    return out
