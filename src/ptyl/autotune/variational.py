"""Diagonal Gaussian variational posterior q(theta) = N(m, diag s^2) around a model's weights.

The mean m *is* the model's parameters (so MAP-style predictions use the model as it is); q adds one log standard
deviation per covered parameter. Reparameterisation (Kingma & Welling 2014): theta = m + s * e, e ~ N(0, I).
Parameters outside q (left without a prior) stay point estimates.

    KL(q || p) = -E_q[log p(theta)] - H[q],   H[q] = sum log s + P/2 (1 + log 2 pi)

with E_q[log p] closed form for every prior family (:meth:`~ptyl.autotune.families.LeafFamily.expected_log_prob`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ptyl.autotune.families import Family
from ptyl.errors import ConfigError
from ptyl.params import normalize_name


class VariationalPosterior(nn.Module):
    """q = N(m, diag s^2) over the parameters ``names`` of ``model``; ``m`` is read from the model on every call."""

    def __init__(self, model: nn.Module, names: Sequence[str], init_std: float | Mapping[str, torch.Tensor] = 1e-3):
        """``init_std``: one number, or name -> tensor of initial standard deviations."""
        super().__init__()
        if not isinstance(init_std, Mapping) and not (
                isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
            raise ConfigError(f"init_std must be a positive finite number, got {init_std!r}")
        raw = {normalize_name(n): n for n, _ in model.named_parameters()}
        missing = [n for n in names if n not in raw]
        if missing:
            raise ConfigError(f"the model has no parameter(s) {missing[:5]}")
        params = dict(model.named_parameters())
        self.names: tuple[str, ...] = tuple(names)
        self.raw_names: tuple[str, ...] = tuple(raw[n] for n in names)
        def log_std(name: str, raw_name: str) -> torch.Tensor:
            p = params[raw_name].detach()
            if isinstance(init_std, Mapping):
                return init_std[name].detach().to(p).log().reshape(p.shape).clone()
            return torch.full_like(p, math.log(init_std))

        self.log_std = nn.ParameterList([nn.Parameter(log_std(n, r))
                                         for n, r in zip(self.names, self.raw_names, strict=True)])

    def means(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {n: params[r] for n, r in zip(self.names, self.raw_names, strict=False)}

    def variances(self) -> dict[str, torch.Tensor]:
        return {n: (2.0 * s).exp() for n, s in zip(self.names, self.log_std, strict=False)}

    def std(self) -> dict[str, torch.Tensor]:
        return {n: s.exp() for n, s in zip(self.names, self.log_std, strict=False)}

    def sample(self, model: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Raw parameter name -> m + s * e (differentiable in m and s), for ``functional_call``."""
        params = dict(model.named_parameters())
        out = {}
        for r, s in zip(self.raw_names, self.log_std, strict=False):
            noise = torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
            out[r] = params[r] + s.exp() * noise
        return out

    def entropy(self) -> torch.Tensor:
        total = sum(s.double().sum() for s in self.log_std)
        count = sum(s.numel() for s in self.log_std)
        return total + 0.5 * count * (1.0 + math.log(2.0 * math.pi))

    def kl(self, model: nn.Module, family: Family) -> torch.Tensor:
        """KL(q || p_h), differentiable in m, s and the family's hyper-parameters (float64)."""
        return -family.expected_log_prob(self.means(model), self.variances()) - self.entropy()

    @torch.no_grad()
    def sample_states(self, model: nn.Module, num_samples: int, generator: torch.Generator | None = None):
        """``num_samples`` full state dicts of ``model`` (buffers included) with the covered parameters drawn from
        q, for a :class:`~ptyl.inference.SampleBank` (Bayesian model averaging over q)."""
        state = model.state_dict(keep_vars=False)
        for _ in range(num_samples):
            draw = self.sample(model, generator)
            yield {k: draw[k].detach() if k in draw else v for k, v in state.items()}


class SampledModel(nn.Module):
    """Calls ``model`` with the parameters set to the current draw (``functional_call``), so any objective
    ``objective(model, batch)`` sees a sample of q."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.draw: dict[str, torch.Tensor] = {}

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.draw, args, kwargs, strict=False)


__all__ = ["SampledModel", "VariationalPosterior"]
