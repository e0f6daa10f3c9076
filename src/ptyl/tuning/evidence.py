"""Choosing the prior scale without a validation grid: the Laplace approximation to the marginal likelihood.

For a prior p(theta | lam) (lam = the scale of a learned prior, or the variance of an isotropic one) the evidence is
approximated around the MAP estimate theta* (MacKay 1992; Immer et al., "Scalable Marginal Likelihood Estimation for
Model Selection in Deep Learning", ICML 2021, https://arxiv.org/abs/2104.04975):

    log p(D | lam) ≈ log p(D | theta*) + log p(theta* | lam) + (P/2) log 2 pi - 1/2 log det(H_lik + Sigma_lam^-1)

- ``H_lik`` is the diagonal GGN or empirical Fisher of the summed negative log-likelihood at theta*
  (:func:`ptyl.tuning.curvature.curvature`).
- ``log det(diag(h) + Sigma^-1)`` has two variants (``approximation``):
    * ``"exact"`` (default): exact for the diagonal ``H_lik``. Diagonal and isotropic priors are diagonal anyway; for
      the low-rank prior ``Sigma = diag(d) + U U^T`` (U: P x k) the matrix determinant lemma gives, in O(P k^2),
      ``log det = sum_j log(h_j + 1/d_j) - log det(I_k + U^T D^-1 U) + log det(I_k + U^T diag(h / (1 + d h)) U)``.
    * ``"diag"``: ``sum_j log(h_j + [Sigma^-1]_jj)``, i.e. the prior precision is replaced by its diagonal too. For the
      low-rank prior that diagonal is exact by Woodbury, ``diag(D^-1 - D^-1 U C^-1 U^T D^-1)``, in O(P k^2).
  ``log p(theta* | lam)`` always uses the full prior.

When the likelihood is Gaussian and the model linear in theta, the log-joint is quadratic, so with orthogonal features
(diagonal ``H_lik``) the ``"exact"`` estimate equals the closed-form marginal likelihood (tested).

:func:`select_prior_scale` alternates, for ``rounds`` rounds, (a) a MAP fit at the current lam and (b) maximisation of
the evidence over log lam with theta* held fixed (a dense log grid, then golden-section refinement; each evaluation is
O(P k^2) because ``H_lik`` is computed once per round). This is MacKay's fixed-point scheme: at a fixed point the
gradient in lam equals that of the true Laplace evidence (the dependence of theta* on lam drops out at the MAP).

Caveats. A diagonal ``H_lik`` overstates ``log det`` (Hadamard's inequality), i.e. the Occam penalty of weak priors,
so the diagonal Laplace evidence leans towards strong priors (Immer et al. use KFAC for this reason); theta* must be
a converged MAP. On an MLP fine-tuned on 50 digits it chose much stronger priors than validation did (GGN), while the
empirical Fisher, smaller at a well-fit MAP, chose a variance close to the best test one. Check the curve.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.params import named_parameters
from ptyl.priors.base import LOG_2PI, CompositePrior, Prior
from ptyl.priors.diagonal import DiagonalGaussianPrior
from ptyl.priors.factory import make_prior
from ptyl.priors.isotropic import IsotropicGaussianPrior
from ptyl.priors.lowrank import LowRankGaussianPrior
from ptyl.priors.registry import PriorKind
from ptyl.training.config import TrainConfig
from ptyl.training.fit import fit
from ptyl.training.registry import Inference
from ptyl.training.result import FitResult
from ptyl.tuning.curvature import LIKELIHOODS, Curvature, curvature, gaussian_objective
from ptyl.validation import check_choice, check_int, check_positive_number

__all__ = [
    "APPROXIMATIONS",
    "EvidenceResult",
    "laplace_log_evidence",
    "posterior_log_det",
    "prior_precision_diagonal",
    "select_prior_scale",
]

APPROXIMATIONS = ("exact", "diag")

def _leaves(prior: Prior) -> list[Prior]:
    if isinstance(prior, CompositePrior):  # block priors too: they are composite
        return [leaf for part in prior.parts.values() for leaf in _leaves(part)]
    return [prior]


# The two questions the evidence asks of a prior, answered per leaf in one place: by the Prior interface of issue 12
# (``precision_diagonal()``, ``posterior_log_det(h)``, PLAN.md "Contracts") where the prior has it.
# TODO(issue 12): once every prior has those methods (the `speed` branch), drop the per-class fallbacks below, which
# read the priors' private buffers.
def _precision_diagonal(leaf: Prior) -> torch.Tensor:
    """diag(Sigma^-1) of one leaf prior, flat float64 in ``leaf.names`` order (Woodbury for the low-rank prior)."""
    if hasattr(leaf, "precision_diagonal"):
        return leaf.precision_diagonal().double().cpu()
    if isinstance(leaf, IsotropicGaussianPrior):
        return torch.full((leaf.num_parameters,), 1.0 / leaf.variance, dtype=torch.float64)
    if isinstance(leaf, DiagonalGaussianPrior):
        return torch.cat([getattr(leaf, f"var_{i}").double().reshape(-1) for i in range(len(leaf.names))]).reciprocal()
    if isinstance(leaf, LowRankGaussianPrior):
        d, u, chol = _lowrank_parts(leaf)
        v = torch.linalg.solve_triangular(chol, u / d, upper=False)  # L^-1 U^T D^-1, [k, P]
        return 1.0 / d - v.pow(2).sum(0)
    raise ConfigError(f"the Laplace evidence does not know the prior type {type(leaf).__name__}")


def _log_det(leaf: Prior, h: torch.Tensor, approximation: str) -> float:
    """log det(diag(h) + Sigma^-1) of one leaf (``"diag"``: with Sigma^-1 replaced by its diagonal)."""
    if approximation == "exact" and hasattr(leaf, "posterior_log_det"):
        device = next((b.device for b in leaf.buffers()), h.device)
        return float(leaf.posterior_log_det(h.to(device)))
    if isinstance(leaf, LowRankGaussianPrior) and approximation == "exact":
        d, u, chol = _lowrank_parts(leaf)
        h = h.to(d.device)
        g = h / (1.0 + d * h)
        inner = torch.eye(leaf.rank, dtype=torch.float64, device=d.device) + (u * g) @ u.T
        return float(torch.log(h + 1.0 / d).sum() - 2.0 * chol.diagonal().log().sum() + torch.linalg.slogdet(inner)[1])
    precision = _precision_diagonal(leaf)
    return float(torch.log(h.to(precision.device) + precision).sum())


def _lowrank_parts(prior: LowRankGaussianPrior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d [P], U [k, P] in float64 and the Cholesky factor of C = I + U D^-1 U^T."""
    _, d, u = prior.flat_parts(torch.float64)
    return d, u, prior.capacitance_chol.double().to(d.device)


