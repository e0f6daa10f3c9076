"""Learn the prior's hyper-parameters with the data-emphasized ELBO, in the same single run as the weights.

Harvey, Petrov & Hughes, "Learning the regularization strength for deep fine-tuning via a data-emphasized variational
objective" (2024), https://arxiv.org/abs/2410.19675 (reference code: github.com/tufts-ml/data-emphasized-ELBo).
With a diagonal Gaussian q(theta) = N(m, diag s^2) around the weights and the prior family p_h:

    J(m, s, h) = kappa * sum_n E_q[log p(y_n | x_n, theta)] - KL(q || p_h),    kappa = P / N

kappa > 1 up-weights the likelihood: with P >> N the KL term of the plain ELBO (kappa = 1) dominates and the
learned prior and q underfit (the paper's analysis). Each step minimises the per-example form, an unbiased estimate
from one mini-batch and ``num_samples`` reparameterised draws:

    loss = mean_batch[-log p(y | x, m + s e)] + KL(q || p_h) / (kappa N)

jointly in m (optimiser ``optimizer``, learning rate ``lr``), log s (Adam, ``std_lr``) and log h (Adam,
``hyper_lr``). The KL is closed
form: O(P k) per step for the learned prior with eps = 0 (Sigma = lam Sigma_0, factorised once) and the isotropic
ones, O(P k^2) per step with eps > 0 (the capacitance depends on eps / lam). Predictions: the model itself (the
variational mean, "MAP-style") or ``result.posterior.predict(model, data)`` (Bayesian model average over q).

``kappa=None`` uses max(1, P / N): the paper's P / N, never below 1 — it targets P >> N, and with P < N the ordinary
ELBO already weighs the data fully (kappa < 1 would *down*-weight it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptyl.autotune.data import as_loader, count_examples, finite_flag, to_device
from ptyl.autotune.families import Family
from ptyl.autotune.likelihoods import Categorical
from ptyl.autotune.result import (
    TuneResult,
    check_epoch,
    check_int,
    check_rate,
    make_optimizer,
    make_schedule,
    model_device,
)
from ptyl.autotune.variational import SampledModel, VariationalPosterior
from ptyl.errors import ConfigError

Objective = Callable[[nn.Module, Any], torch.Tensor]


def resolve_kappa(kappa: float | None, num_parameters: int, num_data: int) -> float:
    """kappa = max(1, P / N) by default (see the module docstring)."""
    if kappa is None:
        return max(1.0, num_parameters / num_data)
    return check_rate(kappa, "kappa")


def deelbo_loss(model: nn.Module, sampled: SampledModel, q: VariationalPosterior, family: Family, batch: Any,
                objective: Objective, scale: float, num_samples: int, generator) -> tuple[torch.Tensor, ...]:
    """(loss, mean NLL, KL) of one mini-batch; ``scale`` = 1 / (kappa N)."""
    nll = 0.0
    for _ in range(num_samples):
        sampled.draw = q.sample(model, generator)
        nll = nll + objective(sampled, batch) / num_samples
    kl = q.kl(model, family)
    return nll + (kl * scale).to(nll.dtype), nll, kl


def deelbo_tune(
    model: nn.Module,
    family: Family,
    data: Iterable,
    objective: Objective | None = None,
    *,
    kappa: float | None = None,
    epochs: int = 50,
    lr: float = 1e-3,
    optimizer: str = "adam",
    schedule: str = "cosine",
    hyper_lr: float = 1e-2,
    std_lr: float = 1e-2,
    init_std: float = 1e-3,
    num_samples: int = 1,
    num_data: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> TuneResult:
    """Train ``model`` and learn ``family``'s hyper-parameters by maximising the DE-ELBO.

    Args:
        model: starts at the pretrained weights (the variational mean is initialised there).
        family: from :func:`~ptyl.autotune.build_family` on the same model (its learnable hyper-parameters are the
            ``nn.Parameter`` s of ``family``).
        data: a DataLoader (or list) of ``(x, y)`` batches; ``objective(model, batch)`` -> mean NLL (default:
            categorical cross-entropy; must be a normalised log-likelihood for the ELBO to mean anything).
        kappa: likelihood weight (default max(1, P / N)); ``kappa=1`` gives the ordinary ELBO.
        lr / optimizer / schedule: for the weights (the variational mean); Adam with ``hyper_lr`` on the log
            hyper-parameters and with ``std_lr`` on log s (scale-free steps: the s span orders of magnitude).
        init_std: initial s of q (the reference code starts at 1e-4; starting q at the prior's marginals made
            the first hundreds of steps pure noise on a CNN transfer task). ``num_samples``: draws of q per step.

    Returns:
        :class:`TuneResult` with the learned hyper-parameters, the per-epoch history (``loss``, ``nll``, ``kl``,
        ``deelbo`` = -kappa N loss, hyper-parameters, ``time_s``), wall time, and ``posterior`` (q).
    """
    start = time.perf_counter()
    objective = objective or Categorical()
    check_int(epochs, "epochs")
    check_int(num_samples, "num_samples")
    device = model_device(model, device)
    family.to(device)
    loader = as_loader(data)
    n = count_examples(loader, num_data)
    kappa = resolve_kappa(kappa, family.num_parameters, n)
    hypers = list(family.parameters())
    if not hypers:
        raise ConfigError("the prior family has no learnable hyper-parameter (see build_family(learn=...))")
    q = VariationalPosterior(model, family.names, init_std).to(device)
    sampled = SampledModel(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, check_rate(lr, "lr"))
    hyper_opt = torch.optim.Adam([{"params": hypers, "lr": check_rate(hyper_lr, "hyper_lr")},
                                  {"params": list(q.parameters()), "lr": check_rate(std_lr, "std_lr")}])
    steps = epochs * max(1, len(loader)) if hasattr(loader, "__len__") else epochs
    sched = make_schedule(opt, schedule, steps)
    generator = torch.Generator(device=device).manual_seed(seed)
    history: list[dict[str, float]] = []
    model.train()
    for epoch in tqdm(range(1, epochs + 1), desc="de-elbo", disable=not progress):
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        flags, batches = [], 0
        for batch in loader:
            x, y = to_device(batch, device)
            flags.append(finite_flag(x, y))
            loss, nll, kl = deelbo_loss(model, sampled, q, family, (x, y), objective, 1.0 / (kappa * n),
                                        num_samples, generator)
            opt.zero_grad(set_to_none=True)
            hyper_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hyper_opt.step()
            if sched is not None:
                sched.step()
            sums += torch.stack([loss.detach().double(), nll.detach().double(), kl.detach().double()])
            batches += 1
        check_epoch(epoch, sums[0], flags, model)
        loss_m, nll_m, kl_m = (sums / batches).tolist()
        history.append({"epoch": epoch, "loss": loss_m, "nll": nll_m, "kl": kl_m, "deelbo": -kappa * n * loss_m,
                        **family.hyper_values(), "time_s": time.perf_counter() - start})
    return TuneResult("de-elbo", family.hyper_values(), family.prior_kwargs(), history, history[-1]["deelbo"],
                      time.perf_counter() - start, model, family, q, {"kappa": kappa, "num_data": n})


__all__ = ["deelbo_loss", "deelbo_tune", "resolve_kappa"]
