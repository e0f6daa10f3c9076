"""Learn the prior's hyper-parameters with the data-emphasized ELBO, in the same single run as the weights.

Harvey, Petrov & Hughes, "Learning the regularization strength for deep fine-tuning via a data-emphasized variational
objective" (2024), https://arxiv.org/abs/2410.19675 (reference code: github.com/tufts-ml/data-emphasized-ELBo).
With a diagonal Gaussian q(theta) = N(m, diag s^2) around the weights and the prior family p_h:

    J(m, s, h) = kappa * sum_n E_q[log p(y_n | x_n, theta)] - KL(q || p_h),    kappa = P / N

kappa > 1 up-weights the likelihood: with P >> N the KL term of the plain ELBO (kappa = 1) dominates and the
learned prior and q underfit (the paper's analysis). Each step minimises the per-example form, an unbiased estimate
from one mini-batch and ``num_samples`` reparameterised draws:

    loss = mean_batch[-log p(y | x, m + s e)] + KL(q || p_h) / (kappa N)

jointly in m (the training run's optimiser), log s and log h (Adam; :class:`ptyl.tuning.DEELBOStrategy` runs it
inside the training loop). The KL is closed form: O(P k) per step for the learned prior with eps = 0
(Sigma = lam Sigma_0, factorised once) and the isotropic ones, O(P k^2) per step with eps > 0 (the capacitance
depends on eps / lam). Predictions: the model itself (the variational mean, "MAP-style") or a Bayesian model
average over draws of q (:meth:`~ptyl.autotune.VariationalPosterior.sample_states`).

``kappa=None`` uses max(1, P / N): the paper's P / N, never below 1 — it targets P >> N, and with P < N the ordinary
ELBO already weighs the data fully (kappa < 1 would *down*-weight it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ptyl.autotune.families import Family
from ptyl.autotune.variational import SampledModel, VariationalPosterior
from ptyl.validation import check_positive_number

Objective = Callable[[nn.Module, Any], torch.Tensor]


def resolve_kappa(kappa: float | None, num_parameters: int, num_data: int) -> float:
    """kappa = max(1, P / N) by default (see the module docstring)."""
    if kappa is None:
        return max(1.0, num_parameters / num_data)
    return check_positive_number(kappa, "kappa")


def deelbo_loss(model: nn.Module, sampled: SampledModel, q: VariationalPosterior, family: Family, batch: Any,
                objective: Objective, scale: float, num_samples: int, generator) -> tuple[torch.Tensor, ...]:
    """(loss, mean NLL, KL) of one mini-batch; ``scale`` = 1 / (kappa N)."""
    nll = 0.0
    for _ in range(num_samples):
        sampled.draw = q.sample(model, generator)
        nll = nll + objective(sampled, batch) / num_samples
    kl = q.kl(model, family)
    return nll + (kl * scale).to(nll.dtype), nll, kl


__all__ = ["deelbo_loss", "resolve_kappa"]
