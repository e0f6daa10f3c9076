"""Likelihoods p(y | f(x; theta)) with what the tuning engines need from them.

A likelihood is also a training objective (``likelihood(model, batch)`` = mean negative log-likelihood, the form
:func:`ptyl.training.fit` takes). For the curvature it gives, per example, a square root of the Hessian of
``-log p(y | f)`` w.r.t. the outputs f (which does not depend on y for these likelihoods), ``Lambda = L L^T``, so the
generalised Gauss-Newton matrix is ``G = sum_n J_n^T L_n L_n^T J_n`` (Martens 2020, https://arxiv.org/abs/1412.1193):

- categorical (softmax CE): ``Lambda = diag(p) - p p^T``, ``L[:, c] = sqrt(p_c) (e_c - p)`` (C columns);
- Gaussian with noise variance s2: ``Lambda = I / s2``, ``L = I / sqrt(s2)``.
``sample_gradient`` draws y ~ p(y | f) and returns ``grad_f -log p(y | f)``, whose outer product is ``Lambda`` in
expectation (the Monte-Carlo Fisher, equal to the GGN for these exponential families).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptyl.errors import ConfigError, DataError, InvalidValueError


class Likelihood:
    """Base class. Subclasses define :meth:`log_prob`, :meth:`hessian_sqrt` and :meth:`sample_gradient`."""

    name = "likelihood"

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean negative log-likelihood of an ``(x, y)`` batch (a training objective)."""
        x, y = unpack(batch)
        return -self.log_prob(model(x), y).mean()

    def outputs(self, out: torch.Tensor) -> torch.Tensor:
        """Model outputs as [B, O]."""
        return out.reshape(out.shape[0], -1)

    def log_prob(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-example log p(y_n | f_n) [B], normalised."""
        raise NotImplementedError

    def hessian_sqrt(self, out: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """L [B, O, R] with L_n L_n^T = d^2 (-log p) / df^2 at f_n."""
        raise NotImplementedError

    def sample_gradient(self, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract


class Categorical(Likelihood):
    """Softmax cross-entropy over ``[B, C]`` logits and integer class targets ``[B]``, or over ``[B, C, *S]`` logits
    (segmentation: an independent categorical per position) and targets ``[B, *S]``, summed over the positions.

    The exact GGN takes one pass per output column (``C`` for ``[B, C]``); for per-position outputs use the
    Monte-Carlo Fisher (``fisher="mc"``): one sampled target per position gives an unbiased estimate in one pass.
    """

    name = "categorical"

    def log_prob(self, out, y):
        if out.dim() < 2:
            raise ConfigError(f"the categorical likelihood needs [batch, classes, ...] logits, got shape "
                              f"{tuple(out.shape)}")
        return -F.cross_entropy(out, y.long(), reduction="none").reshape(out.shape[0], -1).sum(1)

    def hessian_sqrt(self, out):
        if out.dim() != 2:
            raise ConfigError(f"the exact GGN of per-position logits {tuple(out.shape)} takes one pass per class and "
                              "position: use fisher='mc'")
        p = torch.softmax(out.detach().double(), dim=1)  # [B, C]
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return (eye.unsqueeze(0) - p.unsqueeze(2)) * p.sqrt().unsqueeze(1)  # [B, C(out), C(col)]

    def sample_gradient(self, out, generator):
        p = torch.softmax(out.detach().double(), dim=1)
        classes = p.shape[1]
        flat = p.movedim(1, -1).reshape(-1, classes)  # one categorical per example and position
        y = torch.multinomial(flat, 1, generator=generator).squeeze(1)
        grad = (flat - F.one_hot(y, classes).to(p.dtype)).reshape(*p.movedim(1, -1).shape).movedim(-1, 1)
        return grad.reshape(out.shape[0], -1)  # in the order of outputs(): [B, C * prod(S)]


class Gaussian(Likelihood):
    """N(y; f, s2 I) over outputs of any shape ``[B, ...]`` with targets of the same number of elements."""

    name = "gaussian"

    def __init__(self, noise_variance: float = 1.0):
        ok = isinstance(noise_variance, (int, float)) and math.isfinite(noise_variance) and noise_variance > 0
        if not ok:
            raise InvalidValueError(f"noise_variance must be a positive finite number, got {noise_variance!r}")
        self.noise_variance = float(noise_variance)

    def log_prob(self, out, y):
        f = self.outputs(out)
        y = y.reshape(f.shape[0], -1).to(f.dtype)
        if y.shape != f.shape:
            raise DataError(f"targets of shape {tuple(y.shape)} do not match outputs {tuple(f.shape)}")
        return -0.5 * ((f - y).pow(2).sum(1) / self.noise_variance + f.shape[1] * math.log(2 * math.pi
                                                                                          * self.noise_variance))

    def hessian_sqrt(self, out):
        f = self.outputs(out)
        eye = torch.eye(f.shape[1], dtype=torch.float64, device=f.device) / math.sqrt(self.noise_variance)
        return eye.expand(f.shape[0], -1, -1)

    def sample_gradient(self, out, generator):
        f = self.outputs(out).detach().double()
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return -noise / math.sqrt(self.noise_variance)  # (f - y) / s2 with y = f + sqrt(s2) noise


def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DataError(f"a batch must be (inputs, targets, ...), got {type(batch).__name__}")
    return batch[0], batch[1]


def get_likelihood(likelihood: str | Likelihood, noise_variance: float = 1.0) -> Likelihood:
    """``"categorical"`` / ``"gaussian"`` (with ``noise_variance``) or a :class:`Likelihood` instance."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood == "categorical":
        return Categorical()
    if likelihood == "gaussian":
        return Gaussian(noise_variance)
    raise ConfigError(f"unknown likelihood {likelihood!r}; choose 'categorical' or 'gaussian'")


__all__ = ["Categorical", "Gaussian", "Likelihood", "get_likelihood", "unpack"]
