"""Per-example gradients of normalisation layers' affine parameters (BatchNorm in eval mode, LayerNorm), for the
exact diagonal of their GGN block from the same forward/backward pass as K-FAC.

Both layers compute ``y = gamma * x_hat + beta`` elementwise over the affine shape, with ``x_hat`` the normalised input
(BatchNorm: running statistics; LayerNorm: per-position statistics). With the output gradient ``g`` of one column,
the per-example gradients are ``sum_t g_nt * x_hat_nt`` (gamma) and ``sum_t g_nt`` (beta), summed over every position t
that shares the parameter; the diagonal of the GGN is the sum over examples and columns of their squares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def supported_affine(module: nn.Module) -> bool:
    """BatchNorm with running statistics (evaluated in eval mode) or LayerNorm, with affine parameters."""
    if isinstance(module, _BATCH_NORMS):
        return module.affine and module.track_running_stats
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.weight is not None


def _normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return (x - module.running_mean.view(view)) / (module.running_var.view(view) + module.eps).sqrt()


def affine_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"weight": [B, *shape], "bias": [B, *shape]}: per-example gradients of one column's output gradient ``g``."""
    x_hat, g = _normalised(module, x).double(), g.double()
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(1, x.dim() - len(module.normalized_shape)))  # positions between batch and features
    else:
        dims = tuple(range(2, x.dim()))  # spatial positions after the channel
    if not dims:
        return {"weight": g * x_hat, "bias": g}
    return {"weight": (g * x_hat).sum(dims), "bias": g.sum(dims)}


__all__ = ["affine_grads", "supported_affine"]
