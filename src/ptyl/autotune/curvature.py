"""Curvature of the summed negative log-likelihood at the current weights, as blocks over named parameters.

Three block types, each over a disjoint set of parameter names (every other parameter has zero curvature):

- :class:`KronBlock`: K-FAC for an ``nn.Linear`` / ``nn.Conv2d`` (weight and bias together), ``G ~= B (x) A`` on the
  row-major matrix ``[W | b]`` of shape ``[out, in']`` (Martens & Grosse 2015, https://arxiv.org/abs/1503.05671;
  convolutions: Grosse & Martens 2016, https://arxiv.org/abs/1602.01407, "expand" setting of Eschenhagen et al. 2023,
  https://arxiv.org/abs/2311.00636). See :mod:`ptyl.autotune.kfac`.
- :class:`DiagBlock`: the exact diagonal of the GGN (:mod:`ptyl.autotune.ggn`).
- :class:`DenseBlock`: the exact GGN over a small set of parameters, e.g. the head ("last-layer" Laplace).

:func:`compute_curvature` picks them: ``"kfac"`` (Kronecker blocks for supported layers, the diagonal for every other
parameter), ``"diag"`` (per layer from the same hooks for Linear / Conv2d, per-example gradients for the rest), or
``"full"`` (one dense block; small parameter sets only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ptyl.autotune.blocks import Block, DenseBlock, DiagBlock, KronBlock
from ptyl.autotune.ggn import ggn_blocks
from ptyl.autotune.kfac import layer_blocks
from ptyl.autotune.likelihoods import Likelihood
from ptyl.errors import ConfigError
from ptyl.params import named_parameters

METHODS = ("kfac", "diag", "full")
MAX_FACTOR = 1024  # K-FAC: layers with a larger Kronecker factor get the exact diagonal (an eigh of 1,536^2: ~10 s)
FISHERS = ("exact", "mc")
MAX_DENSE = 4096  # parameters in one dense block (its matrix is MAX_DENSE^2 float64 numbers)


@dataclass
class Curvature:
    """Blocks of the GGN of ``-sum_n log p(y_n | x_n, theta)`` and the summed log-likelihood, at one theta."""

    blocks: list[Block]
    log_likelihood: float
    num_data: int
    method: str = "kfac"
    info: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [n for b in self.blocks for n in b.names]

    def scaled(self, factor: float, num_data: int) -> Curvature:
        """The curvature of ``num_data`` examples estimated from this one of a random subset: every sum times
        ``factor`` = N / M (K-FAC: the output factor B; A is a mean)."""
        blocks = [replace(b, b=b.b * factor) if isinstance(b, KronBlock) else replace(b, h=b.h * factor)
                  for b in self.blocks]
        return Curvature(blocks, self.log_likelihood * factor, num_data, self.method,
                         {**self.info, "subset": self.num_data})

    def dense(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> torch.Tensor:
        """The block-diagonal approximation as a dense matrix over ``names`` (tests only)."""
        sizes = [math.prod(s) for s in shapes]
        offsets = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))], strict=False))
        full = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
        for block in self.blocks:
            idx = torch.cat([torch.arange(offsets[n], offsets[n] + math.prod(s))
                             for n, s in zip(block.names, block.shapes, strict=False)])
            full[idx[:, None], idx[None, :]] = block.dense().to(full)
        return full


def check_choice(value: str, choices: Iterable[str], what: str) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {choices}")
    return value


def compute_curvature(
    model: nn.Module,
    data: Iterable,
    likelihood: Likelihood,
    names: Sequence[str],
    *,
    method: str = "kfac",
    fisher: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    max_factor: int | None = MAX_FACTOR,
) -> Curvature:
    """GGN blocks over the parameters ``names`` of ``model`` (eval mode) on every batch of ``data``.

    Args:
        method: ``"kfac"`` (Kronecker blocks for ``nn.Linear`` / ``nn.Conv2d``, diagonal for the rest), ``"diag"``
            or ``"full"`` (one dense block, at most :data:`MAX_DENSE` parameters).
        fisher: ``"exact"`` — the expectation over the likelihood's outputs in closed form (one backward pass per
            column of L, i.e. per class); ``"mc"`` — ``mc_samples`` sampled targets per example (seeded).
        max_factor: ``"kfac"``: a layer whose Kronecker factor would have more rows gets its exact diagonal instead
            (the evidence eigendecomposes every factor once per update); ``None``: no limit.
    """

    check_choice(method, METHODS, "curvature method")
    check_choice(fisher, FISHERS, "fisher")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ConfigError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
    names = list(names)
    if method == "full" and sum(math.prod(s) for s in _shapes(model, names)) > MAX_DENSE:
        raise ConfigError(f"curvature 'full' is for at most {MAX_DENSE} parameters; use 'kfac' or 'diag'")
    generator = torch.Generator(device=_device(model)).manual_seed(seed)
    options = dict(fisher=fisher, mc_samples=mc_samples, generator=generator)
    was_training = model.training
    model.eval()  # BatchNorm running statistics, no dropout: the function whose curvature we take
    try:
        blocks, rest, log_lik, count = [], names, None, None
        if method in ("kfac", "diag"):  # Linear / Conv2d layers from forward inputs and output gradients
            structure = "kron" if method == "kfac" else "diag"
            blocks, rest, log_lik, count = layer_blocks(model, data, likelihood, names, structure=structure,
                                                        max_factor=max_factor, **options)
        if rest:
            structure = "full" if method == "full" else "diag"
            more, ll, n = ggn_blocks(model, data, likelihood, rest, structure=structure, **options)
            blocks += more
            log_lik, count = (ll, n) if log_lik is None else (log_lik, count)
    finally:
        model.train(was_training)
    return Curvature(blocks, log_lik, count, method, {"fisher": fisher, "mc_samples": mc_samples})


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _shapes(model: nn.Module, names: Sequence[str]) -> list[tuple[int, ...]]:
    params = named_parameters(model)
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"the model has no parameter(s) {missing[:5]}")
    return [tuple(params[n].shape) for n in names]


__all__ = ["Block", "Curvature", "DenseBlock", "DiagBlock", "FISHERS", "KronBlock", "MAX_FACTOR", "METHODS",
           "compute_curvature"]
