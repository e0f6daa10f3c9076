"""Exact diagonal (or, for a few parameters, dense) GGN from per-example gradients (``torch.func``).

With the likelihood's Hessian square root ``L_n`` (see :mod:`ptyl.autotune.likelihoods`) the GGN is
``G = sum_n sum_c g_nc g_nc^T`` with ``g_nc = J_n^T L_n[:, c] = grad_theta <f(x_n; theta), L_n[:, c]>``, so

    diag G = sum_{n,c} g_nc^2         (per-example gradients, any likelihood)
    G      = sum_{n,c} g_nc g_nc^T    (dense: "last-layer" Laplace over the head)

``g_nc`` is one vector-Jacobian product per example and column, batched with ``vmap``; with ``fisher="mc"`` the
columns are sampled output gradients instead (Monte-Carlo Fisher).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from ptyl.autotune.blocks import DenseBlock, DiagBlock
from ptyl.autotune.data import checked_batches, model_outputs, num_examples, rows
from ptyl.autotune.likelihoods import Likelihood
from ptyl.errors import ConfigError
from ptyl.params import normalize_name

_BUDGET = 2**24  # gradient entries held at once per chunk (128 MiB in float64)


def _split_params(model: nn.Module, names: Sequence[str]):
    raw = dict(model.named_parameters())
    by_norm = {normalize_name(n): n for n in raw}
    missing = [n for n in names if n not in by_norm]
    if missing:
        raise ConfigError(f"the model has no parameter(s) {missing[:5]}")
    wrt = {by_norm[n]: raw[by_norm[n]].detach() for n in names}
    fixed = {n: p.detach() for n, p in raw.items() if n not in wrt}
    fixed.update(dict(model.named_buffers()))
    return wrt, fixed


def _column_vectors(likelihood: Likelihood, out, fisher: str, mc_samples: int, generator) -> torch.Tensor:
    """[B, R, O]: columns of L_n (exact) or sampled output gradients / sqrt(m) (mc)."""
    if fisher == "exact":
        return likelihood.hessian_sqrt(out).transpose(1, 2)
    return torch.stack([likelihood.sample_gradient(out, generator) for _ in range(mc_samples)], 1) / math.sqrt(
        mc_samples)


def ggn_blocks(model: nn.Module, data: Iterable, likelihood: Likelihood, names: Sequence[str], *, structure: str,
               fisher: str, mc_samples: int, generator) -> tuple[list, float, int]:
    """One :class:`DiagBlock` (``structure="diag"``) or :class:`DenseBlock` (``"full"``) over ``names``; also the
    summed log-likelihood and the number of examples."""

    wrt, fixed = _split_params(model, names)
    size = sum(p.numel() for p in wrt.values())

    def projected(params, x, v):
        one = tree_map(lambda t: t.unsqueeze(0) if torch.is_tensor(t) else t, x)  # a tensor or a dict of tensors
        out = model_outputs(model, one, {**fixed, **params})
        return (likelihood.outputs(out).reshape(-1) * v.to(out.dtype)).sum()

    per_column = vmap(vmap(grad(projected), in_dims=(None, None, 0)), in_dims=(None, 0, 0))
    device = next(iter(wrt.values())).device
    diag = torch.zeros(size, dtype=torch.float64, device=device)
    dense = torch.zeros(size, size, dtype=torch.float64, device=device) if structure == "full" else None
    log_lik, count = torch.zeros((), dtype=torch.float64), 0
    for x, y in checked_batches(data, device):
        with torch.no_grad():
            out = model_outputs(model, x)
        log_lik += likelihood.log_prob(out.double(), y).sum().cpu()
        size = num_examples(x)
        count += size
        vectors = _column_vectors(likelihood, out, fisher, mc_samples, generator)  # [B, R, O]
        chunk = max(1, _BUDGET // max(vectors.shape[1] * size, 1))
        for start in range(0, size, chunk):
            g = per_column(wrt, rows(x, start, start + chunk), vectors[start:start + chunk])
            flat = torch.cat([g[n].reshape(g[n].shape[0] * g[n].shape[1], -1) for n in wrt], dim=1).double()
            if dense is None:
                diag += flat.pow(2).sum(0)
            else:
                dense += flat.T @ flat
    shapes = tuple(tuple(p.shape) for p in wrt.values())
    block = DiagBlock(tuple(names), shapes, diag) if dense is None else DenseBlock(tuple(names), shapes, dense)
    return [block], float(log_lik), count


__all__ = ["ggn_blocks"]
