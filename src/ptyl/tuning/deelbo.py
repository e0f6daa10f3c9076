"""The data-emphasized ELBO as a training strategy: the weights, a diagonal Gaussian q around them and the prior's
hyper-parameters learned in one run of the training loop.

Harvey, Petrov & Hughes, "Learning the regularization strength for deep fine-tuning via a data-emphasized variational
objective" (2024), https://arxiv.org/abs/2410.19675. The objective (see :mod:`ptyl.autotune.deelbo`), per example:

    loss = mean_batch[-log p(y | x, m + s e)] + KL(q || p_h) / (kappa N),    kappa = max(1, P / N)

Its gradients are taken where they are cheap. The data term is back-propagated through one draw of q (into the
weights m and log s). The KL term's gradients in m and log s are closed form at the current h,

    d KL / d m = Sigma_h^-1 (m - mu)  (the prior's ``add_grad_``: a few fused kernels, O(P k)),
    d KL / d log s = s^2 diag(Sigma_h^-1) - 1  (``precision_diagonal()``, cached per h: O(P)),

so a step costs about one MAP step. Every ``hyper_every`` training steps the hyper-parameters are updated on the KL
(its gradient in h has no data term) and the cached prior is rebuilt. ``hyper_solver="exact"`` (default) moves them
to the minimiser of KL(q || p_h) at the current q, as the reference code does in closed form for its scalar
lambda (L-BFGS in log h, a few O(P k^2) evaluations with eps > 0, amortised over ``hyper_every`` steps);
``"adam"`` takes one Adam step at ``hyper_every`` times ``hyper_lr`` (rate-limited: on the 60-step text runs of
``benchmarks/results/autotune.md`` lambda was still falling by e^-1 per update when the run ended). The
weights use the run's own optimizer, learning rate and schedule (exactly as MAP training), log s its own Adam. The
trained model is the variational mean (MAP-style predictions); with ``bma_samples`` the strategy also returns that
many draws of q, and ``FitResult.predict`` averages over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ptyl.autotune.deelbo import resolve_kappa
from ptyl.autotune.families import Family
from ptyl.autotune.variational import SampledModel, VariationalPosterior
from ptyl.errors import ConfigError
from ptyl.inference.samples import SampleBank
from ptyl.training.callbacks import Callback
from ptyl.training.strategies.map import MAPStrategy
from ptyl.tuning.automatic import AutomaticRun, AutomaticSettings, AutomaticTuner
from ptyl.validation import check_choice, check_int, check_positive_number

if TYPE_CHECKING:
    from ptyl.training.config import TrainConfig
    from ptyl.training.trainer import Trainer

__all__ = ["HYPER_SOLVERS", "DEELBOSettings", "DEELBOStrategy", "DEELBOTuner"]

HYPER_SOLVERS = ("exact", "adam")
# log h stays within e^+-LOG_LIMIT (1e-13 .. 1e13): a KL flat in h (no displacement to explain) cannot run it off
LOG_LIMIT = 30.0


def single_process(trainer: Trainer, what: str) -> None:
    """Automatic tuning keeps its hyper-parameters on one process (no gradient averaging for them under DDP)."""
    if type(trainer.env).__name__ != "Environment":
        raise ConfigError(f"{what} runs in one process; run it without torchrun")


class DEELBOStrategy(MAPStrategy):
    """Learn the prior's hyper-parameters with the DE-ELBO while training (see the module docstring).

    Args:
        config: the run's :class:`~ptyl.training.TrainConfig` (the weights' optimizer, lr, head_lr, schedule).
        family: the prior family over the same model (:func:`ptyl.autotune.build_family`); its ``nn.Parameter`` s
            are learned.
        kappa: likelihood weight (``None``: max(1, P / N); 1 is the ordinary ELBO).
        init_std: initial standard deviation of q (the phase-A sanity runs: 1e-3 kept q out of the way of the
            first steps; q at the prior's spread made them noise).
        hyper_lr, std_lr: Adam learning rates of log h (per training step; ``hyper_solver="adam"``) and log s.
        hyper_every: training steps per hyper-parameter step.
        hyper_solver: ``"exact"`` (the minimiser of the KL in h at each update) or ``"adam"`` (one Adam step).
        num_samples: draws of q per step.
        bma_samples: draws of q returned for Bayesian model averaging (0: the variational mean predicts).
    """

    def __init__(self, config: TrainConfig, family: Family, *, kappa: float | None = None, init_std: float = 1e-3,
                 hyper_lr: float = 0.1, std_lr: float = 1e-2, hyper_every: int = 10, num_samples: int = 1,
                 bma_samples: int = 0, hyper_solver: str = "exact") -> None:
        super().__init__(config)
        self.family = family
        self.kappa_option = None if kappa is None else check_positive_number(kappa, "kappa")
        self.init_std = check_positive_number(init_std, "init_std")
        self.hyper_lr = check_positive_number(hyper_lr, "hyper_lr")
        self.std_lr = check_positive_number(std_lr, "std_lr")
        self.hyper_every = check_int(hyper_every, "hyper_every", minimum=1)
        self.num_samples = check_int(num_samples, "num_samples", minimum=1)
        self.bma_samples = check_int(bma_samples, "bma_samples", minimum=0)
        self.hyper_solver = check_choice(hyper_solver, HYPER_SOLVERS, "hyper_solver")
        if not list(family.parameters()):
            raise ConfigError("the prior family has no learnable hyper-parameter (see build_family(learn=...))")

    def setup(self, trainer: Trainer) -> None:
        single_process(trainer, "DE-ELBO")
        if self.config.precision == "fp16":  # q's gradients would stay scaled: its optimizer is not the scaler's
            raise ConfigError("DE-ELBO trains in fp32 or bf16, not fp16")
        super().setup(trainer)
        self.family.to(trainer.device)
        self.kappa = resolve_kappa(self.kappa_option, self.family.num_parameters, trainer.num_data)
        self.weight = 1.0 / (self.kappa * trainer.num_data)  # of the KL term, per example
        self.q = VariationalPosterior(trainer.model, self.family.names, self.init_std).to(trainer.device)
        self.std_optimizer = torch.optim.Adam(self.q.parameters(), lr=self.std_lr)
        self.hyper_optimizer = torch.optim.Adam(self.family.parameters(), lr=self.hyper_lr * self.hyper_every)
        self.generator = torch.Generator(device=trainer.device).manual_seed(self.config.seed)
        self.sampled = SampledModel(trainer.model)
        self._refresh(trainer.model)

    @torch.no_grad()
    def _refresh(self, model) -> None:
        """The prior at the current h, diag(Sigma^-1) per q tensor, and the KL term's value (for the log)."""
        self.prior = self.family.to_prior().to(self.q.log_std[0].device)
        flat = self.prior.precision_diagonal()
        by_name = dict(zip(self.prior.names, flat.split([math.prod(s) for s in self.prior.shapes]), strict=False))
        self.precision = [by_name[n].to(s.dtype).reshape(s.shape)
                          for n, s in zip(self.q.names, self.q.log_std, strict=True)]
        self.kl_term = (self.q.kl(model, self.family) * self.weight).float().to(self.q.log_std[0].device)

    def data_loss(self, trainer: Trainer, batch: Any) -> torch.Tensor:
        """The mean NLL under ``num_samples`` draws of q (back-propagated into the weights m and log s)."""
        nll = 0.0
        for _ in range(self.num_samples):
            self.sampled.draw = self.q.sample(trainer.model, self.generator)
            nll = nll + trainer.objective(self.sampled, batch) / self.num_samples
        return nll

    def add_prior_grad(self, trainer: Trainer) -> torch.Tensor:
        """The KL term's closed-form gradients in m and log s at the current h (module docstring); returns
        KL(q || p_h) / (kappa N) as of the last hyper step."""
        self.prior.add_grad_(trainer.model, self.weight)
        with torch.no_grad():
            for log_std, precision in zip(self.q.log_std, self.precision, strict=False):
                grad = ((2.0 * log_std).exp() * precision - 1.0) * self.weight
                log_std.grad = grad if log_std.grad is None else log_std.grad.add_(grad)
        return self.kl_term

    def on_step(self, trainer: Trainer) -> None:
        self.std_optimizer.step()  # the loop zeroes only the weights' gradients
        self.std_optimizer.zero_grad(set_to_none=True)
        if (trainer.step + 1) % self.hyper_every == 0:
            self._hyper_step(trainer.model)
        super().on_step(trainer)

    def _hyper_step(self, model) -> None:
        """Update log h on KL(q || p_h) at the current q (only -E_q[log p_h] depends on h), see the module docstring."""
        means = {n: m.detach() for n, m in self.q.means(model).items()}
        variances = {n: v.detach() for n, v in self.q.variances().items()}
        params = list(self.family.parameters())
        if self.hyper_solver == "adam":
            self.hyper_optimizer.zero_grad(set_to_none=True)
            (-self.family.expected_log_prob(means, variances)).backward()
            self.hyper_optimizer.step()
        else:
            self._minimise_kl(params, means, variances)
        with torch.no_grad():
            for p in params:
                p.clamp_(-LOG_LIMIT, LOG_LIMIT)
        self._refresh(model)

    def _minimise_kl(self, params, means, variances) -> None:
        """L-BFGS (strong Wolfe) on -E_q[log p_h] / P in log h; a non-finite outcome keeps the previous h."""
        before = [p.detach().clone() for p in params]
        scale = 1.0 / self.family.num_parameters
        solver = torch.optim.LBFGS(params, lr=1.0, max_iter=20, tolerance_grad=1e-7, tolerance_change=1e-9,
                                   line_search_fn="strong_wolfe")

        def closure():
            solver.zero_grad(set_to_none=True)
            loss = -self.family.expected_log_prob(means, variances) * scale
            loss.backward()
            return loss

        solver.step(closure)
        with torch.no_grad():
            if not all(torch.isfinite(p).all() for p in params):
                for p, b in zip(params, before, strict=False):
                    p.copy_(b)
            for p in params:
                p.grad = None

    def callbacks(self) -> list[Callback]:
        return [_RecordDEELBO(self)]

    def finalize(self, trainer: Trainer) -> SampleBank | None:
        if not self.bma_samples:
            return None
        bank = SampleBank()
        for state in self.q.sample_states(trainer.model, self.bma_samples, self.generator):
            bank.add(state)
        return bank

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "family": self.family.state_dict(), "q": self.q.state_dict(),
                "std_optimizer": self.std_optimizer.state_dict(),
                "hyper_optimizer": self.hyper_optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.family.load_state_dict(state["family"])
        self.q.load_state_dict(state["q"])
        self.std_optimizer.load_state_dict(state["std_optimizer"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        self.generator.set_state(state["generator"])
        self._refresh(self.sampled.model)


class _RecordDEELBO(Callback):
    """Adds the hyper-parameters and the epoch's DE-ELBO estimate (-kappa N (loss + prior)) to the history."""

    def __init__(self, strategy: DEELBOStrategy) -> None:
        self.strategy = strategy

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        kappa = self.strategy.kappa
        record.update({"deelbo": -kappa * trainer.num_data * (record["loss"] + record["prior"]), "kappa": kappa,
                       **self.strategy.family.hyper_values()})


@dataclass
class DEELBOSettings(AutomaticSettings):
    """Settings of ``tune(..., strategy="de-elbo")`` (the fields of :class:`DEELBOStrategy`). Defaults:
    ``benchmarks/results/autotune_defaults.md`` (a held-out pair, MNIST-5k -> KMNIST, scored on a validation pool):
    hyper_lr 0.1 beat 1e-2 at each of init_std 1e-4, 1e-3, 1e-2 (pool NLL and accuracy, 2 seeds), init_std made no
    consistent difference (1e-3 kept); the exact hyper update (``hyper_solver="exact"``) tied that Adam setting there
    (pool NLL 2.05 vs 2.08 at n = 10, 0.603 vs 0.604 at n = 100) and is the default because it reaches the KL's
    minimiser in runs too short for Adam (the text pair's 60 steps) at ~15% more time per run on the image pairs.

    Attributes:
        hyper_lr: Adam learning rate of the log hyper-parameters per training step (``hyper_solver="adam"``).
        kappa, init_std, std_lr, hyper_every, hyper_solver, num_samples, bma_samples: as in
            :class:`DEELBOStrategy`.
    """

    hyper_lr: float = 0.1
    kappa: float | None = None
    init_std: float = 1e-3
    std_lr: float = 1e-2
    hyper_every: int = 10
    hyper_solver: str = "exact"
    num_samples: int = 1
    bma_samples: int = 0


class DEELBOTuner(AutomaticTuner):
    """``tune(..., strategy="de-elbo")``: one run of :class:`DEELBOStrategy`; the objective is the last epoch's
    DE-ELBO estimate."""

    Settings = DEELBOSettings
    metric = "deelbo"

    def parts(self, run: AutomaticRun) -> tuple[None, DEELBOStrategy, list]:
        s = self.settings
        strategy = DEELBOStrategy(run.config, run.family, kappa=s.kappa, init_std=s.init_std, hyper_lr=s.hyper_lr,
                                  std_lr=s.std_lr, hyper_every=s.hyper_every, num_samples=s.num_samples,
                                  bma_samples=s.bma_samples, hyper_solver=s.hyper_solver)
        return None, strategy, []
