"""The curvature block types over named parameters (flat, in names order): :class:`KronBlock` (K-FAC),
:class:`DiagBlock` (the exact GGN diagonal) and :class:`DenseBlock` (the exact GGN). Their own module so that the
builders (:mod:`ptyl.autotune.ggn`, :mod:`ptyl.autotune.kfac`) and the dispatcher
(:func:`ptyl.autotune.curvature.compute_curvature`) import them without a circle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Block", "DenseBlock", "DiagBlock", "KronBlock"]


@dataclass
class KronBlock:
    """GGN block of one layer ~= B (x) A over the row-major ``[out, in']`` matrix ``[W.reshape(out, -1) | b]``.

    ``names`` lists the weight name then, if ``has_bias``, the bias name.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    has_bias: bool
    a: torch.Tensor  # [in', in'] input factor (mean over examples and locations)
    b: torch.Tensor  # [out, out] output-gradient factor (sum over examples and locations)

    def gather(self, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-name flat tensors ``[..., numel]`` -> the block matrix ``[..., out, in']``."""
        out = self.b.shape[0]
        w = pieces[self.names[0]]
        w = w.reshape(*w.shape[:-1], out, -1)
        if not self.has_bias:
            return w
        return torch.cat([w, pieces[self.names[1]].unsqueeze(-1)], dim=-1)

    def dense(self) -> torch.Tensor:
        """B (x) A permuted to ``names`` order (tests and tiny layers only)."""
        full = torch.kron(self.b, self.a)
        out, cols = self.b.shape[0], self.a.shape[0]
        index = torch.arange(out * cols).reshape(out, cols)
        order = index[:, : cols - int(self.has_bias)].reshape(-1)
        if self.has_bias:
            order = torch.cat([order, index[:, -1]])
        return full[order][:, order]

    def restrict(self, keep: Sequence[str]):
        """The block over a subset of its names (the others held fixed = the corresponding sub-block)."""
        keep_w, keep_b = self.names[0] in keep, self.has_bias and self.names[1] in keep
        if keep_w and (keep_b or not self.has_bias):
            return self
        if keep_w:
            return KronBlock(self.names[:1], self.shapes[:1], False, self.a[:-1, :-1], self.b)
        if keep_b:
            return DenseBlock(self.names[1:], self.shapes[1:], self.b * self.a[-1, -1])
        return None


@dataclass
class DiagBlock:
    """The diagonal ``h`` of the GGN over ``names`` (flat, names order)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    h: torch.Tensor

    def gather(self, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([pieces[n] for n in self.names], dim=-1)

    def dense(self) -> torch.Tensor:
        return torch.diag(self.h)

    def restrict(self, keep: Sequence[str]):
        return _restrict_flat(self, keep, lambda idx: DiagBlock(*_sub(self, keep), self.h[idx]))


@dataclass
class DenseBlock:
    """The exact GGN ``H`` over ``names`` (flat, names order)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    h: torch.Tensor

    def gather(self, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([pieces[n] for n in self.names], dim=-1)

    def dense(self) -> torch.Tensor:
        return self.h

    def restrict(self, keep: Sequence[str]):
        return _restrict_flat(self, keep, lambda idx: DenseBlock(*_sub(self, keep), self.h[idx][:, idx]))


def _sub(block, keep) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    pairs = [(n, s) for n, s in zip(block.names, block.shapes, strict=False) if n in keep]
    return tuple(n for n, _ in pairs), tuple(s for _, s in pairs)


def _restrict_flat(block, keep, make):
    if all(n in keep for n in block.names):
        return block
    if not any(n in keep for n in block.names):
        return None
    sizes = [math.prod(s) for s in block.shapes]
    mask = torch.cat([torch.full((k,), n in keep) for n, k in zip(block.names, sizes, strict=False)])
    return make(mask.nonzero().squeeze(1))


Block = KronBlock | DiagBlock | DenseBlock