def _hessian_vector(prior: Prior, hessian_diag: dict[str, torch.Tensor]) -> torch.Tensor:
    missing = [n for n in prior.names if n not in hessian_diag]
    if missing:
        raise InvalidValueError(f"no curvature for prior parameter(s) {missing[:5]}")
    return torch.cat([hessian_diag[n].double().reshape(-1).cpu() for n in prior.names])


def prior_precision_diagonal(prior: Prior) -> dict[str, torch.Tensor]:
    """Exact diagonal of Sigma^-1 for every parameter of ``prior`` (name -> float64 tensor of its shape)."""
    out: dict[str, torch.Tensor] = {}
    for leaf in _leaves(prior):
        flat = _precision_diagonal(leaf)
        offset = 0
        for name, shape in zip(leaf.names, leaf.shapes):
            size = math.prod(shape)
            out[name] = flat[offset:offset + size].reshape(shape)
            offset += size
    return out


def posterior_log_det(prior: Prior, hessian_diag: dict[str, torch.Tensor], approximation: str = "exact") -> float:
    """``log det(diag(h) + Sigma^-1)`` over the prior's parameters (see the module docstring for the variants).

    Args:
        prior: any ptyl prior (composite priors sum over their parts).
        hessian_diag: name -> diagonal curvature ``h`` (e.g. :attr:`Curvature.hessian_diag`).
        approximation: ``"exact"`` or ``"diag"``.
    """
    check_choice(approximation, APPROXIMATIONS, "approximation")
    return sum(_log_det(leaf, _hessian_vector(leaf, hessian_diag), approximation) for leaf in _leaves(prior))


