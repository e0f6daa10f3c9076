"""The data side of the Laplace evidence: the diagonal of the likelihood's curvature at the MAP estimate.

``H_lik`` is the *diagonal* of the generalised Gauss-Newton matrix (``hessian="ggn"``, default) or of the empirical
Fisher (``"ef"``) of the summed negative log-likelihood at theta*, built from per-example gradients
(``torch.func.vmap`` + ``jacrev``). For softmax cross-entropy the GGN diagonal is exact, not sampled:
``diag GGN = sum_i sum_c p_ic (grad log p_ic)^2``, since ``diag(p) - p p^T = L L^T`` with
``L[:, c] = sqrt(p_c)(e_c - p)``. For a Gaussian likelihood with noise variance s2 it is ``sum_i (grad f_i)^2 / s2``
(Immer et al., ICML 2021, https://arxiv.org/abs/2104.04975).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl.errors import DataError, InvalidValueError
from ptyl.params import named_parameters, normalize_name
from ptyl.validation import check_choice, check_positive_number

__all__ = ["Curvature", "HESSIANS", "LIKELIHOODS", "curvature", "gaussian_objective"]

LIKELIHOODS = ("categorical", "gaussian")
HESSIANS = ("ggn", "ef")
_JACOBIAN_BUDGET = 2**24  # per-example Jacobian entries held at once (64 MiB in float32)


def gaussian_objective(noise_variance: float = 1.0) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The training objective that matches ``likelihood="gaussian"``.

    Args:
        noise_variance: s2 > 0.

    Returns:
        ``objective(model, batch)``: the mean per-example ``sum_o (y - f)^2 / (2 s2)`` (constant dropped).
    """
    check_positive_number(noise_variance, "noise_variance")

    def objective(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        out = model(x)
        residual = out.reshape(out.shape[0], -1) - y.reshape(y.shape[0], -1).to(out.dtype)
        return residual.pow(2).sum(dim=1).mean() / (2.0 * noise_variance)

    return objective


@dataclass
class Curvature:
    """What the evidence needs from the data at theta*.

    Attributes:
        hessian_diag: name -> diagonal of H_lik, summed over the data (float64).
        log_likelihood: the summed log-likelihood.
        num_data: the number of examples.
    """

    hessian_diag: dict[str, torch.Tensor]
    log_likelihood: float
    num_data: int


def _loader(data: Dataset | DataLoader, batch_size: int) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    if len(data) == 0:
        raise DataError("the training set is empty")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def curvature(
    model: nn.Module,
    data: Dataset | DataLoader,
    names: Sequence[str] | None = None,
    *,
    likelihood: str = "categorical",
    hessian: str = "ggn",
    noise_variance: float = 1.0,
    batch_size: int = 256,
) -> Curvature:
    """Diagonal GGN / empirical Fisher of the summed negative log-likelihood w.r.t. the parameters ``names``
    (default: all trainable ones), and the summed log-likelihood, at the model's current weights (eval mode).

    Args:
        model: the model at theta*.
        data: a Dataset or DataLoader of ``(x, y)``.
        names: the parameters (default: every trainable one).
        likelihood: ``"categorical"`` (logits ``[B, C]``, class-index targets) or ``"gaussian"`` (outputs ``[B]``
            or ``[B, O]``, targets of the same shape, noise variance ``noise_variance``).
        hessian: ``"ggn"`` or ``"ef"`` (empirical Fisher).
        noise_variance: s2 of the Gaussian likelihood.
        batch_size: examples per batch for a Dataset.

    Returns:
        A :class:`Curvature`.
    """
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(hessian, HESSIANS, "hessian")
    check_positive_number(noise_variance, "noise_variance")
    from torch.func import functional_call, jacrev, vmap

    raw = dict(model.named_parameters())
    by_norm = {normalize_name(n): n for n in raw}
    if names is None:
        names = [n for n, p in named_parameters(model).items() if p.requires_grad]
    missing = [n for n in names if n not in by_norm]
    if missing:
        raise InvalidValueError(f"the model has no parameter(s) {missing[:5]}")
    wrt = {by_norm[n]: raw[by_norm[n]].detach() for n in names}
    fixed = {n: p.detach() for n, p in raw.items() if n not in wrt}
    fixed.update(dict(model.named_buffers()))
    num_params = sum(p.numel() for p in wrt.values())

    def outputs(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **params}, (x.unsqueeze(0),)).reshape(-1)
        return torch.log_softmax(out, dim=0) if likelihood == "categorical" else out

    per_example_jacobian = vmap(jacrev(outputs), in_dims=(None, 0))
    device = next(iter(wrt.values())).device
    diag = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in wrt.items()}
    log_lik = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()  # BatchNorm running statistics, no dropout: the function whose curvature we take
    try:
        for batch in _loader(data, batch_size):
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise DataError("the evidence needs (x, y) batches")
            x_all, y_all = batch[0].to(device), batch[1].to(device)
            with torch.no_grad():
                out = model(x_all).reshape(x_all.shape[0], -1)
            width = out.shape[1]
            chunk = max(1, _JACOBIAN_BUDGET // max(width * num_params, 1))
            log_lik += _log_likelihood(out, y_all, likelihood, noise_variance).double().cpu()
            for start in range(0, x_all.shape[0], chunk):
                x, y, o = x_all[start:start + chunk], y_all[start:start + chunk], out[start:start + chunk]
                jac = per_example_jacobian(wrt, x)  # name -> [B, width, *shape]
                weights = _curvature_weights(o, y, likelihood, hessian, noise_variance)  # [B, width]
                for n, j in jac.items():
                    j = j.double().reshape(j.shape[0], width, -1)
                    diag[n] += torch.einsum("bw,bwp->p", weights, j.pow(2)).reshape(diag[n].shape)
            count += x_all.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the training set is empty")
    return Curvature({normalize_name(n): d for n, d in diag.items()}, float(log_lik), count)


def _log_likelihood(out: torch.Tensor, y: torch.Tensor, likelihood: str, noise_variance: float) -> torch.Tensor:
    if likelihood == "categorical":
        return torch.log_softmax(out.double(), dim=1).gather(1, y.long().reshape(-1, 1)).sum()
    residual = out.double() - y.reshape(y.shape[0], -1).double()
    log_norm = 0.5 * residual.numel() * math.log(2 * math.pi * noise_variance)
    return -(residual.pow(2).sum() / (2 * noise_variance) + log_norm)


def _curvature_weights(out, y, likelihood: str, hessian: str, noise_variance: float) -> torch.Tensor:
    """Per-example, per-output weights w such that diag H = sum_b sum_w w * (d out_w / d theta)^2."""
    out = out.double()
    if likelihood == "categorical":  # outputs are log-probabilities
        if hessian == "ggn":
            return torch.softmax(out, dim=1)
        return torch.nn.functional.one_hot(y.long(), out.shape[1]).double()
    if hessian == "ggn":
        return torch.full_like(out, 1.0 / noise_variance)
    residual = out - y.reshape(y.shape[0], -1).double()
    return residual.pow(2) / noise_variance**2
