"""Online Laplace marginal likelihood: learn the prior's hyper-parameters every few epochs of MAP training.

Immer, Bauer, Fortuin, Rätsch & Khan, "Scalable marginal likelihood estimation for model selection in deep
learning", ICML 2021, https://arxiv.org/abs/2104.04975 (Algorithm 1; laplace-torch's ``marglik_training``):

    for epoch = 1..E:
        one epoch of MAP training:  minimise mean_batch[-log p(y | x, theta)] - log p(theta | h) / N
        if epoch % hyper_every == 0 and epoch >= burnin:
            curvature H at theta (K-FAC / diagonal GGN / last layer, over all N examples)
            hyper_steps Adam steps on log h maximising the Laplace evidence
                log p(D | h) ~= log p(D | theta) - 1/2 (theta - mu)^T Sigma_h^-1 (theta - mu)
                                - 1/2 log det(I + Sigma_h H)

(theta fixed during the hyper steps; see :mod:`ptyl.autotune.occam` for the log-determinant). This module is the
update (:func:`update_hypers`); :class:`ptyl.tuning.MarginalLikelihood` runs it as a callback of the training loop,
rebuilds the prior used for training from the family after every update (``family.to_prior()``, the fast ptyl prior)
and, with ``restore_best``, keeps the weights and hyper-parameters of the update with the highest evidence (as
laplace-torch).

``curvature="last-layer"``: the Laplace approximation over the head only (exact dense GGN, or K-FAC over the head
when it has more than ``MAX_DENSE`` parameters; the backbone is held fixed, i.e. conditioned on), which learns the
head variance only — the backbone prior's hyper-parameters have no
curvature to be judged by there and stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ptyl.autotune.curvature import MAX_DENSE, compute_curvature
from ptyl.autotune.families import CompositeFamily, Family
from ptyl.autotune.likelihoods import Likelihood
from ptyl.autotune.occam import LaplaceEvidence
from ptyl.errors import ConfigError, DivergenceError

CURVATURES = ("kfac", "diag", "last-layer")


def evidence_part(family: Family, curvature: str) -> Family:
    """The part of the family the evidence is taken over: everything, or the head for ``last-layer``."""
    if curvature != "last-layer":
        return family
    if not isinstance(family, CompositeFamily) or "head" not in family.part_names:
        raise ConfigError("curvature 'last-layer' needs a head prior: build the family with a head and head_variance")
    return family.part("head")


def update_hypers(part: Family, model: nn.Module, loader: Iterable, likelihood: Likelihood, hyper_opt, *,
                  curvature: str, steps: int, fisher: str, mc_samples: int, seed: int, epoch: int = 0,
                  frozen_shape: bool = True, num_data: int | None = None) -> float:
    """Curvature at the current weights, then ``steps`` Adam steps on the evidence (``frozen_shape``: see
    :class:`~ptyl.autotune.LaplaceEvidence`); returns the final evidence. With ``num_data`` larger than what
    ``loader`` holds, the curvature of the subset is scaled up to ``num_data`` examples.

    Raises:
        DivergenceError: the evidence became non-finite (diverged weights or hyper-parameters).
    """
    method = curvature
    if curvature == "last-layer":  # exact dense GGN over the head, K-FAC restricted to it when that is too big
        method = "full" if part.num_parameters <= MAX_DENSE else "kfac"
    curv = compute_curvature(model, loader, likelihood, list(part.names), method=method, fisher=fisher,
                             mc_samples=mc_samples, seed=seed)
    if num_data is not None and num_data != curv.num_data:
        curv = curv.scaled(num_data / curv.num_data, num_data)
    laplace = LaplaceEvidence(part, curv, frozen_shape)  # K-FAC eigendecompositions once per update
    for step in range(steps + 1):
        hyper_opt.zero_grad(set_to_none=True)
        evidence = laplace(model)
        if not torch.isfinite(evidence):  # one sync per hyper step, not per training step
            raise DivergenceError(f"the Laplace evidence became non-finite at epoch {epoch} (hyper-parameters "
                                  f"{part.hyper_values()}): the weights or hyper-parameters diverged; lower lr or "
                                  "hyper_lr")
        if step == steps:
            return float(evidence.detach())
        (-evidence).backward()
        hyper_opt.step()


__all__ = ["CURVATURES", "evidence_part", "update_hypers"]