def laplace_log_evidence(
    model: nn.Module,
    prior: Prior,
    train_set: Dataset | DataLoader | None = None,
    *,
    likelihood: str = "categorical",
    hessian: str = "ggn",
    noise_variance: float = 1.0,
    approximation: str = "exact",
    batch_size: int = 256,
    curvature_at_map: Curvature | None = None,
) -> float:
    """Laplace estimate of ``log p(D | prior)`` with the model's weights taken as the MAP theta*.

    Trainable parameters the prior does not cover are treated as fixed (conditioned on), with a warning.

    Args:
        model: the model at theta*.
        prior: the prior whose evidence is estimated.
        train_set: the data (not needed with ``curvature_at_map``).
        likelihood, hessian, noise_variance, batch_size: see :func:`ptyl.tuning.curvature`.
        approximation: ``"exact"`` or ``"diag"`` (see :func:`posterior_log_det`).
        curvature_at_map: a :class:`Curvature` computed once, to evaluate many priors at one theta* without touching
            the data.

    Returns:
        ``log p(D | prior)`` (Laplace).
    """
    if curvature_at_map is None:
        if train_set is None:
            raise ConfigError("laplace_log_evidence needs train_set or curvature_at_map")
        curvature_at_map = curvature(model, train_set, list(prior.names), likelihood=likelihood, hessian=hessian,
                                     noise_variance=noise_variance, batch_size=batch_size)
    params = named_parameters(model)
    uncovered = [n for n, p in params.items() if p.requires_grad and n not in prior.names
                 and n not in getattr(prior, "unregularized", ())]
    if uncovered:
        warnings.warn(f"{len(uncovered)} trainable parameter(s) have no prior and are held fixed in the evidence: "
                      f"{uncovered[:5]}")
    with torch.no_grad():
        theta = {n: params[n].detach().double() for n in prior.names}
        log_prior = float(prior.log_prob(theta))
    log_det = posterior_log_det(prior, curvature_at_map.hessian_diag, approximation)
    return curvature_at_map.log_likelihood + log_prior + 0.5 * prior.num_parameters * LOG_2PI - 0.5 * log_det


# --- choosing the scale ---------------------------------------------------------------------------------------


@dataclass
class EvidenceResult:
    """Outcome of :func:`select_prior_scale`.

    Attributes:
        scale: the selected lam.
        log_evidence_curve: ``{"scale": [...], "log_evidence": [...]}`` of the last round (dense grid + refinement
            points, sorted by scale), theta* fixed at that round's MAP.
        final: the fit at the selected scale (with the caller's config) — ``None`` only if ``refit=False``.
        rounds: per round: the scale fit at, the scale selected and the maximal log-evidence.
        final_log_evidence: the evidence at the final MAP (``None`` if the final fit is not a MAP fit).
        edge_warning: the maximiser lies at a bound of the search interval.
    """

    scale: float
    log_evidence_curve: dict[str, list[float]]
    final: FitResult | None
    rounds: list[dict[str, float]] = field(default_factory=list)
    final_log_evidence: float | None = None
    edge_warning: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Everything but the trained model.

        Returns:
            A JSON-ready dict (``scale``, ``log_evidence_curve``, ``rounds``, ...).
        """
        return {"scale": self.scale, "log_evidence_curve": self.log_evidence_curve, "rounds": self.rounds,
                "final_log_evidence": self.final_log_evidence, "edge_warning": self.edge_warning}

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically.

        Returns:
            ``path``.
        """
        from ptyl.metrics.results import save_json

        return save_json(path, self.to_dict())


def _maximise_log_scale(fn: Callable[[float], float], bounds: tuple[float, float], points_per_decade: int,
                        refine_steps: int = 30) -> tuple[float, list[tuple[float, float]]]:
    """Maximise ``fn(log10 lam)``: dense grid over the bounds, then golden-section search around the best point."""
    lo, hi = math.log10(bounds[0]), math.log10(bounds[1])
    n = max(int(math.ceil((hi - lo) * points_per_decade)) + 1, 3)
    grid = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    values = [fn(t) for t in grid]
    evaluated = list(zip(grid, values))
    best = max(range(n), key=lambda i: values[i])
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, n - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    evaluated += [(c, fc), (d, fd)]
    for _ in range(refine_steps):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
            evaluated.append((c, fc))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
            evaluated.append((d, fd))
    top = max(evaluated, key=lambda tv: tv[1])
    return top[0], sorted(evaluated)


