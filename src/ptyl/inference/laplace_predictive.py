"""Post-hoc Laplace around the MAP under the prior it was trained with: ``laplace(model, train_data, prior)`` returns
a predictive.

The posterior is ``N(theta*, (H + tau Sigma^-1)^-1)`` over a subset of the parameters, the others held at the MAP
(:class:`~ptyl.inference.laplace_posterior.PosteriorPrecision`: the learned low-rank prior by Woodbury and the
determinant lemma, never a P x P matrix):

- ``subset="last-layer"``: the head, with its exact dense GGN (Kristiadi, Hein & Hennig, ICML 2020,
  https://arxiv.org/abs/2002.10118); the backbone is conditioned on.
- ``subset="all"``: every parameter with a prior, with K-FAC (``curvature="kfac"``) or the exact diagonal GGN
  (``"diag"``) for the data term and the prior's low-rank coupling kept exactly.

The predictive linearises the network at the MAP (Immer, Korzepa & Bauer, AISTATS 2021,
https://arxiv.org/abs/2008.08400), ``f(x; theta) ~= f(x; theta*) + J(x) (theta - theta*)``, so the logits are
Gaussian, ``N(f*, J A^-1 J^T)``, and

- ``predictive="probit"``: ``softmax(f*_c / sqrt(1 + pi/8 var_c))`` (the multi-class probit approximation;
  MacKay 1992, Daxberger et al. 2021, https://arxiv.org/abs/2106.14806);
- ``predictive="mc"``: the mean of ``softmax(f)`` over ``mc_samples`` draws of those logits (seeded).

``tau`` (``prior_precision``) multiplies the prior's precision: 1 is the prior the MAP was trained under; large
values shrink the posterior onto the MAP (tau -> infinity is the MAP itself). Given several values, the one with the
lowest NLL on validation data is chosen (the logits' Jacobians are computed once per batch for all values), or
without validation data the one of the highest Laplace evidence; a tuning trial re-chooses on its validation data
(:meth:`LaplacePredictive.select`).

Why not laplace-torch: it installs with torch 2.13 but pulls torchvision, BackPACK, ASDL and curvlinops (this project
takes no torchvision), and its prior precision is a scalar or a diagonal: it cannot take a learned low-rank prior's
precision, nor its head part next to a low-rank backbone part.

>>> import torch
>>> from torch import nn
>>> from torch.utils.data import TensorDataset
>>> from ptyl.priors import make_prior
>>> from ptyl.training import fit
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
>>> model = nn.Sequential(); model.add_module("body", nn.Linear(3, 4)); model.add_module("head", nn.Linear(4, 2))
>>> prior = make_prior(model, "l2sp", variance=1.0)
>>> result = fit(model, data, prior, epochs=3, progress=False)
>>> predictive = laplace(result, data, prior)
>>> predictive.predict(data).shape
torch.Size([64, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ptyl.autotune.curvature import MAX_DENSE, compute_curvature
from ptyl.autotune.likelihoods import Categorical
from ptyl.batches import default_input, to_device
from ptyl.errors import ConfigError, DataError
from ptyl.inference.bma import _check_ordered
from ptyl.inference.laplace_posterior import PosteriorPrecision, prior_leaves_within
from ptyl.params import as_name_list, name_matches, named_parameters, normalize_name
from ptyl.priors.base import Prior
from ptyl.validation import check_choice, check_int

__all__ = ["CURVATURES", "LaplacePredictive", "PREDICTIVES", "SUBSETS", "laplace"]

SUBSETS = ("last-layer", "all")
CURVATURES = ("kfac", "diag")  # for subset "all"; the last layer always takes its exact dense GGN
PREDICTIVES = ("probit", "mc")


class LaplacePredictive:
    """The linearised Laplace predictive of a MAP model (see the module docstring); built by :func:`laplace`.

    Attributes:
        model: the MAP model (its BatchNorm statistics are the MAP's).
        posterior: the :class:`PosteriorPrecision` at the chosen ``prior_precision``.
        candidates: the posteriors at every tau given (``posterior`` is one of them).
        prior_precision: the chosen tau.
        predictive, mc_samples, seed: how :meth:`predict` averages.
        validation: ``[{"prior_precision", "val_nll"}]`` per value tried by :meth:`select` (empty otherwise).
        evidence: ``[{"prior_precision", "log_evidence"}]`` per value tried by :meth:`select_by_evidence`.
        log_likelihood: the summed training log-likelihood at the MAP.
    """

    def __init__(self, model: nn.Module, posterior: PosteriorPrecision, *, predictive: str, mc_samples: int,
                 seed: int, batch_size: int, collate_fn: Callable | None, log_likelihood: float,
                 candidates: Sequence[PosteriorPrecision] | None = None) -> None:
        self.model, self.posterior = model, posterior
        self.candidates = list(candidates) if candidates else [posterior]
        self.prior_precision = posterior.prior_precision
        self.predictive, self.mc_samples, self.seed = predictive, mc_samples, seed
        self.batch_size, self.collate_fn = batch_size, collate_fn
        self.log_likelihood = log_likelihood
        self.validation: list[dict[str, float]] = []
        self.evidence: list[dict[str, float]] = []

    def predict(self, data: Dataset | Iterable, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Class probabilities ``[N, C]`` (float32, CPU) of the linearised predictive.

        Args:
            data: a Dataset (read in order) or a loader that does not shuffle.
            batch_size: for a Dataset (default: the one :func:`laplace` was given).
            progress: a progress bar.

        Returns:
            The probabilities.
        """
        loader = _loader(data, batch_size or self.batch_size, self.collate_fn)
        means, covs = logit_moments(self.model, loader, self.posterior.names, [self.posterior], progress=progress)
        return average_softmax(means, covs[0], self.predictive, self.mc_samples, self.seed)

    def select(self, val_data: Dataset | Iterable, progress: bool = False) -> dict[str, float]:
        """Choose tau among :attr:`candidates` by the predictive's NLL on ``val_data`` (the logits' Jacobians are
        computed once per batch for every candidate). A tuning trial calls this with its validation data
        (:class:`ptyl.tuning.trials.TrialRunner`): the same choice as tau on a grid axis, at one MAP fit per point.

        Args:
            val_data: labelled validation data (a Dataset or an ordered loader of ``(inputs, targets)``).
            progress: a progress bar.

        Returns:
            ``{"laplace_prior_precision": tau}``, the choice as a :class:`~ptyl.training.TrainConfig` override.
        """
        if len(self.candidates) > 1:
            loader = _loader(val_data, self.batch_size, self.collate_fn)
            means, covs = logit_moments(self.model, loader, self.posterior.names, self.candidates, progress=progress)
            targets = _targets(loader)
            self.validation = []
            for post, cov in zip(self.candidates, covs, strict=False):
                probs = average_softmax(means, cov, self.predictive, self.mc_samples, self.seed)
                nll = float(torch.nn.functional.nll_loss(probs.double().clamp_min(1e-12).log(), targets))
                self.validation.append({"prior_precision": post.prior_precision, "val_nll": nll})
            self._choose(min(range(len(self.validation)), key=lambda i: self.validation[i]["val_nll"]))
        return {"laplace_prior_precision": self.prior_precision}

    def select_by_evidence(self, prior: Prior) -> dict[str, float]:
        """Choose tau among :attr:`candidates` by the Laplace evidence (:meth:`log_marginal_likelihood`; MacKay
        1992, Immer et al. 2021): for a :func:`laplace` call without validation data.

        Args:
            prior: the prior the MAP was trained under.

        Returns:
            ``{"laplace_prior_precision": tau}``.
        """
        if len(self.candidates) > 1:
            self.evidence = [{"prior_precision": post.prior_precision,
                              "log_evidence": self._log_evidence(prior, post, self.model)} for post in self.candidates]
            self._choose(max(range(len(self.evidence)), key=lambda i: self.evidence[i]["log_evidence"]))
        return {"laplace_prior_precision": self.prior_precision}

    def _choose(self, index: int) -> None:
        self.posterior = self.candidates[index]
        self.prior_precision = self.posterior.prior_precision

    def log_marginal_likelihood(self, prior: Prior, params: nn.Module | None = None) -> float:
        """The Laplace evidence ``log p(D | theta*) + log p(theta* | tau) + P/2 log 2 pi - 1/2 log det A`` of the
        subset (the other parameters conditioned on), under ``prior`` with its precision times tau.

        Args:
            prior: the prior the MAP was trained under.
            params: where theta* is read (default: the MAP model).

        Returns:
            The log evidence (a float).
        """
        return self._log_evidence(prior, self.posterior, params or self.model)

    def _log_evidence(self, prior: Prior, post: PosteriorPrecision, params: nn.Module) -> float:
        tau = post.prior_precision
        named = named_parameters(params)
        log_prior = 0.0
        for leaf in prior_leaves_within(prior, post.names):
            # log N(theta; mu, Sigma / tau) = log N(theta; mu, Sigma) - (tau - 1) q / 2 + P/2 log tau
            base = float(leaf.log_prob(named).detach())
            log_prior += base - 0.5 * (tau - 1.0) * _quadratic(leaf, named) + 0.5 * leaf.num_parameters * math.log(tau)
        p = post.num_parameters
        return self.log_likelihood + log_prior + 0.5 * p * math.log(2 * math.pi) - 0.5 * float(post.log_det())


def _quadratic(leaf: Prior, named: dict[str, torch.Tensor]) -> float:
    """(theta - mu)^T Sigma^-1 (theta - mu) of one leaf: twice the penalty minus its normaliser (penalty at mu)."""
    at_theta = float(leaf.penalty(named).detach())
    center = dict(zip(leaf.names, _split(leaf.mean_flat().double(), leaf.shapes), strict=False))
    at_mean = float(leaf.penalty({n: t.to(named[n]) for n, t in center.items()}).detach())
    return 2.0 * (at_theta - at_mean)


def _split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def laplace(
    model: nn.Module | Any,
    train_data: Dataset | DataLoader,
    prior: Prior,
    *,
    subset: str = "last-layer",
    curvature: str = "kfac",
    prior_precision: float | Sequence[float] = 1.0,
    val_data: Dataset | DataLoader | None = None,
    predictive: str = "probit",
    mc_samples: int = 100,
    num_data: int | None = None,
    head: str | Sequence[str] | None = "head",
    batch_size: int = 128,
    collate_fn: Callable | None = None,
    seed: int = 0,
    progress: bool = False,
) -> LaplacePredictive:
    """The Laplace approximation around a MAP model and its linearised predictive (see the module docstring).

    Args:
        model: the MAP model, or a :class:`~ptyl.training.FitResult` of a MAP run (its ``model``).
        train_data: the data it was trained on (the GGN is summed over it).
        prior: the prior it was trained under (:func:`ptyl.priors.make_prior`).
        subset: ``"last-layer"`` (the prior leaves inside ``head``) or ``"all"`` (every leaf of ``prior``).
        curvature: ``"kfac"`` or ``"diag"`` for ``subset="all"``.
        prior_precision: tau, or several values: the one with the lowest NLL on ``val_data`` is chosen, or without
            ``val_data`` the one of the highest Laplace evidence (:meth:`LaplacePredictive.select_by_evidence`).
        val_data: validation data to choose among several ``prior_precision`` values.
        predictive: ``"probit"`` or ``"mc"``.
        mc_samples: logit draws per example for ``"mc"``.
        num_data: N of the training objective ``mean loss - log p(theta) / N`` (default: the size of
            ``train_data``); the GGN is scaled to N examples.
        head: the head's module name(s) (``subset="last-layer"``).
        batch_size, collate_fn: batching of Datasets.
        seed: seeds the MC draws.
        progress: progress bars.

    Returns:
        A :class:`LaplacePredictive` (``.predict(data)``).

    Raises:
        ConfigError: an unknown option, no ``prior_precision`` value, or a subset without a prior over it.
    """
    model = getattr(model, "model", model)
    check_choice(subset, SUBSETS, "Laplace subset")
    check_choice(curvature, CURVATURES, "Laplace curvature")
    check_choice(predictive, PREDICTIVES, "Laplace predictive")
    mc_samples = check_int(mc_samples, "mc_samples", minimum=1)
    taus = [float(t) for t in (prior_precision if isinstance(prior_precision, Sequence) else [prior_precision])]
    if not taus:
        raise ConfigError("prior_precision needs at least one value")
    names = _subset_names(model, prior, subset, head)
    method = "full" if subset == "last-layer" and _size(model, names) <= MAX_DENSE else curvature
    loader = _loader(train_data, batch_size, collate_fn)
    curv = compute_curvature(model, loader, Categorical(), names, method=method)
    n = int(num_data or curv.num_data)
    if n != curv.num_data:
        curv = curv.scaled(n / curv.num_data, n)
    posteriors = [PosteriorPrecision(curv, prior, names, tau) for tau in taus]
    out = LaplacePredictive(model, posteriors[0], predictive=predictive, mc_samples=mc_samples, seed=seed,
                            batch_size=batch_size, collate_fn=collate_fn, log_likelihood=curv.log_likelihood,
                            candidates=posteriors)
    if val_data is not None:
        out.select(val_data, progress=progress)
    else:
        out.select_by_evidence(prior)
    return out


def _subset_names(model: nn.Module, prior: Prior, subset: str, head) -> list[str] | None:
    if prior is None:
        raise ConfigError("Laplace needs the prior the MAP was trained under (prior=None has no posterior)")
    params = named_parameters(model)
    missing = [n for n in prior.names if n not in params]
    if missing:
        raise ConfigError(f"the prior covers parameters the model does not have: {missing[:4]}")
    if subset == "all":
        return [n for leaf in prior_leaves_within(prior, None) for n in leaf.names]
    heads = as_name_list(head)
    if not heads:
        raise ConfigError("subset 'last-layer' needs the head's module name (head=...)")
    in_head = [n for n in prior.names if any(name_matches(n, h) for h in heads)]
    leaves = [leaf for leaf in prior_leaves_within(prior, None) if set(leaf.names) <= set(in_head)]
    if not leaves:
        raise ConfigError(f"no prior leaf covers only the head {head!r}: the last-layer Laplace needs a head prior "
                          "(make_prior(..., head_variance=...))")
    return [n for leaf in leaves for n in leaf.names]


def _size(model: nn.Module, names: Sequence[str]) -> int:
    params = named_parameters(model)
    return sum(params[n].numel() for n in names)


def _loader(data: Dataset | Iterable, batch_size: int, collate_fn: Callable | None) -> Iterable:
    if isinstance(data, Dataset):
        extra = {"collate_fn": collate_fn} if collate_fn is not None else {}
        return DataLoader(data, batch_size=batch_size, shuffle=False, **extra)
    _check_ordered(data)
    return data


def _targets(loader: Iterable) -> torch.Tensor:
    out = []
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise DataError("validation data must yield (inputs, targets) batches")
        out.append(torch.as_tensor(batch[1]).long().cpu())
    return torch.cat(out)


def logit_moments(model: nn.Module, loader: Iterable, names: Sequence[str], posteriors: Sequence[PosteriorPrecision],
                  progress: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The linearised logits' means ``[N, C]`` and, per posterior, covariances ``[N, C, C]`` (float64, CPU).

    The Jacobian ``J(x) = d f(x) / d theta`` over ``names`` is taken per example (``torch.func.jacrev`` under
    ``vmap``, evaluation mode: the MAP's BatchNorm statistics) once per batch and shared by every posterior.
    """

    raw = dict(model.named_parameters())
    by_norm = {normalize_name(n): n for n in raw}
    wrt = {by_norm[n]: raw[by_norm[n]].detach() for n in names}
    fixed = {n: p.detach() for n, p in raw.items() if n not in wrt}
    fixed.update(dict(model.named_buffers()))
    order = [by_norm[n] for n in names]
    device = next(model.parameters()).device

    def logits(params, x):
        one = tree_map(lambda t: t.unsqueeze(0) if torch.is_tensor(t) else t, x)
        if isinstance(one, dict):
            return _as_logits(functional_call(model, {**fixed, **params}, (), one)).squeeze(0)
        return _as_logits(functional_call(model, {**fixed, **params}, (one,))).squeeze(0)

    jacobian = vmap(jacrev(logits), in_dims=(None, 0))
    was_training = model.training
    model.eval()
    means, covs = [], [[] for _ in posteriors]
    try:
        for batch in tqdm(loader, desc="Laplace predictive", disable=not progress, leave=False):
            x = to_device(default_input(batch), device)
            with torch.no_grad():
                f = _as_logits(model(**x) if isinstance(x, dict) else model(x))
                jac = jacobian(wrt, x)
            rows = torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in order], dim=2).double().cpu()
            means.append(f.double().cpu())
            for k, post in enumerate(posteriors):
                covs[k].append(post.covariance_blocks(rows))
    finally:
        model.train(was_training)
    if not means:
        raise DataError("the data yielded no batches")
    return torch.cat(means), [torch.cat(c) for c in covs]


def _as_logits(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ConfigError("the Laplace predictive is for classifiers returning [batch, classes] logits")
    return logits


def average_softmax(means: torch.Tensor, covs: torch.Tensor, predictive: str, mc_samples: int,
                    seed: int) -> torch.Tensor:
    """Class probabilities of Gaussian logits ``N(means, covs)``: the probit approximation or an MC average.

    Args:
        means: [N, C]; covs: [N, C, C].
        predictive: ``"probit"`` or ``"mc"``.
        mc_samples, seed: MC draws per example and their seed.

    Returns:
        [N, C] float32 probabilities.
    """
    if predictive == "probit":
        var = covs.diagonal(dim1=1, dim2=2).clamp(min=0.0)
        return torch.softmax(means / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=1).float()
    generator = torch.Generator().manual_seed(seed)
    c = means.shape[1]
    jitter = 1e-10 * torch.eye(c, dtype=covs.dtype) * covs.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-12)
    chol = torch.linalg.cholesky(0.5 * (covs + covs.transpose(1, 2)) + jitter)
    eps = torch.randn(mc_samples, *means.shape, dtype=means.dtype, generator=generator)
    draws = means.unsqueeze(0) + torch.einsum("nij,snj->sni", chol, eps)
    return torch.softmax(draws, dim=2).mean(0).float()
