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

(theta fixed during the hyper steps; see :mod:`ptyl.autotune.occam` for the log-determinant). The prior used for
training is rebuilt from the family after every update (``family.to_prior()``, the fast ptyl prior). With
``restore_best`` the weights and hyper-parameters of the update with the highest evidence are kept (as laplace-torch).

``curvature="last-layer"``: the Laplace approximation over the head only (exact dense GGN, or K-FAC over the head
when it has more than ``MAX_DENSE`` parameters; the backbone is held fixed, i.e. conditioned on), which learns the
head variance only — the backbone prior's hyper-parameters have no
curvature to be judged by there and stay as they are.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ptyl.autotune.curvature import MAX_DENSE, check_choice, compute_curvature
from ptyl.autotune.data import as_loader, count_examples, finite_flag, to_device
from ptyl.autotune.families import CompositeFamily, Family
from ptyl.autotune.likelihoods import Likelihood, get_likelihood
from ptyl.autotune.occam import LaplaceEvidence
from ptyl.autotune.result import (
    TuneResult,
    check_epoch,
    check_int,
    check_rate,
    make_optimizer,
    make_schedule,
    model_device,
)
from ptyl.errors import ConfigError, InvalidValueError

CURVATURES = ("kfac", "diag", "last-layer")


def evidence_part(family: Family, curvature: str) -> Family:
    """The part of the family the evidence is taken over: everything, or the head for ``last-layer``."""
    if curvature != "last-layer":
        return family
    if not isinstance(family, CompositeFamily) or "head" not in family.part_names:
        raise ConfigError("curvature 'last-layer' needs a head prior: build the family with a head and head_variance")
    return family.part("head")


def update_hypers(part: Family, model: nn.Module, loader: Iterable, likelihood: Likelihood, hyper_opt, *,
                  curvature: str, steps: int, fisher: str, mc_samples: int, seed: int, epoch: int = 0) -> float:
    """Curvature at the current weights, then ``steps`` Adam steps on the evidence; returns the final evidence."""
    method = curvature
    if curvature == "last-layer":  # exact dense GGN over the head, K-FAC restricted to it when that is too big
        method = "full" if part.num_parameters <= MAX_DENSE else "kfac"
    curv = compute_curvature(model, loader, likelihood, list(part.names), method=method, fisher=fisher,
                             mc_samples=mc_samples, seed=seed)
    laplace = LaplaceEvidence(part, curv)  # K-FAC eigendecompositions once per update
    for step in range(steps + 1):
        hyper_opt.zero_grad(set_to_none=True)
        evidence = laplace(model)
        if not torch.isfinite(evidence):  # one sync per hyper step, not per training step
            raise InvalidValueError(f"the Laplace evidence became non-finite at epoch {epoch} (hyper-parameters "
                                    f"{part.hyper_values()}): the weights or hyper-parameters diverged; lower lr or "
                                    "hyper_lr")
        if step == steps:
            return float(evidence.detach())
        (-evidence).backward()
        hyper_opt.step()


def _map_epoch(model, loader, likelihood, prior, n, opt, sched, device) -> tuple[torch.Tensor, list, int]:
    total = torch.zeros((), dtype=torch.float64, device=device)
    flags, batches = [], 0
    for batch in loader:
        x, y = to_device(batch, device)
        flags.append(finite_flag(x, y))
        loss = likelihood(model, (x, y)) + prior.penalty(model) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.detach().double()
        batches += 1
    return total, flags, batches


def marglik_tune(
    model: nn.Module,
    family: Family,
    data: Iterable,
    likelihood: str | Likelihood = "categorical",
    *,
    curvature: str = "kfac",
    epochs: int = 50,
    lr: float = 1e-3,
    optimizer: str = "adam",
    schedule: str = "cosine",
    hyper_every: int = 5,
    burnin: int = 0,
    hyper_steps: int = 20,
    hyper_lr: float = 0.1,
    fisher: str = "exact",
    mc_samples: int = 1,
    restore_best: bool = True,
    noise_variance: float = 1.0,
    num_data: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> TuneResult:
    """MAP-train ``model`` while learning ``family``'s hyper-parameters from the online Laplace evidence.

    Args:
        family: from :func:`~ptyl.autotune.build_family` on the same model.
        likelihood: ``"categorical"``, ``"gaussian"`` (``noise_variance``) or a :class:`Likelihood`; it is both the
            training objective and the curvature's model.
        curvature: ``"kfac"`` (default; diagonal GGN for parameters outside Linear/Conv2d layers), ``"diag"`` or
            ``"last-layer"`` (head variance only). ``fisher``: ``"exact"`` or ``"mc"`` (``mc_samples``).
        hyper_every / burnin / hyper_steps / hyper_lr: the schedule of Algorithm 1 (Immer et al. 2021). A last
            update always happens after the final epoch.

    Returns:
        :class:`TuneResult`; ``history`` holds every epoch's ``loss`` and, on update epochs, ``log_evidence``.
    """
    start = time.perf_counter()
    check_choice(curvature, CURVATURES, "curvature")
    for value, what in ((epochs, "epochs"), (hyper_every, "hyper_every"), (hyper_steps, "hyper_steps")):
        check_int(value, what)
    check_int(burnin, "burnin", minimum=0)
    likelihood = get_likelihood(likelihood, noise_variance)
    device = model_device(model, device)
    family.to(device)
    loader = as_loader(data)
    n = count_examples(loader, num_data)
    part = evidence_part(family, curvature)
    hypers = list(part.parameters())
    if not hypers:
        raise ConfigError("the prior family has no learnable hyper-parameter for this curvature "
                          "(see build_family(learn=...))")
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, check_rate(lr, "lr"))
    hyper_opt = torch.optim.Adam(hypers, lr=check_rate(hyper_lr, "hyper_lr"))
    sched = make_schedule(opt, schedule, epochs * len(loader) if hasattr(loader, "__len__") else epochs)
    options = dict(curvature=curvature, steps=hyper_steps, fisher=fisher, mc_samples=mc_samples, seed=seed)
    prior = family.to_prior().to(device)
    history, best = [], None
    for epoch in tqdm(range(1, epochs + 1), desc="marglik", disable=not progress):
        model.train()
        total, flags, batches = _map_epoch(model, loader, likelihood, prior, n, opt, sched, device)
        record = {"epoch": epoch, "loss": check_epoch(epoch, total, flags, model) / batches}
        if (epoch % hyper_every == 0 and epoch >= burnin) or epoch == epochs:
            record["log_evidence"] = update_hypers(part, model, loader, likelihood, hyper_opt, epoch=epoch,
                                                   **options)
            prior = family.to_prior().to(device)
            if restore_best and (best is None or record["log_evidence"] > best[0]):
                best = (record["log_evidence"], copy.deepcopy(model.state_dict()),
                        copy.deepcopy(family.state_dict()), epoch)
        history.append({**record, **family.hyper_values(), "time_s": time.perf_counter() - start})
    if best is not None:
        model.load_state_dict(best[1])
        family.load_state_dict(best[2])
    evidence = best[0] if best is not None else history[-1]["log_evidence"]
    info = {"curvature": curvature, "num_data": n, "best_epoch": best[3] if best else epochs}
    return TuneResult("marglik", family.hyper_values(), family.prior_kwargs(), history, evidence,
                      time.perf_counter() - start, model, family, None, info)


__all__ = ["CURVATURES", "marglik_tune", "update_hypers"]