def select_prior_scale(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    posterior=None,
    *,
    kind: str | PriorKind = PriorKind.LOWRANK,
    eps: float = 0.0,
    rank: int | None = None,
    rounds: int = 2,
    config: TrainConfig | None = None,
    init_scale: float = 1.0,
    bounds: tuple[float, float] = (1e-4, 1e4),
    head: str | Sequence[str] | None = "head",
    head_variance: float | None = 1.0,
    likelihood: str = "categorical",
    noise_variance: float = 1.0,
    hessian: str = "ggn",
    approximation: str = "exact",
    points_per_decade: int = 10,
    objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    refit: bool = True,
    progress: bool = True,
) -> EvidenceResult:
    """Choose lam by maximising the Laplace evidence, alternating MAP fits and 1-D evidence maximisation.

    Args:
        model_fn: returns a fresh pretrained / initialised model on every call.
        posterior: the source posterior of a learned ``kind``. For an isotropic kind (``"standard"`` /
            ``"l2sp"``) the selected "scale" is the prior variance (its recipe's strength axis) and ``posterior`` is
            unused.
        eps, rank, head, head_variance: as in :func:`ptyl.priors.make_prior` (the head prior is not tuned).
        rounds: MAP fit -> maximise evidence, this many times (rounds >= 1).
        config: training settings; the rounds always fit by MAP (``inference="map"``), the final fit at the
            selected scale uses ``config`` as given (so it may sample, e.g. ``inference="csgld"``).
        bounds: search interval for lam (inclusive); a maximiser at a bound sets ``edge_warning`` and warns.
        likelihood / noise_variance / hessian / approximation: see :func:`curvature` and :func:`posterior_log_det`.
            With ``likelihood="gaussian"`` the training objective defaults to :func:`gaussian_objective`.
        points_per_decade: density of the log grid the evidence is maximised on.
        objective: the training objective.
        refit: fit at the selected scale with ``config`` (``final``).
        progress: a progress bar.

    Returns:
        An :class:`EvidenceResult`.
    """
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(approximation, APPROXIMATIONS, "approximation")
    check_positive_number(init_scale, "init_scale")
    if not (len(bounds) == 2 and 0 < bounds[0] < bounds[1] and math.isfinite(bounds[1])):
        raise InvalidValueError(f"bounds must be (low, high) with 0 < low < high, got {bounds!r}")
    check_int(rounds, "rounds", minimum=1)
    kind = PriorKind.parse(kind)
    axis = kind.recipe.axis
    if kind.recipe.needs_posterior and posterior is None:
        raise ConfigError(f"prior kind {str(kind)!r} needs the source posterior")
    if axis is None:
        raise ConfigError(f"prior kind {str(kind)!r} has no scale to select; choose one of "
                          f"{tuple(str(k) for k in PriorKind if k.recipe.axis)}")
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    config.validate()
    if objective is None and likelihood == "gaussian":
        objective = gaussian_objective(noise_variance)
    map_config = TrainConfig(**{**asdict(config), "inference": Inference.MAP, "progress": False})
    final_is_map = Inference.parse(config.inference) is Inference.MAP

    def build_prior(model: nn.Module, scale: float) -> Prior:
        return make_prior(model, kind, posterior=posterior, eps=eps, rank=rank, head=head,
                          head_variance=head_variance, **{axis: scale})

    def fresh_fit(scale: float, cfg: TrainConfig) -> tuple[FitResult, nn.Module]:
        torch.manual_seed(cfg.seed)  # the same initial head for every scale
        model = model_fn()
        prior = build_prior(model, scale)  # built before training: l2sp centres on the pretrained weights
        return fit(model, train_set, prior, cfg, objective=objective, head=head), prior

    scale, history, curve, last = float(init_scale), [], [], None
    for r in tqdm(range(rounds), desc="evidence", disable=not progress):
        result, prior = fresh_fit(scale, map_config)
        model = result.model
        curv = curvature(model, train_set, list(prior.names), likelihood=likelihood, hessian=hessian,
                         noise_variance=noise_variance, batch_size=config.batch_size * 8)

        def log_evidence(log10_scale: float) -> float:
            return laplace_log_evidence(model, build_prior(model, 10.0**log10_scale), approximation=approximation,
                                        curvature_at_map=curv)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the uncovered-parameter warning would repeat per evaluation
            best_log, curve = _maximise_log_scale(log_evidence, bounds, points_per_decade)
        history.append({"round": r + 1, "fit_scale": scale, "selected_scale": 10.0**best_log,
                        "log_evidence": max(v for _, v in curve)})
        last = (scale, result, curv)
        scale = 10.0**best_log
    span = math.log10(bounds[1]) - math.log10(bounds[0])
    edge = min(abs(math.log10(scale) - math.log10(b)) for b in bounds) < 1e-3 * span
    if edge:
        warnings.warn(f"the evidence is maximised at the bound lam={scale:g} of {bounds}: widen the bounds")
    final, final_evidence = None, None
    if refit:
        reuse = last[0] == scale and final_is_map
        final = last[1] if reuse else fresh_fit(scale, config)[0]
        if final_is_map:
            torch.manual_seed(config.seed)  # l2sp is centred on the *pretrained* weights: rebuild from a fresh model
            final_prior = build_prior(model_fn(), scale)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                final_evidence = laplace_log_evidence(final.model, final_prior, train_set, likelihood=likelihood,
                                                      hessian=hessian, noise_variance=noise_variance,
                                                      approximation=approximation, batch_size=config.batch_size * 8,
                                                      curvature_at_map=last[2] if reuse else None)
    curve_dict = {"scale": [10.0**t for t, _ in curve], "log_evidence": [v for _, v in curve]}
    return EvidenceResult(scale, curve_dict, final, history, final_evidence, edge)
