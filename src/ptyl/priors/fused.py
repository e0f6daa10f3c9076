"""The fused evaluation of a prior's leaves: one flatten per group, each leaf's kernel in two phases around ONE
reduction of their partial sums (the identity unsharded, an all-reduce for :mod:`ptyl.priors.sharded`), and the
autograd function whose backward only scales the gradient computed in the forward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ptyl.flat import compute_dtype, flatten, groups_for, is_compiling, unflatten

__all__ = ["FusedPenalty", "evaluate", "reduce_with"]


def reduce_with(reduce: Callable[[torch.Tensor], torch.Tensor] | None, stats: list[tuple]) -> list[tuple]:
    """Sum every ``(quad, vec)`` pair of ``stats`` over shards with ONE call of ``reduce`` (None: identity)."""
    parts = [t.reshape(-1) for pair in stats for t in pair if t is not None]
    if reduce is None or not parts:
        return stats
    flat = reduce(parts[0] if len(parts) == 1 else torch.cat(parts))
    out, start = [], 0
    for pair in stats:
        reduced = []
        for t in pair:
            if t is None:
                reduced.append(None)
                continue
            size = t.numel()
            reduced.append(flat[start:start + size].reshape(t.shape))
            start += size
        out.append(tuple(reduced))
    return out


def evaluate(prior, tensors: list[torch.Tensor], need_value: bool, need_grad: bool):
    """Penalty (in the parameters' dtype, or None) and ``(flat gradient, tensors it covers)`` pieces in order.

    Phase 1 of every leaf (``penalty_partials``), then their partial sums reduced -- by ``prior.reduce_stats`` in one
    call when set, else leaf by leaf with each leaf's own -- then phase 2 of every leaf (``penalty_finish``)."""
    out_dtype = tensors[0].dtype
    dtype = compute_dtype(out_dtype)
    started, start = [], 0  # (leaf, groups, phase-1 result)
    for leaf in prior.flat_leaves():
        like = tensors[start:start + len(leaf.names)]
        start += len(like)
        groups, i = [], 0
        for count in groups_for(like[0].device, leaf.cpu_groups, len(like)):
            groups.append(like[i:i + count])
            i += count
        # a generator: each group's flat copy is freed as soon as the kernel moves on (on the CPU, reused memory)
        xs = (flatten(group, dtype) for group in groups)
        started.append((leaf, groups, leaf.penalty_partials(xs, need_value, need_grad)))
    stats = [partials[:2] for _, _, partials in started]
    if prior.reduce_stats is not None:
        stats = reduce_with(prior.reduce_stats, stats)
    else:
        stats = [reduce_with(leaf.reduce_stats, [pair])[0] for (leaf, _, _), pair in zip(started, stats, strict=False)]
    value, pieces = None, []
    for (leaf, groups, (_, _, state)), (quad, vec) in zip(started, stats, strict=False):
        v, grads = leaf.penalty_finish(quad, vec, state, need_value, need_grad)
        if need_value:
            value = v if value is None else value + v
        if need_grad:
            pieces.extend(zip(grads, groups, strict=False))
    return (value.to(out_dtype) if need_value else None), pieces


class FusedPenalty(torch.autograd.Function):
    """penalty(theta) with its gradient computed in the forward pass (it shares every intermediate): backward only
    scales the saved flat gradient and hands out per-tensor views (autograd keeps them as ``.grad`` without a copy)."""

    @staticmethod
    def forward(ctx, prior, *tensors: torch.Tensor) -> torch.Tensor:
        value, pieces = evaluate(prior, list(tensors), need_value=True, need_grad=True)
        ctx.save_for_backward(*(h for h, _ in pieces))
        compiling = is_compiling()
        ctx.likes = [[t.shape for t in group] if compiling else group for _, group in pieces]
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        out = [None]
        for h, like in zip(ctx.saved_tensors, ctx.likes, strict=False):
            out.extend(unflatten((h * grad_output.to(h.dtype)).to(grad_output.dtype), like))
        return tuple(out)
